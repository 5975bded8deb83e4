"""Reading and writing the keys of a local store as regular files below its root, reached
without following a symbolic link: what makes :func:`jaxsave._store.zarr.store.confined_store`
confined.

A hostile store (a chunk or ``zarr.json`` that is a symlink out of it, a FIFO,
``/dev/zero``, a directory on the way that is a link) raises a
:class:`jaxsave.FileFormatError` naming the key, instead of reading or writing outside the
store or hanging. Writes are atomic: an ``O_EXCL | O_NOFOLLOW`` temporary named as zarr names
its temporaries, then a rename into place.
"""

from __future__ import annotations

import os
import stat
import uuid
from typing import Any

from jaxsave.errors import FileFormatError

_NOFOLLOW = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)


def refused(where: str, key: str, what: str) -> FileFormatError:
    """The error for a key of a store that is not a regular file inside it (``where``: the store
    or array, ``what``: what the key is instead)."""
    return FileFormatError(
        f"{where} has {key!r} as {what}; jaxsave reads only regular files inside "
        "a store (no symbolic links, FIFOs or devices): the store is damaged or hostile"
    )


def _refuse(root: str, key: str, what: str) -> FileFormatError:
    return refused(f"the Zarr store {root!r}", key, what)


def _parts(root: str, key: str) -> list[str]:
    parts = key.split("/")
    if any(p in ("", ".", "..") for p in parts) or "\\" in key:
        raise _refuse(root, key, "a key with an empty, '.' or '..' part")
    return parts


_DIRECTORY = _NOFOLLOW | getattr(os, "O_DIRECTORY", 0)


