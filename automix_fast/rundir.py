"""The run folder: its name, its files, continuing a stopped run, and writes that fail cleanly.

Used by `train`, `eval` and `export` alike.

- Naming: `--output/--experiment`, or by default `<date>-<time>-<model>-<mix>`; a default name
  already taken (two runs started in the same second) gets `-2`, `-3`, ... The folder is
  created with one `mkdir`, so two processes can never claim the same one.
- Runs never mix: a new run whose `--experiment` folder already holds files stops with one line
  (continue it with `--resume auto`, or choose another name). Nothing is appended to or
  replaced in another run's folder.
- Resume: `--resume auto` (the newest valid checkpoint of the folder) or `--resume PATH`
  continues with the config stored in the checkpoint; flags given with it may change only
  `RESUMABLE_FIELDS` (config.py), anything else is one line naming the fields.
- Writes: a full disk, a read-only folder or a missing permission while writing any file of the
  run is an `OutputError` (one line naming the file); checkpoints are written atomically, so
  the previous one is intact.
"""
from __future__ import annotations

import errno
import json
import os
import shlex
import time
from pathlib import Path
from typing import Any

from automix_fast.errors import CheckpointError, ConfigError, OutputError

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
LAST_FILE = "last.pt"
BEST_FILE = "best.pt"
DEFAULT_OUTPUT = "output"

# errnos that mean "this place cannot be written", as opposed to a bug or a crash.
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}
_MAX_SUFFIX = 1000


# ----------------------------------------------------------------------------- writes
def write_failure(path: str | os.PathLike, e: OSError, what: str = "") -> OutputError | None:
    """The one-line OutputError for a failed write of `path`, or None when `e` is not a
    can't-write error (those stay as they are: a bug should show its traceback)."""
    if isinstance(e, OutputError):
        return e
    if e.errno not in _WRITE_ERRNOS:
        return None
    hint = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded", errno.EROFS: "read-only file system"}
    reason = e.strerror or str(e)
    extra = f" ({hint[e.errno]})" if e.errno in hint and hint[e.errno].lower() not in reason.lower() else ""
    return OutputError(f"cannot write {what + ' ' if what else ''}{path}: {reason}{extra}")


def write_text(path: str | os.PathLike, text: str, what: str = "") -> Path:
    """Write a small text file atomically (temp file + rename); a failed write is one line."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        err = write_failure(path, e, what)
        if err is None:
            raise
        raise err from None
    return path


def write_json(path: str | os.PathLike, obj: Any, what: str = "") -> Path:
    return write_text(path, json.dumps(obj, indent=2) + "\n", what)


def unique_path(path: str | os.PathLike) -> Path:
    """`path`, or `stem-2.ext`, `stem-3.ext`, ... : the first name not taken (never overwrite)."""
    path = Path(path)
    if not path.exists():
        return path
    for i in range(2, _MAX_SUFFIX):
        candidate = path.with_name(f"{path.stem}-{i}{path.suffix}")
        if not candidate.exists():
            return candidate
    raise OutputError(f"{_MAX_SUFFIX} files named like {path} already exist; pass an explicit output name")


# ----------------------------------------------------------------------------- naming
def default_name(model: str, mix: str) -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{model}-{mix}"


def locate(cfg) -> Path:
    """The run folder a config names: output/experiment, the folder of `--resume PATH`, or a
    default name under output (not yet claimed: see `claim`)."""
    if cfg.experiment:
        return Path(cfg.output) / cfg.experiment
    if cfg.resume and cfg.resume != "auto":
        return Path(cfg.resume).resolve().parent
    return Path(cfg.output) / default_name(cfg.model, cfg.mix)


def holds_files(run_dir: Path) -> bool:
    return run_dir.is_dir() and any(run_dir.iterdir())


def refuse_used(run_dir: Path) -> None:
    """One line when a new run would write into a folder that holds another run's files."""
    if run_dir.exists() and not run_dir.is_dir():
        raise OutputError(f"run folder {run_dir} exists and is not a folder; choose another --experiment")
    if holds_files(run_dir):
        names = sorted(p.name for p in run_dir.iterdir())
        shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
        raise OutputError(
            f"run folder {run_dir} already holds a run ({shown}); continue it with "
            f"--resume auto --experiment {run_dir.name}, or choose another --experiment"
        )


