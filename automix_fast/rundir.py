"""The run folder: its name, its files, continuing a stopped run, and writes that fail cleanly.

Used by `train`, `eval` and `export` alike.

- Naming: `--output/--experiment`, or by default `<date>-<time>-<model>-<mix>`; a default name
  already taken (two runs started in the same second) gets `-2`, `-3`, ... The folder is
  created with one `mkdir`, so two processes can never claim the same one.
- Runs never mix: a new run whose `--experiment` folder already holds files stops with one line
  (continue it with `--resume auto`, or choose another name). Nothing is appended to or
  replaced in another run's folder. A folder holding only what a start that failed before
  its first step leaves (`START_FILES`) is not a run: the next start reuses it.
- Resume: `--resume auto` (the newest valid checkpoint of the folder; a fresh start when the
  folder holds no run, unless the name is one typo away from a run beside it), `--resume FILE`
  (that checkpoint) or `--resume RUN` (a run folder, as a path or a name under --output: its
  newest valid checkpoint) continues with the config stored in the checkpoint
  (`automix_fast.config.resumed_config`: flags may change only the fields marked resumable).
  A checkpoint resumed under another `--experiment` forks: the new folder gets a
  copy of its state as its own first `last.pt`; the source folder is never written.
- Writes: a full disk, a read-only folder or a missing permission while writing any file of the
  run is an `OutputError` (one line naming the file); checkpoints are written atomically, so
  the previous one is intact.
"""
from __future__ import annotations

import difflib
import json
import os
import shlex
import sys
import time
from pathlib import Path

from automix_fast.atomic import remove_stale_temps, write_json, write_text  # noqa: F401  (the run's writers, re-exported)
from automix_fast.engine.checkpoint import latest_valid, resolve_resume
from automix_fast.errors import CheckpointError, OutputError
from automix_fast.mixing.automix import mask_summary

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
LAST_FILE = "last.pt"
BEST_FILE = "best.pt"
DEFAULT_OUTPUT = "output"
# What a start that failed before its first step may leave in its folder; a folder that holds
# nothing else (no checkpoint, no metrics) is not a run, and the next start reuses it.
START_FILES = (CONFIG_FILE, "tensorboard")

_MAX_SUFFIX = 1000


# ----------------------------------------------------------------------------- writes
def check_writable(path: str | os.PathLike, what: str = "", hint: str = "choose a writable --output") -> Path:
    """Before any work: OutputError in one line unless `path` could be written, i.e. it is not
    a folder and its nearest existing parent is a writable folder (the missing ones are created
    by the write). Writes nothing."""
    path = Path(path)
    label = f"cannot write {what + ' ' if what else ''}{path}"
    if path.is_dir():
        raise OutputError(f"{label}: it is a folder ({hint})")
    parent = _nearest_existing(path.parent)
    if not parent.is_dir():
        raise OutputError(f"{label}: {parent} is not a folder ({hint})")
    if not os.access(parent, os.W_OK | os.X_OK):
        reason = "read-only file system" if _read_only(parent) else "no permission"
        raise OutputError(f"{label}: {parent} is not writable, {reason} ({hint})")
    return path


def _nearest_existing(path: Path) -> Path:
    """`path`, or its nearest parent that exists (what a write with missing folders starts in)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _read_only(folder: Path) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        return False


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
    if cfg.run.experiment:
        return Path(cfg.run.output) / cfg.run.experiment
    if cfg.run.resume and cfg.run.resume != "auto":
        target = resume_target(cfg.run.resume, cfg.run.output)
        return (target if target.is_dir() else target.parent).resolve()
    return Path(cfg.run.output) / default_name(cfg.net.model, cfg.mixing.mix)


def run_files(run_dir: Path) -> list[str]:
    """The names in `run_dir` other than `START_FILES`, sorted: empty when it is not a run."""
    if not run_dir.is_dir():
        return []
    return sorted(p.name for p in run_dir.iterdir() if p.name not in START_FILES)


def has_checkpoint(run_dir: Path) -> bool:
    return run_dir.is_dir() and any(run_dir.glob("*.pt"))


def refuse_used(run_dir: Path) -> None:
    """One line when a new run would write into a folder that holds another run's files."""
    if run_dir.exists() and not run_dir.is_dir():
        raise OutputError(f"run folder {run_dir} exists and is not a folder; choose another --experiment")
    names = run_files(run_dir)
    if names:
        shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
        how = (f"continue it with --resume auto --experiment {run_dir.name}" if has_checkpoint(run_dir)
               else "it has no checkpoint to continue from: delete it to start again")
        raise OutputError(f"run folder {run_dir} already holds a run ({shown}); {how}, or choose another --experiment")


