"""Image files that fail to decode in the middle of a run: named once, decoded another way or left out.

The cheap check of `folder.py` runs before training; a file can still fail later: DALI's decoder
rejects some JPEGs that Pillow decodes (measured on DALI 2.4's CPU decoder: an APPn segment whose
length field is 0 or 1, `FF 00` or an RST marker between SOI and the first segment), nvJPEG on a
GPU may reject a different set, and any file can be truncated, made unreadable or deleted
after the check. The loaders report such a file here (`BadFiles.record`, or `record_header` for
the DALI loader's header screening, see jpeg_header.py), and this module decides:

- a JPEG header DALI's parser would reject, damaged in one of the known ways: "header repaired":
  DALI reads a copy without the stray bytes (same pixels), whatever --skip-bad-images says.
- DALI failed but Pillow decodes the file: it is "decoded with Pillow": re-encoded once, as a
  lossless PNG in a temporary folder, and the DALI pipeline reads that copy from then on. It
  trains and evaluates like any other file, whatever --skip-bad-images says. The copies live in
  one temp folder (TMPDIR) for the run; when it is full, that is one line (OutputError).
- nothing decodes it: it is "left out": every later batch plans around it (the batch that held
  it is one image smaller; nothing else moves, so the sample order of the other files, the
  number of batches and the DDP step count are unchanged; a training batch left with no readable
  file at all takes the first readable files of the epoch instead, the only case where an image
  repeats). With --skip-bad-images off the run still finishes the epoch, writes its checkpoint,
  then stops with one line naming the files (`stop_after_epoch`). eval and visualize
  (`evaluating`) only leave it out of the evaluation and score the rest.

Each file is named once on the console (rank 0), counted in metrics.jsonl (a "data" record at
the end of each epoch that found any), and listed in `<run folder>/bad_images.txt`
(path, what was done, why; tab-separated; the path in the file name's own bytes, UTF-8 or not) so a resumed run or the next run in the same folder
treats it so from the start. The files `--skip-bad-images` drops before training (the cheap
check of folder.py, which names them on the console itself) are listed and counted the same way
as "skipped before training", at the end of the first epoch (the run folder may not exist while
they are found); the next run's own check decides about them again. Under torchrun the ranks merge their lists at each epoch end
(one all_gather_object), so all ranks plan the next epoch around the same files.

Nothing here runs per step on a clean dataset: the loaders look at this list only when it is
not empty, and the search for a failing file runs only after a pipeline has raised.
"""
from __future__ import annotations

import hashlib
import io
import os
import shutil
import sys
import tempfile
import weakref
from pathlib import Path

from ..atomic import write_bytes
from ..errors import DataError, OutputError
from .jpeg_header import repaired
from .transforms import load_rgb

BAD_FILES_NAME = "bad_images.txt"
REPAIRED = "header repaired"  # DALI reads a copy without the stray header bytes (jpeg_header.py)
PILLOW = "decoded with Pillow"
LEFT_OUT = "left out"
SKIPPED = "skipped before training"  # dropped by folder.py's check with --skip-bad-images
_SHOW = 3  # paths named in the one-line stop error


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def decode_reason(message: str, path: str) -> str:
    """A decoder's error message without the path (the line names it once already)."""
    return _one_line(str(message).replace(f"cannot decode image {path}: ", "").replace(f"'{path}'", "the file")
                     .replace(path, "the file"))