def check_new_run(run_dir: Path, *, named: bool) -> None:
    """Before any data work: the parent folder can be created and written, and a named run
    folder holds no other run. (The folder itself is created by `claim` when training starts.)"""
    parent = run_dir.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create run folder {run_dir}: {e.strerror or e} (choose a writable --output)") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot create run folder {run_dir}: {parent} is not writable (choose a writable --output)")
    if named:
        refuse_used(run_dir)


def claim(run_dir: Path, *, named: bool) -> Path:
    """Create the folder of a new run and return it. A named folder must be new or empty; a
    default name that is taken gets the first free `-N` suffix."""
    candidates = [run_dir] if named else [run_dir] + [run_dir.with_name(f"{run_dir.name}-{i}") for i in range(2, _MAX_SUFFIX)]
    for path in candidates:
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            if named:
                refuse_used(path)
                return path  # an empty folder: nothing to mix with
        except OSError as e:
            raise OutputError(f"cannot create run folder {path}: {e.strerror or e} (choose a writable --output)") from None
    raise OutputError(f"{_MAX_SUFFIX} run folders named {run_dir.name}-N already exist under {run_dir.parent}")


# ----------------------------------------------------------------------------- resume
def find_resume(resume: str | None, run_dir: Path):
    """(path, state) of the checkpoint `--resume` names, or None to start fresh (auto, nothing
    saved yet). A fresh start in a folder that holds files is refused: runs never mix."""
    import sys

    from automix_fast.engine.checkpoint import latest_valid, resolve_resume

    if not resume:
        return None
    if resume != "auto":
        return resolve_resume(resume, run_dir)
    found = latest_valid(run_dir)
    if found is None:
        if holds_files(run_dir):
            names = ", ".join(sorted(p.name for p in run_dir.iterdir())[:4])
            raise OutputError(f"run folder {run_dir} holds files ({names}) but no checkpoint to resume from; "
                              "delete it or choose another --experiment")
        print(f"resume auto: no checkpoint in {run_dir} yet; starting fresh", file=sys.stderr)
    return found


def resumed_config(found, given: dict[str, Any]):
    """The config to continue with: the one stored in the checkpoint, with the `given` values
    (explicit flags and -c file values) of fields that may change on resume."""
    from automix_fast.config import RESUMABLE_FIELDS, build_config, coerce_field, field_types

    path, state = found
    stored = state.get("config")
    if not isinstance(stored, dict):
        raise CheckpointError(f"{path} holds no training config to resume with")
    known = field_types()
    values = {k: v for k, v in stored.items() if k in known}  # fields of older versions are dropped
    given = {k: coerce_field(k, v) for k, v in given.items()}
    changed = [k for k, v in given.items() if k not in RESUMABLE_FIELDS and k in values and v != values[k]]
    if changed and not given.get("allow_config_change"):
        details = ", ".join(f"{_flag(k)} ({values[k]!r} -> {given[k]!r})" for k in changed)
        may = ", ".join(_flag(k) for k in RESUMABLE_FIELDS if k not in ("resume", "output", "experiment"))
        raise ConfigError(
            f"resuming {path}: {details} cannot change on resume (the run continues with its stored config; "
            f"only {may} may), or pass --allow-config-change to force it"
        )
    values.update(given)
    if given.get("resume") != "auto" and "experiment" not in given:
        # --resume PATH: keep writing beside the checkpoint, wherever that folder is now.
        folder = Path(given["resume"]).resolve().parent
        values.update(output=str(folder.parent), experiment=folder.name)
    return build_config(overrides=values)  # errors name the flags, not "the config file"


def trim_metrics(run_dir: Path, step: int) -> int:
    """Drop the metrics.jsonl records logged after global step `step` (the resumed checkpoint's):
    a run killed after its last checkpoint logged steps that the resumed run logs again. Also
    drops a line cut short by the kill. Returns how many were dropped."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
            keep = record.get("step") is None or record["step"] <= step
        except (ValueError, AttributeError, TypeError):
            keep = False
        if keep:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        write_text(path, "".join(line + "\n" for line in kept), "metrics")
    return dropped


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def resume_command(run_dir: Path, world_size: int = 1) -> str:
    """The short command that continues the run in `run_dir`."""
    run_dir = Path(run_dir)
    if world_size > 1:
        head = f"torchrun --nproc_per_node {world_size} $(which automix-fast) train"
    else:
        head = "automix-fast train"
    output = "" if run_dir.parent == Path(DEFAULT_OUTPUT) else f" --output {shlex.quote(str(run_dir.parent))}"
    return f"{head} --resume auto{output} --experiment {shlex.quote(run_dir.name)}"
