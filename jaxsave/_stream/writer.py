"""The host side of streaming: from the flush callback to the collector.

The callback (on an XLA thread) only wraps the block it was given and puts it in a
bounded queue; one writer thread per saver takes blocks off in order, drops the
rows whose ``keep`` bit is off, and hands the rest to the collector. Errors are
kept, never raised on XLA threads, and re-raised by ``postprocess``.

Small blocks that continue each other (a checkpoint every few hundred steps sends
one each time) are written as one *run*: after a block under ``COALESCE_BYTES``,
the writer takes the blocks that continue it as they come, for up to
``COALESCE_S`` after the last and ``COALESCE_RUN_S`` after the first, and hands
the run to the collector in one call (its checkpoints after its samples). A
collector call costs about 0.13 ms for a block of 50 rows of 10 floats in HDF5,
whatever its size.

The thread is a daemon (interpreter exit must not wait for chains that nobody will
finish), so :meth:`Writer.stop` ends it before exit: a thread frozen by interpreter
shutdown while inside the collector would hold h5py's global lock forever.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from jaxsave.collectors import BlockSink
from jaxsave.errors import CapacityError, SaverStateError

logger = logging.getLogger("jaxsave")

#: How long ``postprocess`` waits for a missing block before calling it lost.
WAIT_TIMEOUT_S = 120.0
#: After ``Writer.stop``'s wait, how long the block being written may still take.
STOP_GRACE_S = 5.0
#: A run of blocks joined into one collector call holds at most this many bytes ...
COALESCE_BYTES = 2**20
#: ... waits at most this long for the next block ...
COALESCE_S = 0.01
#: ... and is written at most this long after its first block came (so the blocks of a
#: steady stream, and the checkpoints they carry, are never held back longer).
COALESCE_RUN_S = 0.1


@dataclass
class Block:
    """Samples of several chains, as they left the device.

    ``leaves[j]`` has shape ``(chains, rows, ...)``; ``mask[i, r]`` is the keep bit
    of row ``r`` of chain ``chain_ids[i]``. The block covers the steps
    ``starts[i] .. ends[i]`` of the chain; its rows are the steps some chain kept.

    A block from the device may come with ``leaves=None`` and ``unpack``, which
    makes them from the packed buffers (``packed_bytes`` of them) on the writer's
    thread (:meth:`sample_leaves`), not on the XLA thread that runs the callback:
    for a sample of 100 leaves that took 0.46 of the callback's 0.65 ms a block.
    """

    chain_ids: np.ndarray
    starts: np.ndarray
    ends: np.ndarray
    mask: np.ndarray
    leaves: list[np.ndarray] | None
    tail: bool = False
    checkpoints: dict | None = None  # {chain: ChainCheckpoint}, stored after the block's samples
    keepalive: Any = field(default=None, repr=False)  # owners of the leaves' memory
    unpack: Callable[[], list[np.ndarray]] | None = field(default=None, repr=False)
    packed_bytes: int = 0

    @property
    def nbytes(self) -> int:
        return self.packed_bytes if self.leaves is None else sum(leaf.nbytes for leaf in self.leaves)

    def sample_leaves(self) -> list[np.ndarray]:
        """``leaves``, made by ``unpack`` at the first call if the block came packed."""
        if self.leaves is None:
            if self.unpack is None:
                raise ValueError("a Block needs leaves or unpack")
            self.leaves, self.unpack = self.unpack(), None
        return self.leaves


class _ByteBoundedQueue:
    """A FIFO that blocks producers while more than ``max_bytes`` are waiting."""

    def __init__(self, max_bytes: int):
        self._items: collections.deque = collections.deque()
        self._bytes = 0
        self._max = max_bytes
        self._cond = threading.Condition()

    def put(self, item: Any, nbytes: int = 0, *, abandon: Callable[[], bool] = lambda: False) -> None:
        with self._cond:
            while self._items and self._bytes + nbytes > self._max and not abandon():
                self._cond.wait(0.1)
            self._items.append((item, nbytes))
            self._bytes += nbytes
            self._cond.notify_all()

    def get(self) -> Any:
        with self._cond:
            while not self._items:
                self._cond.wait()
            return self._pop()

    def get_if(self, accept: Callable[[Any], bool], timeout: float) -> Any:
        """The next item if ``accept(item)``, waiting up to ``timeout`` seconds for one; else
        ``None``, and an item not accepted stays first."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._items:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)
            return self._pop() if accept(self._items[0][0]) else None

    def _pop(self) -> Any:
        item, nbytes = self._items.popleft()
        self._bytes -= nbytes
        self._cond.notify_all()
        return item


