"""Reading the stored rows of a sample file's leaves, through its :class:`SampleSource`
(an HDF5 file or a Zarr store), checked before anything is allocated.

:func:`read_leaves` reads draws ``draws`` of some chains for every leaf, rows past a chain's
count filled as :func:`jaxsave._store.schema.fill_value` says. A dataset must have the shape
and dtype the file's structure and counts need, and store the bytes it declares: a small
hostile file cannot make a reader allocate gigabytes.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from jaxsave._store import schema
from jaxsave._store.schema import VariableInfo
from jaxsave._store.source import LeafArray, SampleSource
from jaxsave.errors import FileFormatError, ReadTooLargeError

__all__ = ["read_leaves"]


def _valid_span(rows: range, count: int) -> slice:
    """The positions in ``rows`` of the draws below ``count`` (a prefix, or a suffix when reversed)."""
    if rows.step > 0:
        return slice(0, min(len(rows), max(0, -(-(count - rows.start) // rows.step))))
    return slice(min(len(rows), max(0, -(-(rows.start - count + 1) // -rows.step))), len(rows))


def _forward(rows: range) -> tuple[int, int, int]:
    """Start, stop and positive step of an h5py slice reading ``rows`` (in forward order)."""
    if not len(rows):
        return 0, 0, 1
    if rows.step > 0:
        return rows.start, rows[-1] + 1, rows.step
    return rows[-1], rows.start + 1, -rows.step


def read_leaves(
    f: SampleSource,
    layout: str,
    variables: list[VariableInfo],
    chains: list[int],
    counts: np.ndarray,
    draws: slice,
) -> list[np.ndarray]:
    """Stored rows ``(len(chains), draws, ...)`` of each leaf; rows past a chain's count are fill.

    Every leaf is checked against the file before anything is allocated: data
    the file declares but does not store is a :class:`FileFormatError`; padding
    short chains to the longest beyond 64 times the draws read (and 64 MiB) is
    a :class:`ReadTooLargeError`.
    """
    n = int(max((counts[c] for c in chains), default=0))
    rows = range(n)[draws]
    storage = [schema.stored_row(var) for var in variables]
    if not chains or not len(rows):
        return [np.empty((len(chains), len(rows)) + shape, dtype) for shape, dtype in storage]
    valid = sum(len(rows[_valid_span(rows, int(counts[c]))]) for c in chains)  # draws read, all chains
    posterior = [
        _checked(f.path, f.dataset(layout, var), (len(counts), n), *st)
        if layout == schema.POSTERIOR
        else None
        for var, st in zip(variables, storage)
    ]

    def backed(slack: int) -> None:  # every dataset read must store the bytes read from it
        for var, (shape, dtype), ds in zip(variables, storage, posterior):
            row = math.prod(shape) * dtype.itemsize
            if ds is not None:
                _check_stored(f, ds, valid * row, slack)
                continue
            for c in chains:
                _check_stored(
                    f,
                    _checked(f.path, f.dataset(layout, var, c), (int(counts[c]),), shape, dtype),
                    int(counts[c]) * row,
                    slack,
                )

    draw_bytes = sum(math.prod(shape) * dtype.itemsize for shape, dtype in storage)
    padded = len(chains) * len(rows) * draw_bytes
    # Small reads may exceed what is stored by 64 MiB; a read that allocates more
    # must be backed byte for byte, or a tiny file could declare 64 MiB of draws
    # that padding over many chains blows up to gigabytes.
    backed(2**26 if padded <= 2**26 else 0)
    if padded > max(64 * valid * draw_bytes, 2**26):
        lengths = [int(counts[c]) for c in chains]
        size = f"{padded / 2**30:.1f} GiB" if padded >= 2**30 else f"{padded / 2**20:.0f} MiB"
        raise ReadTooLargeError(
            f"reading the {len(chains)} chains at once needs {padded:,} bytes ({size}): they hold "
            f"{min(lengths)} to {max(lengths)} draws, and each is padded to {len(rows)} rows, "
            f"{padded / (valid * draw_bytes):.0f} times the {valid * draw_bytes:,} bytes of the draws "
            "themselves. Read one chain at a time with load_samples(path, chain=i), and "
            "draws=slice(start, stop) for part of a long chain"
        )
    return [_read_leaf(f, layout, var, ds, chains, counts, rows) for var, ds in zip(variables, posterior)]


def _check_stored(f: SampleSource, ds: Any, nbytes: int, slack: int) -> None:
    """Refuse to read ``nbytes`` from ``ds`` when the file or store does not hold data for them:
    a dataset can declare any shape and store nothing (unwritten chunks read as the fill value),
    so a small hostile file could make a reader allocate terabytes. ``slack`` bytes are allowed."""
    if nbytes <= slack:
        return
    stored = f.stored_bytes(ds)
    if nbytes > stored + slack:
        raise FileFormatError(
            f"dataset {ds.name!r} declares {nbytes} bytes to read but {f.path!r} stores only "
            f"{stored} for it (a sparse or hostile file)"
        )


def _read_leaf(
    f: SampleSource,
    layout: str,
    var: VariableInfo,
    ds: LeafArray | None,
    chains: list[int],
    counts: np.ndarray,
    rows: range,
) -> np.ndarray:
    """One leaf's rows, read after :func:`read_leaves` checked it (``ds``: its posterior dataset)."""
    shape, dtype = schema.stored_row(var)
    out = np.empty((len(chains), len(rows)) + shape, dtype)
    flip = (lambda a: np.flip(a, axis=-1 - len(shape))) if rows.step < 0 else (lambda a: a)
    if layout == schema.POSTERIOR and chains == list(range(chains[0], chains[-1] + 1)):
        lo, hi, step = _forward(rows)
        if rows.step > 0:  # straight into the result, no temporary
            ds.read_direct(out, np.s_[chains[0] : chains[-1] + 1, lo:hi:step])  # type: ignore[union-attr]
        else:
            out[:] = flip(ds[chains[0] : chains[-1] + 1, lo:hi:step])  # type: ignore[index]
        for i, c in enumerate(chains):
            span = _valid_span(rows, int(counts[c]))
            out[i, : span.start] = out[i, span.stop :] = schema.fill_value(dtype)
        return out
    for i, c in enumerate(chains):
        span = _valid_span(rows, int(counts[c]))
        out[i, : span.start] = out[i, span.stop :] = schema.fill_value(dtype)
        sub = rows[span]
        if not len(sub):
            continue
        lo, hi, step = _forward(sub)
        if layout == schema.POSTERIOR and rows.step > 0:
            ds.read_direct(out, np.s_[c, lo:hi:step], np.s_[i, span])  # type: ignore[union-attr]
        elif layout == schema.POSTERIOR:
            out[i, span] = flip(ds[c, lo:hi:step])  # type: ignore[index]
        else:
            stored = _checked(f.path, f.dataset(layout, var, c), (int(counts[c]),), shape, dtype)
            out[i, span] = flip(stored[lo:hi:step])
    return out


def _checked(path: str, ds: Any, lead: tuple[int, ...], shape: tuple[int, ...], dtype: np.dtype) -> Any:
    if ds.dtype != dtype or not schema.fits(ds.shape, lead, shape):
        raise FileFormatError(
            f"{path!r}: dataset {ds.name} has shape {ds.shape} and dtype {ds.dtype}; the file's "
            f"structure and sample counts need at least {lead + shape} of {dtype}"
        )
    return ds
