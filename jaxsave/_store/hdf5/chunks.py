"""Writing rows into a chunked HDF5 dataset, whole chunks straight to the file.

:func:`write_rows` (one chain's draws) and :func:`write_block` (several chains' draws)
write the chunks a write covers whole with ``write_direct_chunk`` (past HDF5's selection
and chunk cache) when the dataset is unfiltered, and the rest as hyperslabs through
h5py's low-level API. What a write needs to know of its dataset is its :class:`Target`,
read once and held by the caller for every block.
"""

from __future__ import annotations

from typing import NamedTuple

import h5py
import numpy as np

__all__ = ["Target", "write_block", "write_rows"]


class Target(NamedTuple):
    """What writing rows needs of a dataset, read once: its chunk length along the draw axis,
    whether whole chunks may go to the file directly, and its dtype.

    Reading these from h5py costs about 15 us a dataset (``chunks``, the filters), which a
    sample of 100 leaves paid at every block; hold the target and pass it to each write.
    """

    rows: int  #: draws per chunk along the draw axis; 0 if the dataset is not chunked
    direct: bool  #: unfiltered, one chain per chunk, whole trailing axes: a whole chunk is one write
    dtype: np.dtype  #: the dataset's dtype (rows of another dtype go through HDF5's conversion)

    @classmethod
    def of(cls, ds: h5py.Dataset, axis: int) -> Target:
        """The target of ``ds``, whose draw axis is ``axis`` (the axes before it are chains)."""
        chunks = ds.chunks
        if chunks is None:
            return cls(0, False, ds.dtype)
        direct = (
            all(c == 1 for c in chunks[:axis])
            and chunks[axis + 1 :] == ds.shape[axis + 1 :]
            and not ds.id.get_create_plist().get_nfilters()
        )
        return cls(chunks[axis], direct, ds.dtype)


def _whole_chunks(target: Target, start: int, n: int, dtype: np.dtype) -> tuple[int, int, int] | None:
    """``(lo, hi, rows)``: the chunks of draws ``lo..hi`` (``rows`` each) that a write of draws
    ``start..start+n`` covers whole and may go to the file directly; ``None`` if none."""
    rows = target.rows
    if not target.direct or dtype != target.dtype:
        return None
    lo, hi = -(-start // rows) * rows, (start + n) // rows * rows
    return (lo, hi, rows) if lo < hi else None


def _write_slab(ds: h5py.Dataset, offset: tuple[int, ...], rows: np.ndarray) -> None:
    """Write ``rows`` into ``ds`` at ``offset`` (one index per axis of ``ds``), through h5py's
    low-level API: about 50 us a call where ``ds[...] = rows`` costs about 200 us."""
    if rows.size == 0:
        return
    rows = np.ascontiguousarray(rows)
    file_space = ds.id.get_space()
    file_space.select_hyperslab(offset, (1,) * (len(offset) - rows.ndim) + rows.shape)
    ds.id.write(h5py.h5s.create_simple(rows.shape), file_space, rows)


def write_rows(
    ds: h5py.Dataset, lead: tuple[int, ...], start: int, rows: np.ndarray, target: Target | None = None
) -> None:
    """``ds[(*lead, slice(start, start + len(rows)))] = rows``, whole chunks written directly.

    ``ds`` must hold those draws already (grown first); ``target`` is ``Target.of(ds, len(lead))``,
    read here if not given.
    """
    if target is None:
        target = Target.of(ds, len(lead))
    _write_span(ds, lead, start, rows, _whole_chunks(target, start, len(rows), rows.dtype))


def write_block(
    ds: h5py.Dataset, first: int, start: int, rows: np.ndarray, target: Target | None = None
) -> None:
    """``ds[first:first + len(rows), start:start + rows.shape[1]] = rows``.

    That is chains ``first...``, draws ``start...``; ``ds`` must hold them already.
    ``target`` is ``Target.of(ds, 1)``, read here if not given.
    """
    if target is None:
        target = Target.of(ds, 1)
    whole = _whole_chunks(target, start, rows.shape[1], rows.dtype)  # the same span for every chain
    if whole is None:
        _write_slab(ds, (first, start) + (0,) * (rows.ndim - 2), rows)
        return
    for i, chain_rows in enumerate(rows):
        _write_span(ds, (first + i,), start, chain_rows, whole)


def _write_span(
    ds: h5py.Dataset, lead: tuple[int, ...], start: int, rows: np.ndarray, whole: tuple[int, int, int] | None
) -> None:
    """Draws ``start...`` of ``rows``: the chunks ``whole`` (of :func:`_whole_chunks`) directly,
    the rest as slabs."""
    zeros = (0,) * (rows.ndim - 1)
    if whole is None:
        _write_slab(ds, (*lead, start, *zeros), rows)
        return
    lo, hi, size = whole
    if lo > start:
        _write_slab(ds, (*lead, start, *zeros), rows[: lo - start])
    # Each chunk written from its rows where they are contiguous (a chain's rows of a block from
    # the device are: 10.4 ms CPU for 20 MB against 12.1 with a copy), else copied into one reused
    # buffer; the edges, empty where the block is whole chunks, are not even sliced (7 us of
    # Python a leaf where it was 11).
    write, scratch = ds.id.write_direct_chunk, None
    for k in range(lo, hi, size):
        chunk = rows[k - start : k - start + size]
        if not chunk.flags.c_contiguous:
            if scratch is None:
                scratch = np.empty((size, *rows.shape[1:]), rows.dtype)
            np.copyto(scratch, chunk)
            chunk = scratch
        write((*lead, k, *zeros), chunk)
    if hi < start + len(rows):
        _write_slab(ds, (*lead, hi, *zeros), rows[hi - start :])
