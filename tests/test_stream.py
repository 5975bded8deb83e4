"""The streaming core: save() inside jit/scan/vmap, with every collector."""

import time

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import random_walk

import jaxsave
from jaxsave._stream.packing import rows_of, span_of

COLLECTORS = ["memory", "hdf5", "hdf5-chains", "device"]


def make_saver(kind, tmp_path, **kwargs):
    if kind == "memory":
        return jaxsave.save(jaxsave.MemoryCollector(), **kwargs)
    if kind == "hdf5":
        return jaxsave.save(jaxsave.HDF5Collector(tmp_path / "s.h5"), **kwargs)
    if kind == "hdf5-chains":
        return jaxsave.save(jaxsave.HDF5Collector(tmp_path / "s.h5", layout="chains"), **kwargs)
    assert kind == "device"
    return jaxsave.no_save()


def stored(kind, tmp_path, result, chain):
    """Chain ``chain``'s kept samples as {"x": (n, 3), "i": (n,), "e": (n,)}."""
    if kind in ("memory", "device"):
        samples = result["samples"]
        if np.ndim(result["sample_count"]) == 0:
            n = int(result["sample_count"])
            return {"x": samples["x"][:n], "i": samples["stats"][0][:n], "e": samples["stats"][1][:n]}
        n = int(np.asarray(result["sample_count"]).reshape(-1)[chain])
        flat = jax.tree.map(
            lambda a: np.asarray(a).reshape(-1, *np.shape(a)[np.ndim(result["sample_count"]) :]), samples
        )
        return {"x": flat["x"][chain, :n], "i": flat["stats"][0][chain, :n], "e": flat["stats"][1][chain, :n]}
    with h5py.File(tmp_path / "s.h5", "r") as f:
        n = int(f.attrs["sample_counts"][chain])
        if kind == "hdf5":
            g = f["posterior"]
            return {
                "x": g["x"][chain, :n],
                "i": g["stats.list_element_0"][chain, :n],
                "e": g["stats.list_element_1"][chain, :n],
            }
        g = f[f"chain~{chain}"]
        return {"x": g["x"][:n], "i": g["stats/list_element_0"][:n], "e": g["stats/list_element_1"][:n]}


def expected(xs, keeps, steps):
    xs, keeps = np.asarray(xs), np.asarray(keeps)
    i = np.arange(steps)[keeps]
    return {"x": xs[keeps], "i": i, "e": (xs[keeps] ** 2).sum(-1)}


def assert_same(got, want):
    assert got["x"].shape == want["x"].shape
    np.testing.assert_array_equal(got["x"], want["x"])
    np.testing.assert_array_equal(got["i"], want["i"])
    np.testing.assert_allclose(got["e"], want["e"], rtol=1e-6)


@pytest.mark.parametrize("kind", COLLECTORS)
@pytest.mark.parametrize("steps,block", [(50, 7), (56, 7), (5, 16), (40, None)])
def test_single_chain_under_jit_and_scan(kind, tmp_path, sample, steps, block):
    kwargs = {} if kind == "device" or block is None else {"block_size": block}
    saver = make_saver(kind, tmp_path, **kwargs)
    state = saver.init(sample, None, jaxsave.static_information(samples_collected=steps))
    run = jax.jit(lambda s, k: random_walk(saver, s, k, steps, burn_in=3, thin=2))
    state, xs, keeps = run(state, jax.random.key(1))
    result = saver.postprocess(state, None)
    assert int(result["sample_count"]) == int(keeps.sum())
    assert_same(stored(kind, tmp_path, result, 0), expected(xs, keeps, steps))


