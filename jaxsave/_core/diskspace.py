"""Room on disk: refuse an HDF5 write that may not fit, before the HDF5 library sees it.

HDF5 cannot recover from a write that fails for lack of space (a full file
system, ``ulimit -f``): the file stays open half-written and the process
crashes when it exits. So jaxsave checks the free space and the file-size
limit first and raises an ordinary ``OSError`` (``ENOSPC`` or ``EFBIG``)
while the file is still consistent.
"""

from __future__ import annotations

import errno
import os

from jaxsave._core.paths import absolute

try:
    import resource as _resource
except ImportError:  # not POSIX: no file-size limit
    _resource = None  # type: ignore[assignment]

__all__ = ["MARGIN", "Room", "check_room"]

#: Free space kept beyond what a write may need (HDF5 metadata, the last flush).
MARGIN = 2 * 2**20


def check_room(path: str, needed: int, held: str = "") -> None:
    """Raise ``OSError`` if ``path`` cannot grow by ``needed`` bytes plus :data:`MARGIN`.

    ``held`` is added to the message (what the file keeps, e.g. the samples written so far).
    """
    Room(path).check(needed, held)


class Room:
    """:func:`check_room` for one path, checked again and again (per block written): its
    absolute path and directory are resolved once; each check is one ``statvfs``, one
    ``getrlimit`` and, under a file-size limit only, one ``stat``.

    >>> import tempfile, os
    >>> room = Room(os.path.join(tempfile.mkdtemp(), "run.h5"))
    >>> room.check(1024)  # room for 1 KiB (and the margin)
    >>> room.check(2**62)  # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    OSError: [Errno 28] No space left on device for ...
    """

    def __init__(self, path: str):
        self.path = absolute(path)  # link/.. is the link target's parent, as the kernel has it
        self.directory = os.path.dirname(self.path)

    def check(self, needed: int, held: str = "") -> None:
        """Raise ``OSError`` (``ENOSPC`` or ``EFBIG``) if the file cannot grow by ``needed``
        bytes plus :data:`MARGIN`; ``held`` is added to the message."""
        needed += MARGIN
        fs = os.statvfs(self.directory)
        free = fs.f_bavail * fs.f_frsize  # what shutil.disk_usage calls free
        tail = f"; {held}" if held else ""
        if needed > free:
            raise OSError(
                errno.ENOSPC,
                f"No space left on device for {self.path}: {free / 2**20:.1f} MiB free, "
                f"the write needs up to {needed / 2**20:.1f} MiB{tail}",
            )
        if _resource is None:
            return
        limit = _resource.getrlimit(_resource.RLIMIT_FSIZE)[0]
        if limit == _resource.RLIM_INFINITY:
            return
        try:
            size = os.stat(self.path).st_size
        except FileNotFoundError:
            size = 0
        if size + needed > limit:
            raise OSError(
                errno.EFBIG,
                f"File too large: {self.path} would pass this process's file size limit "
                f"(ulimit -f) of {limit} bytes{tail}",
            )
