"""The host's count of each chain's steps and kept samples, block by block.

The saving loop carries no counter for the step a block began at or for the
samples kept so far (on XLA:CPU a carried counter that the step updates cost
about 1.3 us a step, docs/performance.md): a chain's block begins where its
previous one ended, and its keep bits sum to the samples it adds. The same
count catches a saving state that was run twice.

>>> import numpy as np
>>> counter = BlockCounter(checkpoint_every=0)
>>> counter.start(7)
>>> mask = np.array([[True, False, True]])
>>> chains, ends, active, spans = np.array([7]), np.array([3]), np.array([True]), np.array([3])
>>> starts, kept = counter.count(chains, ends, mask, active, spans, tail=False)
>>> starts.tolist(), kept.tolist(), counter.counted
([0], [2], {7: (3, 2)})
"""

from __future__ import annotations

import threading

import numpy as np

from jaxsave._stream.packing import SPAN_MAX
from jaxsave.errors import SaverStateError

__all__ = ["BlockCounter"]


class BlockCounter:
    """``counted[chain]``: ``(steps, kept samples)`` of the chain's blocks so far."""

    def __init__(self, checkpoint_every: int):
        self.checkpoint_every = checkpoint_every
        self.counted: dict[int, tuple[int, int]] = {}
        self._lock = threading.Lock()  # blocks of different chains arrive on several XLA threads

    def start(self, chain: int, step: int = 0, kept: int = 0) -> None:
        """Chain ``chain`` starts (``init``) or resumes (a checkpoint's ``step`` and ``kept``)."""
        with self._lock:
            self.counted[chain] = (step, kept)

    def count(
        self,
        chains: np.ndarray,
        ends: np.ndarray,
        mask: np.ndarray,
        active: np.ndarray,
        spans: np.ndarray,
        *,
        tail: bool,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The first steps of the active chains' blocks and the samples they kept up to
        ``ends`` (the keep bits ``mask``, a row per chain), from the blocks counted before;
        counts these blocks in. ``spans``: the steps each block covers, as the state counted
        them. Raises :class:`SaverStateError` for a block that does not begin where the
        chain's last one ended, or passes a checkpoint step without ending on it."""
        with self._lock:
            before = np.array([self.counted.get(c, (0, 0)) for c in chains.tolist()], np.int64).reshape(-1, 2)
            starts, saved = before[:, 0], before[:, 1] + mask.sum(axis=1)
            on = slice(None) if active.all() else np.flatnonzero(active)  # no copies in the common case
            chains_on, starts_on, ends_on = chains[on], starts[on], ends[on]
            _check_continues(chains_on, starts_on, ends_on, np.asarray(spans)[on])
            least = max(mask.shape[1], int(not tail))  # a step a row; a block sent by save(): one at least
            _check_advanced(chains_on, starts_on, ends_on, least)
            self._check_no_checkpoint_skipped(chains_on, starts_on, ends_on)
            for chain, end, kept in zip(chains_on.tolist(), ends_on.tolist(), saved[on].tolist()):
                self.counted[chain] = (end, kept)
        return starts, saved

    def _check_no_checkpoint_skipped(self, chains: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> None:
        """Refuse blocks that pass a checkpoint step without ending on it (it would be lost)."""
        every = self.checkpoint_every
        if not every:
            return
        passed = (ends - 1) // every * every  # the last checkpoint step before each block's end
        bad = passed > starts
        if bad.any():
            i = np.flatnonzero(bad)[0]
            raise SaverStateError(
                f"chain {int(chains[i])}: the block of steps {int(starts[i])}..{int(ends[i])} passes "
                f"the checkpoint step {int(passed[i])} (checkpoint_every={every}) without taking "
                "it; jaxsave.scan's blocks end on checkpoint steps when its state starts on a "
                "multiple of its block length (a fresh or resumed state does)"
            )


def _check_continues(chains: np.ndarray, starts: np.ndarray, ends: np.ndarray, spans: np.ndarray) -> None:
    """Refuse a block whose first step, by the state's count, is not where the host's count of
    the chain ends: an older state run again, or a state of another saver or run."""
    wrong = (spans < SPAN_MAX) & (ends - spans != starts)
    if wrong.any():
        i = np.flatnonzero(wrong)[0]
        raise SaverStateError(
            f"chain {int(chains[i])}: a block of steps {int(ends[i] - spans[i])}..{int(ends[i])} arrived "
            f"after step {int(starts[i])}; a saving state was advanced twice, or came from another "
            "saver or run (reuse the state returned by this saver's previous run, not an older one)"
        )


def _check_advanced(chains: np.ndarray, starts: np.ndarray, ends: np.ndarray, least: int) -> None:
    """Refuse a block that covers fewer than ``least`` steps (one a row, and one at least
    unless it is the tail): the blocks of a saving state that was run again."""
    short = ends - starts < least
    if short.any():
        i = np.flatnonzero(short)[0]
        raise SaverStateError(
            f"chain {int(chains[i])}: a block ending at step {int(ends[i])} arrived after step "
            f"{int(starts[i])}; a saving state was advanced twice (reuse the state returned by "
            "the previous run, not an older one)"
        )