def check_new_run(run_dir: Path, *, named: bool) -> None:
    """Before any data work: the parent folder can be created and written, and a named run
    folder holds no other run. (The folder itself is created by `claim` when training starts.)"""
    parent = run_dir.parent
    existing = _nearest_existing(parent)
    if not existing.is_dir():  # mkdir would say "File exists" or "Not a directory"
        raise OutputError(f"cannot create run folder {run_dir}: {existing} is not a folder (choose a writable --output)")
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
def resume_target(resume: str, output: str) -> Path:
    """The file or folder `--resume` names: a path as given, else a run name under `output`."""
    path = Path(resume)
    if not path.exists() and not path.is_absolute() and (Path(output) / resume).is_dir():
        return Path(output) / resume
    return path


def find_resume(cfg):
    """(path, state) of the checkpoint `cfg.run.resume` names, or None to start fresh (auto, no run
    in the folder yet; said once on stderr). Refused in one line: a fresh start in a folder that
    holds files, an auto name one typo away from a run beside it, a missing file or folder."""
    if not cfg.run.resume:
        return None
    if cfg.run.resume != "auto":
        target = resume_target(cfg.run.resume, cfg.run.output)
        if not target.exists():
            under = Path(cfg.run.output) / cfg.run.resume
            raise CheckpointError(f"--resume {cfg.run.resume}: file not found: no such checkpoint file or run folder"
                                  + ("" if Path(cfg.run.resume).is_absolute() else f" (nor {under})"))
        return resolve_resume(str(target), target)
    run_dir = locate(cfg)
    found = latest_valid(run_dir)
    if found is None:
        names = run_files(run_dir)
        if names:
            raise OutputError(f"run folder {run_dir} holds files ({', '.join(names[:4])}) but no checkpoint to "
                              "resume from; delete it or choose another --experiment")
        typo = None if run_dir.exists() else near_run(run_dir)
        if typo is not None:
            raise OutputError(f"--resume auto: there is no run {run_dir}, but there is {typo}: did you mean "
                              f"--experiment {typo.name}? (to start a new run {run_dir.name}, leave out --resume)")
        print(f"resume auto: no checkpoint in {run_dir} yet; starting fresh", file=sys.stderr)
    return found


def near_run(run_dir: Path) -> Path | None:
    """A run folder beside `run_dir` whose name is one typo from its name (a swapped, missing,
    extra or wrong character that is not a digit: `seed2` beside `seed1` is a sibling), or None."""
    parent = run_dir.parent
    if not parent.is_dir():
        return None
    runs = [p.name for p in parent.iterdir() if p.is_dir() and (has_checkpoint(p) or (p / METRICS_FILE).exists())]
    close = difflib.get_close_matches(run_dir.name, [n for n in runs if _one_typo(run_dir.name, n)], n=1, cutoff=0)
    return parent / close[0] if close else None


def _one_typo(a: str, b: str) -> bool:
    """`a` and `b` differ by one swap of neighbours, one wrong, one missing or one extra
    character, none of them a digit."""
    if len(a) == len(b):
        diff = [i for i in range(len(a)) if a[i] != b[i]]
        changed = {a[i] for i in diff} | {b[i] for i in diff}
        one = len(diff) == 1 or (len(diff) == 2 and diff[1] == diff[0] + 1 and a[diff[0]] == b[diff[1]]
                                  and a[diff[1]] == b[diff[0]])
        return one and not any(c.isdigit() for c in changed)
    short, long = sorted((a, b), key=len)
    if len(long) != len(short) + 1:
        return False
    i = next((i for i in range(len(short)) if short[i] != long[i]), len(short))
    return short[i:] == long[i + 1:] and not long[i].isdigit()


def finished_line(found, cfg) -> str | None:
    """The line that says the resumed run has nothing left to train (its checkpoint is at or
    past `cfg.schedule.epochs`) and how to extend it; None when there is training to do."""
    path, state = found
    done = state.get("next_epoch", 0)
    if done < cfg.schedule.epochs:
        return None
    return (f"run {Path(path).parent} is finished ({done} of {cfg.schedule.epochs} epochs trained): nothing to train; "
            f"to train it longer, run the same command with --epochs N (more than {done})")


