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

__all__ = [
    "atomic_path",
    "fsync_directory",
    "is_temporary",
    "remove_stale_temporaries",
]

TEMP_SUFFIX = ".jaxsave-tmp"
_TEMP_RE = re.compile(r"^\.(?P<target>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}" + re.escape(TEMP_SUFFIX) + "$")


def temporary_name(path: str | os.PathLike[str]) -> str:
    """A fresh temporary path next to ``path``."""
    path = os.fspath(path)
    directory, name = os.path.split(os.path.abspath(path))
    return os.path.join(directory, f".{name}.{os.getpid()}.{secrets.token_hex(4)}{TEMP_SUFFIX}")


def is_temporary(name: str) -> bool:
    """Whether a file name is one of :func:`atomic_path`'s temporary files."""
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
        fsync_directory(os.path.dirname(os.path.abspath(path)))


def remove_stale_temporaries(directory: str | os.PathLike[str], target: str | None = None) -> list[str]:
    """Delete temporary files left in ``directory`` by processes that no longer run.

    Files of live processes (on this machine) are kept; with ``target`` (a file
    name), only the temporaries of that file are considered. Returns the removed paths.
    """
    removed = []
    for name in os.listdir(directory):
        m = _TEMP_RE.match(name)
        if (m is None or (target is not None and m.group("target") != target)
                or pid_alive(int(m.group("pid")))):
            continue
        path = os.path.join(directory, name)
        with contextlib.suppress(OSError):
            os.unlink(path)
            removed.append(path)
    return removed


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
