"""jaxsave.scan: the loop that owns its scan and sends each block of stacked samples at once."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import scan_carries

import jaxsave


def _sgld(x, k):
    return x - 1e-3 * x + 1e-2 * jax.random.normal(k, x.shape, x.dtype)


def _body(c):
    """A step of chain ``c``: keeps every (c + 1)-th step, a sample of two dtypes."""

    def step(x, inp):
        i, k = inp
        x = _sgld(x, k)
        return x, (i % (c + 1) == 0, {"x": x, "i": i})

    return step


def _inputs(chains, steps):
    keys = jax.vmap(lambda k: jax.random.split(k, steps))(jax.random.split(jax.random.key(1), chains))
    return jnp.broadcast_to(jnp.arange(steps), (chains, steps)), keys


def _run_both(collector_a, collector_b, chains=3, steps=23, block_size=4):
    """The same vmapped chains through ``save()`` in lax.scan and through ``jaxsave.scan``."""
    ids, keys = _inputs(chains, steps)
    x0 = jnp.zeros((chains, 2))
    sample = {"x": x0, "i": jnp.zeros(chains, jnp.int32)}
    by_save = jaxsave.save(collector_a, block_size=block_size)
    by_scan = jaxsave.save(collector_b, block_size=block_size)
    thin = jnp.arange(chains)

    def with_save(state, x, ids, keys, c):
        def step(carry, inp):
            state, x = carry
            x, (keep, s) = jax.lax.switch(c, [_body(j) for j in range(chains)], x, inp)
            state, _ = by_save.save(state, keep, s)
            return (state, x), None

        return jax.lax.scan(step, (state, x), (ids, keys))[0][0]

    def with_scan(state, x, ids, keys, c):
        step = lambda x, inp: jax.lax.switch(c, [_body(j) for j in range(chains)], x, inp)  # noqa: E731
        return jaxsave.scan(by_scan, step, state, x, (ids, keys))[0]

    a = jax.jit(jax.vmap(with_save))(by_save.init(sample, chains=chains), x0, ids, keys, thin)
    b = jax.jit(jax.vmap(with_scan))(by_scan.init(sample, chains=chains), x0, ids, keys, thin)
    return by_save.postprocess(a), by_scan.postprocess(b), b


@pytest.mark.parametrize("block_size", [1, 4, 5, 64])
def test_scan_streams_the_same_samples_as_save(block_size):
    a, b, state = _run_both(jaxsave.MemoryCollector(), jaxsave.MemoryCollector(), block_size=block_size)
    assert a["sample_count"].tolist() == b["sample_count"].tolist() == [23, 12, 8]
    for key in ("x", "i"):
        np.testing.assert_array_equal(np.asarray(a["samples"][key]), np.asarray(b["samples"][key]))
    assert np.asarray(state.step).tolist() == [23, 23, 23]


def test_scan_to_hdf5_matches_save(tmp_path):
    a, b, _ = _run_both(jaxsave.HDF5Collector(tmp_path / "a.h5"), jaxsave.HDF5Collector(tmp_path / "b.h5"))
    for chain in range(3):
        got, want = (
            jaxsave.load_samples(tmp_path / "b.h5", chain=chain),
            jaxsave.load_samples(tmp_path / "a.h5", chain=chain),
        )
        for key in ("x", "i"):
            np.testing.assert_array_equal(got[key], want[key])
    assert list(jaxsave.file_info(tmp_path / "b.h5").sample_counts) == [23, 12, 8]


def test_scan_after_and_before_save_keeps_every_sample_in_order():
    saver = jaxsave.save(jaxsave.MemoryCollector(), block_size=4)
    state = saver.init({"i": jnp.int32(0)})

    def run(state):
        def by_save(state, i):
            return saver.save(state, i % 2 == 0, {"i": i})

        state, _ = jax.lax.scan(by_save, state, jnp.arange(0, 5))  # 3 kept, 1 row left in the buffer
        state, n = jaxsave.scan(saver, lambda n, i: (n + 1, (True, {"i": i})), state, 0, jnp.arange(5, 14))
        state, _ = jax.lax.scan(by_save, state, jnp.arange(14, 17))
        return state, n

    state, n = jax.jit(run)(state)
    assert int(n) == 9
    assert saver.postprocess(state)["samples"]["i"].tolist() == [0, 2, 4, *range(5, 14), 14, 16]


def test_scan_checkpoints_the_carry_and_resumes_exactly(tmp_path):
    path = tmp_path / "run.h5"
    step = lambda x, k: (_sgld(x, k), (True, {"x": x}))  # noqa: E731
    keys = jax.random.split(jax.random.key(0), 30)
    saver = jaxsave.save(jaxsave.HDF5Collector(path), checkpoint_every=10)
    x0 = jnp.zeros(3)
    state = saver.init({"x": x0}, {"x": x0})
    run = jax.jit(lambda s, x, ks: jaxsave.scan(saver, step, s, x, ks, checkpoint=lambda x: {"x": x}))
    state, x20 = run(state, x0, keys[:20])
    saver.postprocess(state)
    ckpt = jaxsave.resume(path)
    assert int(ckpt.step) == 20
    np.testing.assert_array_equal(np.asarray(ckpt.solver_state["x"]), np.asarray(x20))

    again = jaxsave.save(jaxsave.HDF5Collector(path, mode="a"), checkpoint_every=10)
    state = again.init({"x": x0}, {"x": x0}, resume=ckpt)
    run = jax.jit(lambda s, x, ks: jaxsave.scan(again, step, s, x, ks, checkpoint=lambda x: {"x": x}))
    state, _ = run(state, ckpt.solver_state["x"], keys[20:])
    again.postprocess(state)

    whole = jaxsave.save(jaxsave.MemoryCollector())
    ref = jax.jit(lambda s: jaxsave.scan(whole, step, s, x0, keys)[0])(whole.init({"x": x0}))
    np.testing.assert_array_equal(
        jaxsave.load_samples(path, chain=0)["x"], whole.postprocess(ref)["samples"]["x"]
    )


def test_scan_refuses_what_it_cannot_do():
    step = lambda c, i: (c, (True, {"i": i}))  # noqa: E731
    device = jaxsave.no_save()
    state = device.init({"i": jnp.int32(0)}, None, jaxsave.static_information(samples_collected=3))
    with pytest.raises(TypeError, match="needs the saver returned by jaxsave.save"):
        jaxsave.scan(device, step, state, 0, jnp.arange(3))
    saver = jaxsave.save(jaxsave.MemoryCollector(), checkpoint_every=2)
    state = saver.init({"i": jnp.int32(0)}, {"c": 0})
    with pytest.raises(ValueError, match="checkpoint=fn"):
        jaxsave.scan(saver, step, state, 0, jnp.arange(3))
    saver.postprocess(state)
    saver = jaxsave.save(jaxsave.MemoryCollector())
    state = saver.init({"i": jnp.int32(0)})
    with pytest.raises(ValueError, match="disagree"):
        jaxsave.scan(saver, step, state, 0, jnp.arange(3), length=4)
    with pytest.raises(TypeError, match="keep must be a boolean"):
        jaxsave.scan(saver, lambda c, i: (c, (1, {"i": i})), state, 0, jnp.arange(3))
    saver.postprocess(state)


def _thinned_reference(chains, steps, thin, keep):
    """What ``thin`` keeps of ``_counting``'s samples: the steps ``thin-1, 2 thin-1, ...`` whose keep is on."""
    return [[i for i in range(steps) if i % thin == thin - 1 and keep(c, i)] for c in range(chains)]


