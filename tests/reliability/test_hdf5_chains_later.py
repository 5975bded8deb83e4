"""Chains added to an HDF5Collector after the first block reached the file, or after a finished run.

The older library's ``solver.mcmc(strategy="map")`` (its default) registers,
runs (under jit) and postprocesses its chains one by one on one saver: chain 1
is registered after chain 0's blocks were written and its file was closed. A
notebook that runs the same saver twice does the same. Every such chain must
land in the file, every sample exactly, for both layouts, for a path and for a
user-supplied ``h5py.File``; no handle into a replaced or closed file may be used.
"""

from __future__ import annotations

import functools
import warnings

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsave

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(300)]

LAYOUTS = ("posterior", "chains")
STEPS, BURN_IN, THIN = 12, 2, 2
KEPT = list(range(BURN_IN, STEPS, THIN))  # the steps kept: 2, 4, ..., 10


def _sample(chain: int, i) -> dict:
    """Chain ``chain``'s sample at step ``i``: every value tells where it came from."""
    x = 1000.0 * chain + i + jnp.arange(3, dtype=jnp.float32) / 10
    return {"x": x.astype(jnp.float32), "lp": -jnp.float32(i) - chain}


def _expected(chain: int, steps=KEPT) -> dict:
    return {k: np.asarray(jnp.stack([v for v in [_sample(chain, i)[k] for i in steps]])) for k in ("x", "lp")}


def _check_file(path, chains: int, steps=KEPT) -> None:
    """The file is closed and holds every chain's samples, exactly."""
    info = jaxsave.file_info(path)
    assert not info.open_for_writing
    assert info.sample_counts.tolist() == [len(steps)] * chains
    for c in range(chains):
        got = jaxsave.load_samples(path, chain=c)
        for key, want in _expected(c, steps).items():
            np.testing.assert_array_equal(np.asarray(got[key]), want, err_msg=f"chain {c}, {key}")


def _walk(save, state, chain):
    """A chain under lax.scan: keeps steps ``>= BURN_IN`` every ``THIN``-th."""

    def step(s, i):
        return save(s, (i >= BURN_IN) & (i % THIN == 0), _sample(chain, i))

    return jax.lax.scan(step, state, jnp.arange(STEPS))[0]


# -- the older library's solver.mcmc, strategy="map" (its structure, with a trivial solver) ------


def _mcmc_map(saving, init_states, *, init_all_first: bool) -> list[dict]:
    """jax-sgmc's ``mcmc(...)(*states)`` with ``strategy="map"``: per chain ``init_saving``,
    a jitted ``lax.scan`` (one compiled function for every chain) and ``postprocess_saving``.

    ``init_all_first``: every chain is registered before the first runs (then run,
    then postprocessed, one by one).
    """
    init_saving, save, postprocess_saving = saving
    info = jaxsave.static_information(samples_collected=len(KEPT))

    def _init(chain):
        saving_state = init_saving(_sample(chain, 0), (jnp.float32(chain), None), info)
        return (STEPS, info), (jnp.float32(chain), saving_state)

    @functools.partial(jax.jit, static_argnums=0)
    def _run(static, init_state):
        chain, saving_state = init_state

        def update(carry, i):
            chain, saving_state = carry
            saving_state, saved = save(
                saving_state, (i >= BURN_IN) & (i % THIN == 0), _sample(chain.astype(jnp.int32), i)
            )
            return (chain, saving_state), saved

        (_, saving_state), saved = jax.lax.scan(update, (chain, saving_state), jnp.arange(static[0]))
        return saving_state, saved

    if not init_all_first:  # mcmc's run_single
        return [postprocess_saving(*_run(*_init(chain))) for chain in init_states]
    inits = [_init(chain) for chain in init_states]
    results = [_run(*args) for args in inits]
    return [postprocess_saving(*result) for result in results]


def _collector(kind, path, layout):
    if kind == "path":
        return jaxsave.HDF5Collector(path, layout=layout), None
    file = h5py.File(path, "w", libver="latest") if kind == "h5py-latest" else h5py.File(path, "w")
    return jaxsave.HDF5Collector(file, layout=layout), file


