"""``no_save``: every kept sample stays in device memory until ``postprocess``.

The right choice for small runs that fit on the device: nothing leaves it during
the run, so there is no callback at all. The buffer holds ``samples_collected``
rows per chain, plus one scratch row: every sample is written at the next free row
(one not kept is overwritten by the next), a sample past the end on the scratch row,
so the update is a plain in-place write and never a copy of the buffer.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxsave._core import dtypes as _dtypes
from jaxsave._stream import sharding as _sharding
from jaxsave._stream.state import Saver, SaverBase, SaveState, check_one_chain, check_state
from jaxsave.collectors import samples_collected
from jaxsave.errors import CapacityError, SaverStateError

__all__ = ["no_save"]


class _DeviceSaver(SaverBase):
    """The saver behind :func:`no_save`: every kept sample stays in device memory."""

    def __init__(self) -> None:
        super().__init__()
        self.capacity: int | None = None

    def init(
        self,
        init_sample: Any,
        init_checkpoint: Any = None,
        static_information: Any = None,
        *,
        chains: int | None = None,
        scheduler_state: Any = None,
        resume: Any = None,
    ) -> SaveState:
        """A state holding room for ``samples_collected`` samples per chain."""
        if resume is not None:
            raise SaverStateError(
                "no_save() keeps no checkpoints and cannot resume a run: pass resume= to the "
                "init of jaxsave.save(collector, checkpoint_every=...)"
            )
        capacity = samples_collected(static_information)
        if capacity is None:
            raise ValueError(
                "no_save() keeps every sample on the device and needs to know how many: pass "
                "static_information(samples_collected=N)"
            )
        self._sample_spec(init_sample, chains)
        self.capacity = capacity if self.capacity is None else self.capacity
        if capacity != self.capacity:
            raise ValueError(f"all chains of one no_save() need the same samples_collected ({self.capacity})")
        sample = self.sample_layout
        first = len(self.registered)
        ids = list(range(first, first + (chains or 1)))
        self.registered.extend(ids)
        state = SaveState(
            chain_id=jnp.int32(first),
            saved_samples=jnp.int32(0),
            data=tuple(
                jnp.zeros((capacity + 1, *sample.storage_shape(j)), sample.row_dtype(j))
                for j in range(len(sample.specs))
            ),
            keep_mask=None,
            step=jnp.int32(0),
        )
        if chains is None:
            return state
        state = jax.tree.map(lambda x: jnp.broadcast_to(x, (chains, *x.shape)), state)
        return state._replace(chain_id=jnp.asarray(ids, jnp.int32))

    def save(
        self, state: SaveState, keep: Any, sample: Any, scheduler_state: Any = None, solver_state: Any = None
    ) -> tuple[SaveState, None]:
        """Write ``sample`` at the next free row if ``keep``; call inside jit/scan/vmap."""
        if solver_state is not None:
            raise SaverStateError(
                "no_save() keeps no checkpoints, so it cannot take solver_state: checkpoint with "
                "jaxsave.save(collector, checkpoint_every=...), or leave solver_state out"
            )
        self._check_open()
        leaves = self._flat_sample(sample)
        check_state(state, "save()")
        _check_device_state(state, "save()")
        check_one_chain(state, "save()")
        keep = self._check_keep(keep)
        # The sample goes to the next free row whether kept or not (a sample not kept is
        # overwritten by the next one); past the end the write is clamped to the last row,
        # which is scratch. A row index chosen by ``keep`` cost 1.6 us a step on XLA:CPU.
        row = state.saved_samples
        data = tuple(
            lax.dynamic_update_slice(buf, x[None], (row,) + (0,) * x.ndim, allow_negative_indices=False)
            for buf, x in zip(state.data, leaves)
        )
        saved = state.saved_samples + keep.astype(jnp.int32)
        return state._replace(saved_samples=saved, data=data, step=state.step + 1), None

    def postprocess(self, state: SaveState, unused_saved: Any = None) -> dict:
        """The kept samples, as the original tree (vmapped chains: zero-padded, stacked)."""
        check_state(state, "postprocess()")
        _check_device_state(state, "postprocess()")
        state = _sharding.local_part(state)  # this process's chains, on the host
        batch = np.shape(state.chain_id)
        chains = np.asarray(state.chain_id).reshape(-1)
        self._register_finished(chains)
        counts = np.asarray(state.saved_samples).reshape(-1)
        over = counts > self.capacity
        if over.any():
            i = int(np.flatnonzero(over)[0])
            raise CapacityError(
                f"chain {int(chains[i])} kept {int(counts[i])} samples, but "
                f"static_information(samples_collected={self.capacity}) has room for only {self.capacity}"
            )
        self.finished_chains.update(chains.tolist())
        leaves = [np.asarray(x).reshape(-1, *np.shape(x)[len(batch) :]) for x in state.data]
        sample = self.sample_layout
        samples = []
        for i, count in enumerate(counts.tolist()):
            rows = [
                _dtypes.from_storable(x[i, :count], spec.dtype) if spec.is_key else x[i, :count]
                for x, spec in zip(leaves, sample.specs)
            ]
            samples.append(sample.unflatten(rows))
        return self._stack_results(batch, counts, samples)


def _check_device_state(state: SaveState, where: str) -> None:
    if state.fill is not None or state.saved_samples is None:
        raise TypeError(
            f"{where}: this state has a ring buffer (it is a jaxsave.save() state); pass the state "
            "returned by this no_save()'s init, or by the previous save"
        )


def no_save() -> Saver:
    """Keep every kept sample in device memory; nothing leaves the device until ``postprocess``.

    Needs ``static_information(samples_collected=N)``: the buffer holds N samples per
    chain, and keeping more is an error at ``postprocess``.

    >>> import jax, jax.numpy as jnp, jaxsave
    >>> init, save, postprocess = jaxsave.no_save()
    >>> state = init({"i": jnp.int32(0)}, None, jaxsave.static_information(samples_collected=3))
    >>> state, _ = jax.lax.scan(lambda s, i: save(s, i % 2 == 0, {"i": i}), state, jnp.arange(5))
    >>> postprocess(state, None)["samples"]["i"].tolist()
    [0, 2, 4]
    """
    device = _DeviceSaver()
    return Saver(device.init, device.save, device.postprocess)
