"""Streaming samples out of ``jax.jit`` / ``lax.scan`` / ``vmap``.

``save(collector)`` returns ``(init, save, postprocess)``. ``save`` writes each
sample and its keep bit into a ring buffer of ``block_size`` rows that lives in
the saving state; only kept steps take a row, so thinning shrinks the traffic
too. When the buffer is full (or a checkpoint is due), one ``io_callback`` sends
the block of every chain to the host. The callback sits in a ``custom_vmap`` whose
batching rule folds the chain axes into the payload, so C vmapped chains (nested
vmaps included) cost one callback per block, not C, and ``keep`` may differ per
chain. ``postprocess`` sends the partial last block from the final state.

A script that ends before ``postprocess`` (an exception, ``sys.exit``, Ctrl-C) is
handled at interpreter exit (:mod:`jaxsave._stream.shutdown`): the computations still running
finish, every block that reached the host is written, and the collector is closed.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.custom_batching import custom_vmap

from jaxsave._core.tree import check_like
from jaxsave._stream import callback as _callback
from jaxsave._stream import resume as _resume
from jaxsave._stream import sharding as _sharding
from jaxsave._stream import shutdown
from jaxsave._stream.packing import Packing, advance, pack, unpack
from jaxsave._stream.resume import Checkpoint, broadcast_unbatched
from jaxsave._stream.state import Saver, SaverBase, SaveState, check_one_chain, check_state
from jaxsave._stream.writer import Block, Writer
from jaxsave.collectors import DataCollector, MemoryCollector, samples_collected
from jaxsave.errors import SaverStateError

logger = logging.getLogger("jaxsave")

__all__ = ["save"]

#: Automatic block size: aim for this many bytes per chain and block ...
_BLOCK_BYTES = 4 * 2**20
#: ... with at most this many rows.
_MAX_BLOCK_ROWS = 4096



class _Streamer(SaverBase):
    """The saver behind :func:`save`: ring buffer on device, writer thread on host."""

    def __init__(self, collector: DataCollector, checkpoint_every: int, block_size: int | None,
                 max_queue_bytes: int, progress: bool | int = False):
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
            raise TypeError(f"data_collector must be a jaxsave.DataCollector, got {type(collector).__name__}")
        if block_size is not None and (not isinstance(block_size, int) or block_size < 1):
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        if not isinstance(max_queue_bytes, int) or max_queue_bytes < 1:
            raise ValueError(f"max_queue_bytes must be a positive int, got {max_queue_bytes!r}")
        collector._attach(self)
        self.collector = collector
        self.block_size = block_size
        self.max_queue_bytes = max_queue_bytes
        self.packing: Packing | None = None
        self.writer: Writer | None = None
        self.late_error: BaseException | None = None
        self.exited = False  # the interpreter is exiting: the writer was stopped by the exit hook
        self.flush = self._make_flush()
        self._lock = threading.RLock()  # chains may be registered (and finished) from several threads

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
            return self._init(init_sample, init_checkpoint, static_information, chains=chains,
                              scheduler_state=scheduler_state, resume=resume)

    def _init(self, init_sample: Any, init_checkpoint: Any, static_information: Any, *, chains: int | None,
              scheduler_state: Any, resume: Checkpoint | None) -> SaveState:
        self._raise_late_error()
        if resume is not None:
            one = np.ndim(resume.chain_ids) == 0 or len(resume.chain_ids) == 1
            chains = None if one else len(resume.chain_ids)
        spec = self._sample_spec(init_sample, chains)
        capacity = samples_collected(static_information)
        self._checkpoint_spec(init_checkpoint, scheduler_state, chains)
        if self.block_size is None:
            rows = int(np.clip(_BLOCK_BYTES // max(1, self.sample_layout.row_bytes()), 1, _MAX_BLOCK_ROWS))
            # A checkpoint flushes at least every checkpoint_every steps, and a flush
            # sends the whole buffer: no use for more rows than that.
            self.block_size = min(rows, self.checkpoint_every or rows)
        if self.packing is None:
            layout = self.sample_layout
            leaves = range(len(layout.specs))
            self.packing = Packing.build(self.block_size, [layout.storage_shape(j) for j in leaves],
                                         [layout.row_dtype(j) for j in leaves])
        if self.writer is None or not self.writer.alive:
            self.writer = Writer(self.collector, max_queue_bytes=self.max_queue_bytes)
            self.writer.checkpoint_spec = self.checkpoint_spec
            shutdown.watch(self)
            if self.progress:
                self._start_progress()
        running = set(self.registered) - self.finished_chains
        try:
            if resume is not None:
                return self._resume(spec, init_checkpoint, static_information, capacity, resume)
            ids = []
            for _ in range(chains or 1):
                chain = int(self.collector.register_chain(
                    init_sample=spec, init_checkpoint=init_checkpoint, static_information=static_information))
                self.writer.add_chain(chain, capacity)
                self.registered.append(chain)
                ids.append(chain)
            self.writer.add_group(ids)  # they advance together: checkpoints are stored step by step
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
            raise ValueError("checkpoint_every needs init_checkpoint: a template of the solver_state "
                             "to checkpoint")
        tree = _resume.checkpoint_tree(init_checkpoint, scheduler_state)
        if chains is not None:
            tree = jax.tree.map(lambda x: x[0], tree)
        spec = jax.eval_shape(lambda t: t, tree)
        if self.checkpoint_spec is None:
            self.checkpoint_spec = spec
        else:
            check_like(spec, self.checkpoint_spec, "init_checkpoint of a new chain")

    def _resume(self, spec, init_checkpoint, static_information, capacity, ckpt) -> SaveState:
        ids = np.atleast_1d(np.asarray(ckpt.chain_ids)).tolist()
        steps = np.atleast_1d(np.asarray(ckpt.step))
        counts = np.atleast_1d(np.asarray(ckpt.sample_count))
        if len(steps) != len(ids) or len(counts) != len(ids):
            raise SaverStateError(f"the checkpoint to resume has {len(ids)} chain ids but "
                                  f"{len(steps)} steps and {len(counts)} sample counts")
        _resume.at_one_step(dict(zip(ids, steps.tolist())), "the checkpoint to resume")
        self.writer.drain()  # blocks of an abandoned run land before the chains restart
        self.writer.raise_error()
        for chain, step, count in zip(ids, steps.tolist(), counts.tolist()):
            self.collector.reopen_chain(chain, count, init_sample=spec, init_checkpoint=init_checkpoint,
                                        static_information=static_information)
            self.writer.add_chain(chain, capacity, start=step, written=count)
            self.finished_chains.discard(chain)
            if chain not in self.registered:
                self.registered.append(chain)
        self.writer.add_group(ids)
        batched = len(ids) > 1
        step = jnp.asarray(steps, jnp.int32) if batched else jnp.int32(steps[0])
        saved = jnp.asarray(counts, jnp.int32) if batched else jnp.int32(counts[0])
        if self.checkpoint_spec is not None:
            tree = _resume.checkpoint_tree(ckpt.solver_state, ckpt.scheduler_state)
            check_like(jax.eval_shape(lambda t: jax.tree.map(lambda x: x[0], t) if batched else t, tree),
                       self.checkpoint_spec, "the checkpoint to resume")
        state = self._new_state(ids, len(ids) if batched else None)
        return state._replace(step=step, saved_samples=saved, block_start=step)

    def _new_state(self, ids: list[int], chains: int | None) -> SaveState:
        """A fresh state for chains ``ids`` (stacked when ``chains``), from step 0."""
        state = SaveState(
            chain_id=jnp.int32(ids[0]),
            saved_samples=jnp.int32(0),
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
        keep = self._check_keep(keep)
        _check_ring(state, "save()")
        # The row at `fill` is written every step but taken only when kept: a step
        # nobody keeps is overwritten by the next one.
        data, mask = self.packing.write(state.data, state.keep_mask, leaves, keep, state.fill)
        step = state.step + 1
        saved = state.saved_samples + keep.astype(jnp.int32)
        fill = advance(state.fill, keep)
        full = fill == state.keep_mask.shape[-1]
        ckpt = None
        if self.checkpoint_every:
            full = full | (step % self.checkpoint_every == 0)
            tree = _resume.checkpoint_tree(solver_state, scheduler_state)
            check_like(tree, self.checkpoint_spec, "the solver_state/scheduler_state passed to save()")
            ckpt = (tuple(_resume.to_device_leaves(tree)), saved)
        self.flush(full, (full, state.chain_id, state.block_start, step, fill, mask, data, ckpt))
        if self.packing.unbuffered:  # the row just sent was the whole block
            data = state.data
        fill = jnp.where(full, 0, fill)
        block_start = jnp.where(full, step, state.block_start)
        return SaveState(state.chain_id, saved, data, mask, step, fill, block_start), None

    def _make_flush(self) -> Callable[[Any, Any], None]:
        receive, every = self._receive, self.checkpoint_every

        def send(payload):
            # Every argument of io_callback costs ~0.1 ms: the small per-chain fields and
            # the keep mask travel as one int32 array, (chains..., 4 + rows); the samples
            # as one buffer per dtype; the solver state packed the same way.
            active, chain, start, end, fill, mask, data, ckpt = payload
            saved = ckpt[1] if ckpt is not None else jnp.zeros_like(end)
            fields = [active.astype(jnp.int32), chain, end, saved, start, fill]
            meta = jnp.concatenate([jnp.stack(fields, axis=-1), mask.astype(jnp.int32)], axis=-1)
            if ckpt is None:
                _callback.send(receive, (meta, data, None))
                return
            # The solver state travels only with blocks that end on a checkpoint step.
            def with_solver_state():
                solver, packed = pack(ckpt[0], meta.ndim - 1)  # concatenated only on checkpoint flushes
                _callback.send(functools.partial(receive, solver_packing=packed), (meta, data, solver))

            lax.cond(jnp.any(active & (end % every == 0)), with_solver_state,
                     lambda: _callback.send(receive, (meta, data, None)))

        @custom_vmap
        def flush(pred, payload):
            lax.cond(pred, send, lambda p: None, payload)

        @flush.def_vmap
        def _flush_vmap(axis_size, in_batched, pred, payload):
            pred_batched, payload_batched = in_batched
            payload = broadcast_unbatched(payload, payload_batched, axis_size)
            flush(jnp.any(pred) if pred_batched else pred, payload)
            return None, None

        return flush

    # -- host ------------------------------------------------------------------------

    def _receive(self, payload: Any, solver_packing: tuple = ()) -> None:
        """The flush callback: wrap the block and queue it; runs on an XLA thread."""
        if self.exited:  # a computation still running after the exit hook (from another thread)
            if self.writer is not None and not self.writer.dropped:
                logger.warning("jaxsave: blocks computed during interpreter exit are dropped")
            if self.writer is not None:
                self.writer.dropped += 1
            return
        try:
            meta, data, solver = payload
            meta = np.asarray(meta).reshape(-1, np.shape(meta)[-1])
            active, chains, ends, saved = meta[:, 0].astype(bool), meta[:, 1], meta[:, 2], meta[:, 3]
            starts, rows = meta[:, 4], int(meta[0, 5])
            mask = meta[:, 6:6 + rows].astype(bool)
            if (ends != ends[0]).any() or (meta[:, 5] != rows).any():
                raise SaverStateError(
                    f"the vmapped chains {chains.tolist()} are at different steps {ends.tolist()}: "
                    "stack only states that were created together (init(..., chains=n)) and "
                    "advanced together")
            finished = sorted(set(chains[active].tolist()) & self.finished_chains)
            if finished or self.writer is None or not self.writer.alive:
                raise SaverStateError(
                    f"chain(s) {finished or chains[active].tolist()} saved samples after postprocess "
                    "finished them; start again from init"
                )
            leaves = [x[:, :rows] for x in self.packing.unpack(data)]
            block = Block(chains, starts, ends, mask, leaves, keepalive=payload)
            if solver is not None:
                flat = unpack(solver, solver_packing)
                block.checkpoints = _resume.records(
                    chains, ends, saved, flat, active & (ends % self.checkpoint_every == 0))
            if not active.all():
                pick = np.flatnonzero(active)
                block = Block(chains[pick], starts[pick], ends[pick], mask[pick], [x[pick] for x in leaves],
                              checkpoints=block.checkpoints)
            self.writer.submit(block)
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
            if self.writer is not None:
                self.writer.fail(error)

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
        if self.writer is None:
            raise SaverStateError("postprocess() was called before init()")
        check_state(state, "postprocess()")
        _check_ring(state, "postprocess()")
        state = _sharding.local_part(state)  # this process's chains, on the host
        jax.effects_barrier()
        self._raise_late_error()
        batch = np.shape(state.chain_id)
        chains = np.asarray(state.chain_id).reshape(-1)
        self._register_finished(chains)
        steps = np.asarray(state.step).reshape(-1)
        counts = np.asarray(state.saved_samples).reshape(-1)
        starts = np.asarray(state.block_start).reshape(-1)
        fills = np.asarray(state.fill).reshape(-1)
        mask = np.asarray(state.keep_mask).reshape(len(chains), -1)
        leaves = self.packing.unpack(state.data)
        try:
            for tail in np.unique(fills):
                pick = np.flatnonzero(fills == tail)
                for i in pick:
                    self.writer.wait_for(int(chains[i]), int(starts[i]))
                self.writer.submit(Block(chains[pick], starts[pick], steps[pick], mask[pick, :tail],
                                         [x[pick, :tail] for x in leaves], tail=True))
            for chain, step, count in zip(chains.tolist(), steps.tolist(), counts.tolist()):
                self.writer.wait_for(chain, step, finalized=True)
                if self.writer.written[chain] != count:
                    raise SaverStateError(
                        f"chain {chain}: the state counts {count} kept samples but the collector "
                        f"received {self.writer.written[chain]}"
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

    def _start_progress(self) -> None:
        try:
            from tqdm.auto import tqdm
        except ImportError as error:
            raise ImportError("progress=True needs tqdm: pip install 'jaxsave[progress]'") from error
        self.bar = tqdm(total=self.progress_total, unit="step", desc="sampling", dynamic_ncols=True)
        bar, kept = self.bar, [0]

        def on_block(block: Block) -> None:  # writer thread: one update per block, not per step
            if bar.n == 0 and kept[0] == 0:
                bar.reset(total=bar.total)  # the clock starts with sampling, not with compilation
            kept[0] += int(block.mask.sum())
            position = int(block.ends.max()) if len(block.ends) else bar.n
            if position > bar.n:
                bar.update(position - bar.n)
            bar.set_postfix(kept=kept[0], chains=len(self.registered), refresh=False)

        self.writer.on_block = on_block

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
        """At exit: write what is queued (until ``deadline``), stop the writer, close the file."""
        writer = self.writer
        if writer is None or not writer.alive:
            return
        self.exited = True
        unfinished = sorted(set(self.registered) - self.finished_chains)
        try:
            stopped = writer.stop(deadline - time.monotonic())
        except KeyboardInterrupt:  # a second Ctrl-C: drop what is still queued
            stopped = writer.stop(0.0)
        if writer.dropped:
            logger.warning("jaxsave: interpreter exit: %d block(s) of samples were not written "
                           "(dropped after %.0f s of writing)", writer.dropped,
                           shutdown.EXIT_TIMEOUT_S)
        if not stopped:
            logger.error("jaxsave: interpreter exit: the writer thread is still inside %s; "
                         "the collector is left open", type(self.collector).__name__)
            return
        self.finished_chains.update(unfinished)
        if unfinished:
            logger.warning("jaxsave: the interpreter exits before postprocess finished chain(s) "
                           "%s; what reached the host of their samples (if any) is written and "
                           "the file closed", unfinished)
        try:
            self._close_if_done(force=True)
        except Exception as error:  # noqa: BLE001 - exiting anyway
            logger.error("jaxsave: interpreter exit: closing %s failed: %r",
                         type(self.collector).__name__, error)


def _check_ring(state: SaveState, where: str) -> None:
    if state.fill is None or state.block_start is None:
        raise TypeError(f"{where}: this state has no ring buffer (is it a no_save() state?); pass the state "
                        "returned by this saver's init, or by the previous save")


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
    streamer = _Streamer(data_collector if data_collector is not None else MemoryCollector(),
                         checkpoint_every, block_size, max_queue_bytes, progress)
    return Saver(streamer.init, streamer.save, streamer.postprocess)