@pytest.mark.parametrize("kind", COLLECTORS)
def test_vmapped_chains_with_per_chain_keep_equal_unbatched_runs(kind, tmp_path, sample):
    chains, steps = 4, 45
    keys = jax.random.split(jax.random.key(7), chains)
    phases = jnp.arange(chains) % 3  # each chain thins differently
    batched = jax.tree.map(lambda x: jnp.broadcast_to(x, (chains, *jnp.shape(x))), sample)

    kwargs = {} if kind == "device" else {"block_size": 8}
    saver = make_saver(kind, tmp_path, **kwargs)
    state = saver.init(batched, None, jaxsave.static_information(samples_collected=steps), chains=chains)
    run = jax.jit(jax.vmap(lambda s, k, p: random_walk(saver, s, k, steps, burn_in=2, thin=3, phase=p)))
    state, xs, keeps = run(state, keys, phases)
    result = saver.postprocess(state, None)
    assert np.asarray(result["sample_count"]).tolist() == np.asarray(keeps.sum(1)).tolist()

    for c in range(chains):
        # The same chain, alone and unbatched, with a fresh saver of the same kind.
        solo_path = tmp_path / f"solo{c}"
        solo_path.mkdir()
        solo = make_saver(kind, solo_path, **kwargs)
        solo_state = solo.init(sample, None, jaxsave.static_information(samples_collected=steps))
        solo_state, solo_xs, solo_keeps = jax.jit(
            lambda s, k, p: random_walk(solo, s, k, steps, burn_in=2, thin=3, phase=p)
        )(solo_state, keys[c], phases[c])
        solo_result = solo.postprocess(solo_state, None)
        want = stored(kind, solo_path, solo_result, 0)
        got = stored(kind, tmp_path, result, c)
        # Bit for bit what each run computed; between the two runs the rows and steps must be the
        # same, the values within rounding: XLA may round a vmapped step differently from the
        # unbatched one (1 ulp on jax 0.12 on an AMD EPYC).
        assert_same(got, expected(xs[c], keeps[c], steps))
        assert_same(want, expected(solo_xs, solo_keeps, steps))
        np.testing.assert_array_equal(got["i"], want["i"])
        np.testing.assert_allclose(got["x"], want["x"], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind", ["memory", "hdf5", "device"])
def test_nested_vmap_gives_every_chain_its_own_id(kind, tmp_path, sample):
    outer, inner, steps = 2, 3, 20
    keys = jax.random.split(jax.random.key(3), outer * inner).reshape(outer, inner)
    phases = (jnp.arange(outer * inner) % 2).reshape(outer, inner)
    batched = jax.tree.map(lambda x: jnp.broadcast_to(x, (outer * inner, *jnp.shape(x))), sample)
    saver = make_saver(kind, tmp_path, **({} if kind == "device" else {"block_size": 6}))
    state = saver.init(
        batched, None, jaxsave.static_information(samples_collected=steps), chains=outer * inner
    )
    state = jax.tree.map(lambda x: x.reshape(outer, inner, *x.shape[1:]), state)
    body = lambda s, k, p: random_walk(saver, s, k, steps, thin=2, phase=p)
    state, xs, keeps = jax.jit(jax.vmap(jax.vmap(body)))(state, keys, phases)
    result = saver.postprocess(state, None)
    assert np.shape(result["sample_count"]) == (outer, inner)
    xs, keeps = xs.reshape(outer * inner, steps, 3), keeps.reshape(outer * inner, steps)
    for c in range(outer * inner):
        assert_same(stored(kind, tmp_path, result, c), expected(xs[c], keeps[c], steps))


def test_one_callback_per_block_for_all_vmapped_chains(sample, one_call_per_block):
    chains, steps, block = 8, 40, 10
    collector = jaxsave.MemoryCollector()
    calls = []
    original = collector.save_block
    collector.save_block = lambda ids, values: (calls.append(list(ids)), original(ids, values))
    saver = jaxsave.save(collector, block_size=block)
    batched = jax.tree.map(lambda x: jnp.broadcast_to(x, (chains, *jnp.shape(x))), sample)
    state = saver.init(batched, None, chains=chains)
    keys = jax.random.split(jax.random.key(0), chains)
    state, _, _ = jax.jit(jax.vmap(lambda s, k: random_walk(saver, s, k, steps)))(state, keys)
    saver.postprocess(state, None)
    # 4 full blocks, each carrying all 8 chains in one piece (the tail is empty here).
    assert calls[:4] == [list(range(chains))] * 4


@pytest.mark.parametrize("loop", ["fori_loop", "while_loop", "cond"])
def test_other_control_flow(loop, tmp_path):
    saver = jaxsave.save(jaxsave.HDF5Collector(tmp_path / "s.h5"), block_size=4)
    state = saver.init(jnp.float32(0), None)

    def body(i, state):
        return saver.save(state, i % 2 == 0, jnp.float32(i))[0]

    if loop == "fori_loop":
        run = lambda s: jax.lax.fori_loop(0, 11, body, s)
    elif loop == "while_loop":
        run = lambda s: jax.lax.while_loop(
            lambda c: c[0] < 11, lambda c: (c[0] + 1, body(c[0], c[1])), (0, s)
        )[1]
    else:  # save only inside one branch of a cond
        run = lambda s: jax.lax.fori_loop(
            0, 11, lambda i, s: jax.lax.cond(i < 7, lambda s: body(i, s), lambda s: s, s), s
        )
    state = jax.jit(run)(state)
    result = saver.postprocess(state, None)
    want = [0, 2, 4, 6] if loop == "cond" else [0, 2, 4, 6, 8, 10]
    assert int(result["sample_count"]) == len(want)
    with h5py.File(tmp_path / "s.h5") as f:
        np.testing.assert_array_equal(f["posterior/sample"][0], want)


def test_while_loop_under_vmap_with_unbatched_predicate():
    saver = jaxsave.save(jaxsave.MemoryCollector(), block_size=3)
    state = saver.init(jnp.zeros(2), None, chains=2)

    def run(state, offset):
        def body(c):
            i, s = c
            return i + 1, saver.save(s, i % 2 == 1, offset + i.astype(jnp.float32))[0]

        return jax.lax.while_loop(lambda c: c[0] < 8, body, (0, state))[1]

    state = jax.jit(jax.vmap(run))(state, jnp.array([0.0, 100.0]))
    result = saver.postprocess(state, None)
    np.testing.assert_array_equal(result["samples"], [[1, 3, 5, 7], [101, 103, 105, 107]])


def test_save_inside_cond_under_vmap_is_a_jax_limitation():
    """JAX refuses IO effects inside a vmapped cond; the documented fix is keep=pred."""
    saver = jaxsave.save(jaxsave.MemoryCollector())
    state = saver.init(jnp.zeros(2), None, chains=2)
    branchy = lambda s: jax.lax.cond(True, lambda s: saver.save(s, True, 1.0)[0], lambda s: s, s)
    with pytest.raises(NotImplementedError, match="IO effect"):
        jax.vmap(branchy)(state)
    saver.postprocess(state, None)


def test_samples_collected_may_be_unknown_or_a_jax_scalar(tmp_path):
    for info in (
        None,
        jaxsave.static_information(),
        jaxsave.static_information(samples_collected=jnp.int32(9)),
    ):
        saver = jaxsave.save(jaxsave.HDF5Collector(tmp_path / "s.h5"), block_size=4)
        state = saver.init({"a": jnp.zeros(2)}, None, info)
        state, _ = jax.lax.scan(
            lambda s, i: saver.save(s, True, {"a": jnp.full(2, i, jnp.float32)}), state, jnp.arange(9)
        )
        assert int(saver.postprocess(state, None)["sample_count"]) == 9
        with h5py.File(tmp_path / "s.h5") as f:
            assert f["posterior/a"].shape == (1, 9, 2)
            np.testing.assert_array_equal(f["posterior/a"][0, :, 0], np.arange(9))


def test_dtypes_survive_memory_and_device_collectors():
    import ml_dtypes

    sample = {
        "bf16": jnp.zeros(2, jnp.bfloat16),
        "i8": jnp.zeros((), jnp.int8),
        "flag": jnp.zeros((), bool),
        "c": jnp.zeros((), jnp.complex64),
        "key": jax.random.key(0),
    }

    def make(i):
        return {
            "bf16": jnp.full(2, i, jnp.bfloat16) / 3,
            "i8": i.astype(jnp.int8),
            "flag": i % 2 == 0,
            "c": (i + 1j * i).astype(jnp.complex64),
            "key": jax.random.fold_in(jax.random.key(0), i),
        }

    for saver in (jaxsave.save(jaxsave.MemoryCollector(), block_size=3), jaxsave.no_save()):
        state = saver.init(sample, None, jaxsave.static_information(samples_collected=5))
        state, _ = jax.lax.scan(lambda s, i: saver.save(s, True, make(i)), state, jnp.arange(5))
        got = saver.postprocess(state, None)["samples"]
        want = jax.vmap(make)(jnp.arange(5))
        assert got["bf16"].dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(got["bf16"], want["bf16"])
        np.testing.assert_array_equal(got["i8"], want["i8"])
        np.testing.assert_array_equal(got["flag"], want["flag"])
        np.testing.assert_array_equal(got["c"], want["c"])
        assert jax.dtypes.issubdtype(got["key"].dtype, jax.dtypes.prng_key)
        np.testing.assert_array_equal(jax.random.key_data(got["key"]), jax.random.key_data(want["key"]))


def test_memory_collector_writes_npz_per_chain(tmp_path):
    saver = jaxsave.save(jaxsave.MemoryCollector(save_dir=tmp_path / "out"), block_size=2)
    state = saver.init({"a": {"b": jnp.zeros(2)}, "c": [jnp.int32(0)]}, None, chains=None)
    state, _ = jax.lax.scan(
        lambda s, i: saver.save(s, True, {"a": {"b": jnp.full(2, i, jnp.float32)}, "c": [i]}),
        state,
        jnp.arange(5),
    )
    saver.postprocess(state, None)
    with np.load(tmp_path / "out" / "chain_0.npz", allow_pickle=False) as f:
        np.testing.assert_array_equal(f["a/b"][:, 0], np.arange(5))
        np.testing.assert_array_equal(f["c/list_element_0"], np.arange(5))


@pytest.mark.parametrize("capacity", [None, 37, 10**12])
def test_memory_collector_grows_in_place_and_copies_each_sample_once(monkeypatch, capacity):
    from jaxsave.collectors import _MemoryChain

    monkeypatch.setattr(_MemoryChain, "FIRST_BYTES", 5 * 8)  # without a count: room for 5 rows, then doubling
    collector = jaxsave.MemoryCollector()
    saver = jaxsave.save(collector, block_size=3)
    state = saver.init(jnp.zeros(2), None, jaxsave.static_information(samples_collected=capacity))
    state, _ = jax.lax.scan(
        lambda s, i: saver.save(s, i % 3 != 1, jnp.full(2, i, jnp.float32)), state, jnp.arange(55)
    )
    out = saver.postprocess(state, None)
    want = np.array([i for i in range(55) if i % 3 != 1], np.float32)
    np.testing.assert_array_equal(out["samples"][:, 0], want)
    allocated = collector._chains[0].allocated
    if capacity is None:
        assert len(want) <= allocated < 2 * len(want)  # doubled from 5 rows: 5, 10, 20, 40
    elif capacity == 37:
        assert allocated == 37  # the count, at once
    # 10**12 rows (4 TB) cannot be reserved on most machines: it grows from 5 rows instead


def test_device_state_is_bounded_by_the_block_size(sample):
    saver = jaxsave.save(jaxsave.MemoryCollector(), block_size=32)
    state = saver.init(sample, None, jaxsave.static_information(samples_collected=10**6))
    assert state.keep_mask.shape == (32,)
    assert [buf.shape for buf in state.data] == [(32, 1), (32, 1 + 3)]  # int32: i; float32: e and x
    saver.postprocess(state, None)


def test_automatic_block_size_scales_with_the_sample():
    small = jaxsave.save(jaxsave.MemoryCollector())
    large = jaxsave.save(jaxsave.MemoryCollector())
    s = small.init(jnp.zeros(10), None)
    l = large.init(jnp.zeros(2**20), None)
    assert s.keep_mask.shape == (4096,)
    assert l.keep_mask.shape == (1,)
    small.postprocess(s, None)
    large.postprocess(l, None)


def test_legacy_api_shape(tmp_path):
    """The older io module's calls, unchanged."""
    import jaxsave as io

    with h5py.File(tmp_path / "legacy.h5", "w") as file:
        data_collector = io.HDF5Collector(file, layout="chains")
        init_save, save, postprocess_save = io.save(data_collector)
        static_information = io.static_information(samples_collected=3)
        saving_state = init_save({"iteration": jnp.array(0)}, {}, static_information)

        def update(saving_state, it):
            saving_state, _ = save(saving_state, jnp.mod(it, 2) == 0, {"iteration": it})
            return saving_state, None

        final_state, _ = jax.lax.scan(update, saving_state, jnp.arange(5))
        saved = postprocess_save(final_state, None)
        assert int(saved["sample_count"]) == 3 and saved["samples"] is None
        np.testing.assert_array_equal(file["/chain~0/iteration"][:], [0, 2, 4])
    assert io.pytree_dict_keys({"a": [0.0, 1.0], "b": 2.0}) == [
        ("a", "list_element_0"),
        ("a", "list_element_1"),
        ("b",),
    ]


def test_progress_bar_counts_steps_from_the_flushes(capsys):
    saver = jaxsave.save(jaxsave.MemoryCollector(), block_size=10, progress=60)
    state = saver.init({"x": jnp.zeros((3, 2))}, None, chains=3)
    streamer = saver.init.__self__
    bar = streamer.bar
    state = jax.jit(
        jax.vmap(
            lambda s: jax.lax.scan(
                lambda s, i: saver.save(s, i % 2 == 0, {"x": jnp.full(2, i, jnp.float32)}), s, jnp.arange(55)
            )[0]
        )
    )(state)
    out = saver.postprocess(state, None)
    assert out["sample_count"].tolist() == [28, 28, 28]
    assert bar.n == 55 and bar.total == 60 and streamer.bar is None  # closed after postprocess
    assert "55/60" in capsys.readouterr().err


def test_progress_bar_closes_on_error():
    class Failing(jaxsave.MemoryCollector):
        def save_block(self, chain_ids, values):
            raise RuntimeError("nope")

    saver = jaxsave.save(Failing(), block_size=4, progress=True)
    state = saver.init(jnp.zeros(2), None)
    streamer = saver.init.__self__
    state = jax.lax.scan(lambda s, i: saver.save(s, True, jnp.zeros(2)), state, jnp.arange(9))[0]
    with pytest.raises(RuntimeError, match="nope"):
        saver.postprocess(state, None)
    assert streamer.bar is None


@pytest.mark.parametrize(
    "sample",
    [
        {"empty": jnp.zeros((0, 3)), "b": jnp.zeros(2)},
        {"alone": jnp.zeros((0,), jnp.int32), "b": jnp.zeros(2)},
        {},
    ],
    ids=["zero-size leaf", "zero-size dtype group", "empty sample"],
)
def test_zero_size_leaves_and_empty_samples(sample):
    init, save, postprocess = jaxsave.save(jaxsave.MemoryCollector(), block_size=3)
    state = init(sample)
    state = jax.jit(lambda s: jax.lax.scan(lambda s, i: save(s, i % 2 == 0, sample), s, jnp.arange(7))[0])(
        state
    )
    out = postprocess(state, None)
    assert int(out["sample_count"]) == 4
    assert jax.tree.map(np.shape, out["samples"]) == jax.tree.map(lambda x: (4, *x.shape), sample)


@pytest.mark.parametrize(
    "first",
    [np.float32(np.nan), np.float32(-np.inf), np.float32(-3e10), np.complex64(1j), np.bool_(False),
     np.uint32(2**32 - 1), np.zeros((0,), np.float32)],
    ids=["nan", "-inf", "below int32", "complex", "false", "uint32 max", "zero-size"],
)  # fmt: skip
@pytest.mark.parametrize("keep", [True, False, np.True_])
def test_a_constant_keep_keeps_every_step_whatever_the_sample_holds(first, keep):
    """save() ties a constant keep to the sample's first element (ordering.tied_to): whatever that
    element is, keep=True keeps every step and keep=False none, under jit and under vmap."""
    sample = {"a": jnp.asarray(first), "b": jnp.float32(1.0)}
    for chains in (None, 3):
        init, save, postprocess = jaxsave.save(jaxsave.MemoryCollector(), block_size=4)
        stacked = (
            jax.tree.map(lambda x: jnp.broadcast_to(x, (chains, *x.shape)), sample) if chains else sample
        )
        state = init(stacked, chains=chains)
        run = jax.jit(lambda s: jax.lax.scan(lambda s, i: save(s, keep, sample), s, jnp.arange(6))[0])
        out = postprocess(run(state) if chains is None else jax.vmap(run)(state), None)
        np.testing.assert_array_equal(out["sample_count"], np.full(np.shape(out["sample_count"]), 6 * keep))
        if keep:
            kept = out["samples"]["a"]
            np.testing.assert_array_equal(kept, np.broadcast_to(first, kept.shape))


def test_postprocess_results_survive_a_resume_of_the_same_memory_collector():
    collector = jaxsave.MemoryCollector()
    init, save, postprocess = jaxsave.save(collector, checkpoint_every=4)
    state = init(jnp.zeros(()), jnp.zeros(()))
    run = jax.jit(lambda s, xs: jax.lax.scan(lambda s, x: save(s, True, x, solver_state=x), s, xs)[0])
    first = postprocess(run(state, jnp.arange(22.0)), None)["samples"]
    kept = np.array(first, copy=True)
    ckpt = jaxsave.resume(collector)
    assert int(ckpt.step) == 20
    again = postprocess(run(init(jnp.zeros(()), jnp.zeros(()), resume=ckpt), jnp.array([100.0, 101.0])), None)
    np.testing.assert_array_equal(first, kept)  # the first result is not overwritten by the resumed chain
    np.testing.assert_array_equal(again["samples"][-2:], [100.0, 101.0])


def test_a_callback_argument_of_exactly_one_piece_keeps_its_shape(monkeypatch):
    from jaxsave._stream import callback as _callback

    monkeypatch.setattr(_callback, "_pieces_needed", lambda: True)  # as on a multi-device CPU backend
    got = []
    x = jnp.arange(_callback.PIECE_BYTES // 4, dtype=jnp.float32).reshape(-1, 8)  # exactly one piece
    big = jnp.ones((3, _callback.PIECE_BYTES // 4 + 5), jnp.float32)  # three pieces
    jax.jit(lambda a, b: _callback.send(got.append, (a, b, None)))(x, big)
    jax.effects_barrier()
    ((a, b, none),) = got
    assert none is None and a.shape == x.shape and b.shape == big.shape
    np.testing.assert_array_equal(a, x)
    np.testing.assert_array_equal(b, big)


def test_only_kept_steps_take_rows_of_the_block(one_call_per_block):
    """Thinning shrinks what leaves the device: a block fills with kept steps only."""
    collector = jaxsave.MemoryCollector()
    rows = []
    original = collector.save_block
    collector.save_block = lambda ids, values: (rows.append(len(values[0][0])), original(ids, values))
    saver = jaxsave.save(collector, block_size=4)
    state = saver.init(jnp.float32(0), None)
    run = jax.jit(
        lambda s: jax.lax.scan(
            lambda s, i: saver.save(s, i % 10 == 0, i.astype(jnp.float32)), s, jnp.arange(100)
        )[0]
    )
    out = saver.postprocess(run(state), None)
    assert rows == [4, 4, 2]  # 10 kept steps: two full blocks and the tail, not 100 rows
    np.testing.assert_array_equal(out["samples"], np.arange(0, 100, 10))


def test_vmapped_chains_share_a_row_when_any_of_them_keeps():
    thin = jnp.array([10, 25])  # chain 0 keeps 0, 10, ..., 90; chain 1 keeps 0, 25, 50, 75
    saver = jaxsave.save(jaxsave.MemoryCollector(), block_size=4)
    state = saver.init(jnp.zeros(2), None, chains=2)

    def chain(state, thin):
        return jax.lax.scan(
            lambda s, i: saver.save(s, i % thin == 0, i.astype(jnp.float32)), state, jnp.arange(100)
        )[0]

    state = jax.jit(jax.vmap(chain))(state, thin)
    # 12 distinct kept steps fill 3 blocks of 4 rows; the last one was sent after step 90.
    assert rows_of(state.fill).tolist() == [0, 0] and span_of(state.fill).tolist() == [9, 9]
    assert state.block_start.tolist() == [91, 91]
    assert saver.save.__self__.counter.counted == {0: (91, 10), 1: (91, 4)}
    out = saver.postprocess(state, None)
    assert out["sample_count"].tolist() == [10, 4]
    np.testing.assert_array_equal(out["samples"][0], np.arange(0, 100, 10))
    np.testing.assert_array_equal(out["samples"][1, :4], np.arange(0, 100, 25))


class _CountingHDF5(jaxsave.HDF5Collector):
    """An HDF5 collector that counts its sample writes (collector calls, not blocks)."""

    calls = 0

    def save_block(self, chain_ids, values):
        self.calls += 1
        super().save_block(chain_ids, values)


def test_small_blocks_that_continue_each_other_are_written_in_fewer_calls(tmp_path):
    """A checkpoint every 10 steps sends 100 blocks of 5 rows; the writer joins the ones it has at
    hand into one collector call, and stores each run's checkpoint after its samples."""
    path = tmp_path / "s.h5"
    collector = _CountingHDF5(path)
    saver = jaxsave.save(collector, checkpoint_every=10)
    state = saver.init({"x": jnp.zeros(2)}, {"n": jnp.int32(0)})

    def step(state, i):
        x = jnp.stack([i, -i]).astype(jnp.float32)
        return saver.save(state, i % 2 == 0, {"x": x}, solver_state={"n": i + 1})[0], None

    state = jax.jit(lambda s: jax.lax.scan(step, s, jnp.arange(1000))[0])(state)
    out = saver.postprocess(state, None)
    assert int(out["sample_count"]) == 500
    assert collector.calls < 100, "every block of 5 rows went to the collector on its own"
    with h5py.File(path, "r") as f:
        x = f["posterior/x"][0, :500]
    np.testing.assert_array_equal(x[:, 0], np.arange(0, 1000, 2))
    np.testing.assert_array_equal(x[:, 1], -np.arange(0, 1000, 2))
    ckpt = jaxsave.resume(jaxsave.HDF5Collector(path, mode="a"))
    assert int(ckpt.step) == 1000 and int(ckpt.solver_state["n"]) == 1000


def test_a_steady_stream_of_small_blocks_is_written_as_it_runs(tmp_path):
    """Blocks that keep coming (a checkpoint every 10 steps, chunk after chunk for a second) are
    joined for at most COALESCE_RUN_S (0.1 s): the collector is called, and checkpoints land, while the
    run goes on, not only at postprocess (a process killed mid-run must find them on disk)."""
    collector = _CountingHDF5(tmp_path / "s.h5")
    saver = jaxsave.save(collector, checkpoint_every=10)
    state = saver.init({"x": jnp.zeros(2)}, {"n": jnp.int32(0)})

    def step(state, i):
        return saver.save(state, True, {"x": jnp.stack([i, -i]).astype(jnp.float32)},
                          solver_state={"n": i + 1})[0], None  # fmt: skip

    chunk = jax.jit(lambda s, i0: jax.lax.scan(step, s, i0 + jnp.arange(100))[0])
    state = jax.block_until_ready(chunk(state, 0))
    start, i0 = time.monotonic(), 100
    while time.monotonic() - start < 1.0:
        state = jax.block_until_ready(chunk(state, i0))
        i0 += 100
    calls_while_running = collector.calls
    assert calls_while_running >= 3, f"{calls_while_running} collector call(s) during a 1 s stream"
    assert (tmp_path / "s.h5.ckpt").exists(), "no checkpoint on disk during a 1 s stream"
    out = saver.postprocess(state, None)
    assert int(out["sample_count"]) == i0


def test_postprocess_does_not_wait_out_the_writers_join_window(monkeypatch):
    """The writer waits up to COALESCE_S for a block that continues its run. postprocess sends the
    tail, which continues it, without first waiting for the run to be written: with a join window
    of 30 s, postprocess still returns at once (it waited the window out before the fix)."""
    from jaxsave._stream import writer as _writer

    monkeypatch.setattr(_writer, "COALESCE_S", 30.0)
    monkeypatch.setattr(_writer, "COALESCE_RUN_S", 60.0)
    saver = jaxsave.save(jaxsave.MemoryCollector(), block_size=4)
    state = saver.init({"x": jnp.zeros(())}, None)
    step = lambda s, i: (saver.save(s, True, {"x": i})[0], None)  # noqa: E731
    state = jax.jit(lambda s: jax.lax.scan(step, s, jnp.arange(10.0))[0])(state)
    start = time.monotonic()
    out = saver.postprocess(state, None)
    assert time.monotonic() - start < 10.0, "postprocess waited out the writer's join window"
    assert out["samples"]["x"].tolist() == [float(i) for i in range(10)]


def test_a_run_of_blocks_ends_where_another_chain_begins(tmp_path):
    """Chains init-ed one by one, each run in turn: each chain's blocks are joined only with its own."""
    saver = jaxsave.save(jaxsave.HDF5Collector(tmp_path / "s.h5"), block_size=3)
    states = [saver.init({"x": jnp.zeros(())}, None) for _ in range(3)]

    def run(state, c):
        return jax.lax.scan(lambda s, i: saver.save(s, True, {"x": 100.0 * c + i})[0:1] + (None,), state,
                            jnp.arange(20.0))[0]  # fmt: skip

    run = jax.jit(run)
    states = [run(s, c) for c, s in enumerate(states)]
    outs = [saver.postprocess(s, None) for s in states]
    assert [int(o["sample_count"]) for o in outs] == [20, 20, 20]
    with h5py.File(tmp_path / "s.h5", "r") as f:
        x = f["posterior/x"][:, :20]
    np.testing.assert_array_equal(x, 100.0 * np.arange(3)[:, None] + np.arange(20.0))