def run_summary(cfg, run_dir: Path, history: list[dict], eval_result: dict, *, heads: list[str], skipped_steps: int,
                train_seconds: float | None, compile_seconds: float | None = None) -> dict:
    """The contents of summary.json for a run that finished (see docs/RUNS.md)."""
    return {
        "run_dir": str(run_dir),
        "mix": cfg.mixing.mix,
        "model": cfg.net.model,
        "epochs": cfg.schedule.epochs,
        "eval": eval_result,
        "heads": heads,
        "skipped_steps": skipped_steps,
        "train_seconds": train_seconds,
        **({"compile_seconds": round(compile_seconds, 2)} if compile_seconds is not None else {}),
        **mask_summary(history),
        "stopped": False,
    }


def clear_stale_temps(run_dir: Path) -> str | None:
    """Remove the temp files of `run_dir` whose writer process is gone (`atomic.remove_stale_temps`);
    the line that says so, or None when there were none."""
    stale = remove_stale_temps(run_dir)
    if not stale:
        return None
    names = ", ".join(p.name for p in stale[:3]) + (", ..." if len(stale) > 3 else "")
    return f"removed {len(stale)} temp file{'s' if len(stale) > 1 else ''} of writes cut short by a killed process: {names}"


def finish_again(found, cfg) -> list[str]:
    """For a finished run continued in its own folder (`found`: its checkpoint, at the end of the
    epochs its own config planned, the last one evaluated): remove the temp files of writes a kill
    cut short, and write summary.json from the checkpoint when it is missing (a failed or killed
    final write); nothing else is written. `train_seconds` is then null (not stored) and
    `rebuilt_from` names the checkpoint. Returns what was done, one line each."""
    path, state = found
    run_dir = Path(path).parent
    if forks(found, locate(cfg)):
        return []
    done = [note] if (note := clear_stale_temps(run_dir)) else []
    history = json.loads(state.get("history", "[]"))
    last = history[-1] if history else {}
    planned = state.get("config", {}).get("epochs")
    if ((run_dir / SUMMARY_FILE).exists() or not last.get("eval") or last.get("epoch") != state.get("next_epoch")
            or planned != state.get("next_epoch") or state.get("next_batch", 0) != 0):
        return done
    heads = [k[: -len("_top1")] for k in last["eval"] if k.endswith("_top1")]
    summary = run_summary(cfg, run_dir, history, last["eval"], heads=heads, skipped_steps=state.get("skipped_steps", 0),
                          train_seconds=None)
    summary["epochs"] = planned
    write_json(run_dir / SUMMARY_FILE, {**summary, "rebuilt_from": str(path)}, "summary")
    return done + [f"wrote the missing {run_dir / SUMMARY_FILE} from {path} (train_seconds: null, not stored)"]


def forks(found, run_dir: Path) -> bool:
    """True when the checkpoint `found` continues in another folder than its own (a fork)."""
    return Path(found[0]).resolve().parent != Path(run_dir).resolve()


def trim_metrics(run_dir: Path, step: int | None = None, *, epoch: int | None = None) -> int:
    """Drop the metrics.jsonl records logged after global step `step` (the resumed checkpoint's),
    or with `epoch` instead, those of epochs (1-based) after `epoch` (a resume at an epoch's end
    with another number of processes, whose step numbers count other epochs): a run killed after
    its last checkpoint logged steps that the resumed run logs again. Also drops a line cut short
    by the kill. Returns how many were dropped."""
    field, last = ("step", step) if epoch is None else ("epoch", epoch)
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
            keep = record.get(field) is None or record[field] <= last
        except (ValueError, AttributeError, TypeError):
            keep = False
        if keep:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        write_text(path, "".join(line + "\n" for line in kept), "metrics")
    return dropped


def resume_command(run_dir: Path, world_size: int = 1) -> str:
    """The short command that continues the run in `run_dir`."""
    run_dir = Path(run_dir)
    if world_size > 1:
        head = f"torchrun --nproc_per_node {world_size} $(which automix-fast) train"
    else:
        head = "automix-fast train"
    output = "" if run_dir.parent == Path(DEFAULT_OUTPUT) else f" --output {shlex.quote(str(run_dir.parent))}"
    return f"{head} --resume auto{output} --experiment {shlex.quote(run_dir.name)}"
