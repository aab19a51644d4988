"""Atomic file writes that fail in one line: the one writer of every file the program writes.

A file is written to a hidden temp file beside it (`.<name>.<pid>.tmp`, `temp_path`) and renamed over the
final name, so the final name holds either the old file or the new one, never a half-written
one. On any failure, KeyboardInterrupt included, the temp file is removed and the final name
is untouched. With `durable=True` (checkpoints) the file and, after the rename, its folder are
fsynced, so the new file also survives a power cut.

A full disk, a read-only folder or a missing permission (`WRITE_ERRNOS`) is an `OutputError`
in one line naming the file; any other OSError is raised as it is (a bug shows its traceback).

A process killed outright (SIGKILL, the OOM killer, a power cut) leaves its temp file, as large
as the file it was writing; `remove_stale_temps` removes those of a folder whose writer process
is gone (a run folder, when a run starts or resumes in it).
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from automix_fast.errors import OutputError

# errnos that mean "this place cannot be written", as opposed to a bug or a crash.
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG,
                errno.ENOTDIR, errno.EISDIR}


def write_failure(path: str | os.PathLike, e: OSError, what: str = "") -> OutputError | None:
    """The one-line OutputError for a failed write of `path`, or None when `e` is not a
    can't-write error (those stay as they are: a bug should show its traceback)."""
    if isinstance(e, OutputError):
        return e
    if e.errno not in WRITE_ERRNOS:
        return None
    hint = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded", errno.EROFS: "read-only file system"}
    reason = e.strerror or str(e)
    extra = f" ({hint[e.errno]})" if e.errno in hint and hint[e.errno].lower() not in reason.lower() else ""
    return OutputError(f"cannot write {what + ' ' if what else ''}{path}: {reason}{extra}")


# The temp file of a write of NAME by process PID: `.NAME.PID.tmp` (temp_path); nothing else matches.
_TEMP_NAME = re.compile(r"\.(?P<name>.+)\.(?P<pid>[1-9][0-9]*)\.tmp")


def temp_path(path: Path) -> Path:
    """The temp file this process writes `path` through."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Remove the temp files of `folder` (plain files named as `temp_path` names them) whose
    writer process no longer runs on this machine; returns them. A live process's file, anything
    else in the folder and a file that cannot be removed are left as they are."""
    removed = []
    for entry in sorted(Path(folder).iterdir()):
        found = _TEMP_NAME.fullmatch(entry.name)
        if found is None or not entry.is_file() or entry.is_symlink() or _process_runs(int(found["pid"])):
            continue
        try:
            entry.unlink()
        except OSError:  # gone meanwhile, or a read-only folder: the run's own writes say so
            continue
        removed.append(entry)
    return removed


def _process_runs(pid: int) -> bool:
    """Whether process `pid` exists here (signal 0 checks without sending anything). Off POSIX,
    always True: there os.kill would end the process."""
    if os.name != "posix" or pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # no such process; a number no process can have
        return False
    except PermissionError:  # another user's process
        return True
    return True


def fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable, where the platform and file system allow it."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def replace_from_temp(path: str | os.PathLike, fill: Callable[[Path], None], what: str = "", *,
                      durable: bool = False) -> Path:
    """`fill(tmp)` creates the temp file beside `path` (missing folders are created first),
    which then replaces `path` in one rename; see the module docstring for failures."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fill(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):  # on a read-only folder even the cleanup fails
            tmp.unlink(missing_ok=True)
        err = write_failure(path, e, what) if isinstance(e, OSError) else None
        if err is not None:
            raise err from None
        raise
    if durable:
        fsync_dir(path.parent)
    return path


def write_bytes(path: str | os.PathLike, data: bytes, what: str = "", *, durable: bool = False) -> Path:
    """Write `data` to `path` atomically (see the module docstring); returns the path."""
    def fill(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())

    return replace_from_temp(path, fill, what, durable=durable)


def write_text(path: str | os.PathLike, text: str, what: str = "", *, durable: bool = False) -> Path:
    """Write a text file (UTF-8) as `write_bytes` does."""
    return write_bytes(path, text.encode("utf-8"), what, durable=durable)


def write_json(path: str | os.PathLike, obj: Any, what: str = "") -> Path:
    """Write `obj` as indented JSON (one trailing newline) as `write_bytes` does."""
    return write_text(path, json.dumps(obj, indent=2) + "\n", what)
