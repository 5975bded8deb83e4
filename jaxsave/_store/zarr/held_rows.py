"""Rows a :class:`jaxsave.ZarrCollector` keeps until its next commit.

A block that does not fill whole chunks (compressed arrays, chains not in one run) is kept,
and the next block of the same chains that continues it is joined to it, so that a partly
filled chunk is read and rewritten once per commit, not once per block.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from jaxsave._store.zarr.arrays import StoreArrays


class HeldRows:
    """Runs of rows ``(first chain, chains, start, draws, [block rows per leaf])``, oldest first.

    >>> held = HeldRows()
    >>> held.add(0, 0, [np.zeros((2, 3, 4))])
    >>> held.add(0, 3, [np.ones((2, 1, 4))])  # continues the run: joined to it
    >>> [run[:4] for run in held.runs], held.nbytes
    ([(0, 2, 0, 4)], 256)
    """

    def __init__(self) -> None:
        self.runs: list[tuple[int, int, int, int, list[list[np.ndarray]]]] = []
        self.nbytes = 0

    def add(self, first: int, start: int, values: list[np.ndarray]) -> None:
        """Keep (a copy of) rows ``(chains, draws, ...)`` of chains ``first...`` at draws ``start...``."""
        rows = [np.array(v) for v in values]  # the writer reuses the memory of the block
        chains, n = rows[0].shape[:2]
        last = self.runs[-1] if self.runs else None
        if last is not None and last[0] == first and last[1] == chains and last[2] + last[3] == start:
            last[4].append(rows)
            self.runs[-1] = (first, chains, last[2], last[3] + n, last[4])
        else:
            self.runs.append((first, chains, start, n, [rows]))
        self.nbytes += sum(r.nbytes for r in rows)

    def write(self, bound: Callable[[int], StoreArrays]) -> None:
        """Write each run in one write per leaf, into ``bound(stop)`` (the arrays holding its draws).

        A run is dropped only once it is written: after a failed write (a full disk) it is still
        held, so the counts that would count it are not written either."""
        while self.runs:
            first, chains, start, n, pieces = self.runs[0]
            values = [np.concatenate([p[j] for p in pieces], axis=1) for j in range(len(pieces[0]))]
            self.runs[0] = (first, chains, start, n, [values])  # joined once, also for a retry
            bound(start + n).write(first, start, values)
            self.runs.pop(0)
            self.nbytes -= sum(v.nbytes for v in values)
