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
import shutil

try:
    import resource as _resource
except ImportError:  # not POSIX: no file-size limit
    _resource = None  # type: ignore[assignment]

__all__ = ["MARGIN", "check_room"]

#: Free space kept beyond what a write may need (HDF5 metadata, the last flush).
MARGIN = 2 * 2**20


def check_room(path: str, needed: int, held: str = "") -> None:
    """Raise ``OSError`` if ``path`` cannot grow by ``needed`` bytes plus :data:`MARGIN`.

    ``held`` is added to the message (what the file keeps, e.g. the samples written so far).
    """
    needed += MARGIN
    path = os.path.abspath(path)
    free = shutil.disk_usage(os.path.dirname(path)).free
    tail = f"; {held}" if held else ""
    if needed > free:
        raise OSError(
            errno.ENOSPC,
            f"No space left on device for {path}: {free / 2**20:.1f} MiB free, "
            f"the write needs up to {needed / 2**20:.1f} MiB{tail}",
        )
    if _resource is not None:
        limit = _resource.getrlimit(_resource.RLIMIT_FSIZE)[0]
        size = os.path.getsize(path) if os.path.exists(path) else 0
        if limit != _resource.RLIM_INFINITY and size + needed > limit:
            raise OSError(
                errno.EFBIG,
                f"File too large: {path} would pass this process's file size limit "
                f"(ulimit -f) of {limit} bytes{tail}",
            )
