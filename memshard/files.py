"""File-system helpers every layer shares: where memshard writes (the workspace root), a user's path
checked where it comes in (a FIFO or a device refused before it is opened), a directory or a file
proved writable before work starts, and a file or a directory replaced whole.

They know nothing of datasets, models or checkpoints; they fail in one line (a `MemshardError`)
naming the setting or flag the path came from.
"""

from __future__ import annotations

import functools
import os
import shutil
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from memshard.errors import MemshardError, shown

WORKSPACE_ENV = "MEMSHARD_WORKSPACE"


@functools.cache
def _starting_directory() -> Path:
    """The working directory at the process's first question about the workspace, kept: a process that
    changes directory later (a Ray Tune trial, a test) still means the same folder."""
    return Path.cwd().absolute()


def workspace_root() -> Path:
    """Where memshard's relative paths lie: MEMSHARD_WORKSPACE when set (a relative value is taken from
    the starting directory), else the working directory the process started in. Absolute either way."""
    chosen = os.environ.get(WORKSPACE_ENV, "").strip()
    return _starting_directory() / Path(chosen).expanduser() if chosen else _starting_directory()


def in_workspace(path: str | Path) -> Path:
    """`path` made absolute: a relative one (a default such as .memshard/checkpoints, or a setting a user
    gave) lies under the workspace root; an absolute one is kept."""
    return workspace_root() / Path(path).expanduser()


def checked_path(text: str | Path, what: str) -> Path:
    """A user-given path, checked once where it comes in: a NUL byte or a name too long for the file
    system is a one-line error here instead of an OSError wherever the path is first used."""
    path = Path(text)
    try:
        mode = path.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        return path  # a missing path is the caller's to name
    except (OSError, ValueError) as exc:
        raise MemshardError(f"{what} {shown(str(text))} cannot be used as a path ({_reason(exc)}): fix it") from None
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):  # opening a FIFO blocks for ever, a device reads without end
        raise MemshardError(f"{what} {shown(str(text))} is a {_special_kind(mode)}, not a file or a directory: "
                            "give a regular file or a directory")
    return path


def check_writable_target(path: str | Path, what: str, kind: str = "file") -> Path:
    """A file or directory (`kind`) memshard will create or write, checked before work starts: what is
    there already is of that kind and writable, and the folder it lies in (or the nearest existing
    one, for folders still to be made) accepts a new file. Proved by a temporary file, removed at once:
    nothing is left behind. Returns `path` made absolute."""
    path = checked_path(path, what).absolute()
    if path.exists() and path.is_dir() != (kind == "directory"):
        raise MemshardError(f"{what}: {path} is {'not ' if kind == 'directory' else ''}a directory: "
                            f"give a {kind} path")
    folder = path if kind == "directory" else path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise MemshardError(f"{what}: {folder} is not a directory, so {path} cannot be created: choose another path")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise MemshardError(f"{what}: {folder} is not writable ({_reason(exc)}), so {path} cannot be written: "
                            "choose another path") from None
    if path.is_file() and not os.access(path, os.W_OK):
        raise MemshardError(f"{what}: {path} is read-only: make it writable or choose another path")
    return path


def ensure_writable_dir(path: str | Path, what: str) -> Path:
    """Create the directory `path` if needed and prove a file can be written in it, or fail in one
    line naming `what` (a flag or setting). Used before work starts: --out, data.cache_dir,
    mlflow.checkpoint_dir."""
    path = checked_path(path, what).absolute()
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise MemshardError(f"{what}: {path} is not a writable directory ({_reason(exc)}): choose another") from None
    return path


def replace_file(path: Path, write: Callable[[BinaryIO], None]) -> int:
    """Write the file `path` with `write(file)` (a binary file open on a sibling) and move it into place: a
    reader (or a crash mid-write) finds the previous file or the new one whole, never a torn one, and a
    failed write leaves no partial behind. Returns its size. A write the file system refuses raises that
    OSError (disk full, a quota, a file size limit), even through a writer that reports it otherwise
    (torch.save says "unexpected pos"). The partial's name holds the process id, so two processes never
    write the same partial."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        with open(partial, "wb") as file:
            recorded = _RecordedWrites(file)
            try:
                write(recorded)
            except Exception:
                if recorded.error is not None:
                    raise recorded.error from None
                raise
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path.stat().st_size


class _RecordedWrites:
    """A binary file that remembers the OSError a write raised, for `replace_file` to report."""

    def __init__(self, file: BinaryIO) -> None:
        self._file, self.error = file, None

    def write(self, data) -> int:
        try:
            return self._file.write(data)
        except OSError as error:
            self.error = error
            raise

    def __getattr__(self, name: str):  # the rest of the file's interface (tell, seek, read: zipfile uses them)
        return getattr(self._file, name)


def replace_directory(new: Path, target: Path) -> None:
    """Move the directory `new` to `target`, replacing whatever directory is there: a reader sees the
    old one or the new one, never a mix. `new` must be on `target`'s file system (a sibling)."""
    if not target.exists():
        os.replace(new, target)
        return
    # POSIX cannot rename a directory onto a non-empty one: move the old one aside first.
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.replace(target, old / "previous")
    try:
        os.replace(new, target)
    except OSError:
        os.replace(old / "previous", target)  # put the old one back: a failed replace changes nothing
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def _special_kind(mode: int) -> str:
    """What a file that is neither a regular file nor a directory is, in a word or two."""
    kinds = {stat.S_ISFIFO: "named pipe (FIFO)", stat.S_ISCHR: "character device", stat.S_ISBLK: "block device",
             stat.S_ISSOCK: "socket"}
    return next((name for test, name in kinds.items() if test(mode)), "special file")


def _reason(exc: OSError | ValueError) -> str:
    """Why an operating-system call failed, in a few words on one line."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return " ".join(str(exc).split())
