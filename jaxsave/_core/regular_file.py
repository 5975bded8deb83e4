"""Opening a path for reading only if it is a regular file.

A FIFO blocks ``open()`` until a writer comes (forever, for a planted one) and a device reads
without end; jaxsave reads only regular files. The open is non-blocking and the type checked on
the open descriptor (``fstat``), so the path cannot change in between.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import BinaryIO

from jaxsave.errors import FileFormatError

__all__ = ["open_regular"]

_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
_KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
          stat.S_IFSOCK: "a socket"}  # fmt: skip


def open_regular(path: str | os.PathLike) -> BinaryIO:
    """``open(path, "rb")``, refused with a :class:`~jaxsave.errors.FileFormatError` unless
    ``path`` is a regular file (a directory: ``IsADirectoryError``, as ``open`` raises).

    >>> try:
    ...     open_regular("/dev/null")
    ... except FileFormatError as error:
    ...     print(error)
    '/dev/null' is a character device, not a regular file: jaxsave reads only regular files
    """
    fd = os.open(path, _FLAGS)  # non-blocking: opening a FIFO does not wait for a writer
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), os.fspath(path))
        if not stat.S_ISREG(mode):
            kind = _KINDS.get(stat.S_IFMT(mode), "not a file")
            raise FileFormatError(
                f"{os.fspath(path)!r} is {kind}, not a regular file: jaxsave reads only regular files"
            )
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
