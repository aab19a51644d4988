"""Checkpoints: atomic, verifiable files, a manager for a run folder, and RNG state.

File format (one file, no sidecar that could go missing or stale):

    MAGIC (8 bytes) | sha256 of payload (32 bytes) | payload length (8 bytes, little endian) | payload

where the payload is `torch.save(state)`. The length catches truncation, the digest catches
bit flips, the magic catches files that are not ours. The payload is loaded with
`weights_only=True`, so a state may hold only tensors, numbers, strings, bytes, None, dtypes
and lists/tuples/dicts of them (model/optimizer/GradScaler state_dicts qualify; an argparse
namespace or numpy scalar does not). `save_checkpoint` checks this before writing, because
finding out at resume time, days later, is too late.

Writes go through `automix_fast.atomic` with fsync (a hidden temp file in the same directory,
fsynced, `os.replace`d into place, then the directory fsynced): a crash leaves either the old
file or the new one under the final name, never a half-written one.
"""
from __future__ import annotations

import errno
import hashlib
import io
import math
import os
import random
import re
import struct
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from automix_fast.atomic import replace_from_temp, write_bytes, write_failure
from automix_fast.errors import CheckpointError

FORMAT = "automix-fast/1"  # the "format" of a training state (what `train` saves and resumes)
MAGIC = b"AMXFCK01"  # bump the trailing digits if the container layout ever changes
_HEADER = struct.Struct("<8s32sQ")  # magic, sha256 digest, payload length

# Keys CheckpointManager.save adds to every state it writes.
EPOCH_KEY = "epoch"
BEST_METRIC_KEY = "best_metric"  # best metric seen so far (None until one is given)
BEST_EPOCH_KEY = "best_epoch"

_LEAF_TYPES = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device)
# os.link failures that mean "no hard links here" (FAT, some network and FUSE file systems).
_NO_LINK_ERRNOS = {errno.EPERM, errno.EXDEV, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS}
_EPOCH_RE = re.compile(r"^checkpoint-(\d+)\.pt$")


# ----------------------------------------------------------------------------- single files
def _check_loadable(obj, where: str = "state") -> None:
    """Raise TypeError naming the first value that `torch.load(weights_only=True)` would refuse."""
    if isinstance(obj, torch.Tensor) or type(obj) in _LEAF_TYPES:
        return
    if type(obj) in (dict, OrderedDict):
        for k, v in obj.items():
            if type(k) not in (str, int):
                raise TypeError(f"{where} has a key of type {type(k).__name__}; use str or int keys")
            _check_loadable(v, f"{where}[{k!r}]")
        return
    if type(obj) in (list, tuple, set, torch.Size):
        for i, v in enumerate(obj):
            _check_loadable(v, f"{where}[{i}]")
        return
    raise TypeError(
        f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}, which a weights_only "
        "load refuses; store tensors, numbers, strings, lists or dicts instead"
    )


def _write_atomic(path: Path, blob: bytes) -> None:
    write_bytes(path, blob, "checkpoint", durable=True)


def _link_atomic(source: Path, path: Path, blob: bytes) -> None:
    """`path` becomes a second name of `source`'s file (a hard link: no second copy on disk);
    where the file system has no hard links, a copy of `blob` is written instead."""
    def fill(tmp: Path) -> None:
        try:
            os.link(source, tmp)
        except OSError as e:
            if e.errno not in _NO_LINK_ERRNOS:
                raise
            raise _NoHardLinks from None

    try:
        replace_from_temp(path, fill, "checkpoint", durable=True)
    except _NoHardLinks:
        _write_atomic(path, blob)


class _NoHardLinks(Exception):
    """os.link is not supported where the run folder lives."""


