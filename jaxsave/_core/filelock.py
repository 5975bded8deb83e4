"""One writer per sample file: an OS lock on ``<file>.lock``, held while a collector writes.

The samples file itself cannot carry the lock: its writes replace it by renames
(see :mod:`jaxsave._store.hdf5.swmr_file`), and a lock belongs to one inode. So the lock is
``flock`` on a sidecar file next to it, ``<file>.lock``, which also holds the
holder's pid, host and start time for the error message of the next writer.

* ``flock`` locks belong to one open file description: two collectors in one
  process conflict as well as two processes. A registry of the locks held in
  this process covers file systems that emulate ``flock`` per process (NFS).
* The kernel drops the lock when the holder dies, even by SIGKILL: a stale
  ``<file>.lock`` left by a killed writer is simply taken over.
* :meth:`FileLock.release` deletes ``<file>.lock`` while still holding the
  lock; :func:`acquire` checks, once it holds a lock, that the path still names
  the file it locked (otherwise it locked a file just deleted, and tries again).

Readers never take the lock: they read while the writer runs.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import gc
import json
import logging
import os
import socket
import threading
import weakref

from jaxsave.errors import FileInUseError

logger = logging.getLogger("jaxsave")

LOCK_SUFFIX = ".lock"
_UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)
_held: dict[str, weakref.ref] = {}  # lock path -> the FileLock of this process that holds it
_registry = threading.RLock()  # reentrant: a release can run from gc inside acquire


def lock_path(path: str | os.PathLike) -> str:
    """The lock file of sample file ``path`` (next to the file a symlink points to)."""
    return os.path.realpath(os.fspath(path)) + LOCK_SUFFIX


class FileLock:
    """A held lock on ``<file>.lock``; :meth:`release` (or garbage collection) frees it."""

    def __init__(self, path: str, lock_file: str, fd: int | None):
        self.path, self.lock_file, self._fd = path, lock_file, fd
        self._pid = os.getpid()  # a forked child shares the lock: it must not delete the file

    def release(self) -> None:
        """Delete the lock file (still locked, so no one locks the deleted file) and unlock."""
        with _registry:
            if _held.get(self.lock_file, lambda: None)() is self:
                del _held[self.lock_file]
            fd, self._fd = self._fd, None
        if fd is None:
            return
        with contextlib.suppress(OSError):
            ours, now = os.fstat(fd), os.stat(self.lock_file)
            if (ours.st_dev, ours.st_ino) == (now.st_dev, now.st_ino) and self._pid == os.getpid():
                os.unlink(self.lock_file)
        os.close(fd)

    def __del__(self) -> None:  # an abandoned collector's lock is released when it is collected
        try:
            self.release()
        except Exception:  # noqa: BLE001 - at interpreter exit the modules may be gone
            pass


def acquire(path: str | os.PathLike) -> FileLock:
    """Lock sample file ``path`` for writing, or raise :class:`FileInUseError` naming the holder."""
    path = os.fspath(path)
    lock_file = lock_path(path)
    if _held.get(lock_file) is not None:
        gc.collect()  # a collector that nothing references any more (a cycle) frees its lock
    with _registry:
        if _held.get(lock_file, lambda: None)() is not None:
            raise FileInUseError(
                f"{path!r} is being written by another collector in this process "
                f"(pid {os.getpid()}): one sample file takes one writer; close the other collector "
                "first (its saver's postprocess(state), also after a run that failed, e.g. in an "
                "earlier notebook cell; or collector.close()), or write to another path"
            )
        lock = FileLock(path, lock_file, _lock_file(path, lock_file))
        _held[lock_file] = weakref.ref(lock)
        return lock


def _lock_file(path: str, lock_file: str) -> int | None:
    """A ``flock``-ed descriptor of ``lock_file`` (``None``: the file system has no locks)."""
    for _ in range(100):
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe_holder(fd)
            os.close(fd)
            raise FileInUseError(
                f"{path!r} is being written by another process ({holder}; lock file "
                f"{lock_file!r}): one sample file takes one writer at a time; give each run or "
                "process its own file (e.g. "
                "f'run-{jax.process_index()}.h5'), or wait until the other writer is done"
            ) from None
        except OSError as error:
            if error.errno not in _UNSUPPORTED:
                os.close(fd)
                raise
            logger.warning(
                "jaxsave: %s has no file locks (%s): another process writing %r is not detected",
                os.path.dirname(lock_file),
                error,
                path,
            )
            os.close(fd)
            return None
        with contextlib.suppress(FileNotFoundError):
            ours, now = os.fstat(fd), os.stat(lock_file)
            if (ours.st_dev, ours.st_ino) == (now.st_dev, now.st_ino):
                _write_holder(fd)
                return fd
        os.close(fd)  # we locked a lock file that its holder deleted on release: lock the new one
    raise FileInUseError(f"cannot lock {lock_file!r}: it is deleted and recreated continuously")


def _write_holder(fd: int) -> None:
    started = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": started})
    with contextlib.suppress(OSError):  # the lock holds without the description (full disk)
        os.ftruncate(fd, 0)
        os.pwrite(fd, record.encode() + b"\n", 0)


def _describe_holder(fd: int) -> str:
    """``pid 123 on host h, since <time>`` from a lock file (whatever of it is readable)."""
    try:
        record = json.loads(os.pread(fd, 4096, 0).decode())
        return f"pid {int(record['pid'])} on host {record['host']}, since {record['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder not recorded yet"


def hold(key: str, message: str) -> FileLock:
    """Hold ``key`` (a store that has no file to lock: memory, object storage) for one writer of
    this process; :class:`FileInUseError` with ``message`` if another holds it."""
    lock_file = f"in-process:{key}"
    if _held.get(lock_file) is not None:
        gc.collect()  # an abandoned writer (a cycle) frees it
    with _registry:
        if _held.get(lock_file, lambda: None)() is not None:
            raise FileInUseError(message)
        lock = FileLock(key, lock_file, None)
        _held[lock_file] = weakref.ref(lock)
        return lock


def check_unlocked(path: str | os.PathLike) -> None:
    """Raise :class:`FileInUseError` if a collector writes ``path`` now (for recover)."""
    if os.path.exists(lock_path(path)):
        acquire(path).release()