class BadFiles:
    """The run's list of files that failed to decode mid-run, shared by the train and val loaders."""

    def __init__(self, skip: bool = False, announce: bool = True, evaluating: bool = False):
        self.skip = skip
        self.announce = announce  # False on ranks other than 0: only rank 0 prints
        self.evaluating = evaluating  # eval/visualize: a left-out file is only not scored, nothing stops
        self.entries: dict[str, tuple[str, str]] = {}  # path -> (REPAIRED | PILLOW | LEFT_OUT, reason)
        self.left_out: set[str] = set()
        self._copies: dict[str, str] = {}  # path -> the copy DALI reads instead (repaired JPEG or Pillow PNG)
        self._copy_dir: str | None = None
        self._new_left_out: list[str] = []  # left out since the last stop_after_epoch
        self.recoveries = 0  # pipeline failures handled
        self.recovery_seconds = 0.0  # time spent finding the files and rebuilding the pipeline
        self._logged = (0, 0)  # (entries, recoveries) at the last metrics record
        self.dataset_paths: set[str] | None = None  # the image files of this run (build_loaders sets it)
        self._deferred: list[str] = []  # found by the screening, named at the end of the first epoch
        self._listed: set[str] = set()  # already in the run folder's bad_images.txt
        self.in_run = False  # True once a run (engine/runner.py) manages this list
        self._stale = False  # bad_images.txt lists a SKIPPED file this run's check no longer drops

    def __len__(self) -> int:
        return len(self.entries)

    def add_screened(self, dropped: list[tuple[str, str]]) -> None:
        """The (path, problem) pairs folder.py's check dropped before training (already named on
        the console): listed as SKIPPED from the first end_epoch on."""
        for path, problem in dropped:
            self.entries.setdefault(path, (SKIPPED, _one_line(problem)))

    # -- what the loaders ask
    def plan(self, batch, paths: list[str], order=None):
        """`batch` (sample indices) without the left-out files; the caller checks `self.left_out` first
        so that a clean run pays nothing. A training batch (order given) left empty takes the
        first readable files of the epoch's `order` instead, keeping every step's batch non-empty."""
        kept = [i for i in batch if paths[i] not in self.left_out]
        if kept or order is None:
            return kept
        return [i for i in order if paths[i] not in self.left_out][: len(batch)]

    def read_path(self, path: str) -> str:
        """The file a DALI pipeline should read for `path`: its copy when it has one."""
        if path not in self._copies:
            return path
        return self._copies[path]

    @property
    def has_copies(self) -> bool:
        return bool(self._copies)

    def drop_copy(self, path: str) -> bool:
        """Forget `path`'s copy (DALI failed on the copy too) so it can be recorded again; True when
        that copy was already Pillow's (then nothing else is left to try)."""
        if path not in self._copies:
            return False
        del self._copies[path]
        how, _ = self.entries.pop(path, ("", ""))
        return how == PILLOW

    def record_header(self, path: str, problem: str) -> str:
        """A JPEG whose header DALI's parser rejects (jpeg_header.py), found before any pipeline
        runs: DALI reads a repaired copy, or Pillow's when dropping bytes cannot repair it."""
        if path in self.entries:
            return self.entries[path][0]
        try:
            data = repaired(path)
        except OSError as e:
            data, problem = None, f"{problem}; {e.strerror or e}"
        if data is None:
            return self.record(path, f"JPEG header: {problem}", try_pillow=True, defer=True)
        self._write_copy(path, ".jpg", data)
        self._add(path, REPAIRED, f"JPEG header: {problem}", defer=True)
        return REPAIRED

    def _write_copy(self, path: str, ext: str, data: bytes) -> None:
        """`data` becomes the copy DALI reads for `path` (written as every file is, atomic.py). A
        full or unwritable temp folder is an OutputError in one line, no copy left: the copies
        are what the run reads."""
        copy = self._copy_path(path, ext)
        try:
            write_bytes(copy, data, f"the copy DALI reads for {path} as")
        except OutputError as e:
            raise OutputError(f"{e}; set TMPDIR to a folder with room") from None
        self._copies[path] = copy

    def _copy_path(self, path: str, ext: str) -> str:
        if self._copy_dir is None:
            self._copy_dir = tempfile.mkdtemp(prefix="automix-fast-decoded-")
            weakref.finalize(self, shutil.rmtree, self._copy_dir, True)
        return os.path.join(self._copy_dir, hashlib.sha1(os.fsencode(path)).hexdigest() + ext)

    # -- what the loaders report
    def record(self, path: str, reason: str, try_pillow: bool, defer: bool = False) -> str:
        """Note one failing file (once); returns what was done with it (PILLOW or LEFT_OUT)."""
        if path in self.entries:
            return self.entries[path][0]
        reason = _one_line(reason)
        how = LEFT_OUT
        if try_pillow:
            problem = self._make_copy(path)
            if problem is None:
                how = PILLOW
            else:
                reason = f"{reason}; Pillow: {problem}"
        self._add(path, how, reason, defer)
        return how

    def _add(self, path: str, how: str, reason: str, defer: bool = False) -> None:
        self.entries[path] = (how, reason)
        if how == LEFT_OUT:
            self.left_out.add(path)
            self._new_left_out.append(path)
        if defer or path in self._deferred:  # screened: named with its final status at the epoch's end
            if path not in self._deferred:
                self._deferred.append(path)
        elif self.announce:
            print(self._line(path), file=sys.stderr, flush=True)

    def announce_screened(self) -> None:
        """Name the files the screening found, with what became of them (a repaired copy can still
        fail in DALI: then it is left out), once: at the end of the first epoch (`end_epoch`, or the
        loader's own epoch end outside a run), except those the run folder's bad_images.txt already
        listed, so a resumed run does not name them again."""
        deferred, self._deferred = self._deferred, []
        for path in deferred:
            if self.announce and path not in self._listed:
                print(self._line(path), file=sys.stderr, flush=True)

    def _line(self, path: str) -> str:
        how, reason = self.entries[path]
        if how == REPAIRED:
            line = f"warning: DALI cannot decode {path} ({reason}); reading a copy with the header repaired"
        elif how == PILLOW:
            line = f"warning: DALI cannot decode {path} ({reason}); decoded with Pillow instead"
        elif how == SKIPPED:
            line = f"warning: skipped {path} before training ({reason})"
        elif self.evaluating:
            line = f"warning: cannot decode {path} ({reason}); left out of the evaluation"
        elif self.skip:
            line = f"warning: cannot decode {path} ({reason}); left out of this run"
        else:
            line = (f"warning: cannot decode {path} ({reason}); left out for the rest of this epoch, "
                    "then the run stops (--skip-bad-images trains without it)")
        return line

    def _make_copy(self, path: str) -> str | None:
        """Decode `path` with Pillow into a lossless PNG copy; None on success, else why not."""
        try:
            image = load_rgb(path)
        except DataError as e:
            return decode_reason(str(e), path)
        buf = io.BytesIO()
        image.save(buf, format="PNG", compress_level=1)  # fast; the copy lives for this run only
        self._write_copy(path, ".png", buf.getvalue())
        return None

    # -- what the run does (engine/runner.py)
    def start_run(self, run_dir: str | os.PathLike) -> None:
        """Take over `run_dir/bad_images.txt` (a resumed run, or a new run in the same folder)."""
        self.in_run = True  # the runner's end_epoch names the screened files from now on
        listed = Path(run_dir) / BAD_FILES_NAME
        if not listed.is_file():
            return
        for line in listed.read_text(encoding="utf-8", errors="surrogateescape").splitlines():
            parts = line.split("\t")
            if len(parts) != 3:
                continue
            self._listed.add(parts[0])
            if parts[0] in self.entries:  # the screening found it again
                continue
            if parts[1] == SKIPPED:  # this run's check passed it (fixed) or no longer sees it: unlist it
                self._stale = True
                continue
            path, how, reason = parts
            if self.dataset_paths is not None and path not in self.dataset_paths:
                continue  # removed from the folder since: nothing to plan around
            if how == REPAIRED:
                self.record_header(path, reason)  # (the DALI loader's screening usually did it already)
                continue
            if how == PILLOW and self._make_copy(path) is not None:
                how = LEFT_OUT  # it was decodable by Pillow once and is not any more
            self.entries[path] = (how, reason)
            if how == LEFT_OUT:
                self.left_out.add(path)
        if self.left_out and not self.skip:
            shown = "; ".join(sorted(self.left_out)[:_SHOW])
            raise DataError(
                f"{listed} lists {len(self.left_out)} image file(s) that no decoder can read ({shown}); "
                "remove them or pass --skip-bad-images to train without them"
            )

    def end_epoch(self, logger, *, epoch: int, step: int, run_dir, write: bool, distributed: bool) -> None:
        """Merge the ranks' lists (every rank calls this), log the counts, rewrite bad_images.txt."""
        if distributed:
            import torch.distributed as dist

            gathered: list = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, dict(self.entries))
            for entries in gathered:
                for path, (how, reason) in sorted(entries.items()):
                    if how == LEFT_OUT and path in self.entries and path not in self.left_out:
                        self.drop_copy(path)  # another rank found that its copy fails too
                    if path not in self.entries:
                        if how == REPAIRED:
                            self.record_header(path, reason)
                            continue
                        if how == PILLOW and self._make_copy(path) is not None:
                            how = LEFT_OUT
                        self._add(path, how, reason)
        self.announce_screened()
        if (len(self.entries), self.recoveries) == self._logged and not self._stale:
            return
        self._stale = False
        self._logged = (len(self.entries), self.recoveries)
        hows = [how for how, _ in self.entries.values()]
        logger.log("data", {"bad_images": len(hows), "left_out": hows.count(LEFT_OUT),
                            "header_repaired": hows.count(REPAIRED), "decoded_with_pillow": hows.count(PILLOW),
                            "skipped_before_training": hows.count(SKIPPED), "pipeline_recoveries": self.recoveries,
                            "recovery_seconds": round(self.recovery_seconds, 4)}, epoch=epoch, step=step)
        if write:
            self._write(Path(run_dir) / BAD_FILES_NAME)

    def _write(self, path: Path) -> None:
        text = "".join(f"{p}\t{how}\t{reason}\n" for p, (how, reason) in sorted(self.entries.items()))
        # A file name's own bytes, UTF-8 or not (surrogateescape), as start_run reads them back.
        write_bytes(path, text.encode("utf-8", "surrogateescape"), "bad-images list", durable=True)

    def stop_after_epoch(self, before_training: bool = False) -> None:
        """With --skip-bad-images off: a DataError naming the files left out this epoch (call it
        after the epoch's checkpoint is written), or found while decoding a folder into memory."""
        new, self._new_left_out = self._new_left_out, []
        if self.skip or not new:
            return
        shown = "; ".join(new[:_SHOW]) + (f" and {len(new) - _SHOW} more" if len(new) > _SHOW else "")
        if before_training:
            raise DataError(f"{len(new)} image file(s) cannot be decoded: {shown}; "
                            "remove them or pass --skip-bad-images to train without them")
        raise DataError(
            f"{len(new)} image file(s) could not be decoded and were left out of this epoch: {shown} "
            f"(listed in {BAD_FILES_NAME}); the checkpoint is written: remove them or pass --skip-bad-images, "
            "then --resume auto"
        )