def _counting(c, i):
    """Chain ``c`` at step ``i``: keeps all but every (c + 2)-th step; the carry counts the steps."""
    return i % (c + 2) != 1


@pytest.mark.parametrize(
    "steps, thin, block_size",
    [(60, 3, 4), (61, 3, 4), (59, 5, 2), (23, 1, 4), (7, 10, 4), (100, 7, 64), (24, 4, 1)],
)
def test_thin_keeps_every_thin_th_step_to_hdf5(tmp_path, steps, thin, block_size):
    """Whole blocks, a shorter last block and steps after the last group (fewer than thin)."""
    chains = 3
    saver = jaxsave.save(jaxsave.HDF5Collector(tmp_path / "t.h5"), block_size=block_size)
    state = saver.init({"i": jnp.zeros(chains, jnp.int32), "y": jnp.zeros((chains, 2))}, chains=chains)

    def chain(state, c):
        def f(n, i):
            return n + 1, (_counting(c, i), {"i": i, "y": jnp.stack([n, -n]).astype(jnp.float32)})

        return jaxsave.scan(saver, f, state, jnp.int32(0), jnp.arange(steps), thin=thin)

    state, n = jax.jit(jax.vmap(chain))(state, jnp.arange(chains))
    assert np.asarray(n).tolist() == [steps] * chains
    assert np.asarray(state.step).tolist() == [steps] * chains
    out = saver.postprocess(state)
    want = _thinned_reference(chains, steps, thin, lambda c, i: i % (c + 2) != 1)
    assert out["sample_count"].tolist() == [len(w) for w in want]
    for c in range(chains):
        got = jaxsave.load_samples(tmp_path / "t.h5", chain=c)
        assert got["i"].tolist() == want[c]
        np.testing.assert_array_equal(got["y"][:, 0], np.asarray(want[c], np.float32))


def test_thinned_scans_in_a_row_and_save_between_keep_every_sample_in_order():
    """Steps left over by one thinned scan (fewer than thin) are covered by what comes next."""
    saver = jaxsave.save(jaxsave.MemoryCollector(), block_size=2)
    state = saver.init({"i": jnp.int32(0)})
    f = lambda n, i: (n + 1, (True, {"i": i}))  # noqa: E731

    def run(state):
        state, _ = jaxsave.scan(saver, f, state, 0, jnp.arange(0, 11), thin=3)  # keeps 2, 5, 8
        state, _ = jax.lax.scan(lambda s, i: saver.save(s, i % 2 == 0, {"i": i}), state, jnp.arange(11, 14))
        state, _ = jaxsave.scan(saver, f, state, 0, jnp.arange(14, 24), thin=4)  # keeps 17, 21
        return state

    state = jax.jit(run)(state)
    assert int(state.step) == 24
    assert saver.postprocess(state)["samples"]["i"].tolist() == [2, 5, 8, 12, 17, 21]