_STOP = object()


class _Call(NamedTuple):
    """A collector call queued among the blocks (run in order on the writer thread)."""

    call: Callable[[], Any]


def _nbytes(record: Any) -> int:
    return sum(x.nbytes for x in record.leaves)


class Writer:
    """Drains blocks into a collector on its own thread, checking every step arrives once.

    ``received[c]`` is the step count up to which chain ``c``'s samples have been
    handed to the collector; ``written[c]`` is how many of them were kept.

    Checkpoints are handed over one step at a time for each *group*: the chains
    that one ``init`` created, which advance together. Sharded over several
    devices, a group's chains arrive in several blocks, and one device may be
    checkpoints ahead of another; a step's checkpoints are held back until every
    chain of the group has reached it, so that the collector only ever stores
    (and a kill only ever leaves) checkpoints of the group at one step. Held-back
    checkpoints beyond ``max_queue_bytes`` per group are dropped, oldest first (the
    newest is always kept): the stored step then waits until the slow chains reach
    one that is still held.
    """

    def __init__(
        self, collector: BlockSink, *, max_queue_bytes: int = 64 * 2**20, name: str = "jaxsave-writer"
    ):
        self.collector = collector
        self.received: dict[int, int] = {}
        self.written: dict[int, int] = {}
        self.capacity: dict[int, int | None] = {}
        self.finalized: set[int] = set()
        self.checkpoint_spec: Any = None
        self.groups: dict[int, tuple[int, ...]] = {}  # chain -> its group (sorted chain ids)
        # group -> step -> {chain: ChainCheckpoint}: checkpoints not yet reached by the whole group
        self._pending: dict[tuple[int, ...], dict[int, dict]] = {}
        self._pending_bytes: dict[tuple[int, ...], int] = {}
        self._dropped: set[tuple[int, ...]] = set()  # groups whose held ones were cut (logged)
        self.error: BaseException | None = None
        self.on_block: Callable[[Block], None] | None = None
        self.dropped = 0  # blocks left unwritten because stop() ran out of time
        self._queue = _ByteBoundedQueue(max_queue_bytes)
        self._held_bytes = max_queue_bytes  # per group, for held-back checkpoints
        self._cond = threading.Condition()
        self._stopping = False  # stop() was called: blocks submitted from now on are dropped
        self._dropping = False  # stop() ran out of time: what is still queued is dropped
        self._prepared = False  # prepare() was queued
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # -- producers -------------------------------------------------------------------

    def add_chain(self, chain_id: int, capacity: int | None, start: int = 0, written: int = 0) -> None:
        with self._cond:
            self.received[chain_id] = start
            self.written[chain_id] = written
            self.capacity[chain_id] = capacity
            self.finalized.discard(chain_id)

    def add_group(self, chain_ids: list[int]) -> None:
        """Chains ``chain_ids`` (added with ``add_chain``) take their checkpoints together."""
        group = tuple(sorted(chain_ids))
        with self._cond:
            for old in {self.groups[c] for c in group if c in self.groups}:
                self._pending.pop(old, None)  # a chain restarted: its old group's are void
                self._pending_bytes.pop(old, None)
                for c in old:
                    if c not in group:
                        self.groups[c] = (c,)  # ... and its former companions go on alone
            for c in group:
                self.groups[c] = group

    def submit(self, block: Block) -> None:
        """Queue a block; never raises (errors are kept for ``postprocess``)."""
        if self._stopping:
            self.dropped += 1
            return
        abandon = lambda: self.error is not None or self._stopping
        self._queue.put(block, block.nbytes, abandon=abandon)

    def prepare_storage(self, block_rows: int) -> None:
        """Have the collector make room for every chain added, before the first block arrives
        (its optional ``prepare_storage(block_rows)``: an HDF5 file's datasets), once per writer.

        Called when the loop is traced: the work overlaps the compilation instead of adding
        to the first block (in a short run, the only one, reaching the host at ``postprocess``).
        """
        prepare = getattr(self.collector, "prepare_storage", None)
        if prepare is None or self._prepared:
            return
        self._prepared = True
        self._queue.put(_Call(lambda: prepare(block_rows)), abandon=lambda: True)

    def drain(self) -> None:
        """Wait until every block queued so far has been handled."""
        done = threading.Event()
        self._queue.put(done, abandon=lambda: True)
        while not done.wait(0.5):
            if not self._thread.is_alive():
                return

    def fail(self, error: BaseException) -> None:
        """Keep ``error`` as this writer's error, unless an earlier one is kept."""
        with self._cond:
            if self.error is None:
                self.error = error
                logger.error("jaxsave: saving failed: %r (re-raised by postprocess)", error)
            self._cond.notify_all()

    # -- consumers -------------------------------------------------------------------

    def wait_for(self, chain_id: int, step: int, *, finalized: bool = False) -> None:
        """Wait until chain ``chain_id`` has been received up to ``step`` (and finalized), or raise."""
        deadline = time.monotonic() + WAIT_TIMEOUT_S
        with self._cond:
            while self.error is None and (
                self.received.get(chain_id, 0) < step or (finalized and chain_id not in self.finalized)
            ):
                if time.monotonic() > deadline or not self._thread.is_alive():
                    raise SaverStateError(
                        f"chain {chain_id}: the saving state says {step} steps were taken, but "
                        f"the host received only {self.received.get(chain_id, 0)}; samples were lost"
                    )
                self._cond.wait(0.5)
            self.raise_error()

    def raise_error(self) -> None:
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        """Stop the thread once everything queued is written."""
        if self._thread.is_alive():
            self._queue.put(_STOP, abandon=lambda: True)
            self._thread.join()

    def stop(self, timeout: float) -> bool:
        """Write what is queued for at most ``timeout`` seconds, drop the rest, end the thread.

        Blocks submitted after the call are dropped (counted in ``dropped``). Returns
        whether the thread ended: it does not while a collector call outlasts the wait.
        """
        self._stopping = True
        if self._thread.is_alive():
            self._queue.put(_STOP, abandon=lambda: True)
            self._thread.join(max(0.0, timeout))
        if self._thread.is_alive():
            self._dropping = True  # skip the queue; the block being written still finishes
            self._thread.join(STOP_GRACE_S)
        return not self._thread.is_alive()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # -- the thread ------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            block = self._queue.get()
            if block is _STOP:
                return
            if isinstance(block, threading.Event):
                block.set()
                continue
            if self._dropping:
                self.dropped += 1
                continue
            if self.error is not None:
                continue  # drain, so that producers never block on a dead writer
            try:
                if isinstance(block, _Call):
                    block.call()
                    continue
                self._write(self._run_from(block))
            except BaseException as error:  # noqa: BLE001 - kept and re-raised by postprocess
                self.fail(error)
            with self._cond:
                self._cond.notify_all()

    def _run_from(self, block: Block) -> list[Block]:
        """``block`` and the blocks that continue it, taken off the queue as they come (up to
        ``COALESCE_S`` after the last and ``COALESCE_RUN_S`` after the first, ``COALESCE_BYTES``
        in all); a block that does not continue the run (another chain's, an older state's) or
        anything else queued ends it."""
        run, size = [block], block.nbytes
        deadline = time.monotonic() + COALESCE_RUN_S
        chains = block.chain_ids.tolist()

        def continues(item: Any) -> bool:
            last = run[-1]
            return (
                isinstance(item, Block)
                and size + item.nbytes <= COALESCE_BYTES
                and item.chain_ids.tolist() == chains
                and np.array_equal(item.starts, last.ends)
            )

        while not run[-1].tail and size < COALESCE_BYTES and not self._stopping:
            left = deadline - time.monotonic()
            item = self._queue.get_if(continues, min(COALESCE_S, left)) if left > 0 else None
            if item is None:
                break
            run.append(item)
            size += item.nbytes
        return run

    def _write(self, run: list[Block]) -> None:
        """Hand the blocks of ``run`` (each continuing the one before) to the collector in one call."""
        first, last = run[0], run[-1]
        chains = first.chain_ids.tolist()
        for chain, start, end in zip(chains, first.starts.tolist(), last.ends.tolist()):
            if chain in self.finalized:
                raise SaverStateError(f"chain {chain} saved samples after postprocess finished it")
            if self.received.get(chain) != start:
                raise SaverStateError(
                    f"chain {chain}: a block for steps {start}..{end} arrived after step "
                    f"{self.received.get(chain)}; a saving state was advanced twice (reuse the "
                    "state returned by the previous run, not an older one)"
                )
        mask = first.mask if len(run) == 1 else np.concatenate([b.mask for b in run], axis=1)
        kept = mask.sum(axis=1)
        for i, chain in enumerate(chains):
            cap = self.capacity.get(chain)
            if cap is not None and self.written[chain] + int(kept[i]) > cap:
                raise CapacityError(
                    f"chain {chain} kept {self.written[chain] + int(kept[i])} samples (or more), but "
                    f"static_information(samples_collected={cap}) allows only {cap}"
                )
        if kept.any():
            self._hand_over(chains, mask, run)
        with self._cond:
            for i, chain in enumerate(chains):
                self.received[chain] = int(last.ends[i])
                self.written[chain] += int(kept[i])
        ready: dict = {}
        for block in run:  # in order: a group's newest complete step wins
            if block.checkpoints:
                ready.update(self._reached_by_group(block.checkpoints))
        if ready:
            self.collector.checkpoint(ready, self.checkpoint_spec)
        if self.on_block is not None:
            for block in run:
                self.on_block(block)
        if last.tail:
            for chain in chains:
                self.collector.finalize(chain)
                self.finalized.add(chain)

    def _reached_by_group(self, records: dict) -> dict:
        """Of ``records`` and those held back: the newest step each group has completed."""
        ready: dict = {}
        with self._cond:
            groups = set()
            for chain, record in records.items():
                group = self.groups.get(chain, (chain,))
                self._pending.setdefault(group, {}).setdefault(record.step, {})[chain] = record
                self._pending_bytes[group] = self._pending_bytes.get(group, 0) + _nbytes(record)
                groups.add(group)
            for group in groups:
                steps = self._pending[group]
                complete = [step for step, held in steps.items() if len(held) == len(group)]
                if complete:
                    newest = max(complete)
                    ready.update(steps[newest])
                    for step in [step for step in steps if step <= newest]:
                        self._drop(group, step)
                # Beyond the memory allowed, the oldest held steps go (never the newest).
                while len(steps) > 1 and self._pending_bytes[group] > self._held_bytes:
                    self._drop(group, min(steps))
                    if group not in self._dropped:
                        self._dropped.add(group)
                        logger.info(
                            "jaxsave: chains %s are many checkpoints apart; the stored "
                            "checkpoint advances once the slow ones reach a step still "
                            "held",
                            list(group),
                        )
        return ready

    def _drop(self, group: tuple[int, ...], step: int) -> None:
        held = self._pending[group].pop(step)
        self._pending_bytes[group] -= sum(_nbytes(r) for r in held.values())

    def _hand_over(self, chains: list[int], mask: np.ndarray, run: list[Block]) -> None:
        """The kept rows of ``run`` (keep bits ``mask``, the blocks' joined): one ``save_block``
        where every chain kept the same steps, else a ``save`` per chain."""
        if (mask == mask[:1]).all():
            parts = [_rows(block.sample_leaves(), block.mask[0]) for block in run]
            self.collector.save_block(chains, _joined(parts))
            return
        leaves = _joined([block.sample_leaves() for block in run])
        for i, chain in enumerate(chains):
            if mask[i].any():
                self.collector.save(chain, [leaf[i, mask[i]] for leaf in leaves])


def _rows(leaves: list[np.ndarray], keep: np.ndarray) -> list[np.ndarray]:
    """The rows ``keep`` of every chain's ``leaves`` (``(chains, rows, ...)``); no copy if all."""
    return leaves if keep.all() else [leaf[:, keep] for leaf in leaves]


def _joined(parts: list[list[np.ndarray]]) -> list[np.ndarray]:
    """Each leaf's blocks ``parts`` joined along the rows (no copy for one block)."""
    return parts[0] if len(parts) == 1 else [np.concatenate(leaf, axis=1) for leaf in zip(*parts)]
