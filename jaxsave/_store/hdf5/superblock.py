"""Clearing the "open for writing" flags of an HDF5 file whose writer was killed.

A file written with ``libver="latest"`` (as :class:`jaxsave.HDF5Collector` does for
SWMR) marks its superblock "open for (SWMR) writing" while a writer has it open.
If the writer is killed, the mark stays, and ordinary readers (``xarray``,
``h5py.File(path)``) refuse the file; readers in SWMR mode (jaxsave's own) still
read it. :func:`clear_open_flags` does what the HDF5 tool ``h5clear -s`` does:
it zeroes the flags and rewrites the superblock checksum (and, for a writer
taking the file over, what ``h5clear --increment`` does: see there). It checks
the old checksum first, so it never writes to a file it does not understand.
"""

from __future__ import annotations

import os
import struct

from jaxsave._core.regular_file import open_regular
from jaxsave.errors import FileFormatError

_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_MASK = 0xFFFFFFFF


def _rot(x: int, k: int) -> int:
    return ((x << k) | (x >> (32 - k))) & _MASK


#: lookup3's ``mix``: ``(x, z, y, r)`` is ``x -= z; x ^= rot(z, r); z += y`` (0, 1, 2: a, b, c).
_MIX = ((0, 2, 1, 4), (1, 0, 2, 6), (2, 1, 0, 8), (0, 2, 1, 16), (1, 0, 2, 19), (2, 1, 0, 4))
#: lookup3's ``final``: ``(x, z, r)`` is ``x ^= z; x -= rot(z, r)``.
_FINAL = ((2, 1, 14), (0, 2, 11), (1, 0, 25), (2, 1, 16), (0, 2, 4), (1, 0, 14), (2, 1, 24))


def lookup3(data: bytes, initval: int = 0) -> int:
    """Bob Jenkins' lookup3 ``hashlittle``, the checksum of HDF5 metadata.

    >>> hex(lookup3(b""))
    '0xdeadbeef'
    >>> hex(lookup3(b"Four score and seven years ago"))  # the value in lookup3.c's self-test
    '0x17770551'
    """
    length = len(data)
    start = (0xDEADBEEF + length + initval) & _MASK
    if length == 0:
        return start
    padded = data + b"\0" * (-length % 12)
    words = struct.unpack(f"<{len(padded) // 4}I", padded)
    v = [start, start, start]
    for i in range(0, len(words) - 3, 3):
        v = [(v[k] + words[i + k]) & _MASK for k in range(3)]
        for x, z, y, r in _MIX:
            v[x] = (v[x] - v[z]) & _MASK
            v[x] ^= _rot(v[z], r)
            v[z] = (v[z] + v[y]) & _MASK
    v = [(v[k] + words[len(words) - 3 + k]) & _MASK for k in range(3)]
    for x, z, r in _FINAL:
        v[x] ^= v[z]
        v[x] = (v[x] - _rot(v[z], r)) & _MASK
    return v[2]


def _find_superblock(fh) -> int:
    for offset in (0, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536):
        fh.seek(offset)
        if fh.read(8) == _SIGNATURE:
            return offset
    raise FileFormatError("no HDF5 superblock found: not an HDF5 file")


def _head(path: str | os.PathLike) -> bytes:
    """The superblock's version, three sizes or flags bytes (fewer if truncated)."""
    with open_regular(path) as fh:  # a FIFO would block the open
        offset = _find_superblock(fh)
        fh.seek(offset + 8)
        return fh.read(4)


def open_flags(path: str | os.PathLike) -> int:
    """The superblock's file-consistency flags (0: closed cleanly, or an old format)."""
    head = _head(path)
    if len(head) < 4 or head[0] < 2:
        return 0
    return head[3]


def version(path: str | os.PathLike) -> int:
    """The superblock's version (3 for files HDF5 can write in SWMR mode)."""
    head = _head(path)
    if not head:
        raise FileFormatError("the HDF5 superblock is truncated")
    return head[0]


#: How far past the end of a killed writer's file :func:`clear_open_flags` moves its end address
#: (``h5clear --increment``'s default): room for what the writer had allocated but not written.
EOA_MARGIN = 2**20


def _checked_superblock(fh) -> tuple[int, bytes] | None:
    """The superblock's offset and bytes (checksum verified); ``None`` for versions 0/1."""
    offset = _find_superblock(fh)
    fh.seek(offset)
    head = fh.read(12)
    if len(head) < 12 or head[8] < 2:  # versions 0/1 have no flags and no checksum
        return None
    size = 12 + 4 * head[9]
    fh.seek(offset)
    block = fh.read(size + 4)
    if len(block) < size + 4 or head[9] not in (2, 4, 8):
        raise FileFormatError("the HDF5 superblock is truncated or malformed")
    (stored,) = struct.unpack("<I", block[size:])
    if lookup3(block[:size]) != stored:
        raise FileFormatError("the HDF5 superblock checksum does not match: the file is corrupt")
    return offset, block[:size]


def clear_open_flags(path: str | os.PathLike, *, eoa_margin: int | None = None) -> bool:
    """Zero the "open for writing" flags of a v2/v3 superblock; returns whether anything changed.

    With ``eoa_margin`` (a takeover of a killed writer's file, like ``h5clear -s
    --increment``), a file that was left open, or whose stored end-of-file
    address (EOA) lags behind its real end (a writer killed in SWMR mode between
    writing data and the superblock), also gets EOA = max(EOA, file size) +
    ``eoa_margin``, and is extended with zeros to it (a sparse hole on most
    file systems). Otherwise HDF5 takes the objects past the stored EOA for
    outside the file ("addr overflow") and allocates new ones over them. Only
    call this when no process has the file open for writing.
    """
    with open(path, "r+b") as fh:
        found = _checked_superblock(fh)
        if found is None:
            return False
        offset, block = found
        width = block[9]
        base = int.from_bytes(block[12 : 12 + width], "little")
        at = 12 + 2 * width
        eoa = base + int.from_bytes(block[at : at + width], "little")
        eof = os.fstat(fh.fileno()).st_size
        new = bytearray(block)
        new[11] = 0
        # A stored EOA past the end is a truncated file: left for HDF5 to refuse, not padded.
        grow = eoa_margin is not None and eoa <= eof and (block[11] != 0 or eoa < eof)
        if grow:
            eoa = eof + int(eoa_margin)  # type: ignore[arg-type]
            if eoa - base >= 2 ** (8 * width):
                raise FileFormatError("the HDF5 file is too large for its superblock's address size")
            new[at : at + width] = (eoa - base).to_bytes(width, "little")
        if bytes(new) == block:
            return False
        if grow:  # the file first, so that a stored EOA never points past its end
            os.ftruncate(fh.fileno(), eoa)
        fh.seek(offset)
        fh.write(bytes(new) + struct.pack("<I", lookup3(bytes(new))))
        fh.flush()
        os.fsync(fh.fileno())
    return True


def stored_eof(path: str | os.PathLike) -> int | None:
    """The end-of-file address a v2/v3 superblock records (``None`` for older superblocks)."""
    with open_regular(path) as fh:  # a FIFO would block the open
        offset = _find_superblock(fh)
        fh.seek(offset + 8)
        head = fh.read(4)
        if len(head) < 4 or head[0] < 2:
            return None
        size = head[1]
        fh.seek(offset + 12 + 2 * size)
        raw = fh.read(size)
    if len(raw) < size:
        raise FileFormatError("the HDF5 superblock is truncated")
    return offset + int.from_bytes(raw, "little")
