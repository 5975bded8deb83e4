"""Streaming samples out of ``jax.jit`` / ``lax.scan`` / ``vmap``.

``save(collector)`` returns ``(init, save, postprocess)``. ``save`` writes each
sample and its keep bit into a ring buffer of ``block_size`` rows that lives in
the saving state; only kept steps take a row, so thinning shrinks the traffic
too. When the buffer is full (or a checkpoint is due), one ``io_callback`` sends
the block of every chain to the host (:mod:`jaxsave._stream.flush`: one callback per
block for C vmapped chains, not C), and ``keep`` may differ per chain. On the host,
:meth:`Streamer._receive` hands the block to the writer thread
(:mod:`jaxsave._stream.writer`). ``postprocess`` sends the partial last block from the
final state.

A script that ends before ``postprocess`` (an exception, ``sys.exit``, Ctrl-C) is
handled at interpreter exit (:mod:`jaxsave._stream.shutdown`): the computations still running
finish, every block that reached the host is written, and the collector is closed.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxsave._core.tree import check_like
from jaxsave._stream import flush as _flush
from jaxsave._stream import resume as _resume
from jaxsave._stream import sharding as _sharding
from jaxsave._stream import shutdown
from jaxsave._stream.counting import BlockCounter
from jaxsave._stream.ordering import never, tied_to
from jaxsave._stream.packing import Packing, advance, rows_of, span_of, with_span
from jaxsave._stream.progress import start_bar
from jaxsave._stream.receive import block_of, tail_blocks
from jaxsave._stream.resume import Checkpoint
from jaxsave._stream.state import (
    Saver,
    SaverBase,
    SaveState,
    check_one_chain,
    check_ring,
    check_state,
)
from jaxsave._stream.writer import Writer
from jaxsave.collectors import Collector, DataCollector, MemoryCollector, samples_collected
from jaxsave.errors import SaverStateError

logger = logging.getLogger("jaxsave")

__all__ = ["save"]

#: Automatic block size: aim for this many bytes per chain and block ...
_BLOCK_BYTES = 4 * 2**20
#: ... with at most this many rows.
_MAX_BLOCK_ROWS = 4096


class Streamer(SaverBase):
    """The saver behind :func:`save`: ring buffer on device, writer thread on host."""

    def __init__(
        self,
        collector: DataCollector,
        checkpoint_every: int,
        block_size: int | None,
        max_queue_bytes: int,
        progress: bool | int = False,
    ):
        super().__init__()
        if isinstance(progress, bool) or progress is None:
            self.progress_total = None
        elif isinstance(progress, int) and progress > 0:
            self.progress_total, progress = progress, True
        else:
            raise ValueError(f"progress must be a bool or the total number of steps, got {progress!r}")
        self.progress = bool(progress)
        self.bar: Any = None
        if not isinstance(checkpoint_every, int) or checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be an int >= 0, got {checkpoint_every!r}")
        self.checkpoint_every = checkpoint_every
        self.checkpoint_spec: Any = None
        if not isinstance(collector, DataCollector):
            raise TypeError(f"data_collector must be a jaxsave.DataCollector, got {_what(collector)}")
        if block_size is not None and (not isinstance(block_size, int) or block_size < 1):
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        if not isinstance(max_queue_bytes, int) or max_queue_bytes < 1:
            raise ValueError(f"max_queue_bytes must be a positive int, got {max_queue_bytes!r}")
        collector._attach(self)  # a DataCollector records the one saver it belongs to
        self.collector: Collector = collector  # ... which calls only the Collector protocol
        self.block_size = block_size
        self.max_queue_bytes = max_queue_bytes
        self._packing: Packing | None = None  # built at the first init, from the sample's layout
        self.writer: Writer | None = None  # started by init (again after the previous one closed)
        self.late_error: BaseException | None = None
        self.exited = False  # the interpreter is exiting: the writer was stopped by the exit hook
        self.traced = False  # save() (or save_rows) was traced: a loop that saves was built
        self.flush = _flush.make_flush(self._receive, self.checkpoint_every)
        self.counter = BlockCounter(checkpoint_every)  # the host counts blocks' steps and samples
        self._lock = threading.RLock()  # chains may be registered (and finished) from several threads

    @property
    def packing(self) -> Packing:
        """How the sample's leaves are packed into the ring buffer (known from the first init)."""
        if self._packing is None:
            raise SaverStateError("save() was called before init()")
        return self._packing

    def _live_writer(self) -> Writer:
        """The writer thread that init started; an error before init."""
        if self.writer is None:
            raise SaverStateError("postprocess() was called before init()")
        return self.writer

    @property
    def writing(self) -> bool:
        """Whether a writer thread is running (the exit hook stops it)."""
        return self.writer is not None and self.writer.alive

    def drain(self) -> None:
        """Return once the writer stored every block the sampler sent (at once before init)."""
        if self.writer is not None:
            self.writer.drain()

    # -- init ------------------------------------------------------------------------

    def init(
        self,
        init_sample: Any,
        init_checkpoint: Any = None,
        static_information: Any = None,
        *,
        chains: int | None = None,
        scheduler_state: Any = None,
        resume: Checkpoint | None = None,
    ) -> SaveState:
        """A new saving state for one chain, or ``chains`` chains stacked on a leading axis.

        With ``checkpoint_every``, ``init_checkpoint`` is a template of the
        ``solver_state`` that ``save`` will get (and ``scheduler_state`` one of the
        scheduler state, if you pass one to ``save``). ``resume`` continues the
        chains of a :class:`Checkpoint` from :func:`jaxsave.resume`.
        """
        with self._lock:
            return self._init(
                init_sample,
                init_checkpoint,
                static_information,
                chains=chains,
                scheduler_state=scheduler_state,
                resume=resume,
            )

    def _init(
        self,
        init_sample: Any,
        init_checkpoint: Any,
        static_information: Any,
        *,
        chains: int | None,
        scheduler_state: Any,
        resume: Checkpoint | None,
    ) -> SaveState:
        self._raise_late_error()
        if resume is not None:  # its chain count; chains=1 keeps one chain stacked, as it ran
            held = int(np.size(resume.chain_ids))
            if chains is not None and chains != held:
                raise ValueError(f"init(chains={chains}, resume=...): the checkpoint holds {held} chain(s)")
            chains = chains if held == 1 else held
        spec = self._sample_spec(init_sample, chains)
        capacity = samples_collected(static_information)
        self._checkpoint_spec(init_checkpoint, scheduler_state, chains)
        if self.block_size is None:
            rows = int(np.clip(_BLOCK_BYTES // max(1, self.sample_layout.row_bytes()), 1, _MAX_BLOCK_ROWS))
            # A checkpoint flushes at least every checkpoint_every steps, and a flush
            # sends the whole buffer: no use for more rows than that.
            self.block_size = min(rows, self.checkpoint_every or rows)
        if self._packing is None:
            sample = self.sample_layout
            leaves = range(len(sample.specs))
            self._packing = Packing.build(
                self.block_size,
                [sample.storage_shape(j) for j in leaves],
                [sample.row_dtype(j) for j in leaves],
            )
        writer = self.writer
        if writer is None or not writer.alive:
            self.writer = writer = Writer(self.collector, max_queue_bytes=self.max_queue_bytes)
            writer.checkpoint_spec = self.checkpoint_spec
            shutdown.watch(self)
            if self.progress:
                self.bar = start_bar(writer, self.progress_total, lambda: len(self.registered))
        running = set(self.registered) - self.finished_chains
        try:
            if resume is not None:
                return self._resume(spec, init_checkpoint, static_information, capacity, resume, chains)
            ids = []
            for _ in range(chains or 1):
                chain = int(
                    self.collector.register_chain(
                        init_sample=spec,
                        init_checkpoint=init_checkpoint,
                        static_information=static_information,
                    )
                )
                writer.add_chain(chain, capacity)
                self.counter.start(chain)
                self.registered.append(chain)
                ids.append(chain)
            writer.add_group(ids)  # they advance together: checkpoints are stored step by step
        except BaseException as error:
            # The chains this call registered (or reopened) get no state: none of them will run.
            self.finished_chains.update(set(self.registered) - running)
            if len(self.finished_chains) == len(self.registered):
                self._close_after(error)  # no chain left running: no thread left behind
            raise
        return self._new_state(ids, chains)

    def _checkpoint_spec(self, init_checkpoint: Any, scheduler_state: Any, chains: int | None) -> None:
        if not self.checkpoint_every:
            return
        if init_checkpoint is None:
            raise ValueError(
                "checkpoint_every needs init_checkpoint: a template of the solver_state to checkpoint"
            )
        tree = _resume.checkpoint_tree(init_checkpoint, scheduler_state)
        if chains is not None:
            tree = jax.tree.map(lambda x: x[0], tree)
        spec = jax.eval_shape(lambda t: t, tree)
        if self.checkpoint_spec is None:
            stored, stored_spec = self.collector.resume()  # a file continued, a store shared
            if stored and stored_spec is not None:
                _resume.check_same_spec(stored_spec, spec, "init_checkpoint")
            self.checkpoint_spec = spec
        else:
            check_like(spec, self.checkpoint_spec, "init_checkpoint of a new chain")

    def _resume(self, spec, init_checkpoint, static_information, capacity, ckpt, chains) -> SaveState:
        ids = np.atleast_1d(np.asarray(ckpt.chain_ids)).tolist()
        steps = np.atleast_1d(np.asarray(ckpt.step))
        counts = np.atleast_1d(np.asarray(ckpt.sample_count))
        if len(steps) != len(ids) or len(counts) != len(ids):
            raise SaverStateError(
                f"the checkpoint to resume has {len(ids)} chain ids but "
                f"{len(steps)} steps and {len(counts)} sample counts"
            )
        _resume.at_one_step(dict(zip(ids, steps.tolist())), "the checkpoint to resume")
        writer = self._live_writer()
        writer.drain()  # blocks of an abandoned run land before the chains restart
        writer.raise_error()
        for chain, step, count in zip(ids, steps.tolist(), counts.tolist()):
            self.collector.reopen_chain(
                chain,
                count,
                init_sample=spec,
                init_checkpoint=init_checkpoint,
                static_information=static_information,
            )
            writer.add_chain(chain, capacity, start=step, written=count)
            self.counter.start(chain, step, count)
            self.finished_chains.discard(chain)
            if chain not in self.registered:
                self.registered.append(chain)
        writer.add_group(ids)
        batched = chains is not None  # the state; the checkpoint's leaves have a chain axis if len(ids) > 1
        step = jnp.asarray(steps, jnp.int32) if batched else jnp.int32(steps[0])
        if self.checkpoint_spec is not None:
            tree = _resume.checkpoint_tree(ckpt.solver_state, ckpt.scheduler_state)
            check_like(
                jax.eval_shape(lambda t: jax.tree.map(lambda x: x[0], t) if len(ids) > 1 else t, tree),
                self.checkpoint_spec,
                "the checkpoint to resume",
            )
        state = self._new_state(ids, len(ids) if batched else None)
        return state._replace(step=step, block_start=step)

    def _new_state(self, ids: list[int], chains: int | None) -> SaveState:
        """A fresh state for chains ``ids`` (stacked when ``chains``), from step 0."""
        state = SaveState(
            chain_id=jnp.int32(ids[0]),
            saved_samples=None,  # counted on the host (self.counter)
            data=self.packing.zeros(),
            keep_mask=jnp.zeros((self.block_size,), jnp.bool_),
            step=jnp.int32(0),
            fill=jnp.int32(0),
            block_start=jnp.int32(0),
        )
        if chains is None:
            return state
        state = jax.tree.map(lambda x: jnp.broadcast_to(x, (chains, *x.shape)), state)
        return state._replace(chain_id=jnp.asarray(ids, jnp.int32))

    # -- save (traced) -----------------------------------------------------------------

    def _traced(self) -> None:
        """A loop that saves is being built: the collector can make room while it compiles."""
        self.traced = True
        if self.writer is not None:
            self.writer.prepare_storage(self.block_size or 1)

    def save(
        self,
        state: SaveState,
        keep: Any,
        sample: Any,
        scheduler_state: Any = None,
        solver_state: Any = None,
    ) -> tuple[SaveState, None]:
        """Record ``sample`` if ``keep``; call inside jit/scan/vmap. Returns ``(state, None)``.

        With ``checkpoint_every=n``, every n-th call also takes a checkpoint of
        ``solver_state`` (and ``scheduler_state``), as they are after this step:
        they travel with the block of samples sent at that step, at no cost on
        other steps.
        """
        self._check_open()
        check_state(state, "save()")
        check_one_chain(state, "save()")
        leaves = self._flat_sample(sample)
        constant = not isinstance(keep, jax.core.Tracer)  # `save(state, True, sample)`
        keep = self._check_keep(keep)
        if constant:
            keep = tied_to(keep, leaves)
        check_ring(state, "save()")
        self._traced()  # a save refused above built no loop: nothing to warn of at exit
        # The row at `fill` is written every step but taken only when kept: a step
        # nobody keeps is overwritten by the next one.
        # Per step: one row and one keep bit written in place, the step and the row counters, the
        # flush predicate. The block's first step and the kept count are the host's to count
        # (under vmap the state carries the block start as well: _flush.carried_start).
        data, mask = self.packing.write(state.data, state.keep_mask, leaves, keep, rows_of(state.fill))
        step = state.step + 1
        fill = advance(state.fill, keep)  # a row if kept, and a step: the host tells the block's start
        full = rows_of(fill) == state.keep_mask.shape[-1]
        ckpt = None
        if self.checkpoint_every:
            # With a traced keep the remainder waits for the fill's advance: read at the top of the
            # step beside the user's kernels, it made 9 ready at once under vmap (ckpt-light-1-64).
            due = step if constant else step + never(fill).astype(step.dtype)
            full = full | (due % self.checkpoint_every == 0)
            tree = _resume.checkpoint_tree(solver_state, scheduler_state)
            check_like(tree, self.checkpoint_spec, "the solver_state/scheduler_state passed to save()")
            ckpt = tuple(_resume.to_device_leaves(tree))
        start = lax.select(full, state.block_start, step)  # read by a vmapped flush only
        self.flush(full, (full, state.chain_id, start, step, fill, mask, data, ckpt))
        if self.packing.unbuffered:  # the row just sent was the whole block
            data = state.data
        # Reset on a flush as `fill & -1` / `fill & 0`, not `select(full, 0, fill)`: with checkpoints,
        # that select was the only reader of a constant 0 in the loop body besides the user's inner
        # loops (a key split's), and XLA:CPU copied the 0 for each at the top of the body: 10 thunks
        # ready at once there, so XLA:CPU split every step over two threads (tests/_thunk_graph.py).
        fill = fill & (full.astype(fill.dtype) - 1)
        block_start = _flush.carried_start(state.block_start, full, step)
        return SaveState(state.chain_id, None, data, mask, step, fill, block_start), None

    # -- whole blocks (traced; jaxsave.scan) --------------------------------------------

    def sample_row(self, keep: Any, sample: Any) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        """``(keep, row)``: one step's keep bit and sample packed as one row per buffer.

        Stacked over a block of steps by ``lax.scan``, they are what :meth:`save_rows` sends.
        """
        return self._check_keep(keep), self.packing.row(self._flat_sample(sample))

    def save_rows(
        self,
        state: SaveState,
        mask: jax.Array,
        rows: tuple[jax.Array, ...],
        solver_state: Any = None,
        scheduler_state: Any = None,
        *,
        steps: int | None = None,
    ) -> SaveState:
        """Send a block of consecutive steps (``mask`` ``(n,)``, ``rows`` stacked by
        :meth:`sample_row`) in one callback, as if ``save`` had been called ``n`` times.

        With ``steps``, the block covers that many steps (thinned: only ``n`` of them
        made a row). Rows still in the state's buffer (from earlier ``save`` calls) are
        sent first. With ``checkpoint_every``, ``solver_state`` is checkpointed when the
        block ends on a checkpoint step; the host refuses a block that passes one.
        """
        self._check_open()
        check_state(state, "jaxsave.scan")
        check_one_chain(state, "jaxsave.scan")
        check_ring(state, "jaxsave.scan")
        self._traced()
        held = rows_of(state.fill) > 0
        self.flush(
            held,
            (held, state.chain_id, state.block_start, state.step, state.fill, state.keep_mask,
             state.data, None),
        )  # fmt: skip
        n = mask.shape[-1]
        step = state.step + (n if steps is None else steps)
        ckpt = None
        if self.checkpoint_every:
            tree = _resume.checkpoint_tree(solver_state, scheduler_state)
            check_like(tree, self.checkpoint_spec, "the checkpoint of jaxsave.scan's carry")
            ckpt = tuple(_resume.to_device_leaves(tree))
        start = jnp.where(held, state.step, state.block_start)
        span = jnp.where(held, 0, span_of(state.fill)) + (n if steps is None else steps)
        fill = with_span(jnp.int32(n), span)
        self.flush(True, (jnp.bool_(True), state.chain_id, start, step, fill, mask, rows, ckpt))
        return state._replace(step=step, fill=jnp.zeros_like(state.fill), block_start=step)

    # -- host ------------------------------------------------------------------------

    def _receive(self, payload: Any, solver_packing: tuple = ()) -> None:
        """The flush callback: wrap the block and queue it; runs on an XLA thread."""
        writer = self.writer
        if self.exited:  # a computation still running after the exit hook (from another thread)
            if writer is not None and not writer.dropped:
                logger.warning("jaxsave: blocks computed during interpreter exit are dropped")
            if writer is not None:
                writer.dropped += 1
            return
        try:
            block = block_of(
                payload,
                solver_packing,
                packing=self.packing,
                counter=self.counter,
                checkpoint_every=self.checkpoint_every,
                finished=self.finished_chains,
                closed=writer is None or not writer.alive,
            )
            assert writer is not None  # block_of refuses a closed saver
            writer.submit(block)
        except SaverStateError as error:
            self.late_error = self.late_error or error
            logger.error("jaxsave: %s", error)
            raise
        except (KeyboardInterrupt, SystemExit):
            # Ctrl-C while the callback runs on the main thread (JAX's CPU backend): it must stop
            # the run, not become the writer's error. JAX raises it as a JaxRuntimeError; the
            # blocks queued before this one are written, at postprocess or at interpreter exit.
            raise
        except BaseException as error:  # noqa: BLE001 - kept for postprocess, never raised on XLA threads
            if writer is not None:
                writer.fail(error)

    def _raise_late_error(self) -> None:
        if self.late_error is not None:
            error, self.late_error = self.late_error, None
            raise error

    # -- postprocess -------------------------------------------------------------------

    def postprocess(self, state: SaveState, unused_saved: Any = None) -> dict:
        """Wait until every kept sample of the state's chains is in the collector; return results.

        Returns ``{"sample_count": ..., "samples": ...}``; for vmapped chains both
        gain the chain axes, and samples are zero-padded to the longest chain.
        """
        writer = self._live_writer()
        check_state(state, "postprocess()")
        check_ring(state, "postprocess()")
        state = _sharding.local_part(state)  # this process's chains, on the host
        jax.effects_barrier()
        self._raise_late_error()
        batch = np.shape(state.chain_id)
        chains = np.asarray(state.chain_id).reshape(-1)
        self._register_finished(chains)
        steps = np.asarray(state.step).reshape(-1)
        try:
            blocks, counts = tail_blocks(chains, steps, state, packing=self.packing, counter=self.counter)
            # Queued after every block the sampler sent (effects_barrier), the tails end the run
            # of blocks the writer may be joining: waiting for those first would hold each
            # postprocess for the writer's COALESCE_S wait for a block that never comes.
            for block in blocks:
                writer.submit(block)
            for chain, step, count in zip(chains.tolist(), steps.tolist(), counts.tolist()):
                writer.wait_for(chain, step, finalized=True)
                if writer.written[chain] != count:
                    raise SaverStateError(
                        f"chain {chain}: the state counts {count} kept samples but the collector "
                        f"received {writer.written[chain]}"
                    )
            samples = [self.collector.finished(c) for c in chains.tolist()]
        except BaseException as error:
            with self._lock:
                self.finished_chains.update(chains.tolist())
                self._close_after(error)
            raise
        with self._lock:
            self.finished_chains.update(chains.tolist())
            self._close_if_done()
        return self._stack_results(batch, counts, samples)

    def _close_after(self, error: BaseException) -> None:
        """Close everything after ``error``; a failure to close is logged, ``error`` stays the one raised."""
        try:
            self._close_if_done(force=True)
        except Exception as late:  # noqa: BLE001 - the first error is the one to report
            logger.error("jaxsave: closing after %r failed too: %r", error, late)

    def _close_if_done(self, force: bool = False) -> None:
        if force or len(self.finished_chains) == len(self.registered):
            if self.writer is not None:
                self.writer.close()
            if self.bar is not None:
                self.bar.close()
                self.bar = None
            self.collector.close()

    def stop_at_exit(self, deadline: float) -> None:
        """At exit: write what is queued (until ``deadline``), stop the writer, close the collector;
        warn of unfinished chains, unless this saver's ``save`` was never traced."""
        writer = self.writer
        if writer is None or not writer.alive:
            return
        self.exited = True
        unfinished = sorted(set(self.registered) - self.finished_chains)
        try:
            stopped = writer.stop(deadline - time.monotonic())
        except KeyboardInterrupt:  # a second Ctrl-C: drop what is still queued
            stopped = writer.stop(0.0)
        shutdown.report_stop(writer, self.collector, stopped)
        if not stopped:
            return
        self.finished_chains.update(unfinished)
        try:
            self._close_if_done(force=True)
        except Exception as error:  # noqa: BLE001 - exiting anyway
            logger.error(
                "jaxsave: interpreter exit: closing %s (unfinished chains %s) failed: %r",
                type(self.collector).__name__,
                unfinished,
                error,
            )
            return
        shutdown.report_unfinished(writer, self.collector, unfinished, self.traced, self.block_size)


def _what(collector: Any) -> str:
    """What was passed instead of a collector, and the fix where it is plain."""
    if isinstance(collector, type) and issubclass(collector, DataCollector):
        return f"the class {collector.__name__}: pass an instance, e.g. {collector.__name__}(...)"
    if isinstance(collector, (str, os.PathLike)):
        path = os.fspath(collector)
        return f"the path {path!r}: pass a collector for it, e.g. jaxsave.HDF5Collector({path!r})"
    return type(collector).__name__


def save(
    data_collector: DataCollector | None = None,
    checkpoint_every: int = 0,
    *,
    block_size: int | None = None,
    max_queue_bytes: int = 64 * 2**20,
    progress: bool | int = False,
) -> Saver:
    """Stream samples from inside ``jax.jit`` to ``data_collector``.

    Args:
      data_collector: where samples go (default: a new :class:`MemoryCollector`).
      checkpoint_every: take a checkpoint of the ``solver_state`` given to ``save``
        every this many steps (0: never); see :func:`jaxsave.resume`.
      block_size: samples buffered on device per chain before one callback sends
        them; by default about 4 MiB per chain, at most 4096 rows. With 1, each
        kept sample leaves as it is made and the state keeps no buffer.
      max_queue_bytes: host memory the blocks waiting for the writer may use;
        the sampler waits (backpressure) beyond it.
      progress: show a tqdm progress bar (in steps), updated once per block from
        the host side, so it costs nothing per step; an int gives the total
        number of steps per chain.

    Returns:
      ``Saver(init, save, postprocess)``:

      * ``init(init_sample, init_checkpoint=None, static_information=None, *, chains=None)``
        registers a chain (or ``chains`` chains, stacked on axis 0 for ``vmap``);
      * ``save(state, keep, sample, scheduler_state=None, solver_state=None) -> (state, None)``
        inside jit/scan/vmap;
      * ``postprocess(state, None) -> {"sample_count", "samples"}`` after the run.

    >>> import jax, jax.numpy as jnp, jaxsave
    >>> init, save, postprocess = jaxsave.save(jaxsave.MemoryCollector())
    >>> state = init(jnp.zeros(2), None, chains=2)
    >>> def step(state, i):
    ...     return save(state, i >= 2, jnp.float32(i))
    >>> run = jax.jit(jax.vmap(lambda s: jax.lax.scan(step, s, jnp.arange(4))[0]))
    >>> out = postprocess(run(state), None)
    >>> out["sample_count"].tolist(), out["samples"].tolist()
    ([2, 2], [[2.0, 3.0], [2.0, 3.0]])
    """
    streamer = Streamer(
        data_collector if data_collector is not None else MemoryCollector(),
        checkpoint_every,
        block_size,
        max_queue_bytes,
        progress,
    )
    return Saver(streamer.init, streamer.save, streamer.postprocess)
