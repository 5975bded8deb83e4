"""What every saver shares: the saving state, static information, sample checks, results.

A saver is ``Saver(init, save, postprocess)``; :func:`jaxsave.save` (streaming to a
collector) and :func:`jaxsave.no_save` (device memory) build one. Both keep the
samples' layout, check every sample against it at trace time, track which chains
were finished by ``postprocess``, and stack per-chain results the same way.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from jaxsave._core import dtypes as _dtypes
from jaxsave._core.tree import check_like
from jaxsave.collectors import SampleLayout, sample_layout
from jaxsave.errors import SaverStateError, StructureMismatchError

__all__ = ["static_information", "SaveState", "Saver"]


class static_information(NamedTuple):  # noqa: N801 - the older io module's name
    """What is known before the run: ``samples_collected`` (``None`` if unknown)."""

    samples_collected: Any = None


class SaveState(NamedTuple):
    """The saving state threaded through the user's loop; vmapped chains add leading axes.

    ``data`` holds the ring buffer (``block_size`` rows per leaf) or, for
    :func:`no_save`, every kept sample; ``keep_mask`` the keep bits of the ring
    buffer's rows; ``step`` the number of ``save`` calls so far. Streaming only:
    ``fill`` packs the number of rows of the current block in use (a row is taken
    only by a step that some chain keeps) and the steps since the block began, in
    one int32 (``_stream/packing.py``: ``rows_of``, ``span_of``). ``saved_samples`` counts the kept
    samples for :func:`no_save`; a streaming state leaves it ``None``: the host
    counts the samples and steps of every block it receives, so the loop carries no
    counter for them (``postprocess`` returns the count). ``block_start`` is the
    step the current block began at, kept up to date under vmap only (it orders
    XLA:CPU's vmapped loop body; docs/performance.md).
    """

    chain_id: jax.Array
    saved_samples: Any
    data: Any
    keep_mask: Any
    step: jax.Array
    fill: Any = None
    block_start: Any = None


class InitFn(Protocol):
    """``init(init_sample, init_checkpoint=None, static_information=None, *, chains=None, ...)``."""

    def __call__(
        self,
        init_sample: Any,
        init_checkpoint: Any = None,
        static_information: Any = None,
        *,
        chains: int | None = None,
        scheduler_state: Any = None,
        resume: Any = None,
    ) -> SaveState: ...


class SaveFn(Protocol):
    """``save(state, keep, sample, scheduler_state=None, solver_state=None) -> (state, None)``."""

    def __call__(
        self, state: SaveState, keep: Any, sample: Any, scheduler_state: Any = None, solver_state: Any = None
    ) -> tuple[SaveState, None]: ...


class PostprocessFn(Protocol):
    """``postprocess(state, saved=None) -> dict`` of the samples (or their file)."""

    def __call__(self, state: SaveState, unused_saved: Any = None) -> dict: ...


class Saver(NamedTuple):
    """``init``, ``save`` and ``postprocess`` of one saver; unpacks as a 3-tuple."""

    init: InitFn
    save: SaveFn
    postprocess: PostprocessFn


class SaverBase:
    """What the streaming saver and ``no_save`` share: layout, checks, chain bookkeeping."""

    def __init__(self) -> None:
        self.spec: Any = None  # per-chain jax.ShapeDtypeStruct tree of the sample
        self._sample_layout: SampleLayout | None = None
        self.registered: list[int] = []
        self.finished_chains: set[int] = set()

    @property
    def sample_layout(self) -> SampleLayout:
        """The layout of one chain's sample (known from the first init)."""
        if self._sample_layout is None:
            raise SaverStateError("save() was called before init()")
        return self._sample_layout

    def _sample_spec(self, init_sample: Any, chains: int | None) -> Any:
        try:
            spec = jax.eval_shape(lambda tree: tree, init_sample)
        except TypeError as error:
            paths = jax.tree_util.tree_flatten_with_path(init_sample)[0]
            bad = [
                f"{jax.tree_util.keystr(p) or '<root>'} ({type(x).__name__})"
                for p, x in paths
                if not _is_array_like(x)
            ]
            raise TypeError(
                f"init_sample must be a pytree of arrays or numbers; not arrays: {', '.join(bad) or error}"
            ) from error
        if chains is not None:
            if not isinstance(chains, int) or chains < 1:
                raise ValueError(f"chains must be a positive int, got {chains!r}")
            for key, leaf in zip(sample_layout(spec).keys, jax.tree.leaves(spec)):
                if leaf.shape[:1] != (chains,):
                    raise StructureMismatchError(
                        f"with chains={chains}, every leaf of init_sample needs a leading axis of "
                        f"size {chains}; leaf {'/'.join(key) or '<root>'!r} has shape {leaf.shape}"
                    )
            spec = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape[1:], s.dtype), spec)
        if self.spec is None:
            self.spec, self._sample_layout = spec, sample_layout(spec)
        else:
            check_like(spec, self.spec, "init_sample of a new chain")
        return spec

    def _check_open(self) -> None:
        if self.registered and len(self.finished_chains) == len(self.registered):
            raise SaverStateError(
                "this saver's chains were all finished by postprocess; saving again needs a new "
                "state from init (or a new saver)"
            )

    def _flat_sample(self, sample: Any) -> list[jax.Array]:
        """The sample's leaves as device arrays of the registered dtypes (keys as key data)."""
        if self.spec is None:
            raise SaverStateError("save() was called before init()")
        leaves, treedef = jax.tree.flatten(sample)
        if treedef == self.sample_layout.treedef:  # Python scalars take the registered dtype
            specs = jax.tree.leaves(self.spec)
            leaves = [x if hasattr(x, "dtype") else jnp.asarray(x, s.dtype) for x, s in zip(leaves, specs)]
            sample = jax.tree.unflatten(treedef, leaves)
        try:
            check_like(sample, self.spec, "the sample passed to save()")
        except StructureMismatchError as error:
            chains = _stacked_chains(sample, self.spec)
            if chains is None:
                raise
            raise StructureMismatchError(
                f"{error}\n  every leaf of init_sample has a leading axis of {chains} that the "
                f"samples lack: for {chains} vmapped chains, create the state with "
                f"init(init_sample, ..., chains={chains})"
            ) from None
        return [
            jax.random.key_data(x) if _dtypes.is_key(x) else jnp.asarray(x) for x in jax.tree.leaves(sample)
        ]

    @staticmethod
    def _check_keep(keep: Any) -> jax.Array:
        if keep is None or isinstance(keep, (str, bytes)):
            raise TypeError(f"keep must be a boolean scalar (e.g. `step % thin == 0`), got {keep!r}")
        keep = jnp.asarray(keep)
        if keep.shape != () or keep.dtype != jnp.bool_:
            raise TypeError(
                f"keep must be a boolean scalar (e.g. `step % thin == 0`), got dtype {keep.dtype} "
                f"and shape {keep.shape}"
            )
        return keep

    def _register_finished(self, chains: np.ndarray) -> None:
        check_distinct_chains(chains, "the state")
        again = sorted(set(chains.tolist()) & self.finished_chains)
        if again:
            raise SaverStateError(f"postprocess was already called for chain(s) {again}")
        unknown = sorted(set(chains.tolist()) - set(self.registered))
        if unknown:
            raise SaverStateError(f"chain id(s) {unknown} were not created by this saver's init")

    def _stack_results(self, batch: tuple[int, ...], counts: np.ndarray, samples: list[Any]) -> dict:
        if batch == ():
            return {"sample_count": counts.reshape(()), "samples": samples[0]}
        if any(s is None for s in samples):
            stacked = None
        else:
            longest = int(counts.max()) if counts.size else 0
            stacked = jax.tree.map(
                lambda *xs: _stack_padded(xs, longest, batch),
                *samples,
            )
        return {"sample_count": counts.reshape(batch), "samples": stacked}