def test_thin_skipped_steps_stack_nothing():
    """With thin=k the stacked rows are the kept steps only: the scan that stacks them runs
    steps // k times (the other steps run in a nested scan without outputs)."""
    saver = jaxsave.save(jaxsave.MemoryCollector(), block_size=50)
    state = saver.init({"x": jnp.zeros(3)})
    step = lambda x, k: (_sgld(x, k), (True, {"x": x}))  # noqa: E731
    keys = jax.random.split(jax.random.key(0), 1000)
    jaxpr = jax.make_jaxpr(lambda s: jaxsave.scan(saver, step, s, jnp.zeros(3), keys, thin=10))(state)
    lengths = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "scan":
                lengths.append((eqn.params["length"], len(eqn.outvars) - scan_carries(eqn)))
                walk(getattr(eqn.params["jaxpr"], "jaxpr", eqn.params["jaxpr"]))

    walk(jaxpr.jaxpr)
    saver.postprocess(state)
    assert lengths == [(2, 0), (50, 2), (9, 0)]  # blocks, kept rows (keep + row), skipped steps


def test_thinned_scan_checkpoints_and_resumes_exactly(tmp_path):
    path = tmp_path / "run.h5"
    step = lambda x, k: (_sgld(x, k), (True, {"x": x}))  # noqa: E731
    keys = jax.random.split(jax.random.key(0), 60)
    ckpt = lambda x: {"x": x}  # noqa: E731
    saver = jaxsave.save(jaxsave.HDF5Collector(path), checkpoint_every=20, block_size=3)
    x0 = jnp.zeros(3)
    state = saver.init({"x": x0}, {"x": x0})
    run = jax.jit(lambda s, x, ks: jaxsave.scan(saver, step, s, x, ks, thin=5, checkpoint=ckpt))
    state, _ = run(state, x0, keys[:45])  # blocks of 2 rows (10 steps); the last 5 steps uncheckpointed
    saver.postprocess(state)
    resumed = jaxsave.resume(path)
    assert int(resumed.step) == 40 and int(resumed.sample_count) == 8

    again = jaxsave.save(jaxsave.HDF5Collector(path, mode="a"), checkpoint_every=20, block_size=3)
    state = again.init({"x": x0}, {"x": x0}, resume=resumed)
    run = jax.jit(lambda s, x, ks: jaxsave.scan(again, step, s, x, ks, thin=5, checkpoint=ckpt))
    state, _ = run(state, resumed.solver_state["x"], keys[40:])
    again.postprocess(state)

    whole = jaxsave.save(jaxsave.MemoryCollector())
    ref = jax.jit(lambda s: jaxsave.scan(whole, step, s, x0, keys, thin=5)[0])(whole.init({"x": x0}))
    want = whole.postprocess(ref)["samples"]["x"]
    assert want.shape == (12, 3)
    np.testing.assert_array_equal(jaxsave.load_samples(path, chain=0)["x"], want)


@pytest.mark.parametrize("with_bf16", [False, True])
def test_packed_blocks_of_mixed_dtypes_arrive_intact(with_bf16):
    """Small blocks travel as one byte array (bool, int8, float16, uint32 leaves, odd sizes, so
    the 8-byte padding matters); a dtype it cannot bitcast (bfloat16) sends the arrays as they are."""
    sample = {
        "b": jnp.zeros(3, jnp.bool_),
        "i8": jnp.zeros((), jnp.int8),
        "h": jnp.zeros(5, jnp.float16),
        "u": jnp.zeros(2, jnp.uint32),
    }
    if with_bf16:
        sample["bf"] = jnp.zeros(3, jnp.bfloat16)

    def make(i):
        out = {
            "b": jnp.arange(3) + i > 4,
            "i8": (i - 7).astype(jnp.int8),
            "h": (jnp.arange(5) * i).astype(jnp.float16),
            "u": jnp.stack([i, i + 2**30]).astype(jnp.uint32) * jnp.uint32(2),
        }
        if with_bf16:
            out["bf"] = (jnp.arange(3) - i).astype(jnp.bfloat16)
        return out

    saver = jaxsave.save(jaxsave.MemoryCollector(), block_size=3)
    state = saver.init(sample)

    def run(state):
        state, _ = jax.lax.scan(lambda s, i: saver.save(s, i % 2 == 0, make(i)), state, jnp.arange(7))
        state, _ = jaxsave.scan(saver, lambda c, i: (c, (True, make(i))), state, 0, jnp.arange(7, 15), thin=2)
        return state

    got = saver.postprocess(jax.jit(run)(state))["samples"]
    steps = [0, 2, 4, 6, 8, 10, 12, 14]
    for key, want in jax.tree.map(lambda *xs: np.stack(xs), *[make(jnp.int32(i)) for i in steps]).items():
        np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(want), err_msg=key)