@pytest.mark.parametrize("init_all_first", [False, True], ids=["run_single", "init_all_first"])
@pytest.mark.parametrize("kind", ["path", "h5py-latest", "h5py"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_jax_sgmc_mcmc_map_strategy_keeps_every_chain(tmp_path, layout, kind, init_all_first):
    path = tmp_path / "mcmc.h5"
    collector, file = _collector(kind, path, layout)
    saving = jaxsave.save(collector, block_size=2)
    with warnings.catch_warnings():
        # h5py-latest, run_single: warned (tested below)
        warnings.simplefilter("ignore", RuntimeWarning)
        results = _mcmc_map(saving, [0, 1, 2], init_all_first=init_all_first)
    if file is not None:
        assert file.id.valid  # the user's file stays open
        file.close()
    assert [int(r["sample_count"]) for r in results] == [len(KEPT)] * 3
    _check_file(path, 3)


# -- defect 3: the same saver run twice ---------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
def test_same_saver_run_again_after_postprocess(tmp_path, layout):
    """init -> jitted run -> postprocess, then init again on the same saver: a new chain in the
    same file, the first run's samples intact."""
    path = tmp_path / "again.h5"
    saver = jaxsave.save(jaxsave.HDF5Collector(path, layout=layout), block_size=2)
    for chain in range(3):
        state = saver.init(_sample(0, 0), None)
        out = saver.postprocess(jax.jit(lambda s, c=chain: _walk(saver.save, s, c))(state), None)
        assert int(out["sample_count"]) == len(KEPT)
        _check_file(path, chain + 1)  # closed after each run, every chain so far in it


# -- defect 4: a chain added after chain 0's first block reached the file ----------------------


@pytest.mark.parametrize("swmr", [True, False])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_chain_added_after_the_first_block(tmp_path, layout, swmr):
    path = tmp_path / "later.h5"
    collector = jaxsave.HDF5Collector(path, layout=layout, swmr=swmr, flush_interval=0.0)
    saver = jaxsave.save(collector, block_size=2)
    run = jax.jit(_walk, static_argnums=0)
    first = jax.block_until_ready(run(saver.save, saver.init(_sample(0, 0), None), 0))
    jax.effects_barrier()
    saver.init.__self__.writer.drain()  # chain 0's 2 full blocks are in the file, its tail is not
    with collector._lock:
        assert collector.file.attrs["sample_counts"].tolist() == [4]
    second = run(saver.save, saver.init(_sample(0, 0), None), 1)
    pair = jax.tree.map(lambda x: jnp.stack([x, x]), _sample(0, 0))  # 2 more at once: chains 2, 3
    third = jax.jit(jax.vmap(lambda s: _walk(saver.save, s, 2)))(saver.init(pair, None, chains=2))
    for state in (second, first, third):
        saver.postprocess(state, None)
    info = jaxsave.file_info(path)
    assert info.sample_counts.tolist() == [len(KEPT)] * 4
    for c in range(3):
        got = jaxsave.load_samples(path, chain=c)
        np.testing.assert_array_equal(np.asarray(got["x"]), _expected(c)["x"])
    # the vmapped pair (chains 2 and 3) got the sample of "chain 2" both
    np.testing.assert_array_equal(np.asarray(jaxsave.load_samples(path, chain=3)["x"]), _expected(2)["x"])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_chain_registered_while_blocks_are_written(tmp_path, layout):
    """Chain 1 is registered while chain 0's first blocks may or may not have reached the file
    (no wait between them): either order must keep every sample. The old code lost them in
    most runs (8 and 10 of 10, when the blocks came first), so a few rounds catch it."""
    for round_ in range(6):
        path = tmp_path / f"race{round_}.h5"
        saver = jaxsave.save(jaxsave.HDF5Collector(path, layout=layout), block_size=2)
        run = jax.jit(_walk, static_argnums=0)  # one compilation for both chains (chain traced)
        first = run(saver.save, saver.init(_sample(0, 0), None), 0)
        # no wait: the registration races chain 0's blocks
        second = run(saver.save, saver.init(_sample(0, 0), None), 1)
        saver.postprocess(first, None)
        saver.postprocess(second, None)
        _check_file(path, 2)


# -- a user-supplied h5py.File in SWMR mode ---------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
def test_user_file_in_swmr_mode_gets_later_chains_with_a_warning(tmp_path, layout):
    path = tmp_path / "user.h5"
    with h5py.File(path, "w", libver="latest") as f:
        f.attrs["mine"] = 1
        saver = jaxsave.save(jaxsave.HDF5Collector(f, layout=layout), block_size=2)
        run = jax.jit(_walk, static_argnums=0)
        saver.postprocess(run(saver.save, saver.init(_sample(0, 0), None), 0), None)
        assert f.swmr_mode  # the first block switched it to SWMR mode, which cannot be left
        with pytest.warns(RuntimeWarning, match="after the first block, in SWMR mode"):
            state = saver.init(_sample(0, 0), None)
        saver.postprocess(run(saver.save, state, 1), None)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # warned once per collector
            state = saver.init(_sample(0, 0), None)
        saver.postprocess(run(saver.save, state, 2), None)
    with h5py.File(path, "r") as f:
        assert f.attrs["mine"] == 1
    _check_file(path, 3)