def _encode(state: dict) -> bytes:
    if not isinstance(state, dict):
        raise TypeError(f"a checkpoint state must be a dict, got {type(state).__name__}")
    _check_loadable(state)
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getbuffer()
    return _HEADER.pack(MAGIC, hashlib.sha256(payload).digest(), len(payload)) + payload


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """Write `state` to `path` atomically with an integrity record (see the module docstring)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(path, _encode(state))


def state_dict_mismatch(error: Exception) -> str:
    """What a failed `load_state_dict` found first, in one line: the checkpoint lacks a key (and
    how many more), has one the model lacks, or a tensor of another shape (torch's own line)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in lines[1:]:
        for label, says in (("Missing key(s) in state_dict:", "the checkpoint lacks"),
                            ("Unexpected key(s) in state_dict:", "the model lacks")):
            if line.startswith(label):
                keys = re.findall(r'"([^"]+)"', line)
                more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
                return f"{says} {keys[0]}{more}" if keys else line
        return line
    return lines[0] if lines else type(error).__name__


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Read and verify a checkpoint; any problem raises a one-line CheckpointError naming `path`."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path}: file not found") from None
    except OSError as e:
        raise CheckpointError(f"checkpoint {path}: cannot read ({e.strerror or e})") from None
    if not data:
        raise CheckpointError(f"checkpoint {path}: the file is empty (0 bytes)")
    if len(data) < len(MAGIC) or data[: len(MAGIC)] != MAGIC:
        raise CheckpointError(f"checkpoint {path}: not an automix-fast checkpoint (unknown header)")
    if len(data) < _HEADER.size:
        raise CheckpointError(f"checkpoint {path}: truncated ({len(data)} bytes, header incomplete)")
    _, digest, length = _HEADER.unpack_from(data)
    payload = memoryview(data)[_HEADER.size :]
    if len(payload) != length:
        what = "truncated" if len(payload) < length else "has trailing bytes"
        raise CheckpointError(f"checkpoint {path}: {what} ({len(payload)} of {length} payload bytes)")
    if hashlib.sha256(payload).digest() != digest:
        raise CheckpointError(f"checkpoint {path}: checksum mismatch (file is corrupt)")
    try:
        state = torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
    except Exception as e:  # checksum was fine, so this is a writer/reader version problem
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {path}: cannot be unpickled ({first})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path}: not an automix-fast checkpoint (payload is not a dict)")
    return state


def check_training_state(path: str | os.PathLike, state: dict, flag: str = "", *, with_config: bool = False) -> None:
    """CheckpointError in one line unless `state` (loaded from `path`) is a training state of
    this program: its "format" is FORMAT and it holds the policy weights ("mixer") as a dict,
    and with `with_config` also its training config as a dict (what eval, export and visualize
    rebuild the policy from). `flag` (e.g. "--initial-checkpoint") starts the message."""
    if (state.get("format") != FORMAT or not isinstance(state.get("mixer"), dict)
            or (with_config and not isinstance(state.get("config"), dict))):
        raise CheckpointError(f"{flag + ' ' if flag else ''}{path} is not an automix-fast training checkpoint")


def check_resume_world_size(path: str | os.PathLike, state: dict, world_size: int) -> None:
    """CheckpointError in one line when a mid-epoch training state (next_batch > 0) is resumed by
    another number of processes than the `world_size` that wrote it: each rank's shard of the
    epoch and the global step of a batch depend on that number, so skipping the batches done would
    skip or repeat images. A state at an epoch's end resumes with any number. A state without
    "world_size" (written before it was stored) is not checked: the command printed to continue an
    interrupted run names the count that wrote it."""
    written = state.get("world_size")
    if written is None or written == world_size or not state.get("next_batch"):
        return
    how = f"torchrun --nproc_per_node {written}" if written > 1 else "one process (no torchrun)"
    raise CheckpointError(
        f"{path} was written mid-epoch (epoch {state.get('next_epoch', 0) + 1}, batch {state['next_batch']}) by "
        f"{written} process{'es' if written > 1 else ''} and this run has {world_size}: resume it with {how}, "
        "or resume from an epoch-end checkpoint (checkpoint-NNNN.pt) instead")


