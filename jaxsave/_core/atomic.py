"""Atomic file replacement: write to a temporary file, fsync, rename, fsync the directory.

A reader (or a crash) sees either the complete old file or the complete new one,
never a partial file. The temporary file lives in the target's directory (a
rename is only atomic within one file system) and is named
``.<target>.<pid>.<random>.jaxsave-tmp``, so leftovers from a killed process
are easy to recognise (:func:`is_temporary`) and clean up
(:func:`remove_stale_temporaries`).

>>> import os, tempfile
>>> d = tempfile.mkdtemp()
>>> with atomic_path(os.path.join(d, "a.txt")) as tmp, open(tmp, "wb") as f:
...     _ = f.write(b"hello")
>>> open(os.path.join(d, "a.txt"), "rb").read(), os.listdir(d)
(b'hello', ['a.txt'])
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
from collections.abc import Iterator
from typing import BinaryIO

from jaxsave._core.paths import check_directory, directory_of

__all__ = [
    "atomic_write",
    "atomic_path",
    "fsync_directory",
    "is_temporary",
    "remove_stale_temporaries",
]

TEMP_SUFFIX = ".jaxsave-tmp"
_TEMP_RE = re.compile(r"^\.(?P<target>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}" + re.escape(TEMP_SUFFIX) + "$")
#: Aside copies of HDF5 files that older jaxsave versions wrote: ``<target>.jaxsave-<pid>.tmp``.
_LEGACY_TEMP_RE = re.compile(r"^(?P<target>.+)\.jaxsave-(?P<pid>\d+)\.tmp$")


def temporary_name(path: str | os.PathLike[str]) -> str:
    """A fresh temporary path next to ``path``."""
    directory, name = os.path.split(os.fspath(path))
    return os.path.join(directory, f".{name}.{os.getpid()}.{secrets.token_hex(4)}{TEMP_SUFFIX}")


def is_temporary(name: str) -> bool:
    """Whether a file name is one of :func:`atomic_write`'s (or :func:`atomic_path`'s) temporary files."""
    return _TEMP_RE.match(os.path.basename(name)) is not None


def fsync_directory(directory: str | os.PathLike[str]) -> None:
    """Make a rename or unlink inside ``directory`` durable (no-op where unsupported)."""
    try:
        fd = os.open(os.fspath(directory), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, fsync: bool = True) -> Iterator[str]:
    """Yield a temporary path to write ``path``'s new content to, by any means.

    When the block ends without an exception, the temporary file is fsynced and
    renamed over ``path`` and the directory is fsynced; on an exception it is
    removed and ``path`` is left as it was. Use it for libraries that insist on
    writing to a path themselves (safetensors, h5py).
    """
    check_directory(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"cannot write {os.fspath(path)!r}: it is a directory")
    tmp = temporary_name(path)
    try:
        yield tmp
        if fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if fsync:
        fsync_directory(directory_of(path))


@contextlib.contextmanager
def atomic_write(
    path: str | os.PathLike[str], *, fsync: bool = True, buffering: int = 1 << 20
) -> Iterator[BinaryIO]:
    """Open a temporary binary file that replaces ``path`` atomically on success.

    The file is flushed and fsynced before the rename; ``fsync=False`` skips both
    fsyncs (atomic against crashes of the process, not of the machine).
    """
    with atomic_path(path, fsync=False) as tmp, open(tmp, "xb", buffering=buffering) as f:
        yield f  # type: ignore[misc]
        f.flush()
        if fsync:
            os.fsync(f.fileno())
    if fsync:
        fsync_directory(directory_of(path))


def remove_stale_temporaries(directory: str | os.PathLike[str], target: str | None = None) -> list[str]:
    """Delete temporary files left in ``directory`` by processes that no longer run.

    Both :func:`is_temporary` names and the ``<target>.jaxsave-<pid>.tmp`` aside
    copies of older versions count. Files of live processes (on this machine), and
    files another process holds locked (an HDF5 writer elsewhere), are kept; with
    ``target`` (a file name), only the temporaries of that file are considered.
    Returns the removed paths.
    """
    removed = []
    for name in os.listdir(directory):
        m = _TEMP_RE.match(name) or _LEGACY_TEMP_RE.match(name)
        if (
            m is None
            or (target is not None and m.group("target") != target)
            or pid_alive(int(m.group("pid")))
        ):
            continue
        path = os.path.join(directory, name)
        if not os.path.isfile(path) or _locked(path):
            continue
        with contextlib.suppress(OSError):
            os.unlink(path)
            removed.append(path)
    return removed


def _locked(path: str) -> bool:
    """Whether another process holds a lock on ``path`` (HDF5 writers lock their file)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: the pid check alone decides
        return False
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return True  # cannot look: keep it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (this process counts as running)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True