def _stack_padded(leaves: tuple[Any, ...], length: int, batch: tuple[int, ...]) -> Any:
    """Stack per-chain ``(n_i, ...)`` arrays into ``batch + (length, ...)``, zero-padded."""
    keys = _dtypes.is_key(leaves[0])
    impl = str(jax.random.key_impl(leaves[0])) if keys else None
    arrays = [np.asarray(jax.random.key_data(x)) if keys else np.asarray(x) for x in leaves]
    padded = [np.pad(a, [(0, length - a.shape[0])] + [(0, 0)] * (a.ndim - 1)) for a in arrays]
    out = np.stack(padded).reshape(batch + padded[0].shape)
    return jax.random.wrap_key_data(out, impl=impl) if keys else out  # type: ignore[arg-type]


def _stacked_chains(sample: Any, spec: Any) -> int | None:
    """``C`` if every leaf of ``spec`` is ``sample``'s leaf with a leading axis of ``C`` added."""
    leaves, specs = jax.tree.leaves(sample), jax.tree.leaves(spec)
    structure: Any = jax.tree.structure(sample)
    if structure != jax.tree.structure(spec) or not specs:
        return None
    leading = {s.shape[0] if s.shape else None for s in specs}
    if len(leading) != 1 or None in leading:
        return None
    if any(tuple(np.shape(x)) != s.shape[1:] for x, s in zip(leaves, specs)):
        return None
    return leading.pop()


def _is_array_like(x: Any) -> bool:
    try:
        jax.eval_shape(lambda t: t, x)
        return True
    except TypeError:
        return False


def check_distinct_chains(chains: np.ndarray, what: str) -> None:
    """Refuse ``chains`` (of a state, or a block) that name one chain id more than once."""
    if np.size(chains) < 2:
        return
    ordered = np.sort(chains, axis=None)
    twice = ordered[1:] == ordered[:-1]
    if twice.any():
        raise SaverStateError(
            f"{what} holds chain id(s) {np.unique(ordered[1:][twice]).tolist()} more than once (chain ids "
            f"{chains.tolist()}): a one-chain state was closed over, or passed with in_axes=None, "
            "in a jax.vmap, or one state was stacked with itself. Create vmapped chains with "
            "init(init_sample, ..., chains=C) and vmap over the state (in_axes=0)"
        )


def check_state(state: Any, where: str) -> None:
    """Refuse anything but a :class:`SaveState` as the saving state (a clear error, not an
    AttributeError)."""
    if not isinstance(state, SaveState):
        raise TypeError(
            f"{where}: state must be the SaveState returned by init (or by the previous save), "
            f"got {type(state).__name__}"
        )


def check_one_chain(state: SaveState, where: str) -> None:
    """Refuse a state of several chains where one chain's step is traced (``vmap`` forgotten)."""
    shape: tuple[int, ...] = tuple(getattr(state.chain_id, "shape", ()))
    if shape:
        raise TypeError(
            f"{where}: this state holds {shape[0]} chains stacked on a leading axis (from "
            f"init(..., chains={shape[0]}) or stacked states); call save for one chain, under "
            f"jax.vmap over that axis (e.g. jax.jit(jax.vmap(run_chain))(state, keys))"
        )


def check_ring(state: SaveState, where: str) -> None:
    """Refuse a state without a ring buffer (a ``no_save()`` state) where ``save()``'s is needed."""
    if state.fill is None or state.block_start is None:
        raise TypeError(
            f"{where}: this state has no ring buffer (is it a no_save() state?); pass the state "
            "returned by this saver's init, or by the previous save"
        )