# ----------------------------------------------------------------------------- run folder
def _epoch_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(epoch, path) of every checkpoint-<epoch>.pt in run_dir, newest first."""
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := _EPOCH_RE.match(p.name))]
    return sorted(found, reverse=True)


SUPERSEDED = "superseded"  # the mark in the name of a file set aside: NAME.superseded.pt


def set_aside_after(run_dir: str | os.PathLike, epoch: int, *, resumed_from) -> list[tuple[Path, Path]]:
    """A run resumed in its own folder from a state within or at the end of epoch `epoch` (its
    next_epoch) replaces what a continuation past that state wrote: checkpoint-N.pt with
    N > epoch, and last.pt unless it is the file resumed from. Each is renamed to
    NAME.superseded.pt (NAME.superseded-2.pt, ... when taken), a name that neither `--resume auto`
    nor the pruning of CheckpointManager.save considers; nothing is deleted. Returns the
    (old, new) paths, last.pt first, then the epochs newest first."""
    run_dir = Path(run_dir)
    last = run_dir / "last.pt"
    later = [p for n, p in _epoch_checkpoints(run_dir) if n > epoch]
    if last.exists() and not os.path.samefile(last, resumed_from):
        later.insert(0, last)
    moved = []
    for path in later:
        target, n = path.with_name(f"{path.stem}.{SUPERSEDED}.pt"), 1
        while target.exists():
            n += 1
            target = path.with_name(f"{path.stem}.{SUPERSEDED}-{n}.pt")
        try:
            os.rename(path, target)
        except OSError as e:
            raise (write_failure(target, e, "checkpoint") or e) from None
        moved.append((path, target))
    return moved


def latest_valid(run_dir: str | os.PathLike) -> tuple[Path, dict] | None:
    """The newest checkpoint in run_dir that loads: last.pt, then checkpoint-*.pt newest first.

    A corrupt file is reported on stderr in one line and skipped; None when nothing loads.
    best.pt is not a candidate: it may be older than the newest epoch.
    """
    run_dir = Path(run_dir)
    candidates = [run_dir / "last.pt"] if (run_dir / "last.pt").exists() else []
    candidates += [p for _, p in _epoch_checkpoints(run_dir)]
    for i, path in enumerate(candidates):
        try:
            return path, load_checkpoint(path)
        except CheckpointError as e:
            reason = str(e).split(": ", 1)[-1]
            nxt = candidates[i + 1] if i + 1 < len(candidates) else "nothing (no older checkpoint)"
            print(f"checkpoint {path} is corrupt ({reason}); falling back to {nxt}", file=sys.stderr)
    return None


def resolve_resume(resume_arg: str | None, run_dir: str | os.PathLike) -> tuple[Path, dict] | None:
    """`--resume` semantics: None/"" -> None; "auto" -> latest valid in run_dir, or None (fresh
    start, said on stderr); a run folder -> its newest valid checkpoint; a file -> that
    checkpoint. CheckpointError (one line) when the path is missing, the file is bad, or the
    folder holds no valid checkpoint."""
    if not resume_arg:
        return None
    if resume_arg == "auto":
        found = latest_valid(run_dir)
        if found is None:
            print(f"resume auto: no valid checkpoint in {run_dir}; starting fresh", file=sys.stderr)
        return found
    path = Path(resume_arg)
    if path.is_dir():
        found = latest_valid(path)
        if found is None:
            raise CheckpointError(f"--resume {resume_arg}: the folder holds no valid checkpoint "
                                  "(last.pt or checkpoint-NNNN.pt)")
        return found
    return path, load_checkpoint(path)


class CheckpointManager:
    """Writes last.pt, checkpoint-<epoch:04d>.pt (keeping `keep_recent`) and best.pt in run_dir.

    An epoch's state is written once: checkpoint-<epoch>.pt and best.pt are hard links to the
    last.pt of that epoch (a copy only where the file system has no hard links), so the
    folder holds at most keep_recent + 1 copies (the +1 when best.pt is older than all of them).

    Call on rank 0 only. After resuming, call `restore(state)` so best.pt keeps following the
    best metric of the whole run, not just of the resumed part.
    """

    def __init__(self, run_dir: str | os.PathLike, keep_recent: int = 3):
        if keep_recent < 0:
            raise ValueError(f"keep_recent must be >= 0, got {keep_recent}")
        self.run_dir = Path(run_dir)
        self.keep_recent = keep_recent
        self.best_metric: float | None = None
        self.best_epoch: int | None = None

    def restore(self, state: dict) -> None:
        """Take the best metric from a resumed state (written by `save`)."""
        self.best_metric = state.get(BEST_METRIC_KEY)
        self.best_epoch = state.get(BEST_EPOCH_KEY)

    def _improves(self, metric: float, higher_is_better: bool) -> bool:
        if metric is None or math.isnan(metric):
            return False
        if self.best_metric is None:
            return True
        return metric > self.best_metric if higher_is_better else metric < self.best_metric

    def _blob(self, state: dict, epoch: int | None) -> bytes:
        extra = {BEST_METRIC_KEY: self.best_metric, BEST_EPOCH_KEY: self.best_epoch}
        if epoch is not None:
            extra[EPOCH_KEY] = epoch
        return _encode({**state, **extra})

    def save_last(self, state: dict, epoch: int | None = None) -> None:
        """Write only last.pt (e.g. a mid-epoch stop on a signal). Use this rather than
        `save_checkpoint` so the state still carries the best metric for `restore`."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        _write_atomic(self.run_dir / "last.pt", self._blob(state, epoch))

    def save(self, state: dict, epoch: int, *, metric: float | None = None,
             higher_is_better: bool = True) -> bool:
        """Write this epoch's checkpoints; returns True when it became best.pt.

        The state written carries `epoch`, `best_metric` and `best_epoch` (added to a shallow
        copy; the caller's dict is left alone).
        """
        if metric is not None:
            metric = float(metric)  # tensors/numpy scalars -> a plain float that loads weights_only
        is_best = self._improves(metric, higher_is_better)
        if is_best:
            self.best_metric, self.best_epoch = metric, epoch
        blob = self._blob(state, epoch)  # serialized and written once, linked under the other names
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise (write_failure(self.run_dir, e, "run folder") or e) from None
        last = self.run_dir / "last.pt"
        # last.pt first: if we crash before the epoch file, last.pt is still the newest state.
        _write_atomic(last, blob)
        if self.keep_recent > 0:
            _link_atomic(last, self.run_dir / f"checkpoint-{epoch:04d}.pt", blob)
        if is_best:
            _link_atomic(last, self.run_dir / "best.pt", blob)
        # The newest keep_recent epochs up to this one (this one first); an epoch file above it
        # (copied in by hand) is neither counted nor deleted.
        upto = [p for n, p in _epoch_checkpoints(self.run_dir) if n <= epoch]
        for old in upto[self.keep_recent :]:
            old.unlink(missing_ok=True)
        return is_best


# ----------------------------------------------------------------------------- RNG state
def rng_state() -> dict:
    """Python, numpy, torch CPU and (if already initialized) CUDA generator states, as tensors
    and plain numbers so the dict survives a weights_only load."""
    py_version, py_words, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    state = {
        "python": {"version": py_version, "state": torch.tensor(py_words, dtype=torch.int64),
                   "gauss": py_gauss},
        "numpy": {"kind": np_kind, "keys": torch.from_numpy(np_keys.astype(np.int64)),
                  "pos": int(np_pos), "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "torch": torch.get_rng_state(),
    }
    # is_initialized(): never create a CUDA context just to save RNG state.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` captured (tensors may have been mapped to any device)."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    npst = state["numpy"]
    np.random.set_state((npst["kind"], npst["keys"].cpu().numpy().astype(np.uint32), npst["pos"],
                         npst["has_gauss"], npst["gauss"]))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        # A resume on fewer GPUs restores the ones that exist.
        for i, s in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s.cpu(), i)