def _open_parent(root: str, key: str, parts: list[str]) -> int | None:
    """A descriptor of the directory holding ``key`` (``None``: it does not exist), reached
    from ``root`` without following a symbolic link."""
    try:
        fd = os.open(root, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_DIRECTORY", 0))
    except (FileNotFoundError, NotADirectoryError):
        return None
    for part in parts[:-1]:
        for attempt in (1, 2):
            try:
                inner = os.open(part, _DIRECTORY, dir_fd=fd)
                break
            except OSError:
                kind = _kind(fd, part)
                if kind == "directory" and attempt == 1:
                    continue  # made by a concurrent write between the open and the look
                os.close(fd)
                if kind in ("missing", "file"):
                    return None
                if kind == "directory":
                    raise
                raise _refuse(root, key, f"a path through {kind} {part!r}") from None
        os.close(fd)
        fd = inner
    return fd


def _kind(dir_fd: int, name: str) -> str:
    """What ``name`` in directory ``dir_fd`` is (not following a symbolic link)."""
    try:
        mode = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return "missing"
    return _kind_of_mode(mode)


def _kind_of_mode(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "directory"
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    return "a device or socket"


def stat_confined(root: str, key: str) -> os.stat_result | None:
    """``lstat`` of ``key`` in the local store at ``root`` (``None`` if there is none); refuses
    a key that is or passes through a symbolic link, a FIFO or a device."""
    parts = _parts(root, key)
    parent = _open_parent(root, key, parts)
    if parent is None:
        return None
    try:
        found = os.stat(parts[-1], dir_fd=parent, follow_symlinks=False)
    except (FileNotFoundError, NotADirectoryError):
        return None
    finally:
        os.close(parent)
    kind = _kind_of_mode(found.st_mode)
    if kind not in ("file", "directory"):
        raise _refuse(root, key, kind)
    return found


#: Where Linux names the file behind a descriptor (one ``readlink`` checks a whole path).
PROC_FD = "/proc/self/fd"


def _open_direct(root: str, real_root: str, key: str) -> int | None:
    """``key`` opened in one call (no link followed at its end, a FIFO not waited on) when the
    file it opened is ``real_root/key`` itself (no link on the way); ``-1``: ask :func:`_open_parent`."""
    try:
        fd = os.open(os.path.join(root, key), _NOFOLLOW | os.O_NONBLOCK)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError:
        return -1
    try:
        opened = os.readlink(f"{PROC_FD}/{fd}")
    except OSError:
        opened = ""
    if opened.removesuffix(" (deleted)") != os.path.join(real_root, key):  # (a live writer's rename)
        os.close(fd)
        return -1
    return fd


def read_confined(root: str, key: str, byte_range: Any = None, real_root: str | None = None) -> bytes | None:
    """The bytes of ``key`` (a ``zarr`` byte range of them) in the local store at ``root``
    (whose real path is ``real_root``); ``None`` if there is none. Refuses
    (:class:`jaxsave.FileFormatError`) a key that is or passes through a symbolic link, or
    that is not a regular file."""
    parts = _parts(root, key)
    fd = _open_direct(root, real_root, key) if real_root is not None else -1
    if fd is None:
        return None
    if fd == -1:
        fd = _open_walking(root, key, parts)
        if fd is None:
            return None
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(f.fileno()).st_mode
        if stat.S_ISDIR(mode):
            return None
        if not stat.S_ISREG(mode):
            raise _refuse(root, key, _kind_of_mode(mode))
        return _read_range(f, byte_range)


def _open_walking(root: str, key: str, parts: list[str]) -> int | None:
    """``key`` opened one directory at a time, none of them through a link."""
    parent = _open_parent(root, key, parts)
    if parent is None:
        return None
    try:
        return os.open(parts[-1], _NOFOLLOW | os.O_NONBLOCK, dir_fd=parent)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError:
        kind = _kind(parent, parts[-1])
        if kind not in ("file", "directory", "missing"):
            raise _refuse(root, key, kind) from None
        raise
    finally:
        os.close(parent)


def _read_range(f: Any, byte_range: Any) -> bytes:
    """``zarr``'s byte ranges (range, offset, suffix) of an open file, as its ``LocalStore`` reads them."""
    if byte_range is None:
        return bytes(f.read())
    size = f.seek(0, os.SEEK_END)
    if hasattr(byte_range, "end"):
        f.seek(byte_range.start)
        return bytes(f.read(max(0, byte_range.end - byte_range.start)))
    if hasattr(byte_range, "offset"):
        f.seek(byte_range.offset)
    elif hasattr(byte_range, "suffix"):
        f.seek(max(0, size - byte_range.suffix))
    else:
        raise TypeError(f"unexpected byte range {byte_range!r}")
    return bytes(f.read())


def check_confined_parents(root: str, key: str, real_root: str | None = None) -> None:
    """Refuse to write ``key`` below a symbolic link (or anything but directories) of the store;
    one ``open`` and ``readlink`` of its directory when that is ``real_root/...`` itself."""
    parts = _parts(root, key)
    if real_root is not None and len(parts) > 1:
        try:
            fd = os.open(os.path.join(root, *parts[:-1]), os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            fd = -1
        if fd != -1:
            try:
                if os.readlink(f"{PROC_FD}/{fd}") == os.path.join(real_root, *parts[:-1]):
                    return
            except OSError:
                pass
            finally:
                os.close(fd)
    parent = _open_parent(root, key, parts)
    if parent is not None:
        os.close(parent)


_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)


def _directory_for_write(root: str, key: str, parts: list[str], real_root: str | None) -> int:
    """A descriptor of the directory that holds ``key``, made where missing, reached from
    ``root`` without a symbolic link: one ``open`` and ``readlink`` when it is
    ``real_root/...`` itself, else one directory at a time (``mkdir`` where missing)."""
    if real_root is not None and len(parts) > 1:
        try:
            fd = os.open(os.path.join(root, *parts[:-1]), _DIRECTORY)
        except OSError:
            fd = -1
        if fd != -1:
            try:
                if os.readlink(f"{PROC_FD}/{fd}") == os.path.join(real_root, *parts[:-1]):
                    return fd
            except OSError:
                pass
            os.close(fd)
    os.makedirs(root, exist_ok=True)
    fd = os.open(root, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_DIRECTORY", 0))
    for part in parts[:-1]:
        for attempt in (1, 2, 3):
            try:
                inner = os.open(part, _DIRECTORY, dir_fd=fd)
                break
            except FileNotFoundError:
                try:
                    os.mkdir(part, dir_fd=fd)
                except FileExistsError:
                    pass  # made by a concurrent write
            except OSError:
                kind = _kind(fd, part)
                if kind in ("directory", "missing") and attempt < 3:
                    continue  # made (or removed) by a concurrent write between the open and the look
                os.close(fd)
                if kind in ("directory", "missing"):
                    raise
                what = "a file" if kind == "file" else kind
                raise _refuse(root, key, f"a path through {what} {part!r}") from None
        else:
            os.close(fd)
            raise FileNotFoundError(os.path.join(root, *parts[:-1]))
        os.close(fd)
        fd = inner
    return fd


def write_confined(root: str, key: str, data: Any, real_root: str | None = None) -> None:
    """Write ``data`` (bytes-like) as ``key`` of the local store at ``root`` (real path
    ``real_root``) in the calling thread: to a temporary file in the key's directory, renamed
    into place (atomic, as zarr's ``LocalStore`` writes, and named as its temporaries are),
    every file and directory opened relative to its parent, never through a symbolic link."""
    parts = _parts(root, key)
    directory = _directory_for_write(root, key, parts, real_root)
    temporary = f"{parts[-1]}.{uuid.uuid4().hex}.partial"
    try:
        fd = os.open(temporary, _CREATE, 0o666, dir_fd=directory)
        try:
            view = memoryview(data).cast("B")
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        os.rename(temporary, parts[-1], src_dir_fd=directory, dst_dir_fd=directory)
    except BaseException:
        try:
            os.unlink(temporary, dir_fd=directory)
        except OSError:
            pass
        raise
    finally:
        os.close(directory)


def list_confined(root: str, prefix: str) -> list[str]:
    """The keys (regular files) below ``prefix`` of the local store at ``root``, as zarr's
    ``LocalStore.list_prefix`` lists them; refuses a symbolic link, FIFO or device among them."""
    base = prefix.strip("/")
    if base:
        found = stat_confined(root, base)
        if found is None or not stat.S_ISDIR(found.st_mode):
            return []
    keys: list[str] = []
    pending = [base]
    while pending:
        relative = pending.pop()
        with os.scandir(os.path.join(root, relative) if relative else root) as entries:
            for entry in entries:
                key = f"{relative}/{entry.name}" if relative else entry.name
                mode = entry.stat(follow_symlinks=False).st_mode
                kind = _kind_of_mode(mode)
                if kind == "directory":
                    pending.append(key)
                elif kind == "file":
                    keys.append(key)
                else:
                    raise _refuse(root, key, kind)
    return keys
