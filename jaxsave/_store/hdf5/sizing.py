"""How large the HDF5 collector's datasets are made: draws per chunk, and draws allocated at creation.

Chunks hold about 1 MiB and at most 4096 draws; as many draws as the first block where that is
longer, so that a block is a whole chunk of each leaf. A known count allocates the datasets at
their final size, at most 16384 draws.
"""

from __future__ import annotations

__all__ = ["chunk_rows", "draw_extent"]

#: Target size of one chunk: big enough that reading draws is fast.
_CHUNK_BYTES = 1 * 2**20
#: ... and at most this many draws, so that short runs of small samples stay small files.
_MAX_CHUNK_ROWS = 4096
#: A sample of many small leaves: the chunks of one span of draws, over all leaves, hold about
#: ``_CHUNK_BYTES`` (each leaf's partial last chunk takes its whole size on disk), but each chunk
#: at least this many draws.
_MIN_CHUNK_ROWS = 64
#: A first block longer than the chunks would be gives the chunks its length (so that each block is
#: a whole chunk of each leaf, written straight to the file), but at most this many times theirs.
_BLOCK_CHUNK_FACTOR = 4
#: A known count preallocates at most this many draws (more are grown as they come): the draw
#: scale is written in full, so an over-estimate would fill the file (or memory) with it.
_MAX_PREALLOC_DRAWS = 16384


def chunk_rows(row_bytes: int, sample_row_bytes: int, block: int, largest: int) -> int:
    """Draws per chunk of a leaf of ``row_bytes`` a draw (of ``sample_row_bytes`` over all leaves):
    about 1 MiB, at most 4096, at most the ``largest`` known count of a chain (0: none known);
    for many small leaves, about 1 MiB over all leaves (at least 64 draws), so that a short run
    makes a small file.

    A first ``block`` of more draws than that makes the chunks longer, up to the block (at
    most 1 MiB and 4 times the chunk above): then the blocks that follow, of its length,
    are each one whole chunk of each leaf, written straight to the file. A block too long
    for one chunk is cut into equal chunks where its length allows.

    >>> chunk_rows(8, 8, 0, 0), chunk_rows(8, 8, 0, 100), chunk_rows(8, 80_000, 100, 0)
    (4096, 100, 100)
    """
    leaf_cap = max(1, _CHUNK_BYTES // max(1, row_bytes))
    rows = min(_MAX_CHUNK_ROWS, leaf_cap, max(_MIN_CHUNK_ROWS, _CHUNK_BYTES // max(1, sample_row_bytes)))
    if block > rows:
        rows = _block_chunk(block, min(_MAX_CHUNK_ROWS, leaf_cap, _BLOCK_CHUNK_FACTOR * rows), rows)
    return min(rows, largest) if largest else rows


def draw_extent(capacities: list[int | None], needed: int) -> int:
    """Draws to allocate for chains of these ``capacities`` (``None``: unknown) that need ``needed``:
    the largest capacity (at most 16384) where every one is known.

    >>> draw_extent([100, 50], 10), draw_extent([100, None], 10), draw_extent([10**6], 10)
    (100, 10, 16384)
    """
    known = [c for c in capacities if c is not None]
    if capacities and len(known) == len(capacities):
        return max(needed, min(max(known), _MAX_PREALLOC_DRAWS))
    return needed


def _block_chunk(block: int, limit: int, rows: int) -> int:
    """Draws per chunk for blocks of ``block`` draws: the block, if at most ``limit``; else
    ``block`` cut into equal chunks of at most ``limit`` (and at least half of ``rows``, the
    chunk without the block), so that each block is whole chunks, or into chunks of about
    ``limit`` where no such cut exists.

    >>> _block_chunk(104, 256, 64), _block_chunk(220, 64, 64), _block_chunk(4093, 1024, 256)
    (104, 55, 1024)
    """
    if block <= limit:
        return block
    parts = -(-block // limit)
    for k in range(parts, 2 * parts + 1):
        if block % k == 0 and 2 * (block // k) >= rows:
            return block // k
    return limit
