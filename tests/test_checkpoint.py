"""Checkpoints taken inside jit, and exact resume (in-process; see test_resume_kill.py for SIGKILL)."""

import subprocess
import sys
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jaxsave

THIN = 3


def run(saver, state, solver, start, stop):
    """A chain whose whole state (position, bf16 momentum, typed key, counter) is the solver_state."""

    def step(carry, i):
        state, (x, m, key, n) = carry
        key, sub = jax.random.split(key)
        x = 0.9 * x + 0.1 * jax.random.normal(sub, x.shape)
        m = (0.5 * m + x.astype(jnp.bfloat16)).astype(jnp.bfloat16)
        solver = (x, m, key, n + 1)
        state, _ = saver.save(state, i % THIN == 0, {"x": x, "m": m}, solver_state=solver)
        return (state, solver), None

    return jax.lax.scan(step, (state, solver), jnp.arange(start, stop))[0]


def solver0(key):
    return (jnp.zeros(2), jnp.zeros(2, jnp.bfloat16), key, jnp.int32(0))


SAMPLE = {"x": jnp.zeros(2), "m": jnp.zeros(2, jnp.bfloat16)}


def uninterrupted(steps, chains=None, **kwargs):
    saver = jaxsave.save(jaxsave.MemoryCollector(), **kwargs)
    if chains is None:
        state = saver.init(SAMPLE, None)
        state, _ = jax.jit(lambda s: run(saver, s, solver0(jax.random.key(0)), 0, steps))(state)
    else:
        keys = jax.random.split(jax.random.key(0), chains)
        sample = jax.tree.map(lambda x: jnp.broadcast_to(x, (chains, *x.shape)), SAMPLE)
        state = saver.init(sample, None, chains=chains)
        state, _ = jax.jit(jax.vmap(lambda s, k: run(saver, s, solver0(k), 0, steps)))(state, keys)
    return saver.postprocess(state, None)


@pytest.mark.parametrize("crash_at", [9, 20, 33])
def test_resume_in_process_is_exact_for_one_chain(crash_at):
    steps, every = 50, 8
    want = uninterrupted(steps, block_size=4)

    collector = jaxsave.MemoryCollector()
    saver = jaxsave.save(collector, checkpoint_every=every, block_size=4)
    state = saver.init(SAMPLE, solver0(jax.random.key(0)))
    state, _ = jax.jit(lambda s: run(saver, s, solver0(jax.random.key(0)), 0, crash_at))(state)
    jax.block_until_ready(state)
    del state  # the run dies here: no postprocess

    ckpt = jaxsave.resume(collector, like=(solver0(jax.random.key(0)), None))
    assert int(ckpt.step) % every == 0 and int(ckpt.step) <= crash_at
    assert int(ckpt.sample_count) == len(range(0, int(ckpt.step), THIN))
    assert ckpt.solver_state[1].dtype == ml_dtypes.bfloat16
    assert jax.dtypes.issubdtype(ckpt.solver_state[2].dtype, jax.dtypes.prng_key)
    assert int(ckpt.solver_state[3]) == int(ckpt.step)

    state = saver.init(SAMPLE, solver0(jax.random.key(0)), resume=ckpt)
    state, _ = jax.jit(lambda s, sv: run(saver, s, sv, int(ckpt.step), steps))(state, ckpt.solver_state)
    got = saver.postprocess(state, None)
    assert int(got["sample_count"]) == int(want["sample_count"])
    for k in ("x", "m"):
        np.testing.assert_array_equal(np.asarray(got["samples"][k]), np.asarray(want["samples"][k]))


def vmapped_chains(chains, every):
    """A MemoryCollector, its checkpointing saver, the state of ``chains`` chains, their solver
    state and their stacked sample."""
    collector = jaxsave.MemoryCollector()
    saver = jaxsave.save(collector, checkpoint_every=every, block_size=5)
    keys = jax.random.split(jax.random.key(0), chains)
    sample = jax.tree.map(lambda x: jnp.broadcast_to(x, (chains, *x.shape)), SAMPLE)
    template = jax.vmap(solver0)(keys)
    return collector, saver, saver.init(sample, template, chains=chains), template, sample


def test_resume_vmapped_chains_with_thinning_is_exact():
    chains, steps, every = 3, 40, 10
    want = uninterrupted(steps, chains=chains, block_size=5)

    collector, saver, state, template, sample = vmapped_chains(chains, every)
    body = lambda s, sv, start, stop: run(saver, s, sv, start, stop)
    state, _ = jax.jit(jax.vmap(lambda s, sv: body(s, sv, 0, 29)))(state, template)
    jax.block_until_ready(state)

    ckpt = jaxsave.resume(collector)
    assert ckpt.chain_ids.tolist() == [0, 1, 2]
    assert ckpt.step.tolist() == [20] * 3  # the last checkpoint step reached (29 steps ran)
    state = saver.init(sample, template, resume=ckpt)
    start = int(ckpt.step[0])
    state, _ = jax.jit(jax.vmap(lambda s, sv: body(s, sv, start, steps)))(state, ckpt.solver_state)
    got = saver.postprocess(state, None)
    np.testing.assert_array_equal(got["sample_count"], want["sample_count"])
    np.testing.assert_array_equal(got["samples"]["x"], want["samples"]["x"])
    np.testing.assert_array_equal(got["samples"]["m"].view(np.uint16), want["samples"]["m"].view(np.uint16))


def test_checkpoints_send_the_block_so_far(one_call_per_block):
    """A checkpoint step flushes the rows gathered so far, whatever the block size."""
    collector = jaxsave.MemoryCollector()
    saver = jaxsave.save(collector, checkpoint_every=10, block_size=64)
    state = saver.init(SAMPLE, solver0(jax.random.key(1)))
    calls = []
    collector_save = collector.save_block
    collector.save_block = lambda ids, leaves: (calls.append(len(leaves[0][0])), collector_save(ids, leaves))[
        1
    ]
    state, _ = jax.jit(lambda s: run(saver, s, solver0(jax.random.key(1)), 0, 25))(state)
    saver.postprocess(state, None)
    # Blocks end at the checkpoint steps 10 and 20 and hold only the kept steps
    # (every THIN=3rd): 0 3 6 9 | 12 15 18 | 21 24 (the tail, from postprocess).
    assert calls == [4, 3, 2]
    ckpt = jaxsave.resume(collector)
    assert int(ckpt.step) == 20 and int(ckpt.solver_state[3]) == 20


def test_checkpoint_errors():
    saver = jaxsave.save(jaxsave.MemoryCollector(), checkpoint_every=5)
    with pytest.raises(ValueError, match="needs init_checkpoint"):
        saver.init(SAMPLE, None)
    state = saver.init(SAMPLE, solver0(jax.random.key(0)))
    with pytest.raises(jaxsave.StructureMismatchError, match="solver_state"):
        saver.save(
            state, True, {"x": jnp.zeros(2), "m": jnp.zeros(2, jnp.bfloat16)}, solver_state=jnp.zeros(3)
        )
    with pytest.raises(jaxsave.JaxsaveError, match="no checkpoint"):
        jaxsave.resume(jaxsave.MemoryCollector())
    with pytest.raises(ValueError, match="checkpoint_every"):
        jaxsave.save(jaxsave.MemoryCollector(), checkpoint_every=-1)
    saver.postprocess(state, None)


def test_resume_like_mismatch_names_the_leaf():
    collector = jaxsave.MemoryCollector()
    saver = jaxsave.save(collector, checkpoint_every=2, block_size=2)
    state = saver.init(SAMPLE, solver0(jax.random.key(0)))
    state, _ = run(saver, state, solver0(jax.random.key(0)), 0, 4)
    saver.postprocess(state, None)
    bad = (jnp.zeros(3), jnp.zeros(2, jnp.bfloat16), jax.random.key(0), jnp.int32(0))
    with pytest.raises(jaxsave.StructureMismatchError, match=r"solver_state/list_element_0': shape \(3,\)"):
        jaxsave.resume(collector, like=(bad, None))


_RESUMER = """
import sys, typing, jax, jax.numpy as jnp, jaxsave
class State(typing.NamedTuple):  # this process's class: fields {fields}
    {first}: jax.Array
    {second}: jax.Array
try:
    print(jaxsave.resume(sys.argv[1], like=({like}, None)).solver_state)
except jaxsave.JaxsaveError as e:
    print(type(e).__name__, e)
"""


@pytest.mark.parametrize(
    "fields, like, expected",
    [
        (("a", "b"), "State(jnp.zeros(2), jnp.zeros(2))", "State(a=array([0., 0.]"),
        (("b", "a"), "State(jnp.zeros(2), jnp.zeros(2))", '{"t":"namedtuple","fields":["b","a"]'),
        (
            ("a", "b"),
            "{'a': jnp.zeros(2), 'b': jnp.zeros(2)}",
            '"children":[{"t":"none"},{"t":"dict","keys":["a","b"]',
        ),
        (("a", "b"), "{'p': jnp.zeros(5, jnp.int8)}", '{"t":"dict","keys":["p"]'),
    ],
    ids=["same class", "fields reordered", "a dict of the same leaves", "other leaves"],
)
def test_resume_like_in_a_process_that_never_saw_the_class(tmp_path, fields, like, expected):
    # the state's class is unknown to a fresh process until like= names one: like= was taken
    # for the structure unchecked, and swapped the fields or took any leaves of the same count
    class State(NamedTuple):
        a: jax.Array
        b: jax.Array

    saver = jaxsave.save(jaxsave.HDF5Collector(tmp_path / "run.h5"), checkpoint_every=2)
    st = State(jnp.zeros(2), jnp.full(2, 7.0))
    state = saver.init({"x": jnp.zeros(())}, st)
    state, _ = jax.lax.scan(
        lambda c, i: (saver.save(c, True, {"x": i}, solver_state=st)[0], None), state, jnp.arange(4.0)
    )
    saver.postprocess(state, None)
    code = _RESUMER.format(fields=fields, first=fields[0], second=fields[1], like=like)
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "run.h5")], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert expected in out.stdout, out.stdout
    if expected.startswith("State"):
        assert "b=array([7., 7.]" in out.stdout
    else:
        assert out.stdout.startswith("StructureMismatchError the checkpoint template does not match"), (
            out.stdout
        )


def test_checkpoint_records_unlike_their_structure_are_refused(tmp_path):
    # a damaged .ckpt, or the writers of one Zarr store with different templates: the records
    # were stacked into whatever the structure said (int8[5] came back as the float32[2] leaf)
    from jaxsave._stream.resume import ChainCheckpoint, write_file

    spec = jax.eval_shape(lambda: {"solver_state": {"x": jnp.zeros(2)}, "scheduler_state": None})
    write_file(str(tmp_path / "a.h5.ckpt"), {0: ChainCheckpoint(4, 4, [np.arange(5, dtype=np.int8)])}, spec)
    with pytest.raises(
        jaxsave.StructureMismatchError,
        match=r"chain 0: leaf \['solver_state'\]\['x'\] is stored as int8\[5\]",
    ):
        jaxsave.resume(tmp_path / "a.h5", like=({"x": jnp.zeros(2)}, None))
    two = {
        0: ChainCheckpoint(4, 4, [np.zeros(2, np.float32)]),
        1: ChainCheckpoint(4, 4, [np.zeros(3, np.float32)]),
    }
    write_file(str(tmp_path / "b.h5.ckpt"), two, spec)
    with pytest.raises(
        jaxsave.StructureMismatchError, match=r"chain 1: .* float32\[3\], its structure says float32\[2\]"
    ):
        jaxsave.resume(tmp_path / "b.h5")


def test_resume_from_an_hdf5_collector_after_postprocess(tmp_path):
    collector = jaxsave.HDF5Collector(tmp_path / "run.h5")
    saver = jaxsave.save(collector, checkpoint_every=4, block_size=4)
    state = saver.init(SAMPLE, solver0(jax.random.key(0)))
    state, _ = jax.jit(lambda s: run(saver, s, solver0(jax.random.key(0)), 0, 10))(state)
    saver.postprocess(state, None)  # closes the file
    ckpt = jaxsave.resume(collector, like=(solver0(jax.random.key(0)), None))
    assert int(ckpt.step) == 8 and int(ckpt.sample_count) == 3
    assert int(jaxsave.resume(tmp_path / "run.h5", like=(solver0(jax.random.key(0)), None)).step) == 8


def _one(tree, i):
    return jax.tree.map(lambda x: x[i], tree)


def test_chains_of_one_init_are_stored_at_one_step_even_when_they_advance_apart():
    """As when a shard_map'd run is killed with one device ahead: the chains of one init(chains=n)
    are checkpointed at the newest step all of them reached, and continue exactly from there."""
    chains, steps, every = 2, 40, 10
    want = uninterrupted(steps, chains=chains, block_size=5)

    collector, saver, state, template, sample = vmapped_chains(chains, every)
    for chain, stop in ((0, 35), (1, 12)):  # each chain on its own, as the devices run
        part = jax.jit(lambda s, sv, stop=stop: run(saver, s, sv, 0, stop))
        jax.block_until_ready(part(_one(state, chain), _one(template, chain)))

    ckpt = jaxsave.resume(collector)
    assert ckpt.step.tolist() == [10, 10]  # chain 0's checkpoints at 20 and 30 wait for chain 1
    assert ckpt.sample_count.tolist() == [len(range(0, 10, THIN))] * 2
    state = saver.init(sample, template, resume=ckpt)
    body = jax.vmap(lambda s, sv: run(saver, s, sv, 10, steps))
    state, _ = jax.jit(body)(state, ckpt.solver_state)
    got = saver.postprocess(state, None)
    np.testing.assert_array_equal(got["sample_count"], want["sample_count"])
    np.testing.assert_array_equal(got["samples"]["x"], want["samples"]["x"])


def test_chains_run_separately_resume_separately():
    steps, every = 50, 10
    want = uninterrupted(steps, block_size=4)
    collector = jaxsave.MemoryCollector()
    saver = jaxsave.save(collector, checkpoint_every=every, block_size=4)
    for stop in (25, 12):  # two chains, init one by one, killed at different steps
        state = saver.init(SAMPLE, solver0(jax.random.key(0)))
        part = jax.jit(lambda s, stop=stop: run(saver, s, solver0(jax.random.key(0)), 0, stop))
        jax.block_until_ready(part(state))

    steps_named = r"chain\(s\) \[1\] at step 10, chain\(s\) \[0\] at step 20"
    with pytest.raises(jaxsave.SaverStateError, match=steps_named):
        jaxsave.resume(collector)
    finals = []
    for chain in (0, 1):
        ckpt = jaxsave.resume(collector, chains=[chain])
        assert ckpt.chain_ids.tolist() == [chain] and int(ckpt.step) == (20, 10)[chain]
        state = saver.init(SAMPLE, solver0(jax.random.key(0)), resume=ckpt)
        rest = jax.jit(lambda s, sv, s0=int(ckpt.step): run(saver, s, sv, s0, steps))
        finals.append(rest(state, ckpt.solver_state))
    for state, _ in finals:
        got = saver.postprocess(state, None)
        assert int(got["sample_count"]) == int(want["sample_count"])
        np.testing.assert_array_equal(np.asarray(got["samples"]["x"]), np.asarray(want["samples"]["x"]))


def test_resume_refuses_bad_chain_selections_and_mixed_steps():
    collector = jaxsave.MemoryCollector()
    saver = jaxsave.save(collector, checkpoint_every=4, block_size=4)
    keys = jax.random.split(jax.random.key(0), 2)
    sample = jax.tree.map(lambda x: jnp.broadcast_to(x, (2, *x.shape)), SAMPLE)
    template = jax.vmap(solver0)(keys)
    state = saver.init(sample, template, chains=2)
    state, _ = jax.jit(jax.vmap(lambda s, sv: run(saver, s, sv, 0, 8)))(state, template)
    for bad in (True, [], ["0"], 0.0):
        with pytest.raises(TypeError, match="chains must be"):
            jaxsave.resume(collector, chains=bad)
    with pytest.raises(jaxsave.JaxsaveError, match=r"no checkpoint of chain\(s\) \[5\]"):
        jaxsave.resume(collector, chains=[0, 5])
    ckpt = jaxsave.resume(collector, chains=np.array([1, 0]))
    assert ckpt.chain_ids.tolist() == [0, 1] and ckpt.step.tolist() == [8, 8]
    mixed = ckpt._replace(step=np.array([8, 4]))
    steps_named = r"chain\(s\) \[1\] at step 4, chain\(s\) \[0\] at step 8"
    with pytest.raises(jaxsave.SaverStateError, match=steps_named):
        saver.init(sample, template, resume=mixed)
    saver.postprocess(state, None)


def test_held_back_checkpoints_are_bounded_by_max_queue_bytes(caplog):
    """Checkpoints waiting for the slow chains of their init use at most max_queue_bytes (the
    newest is kept): the stored step then advances when the slow chains reach a step still held."""
    collector = jaxsave.MemoryCollector()
    saver = jaxsave.save(collector, checkpoint_every=10, block_size=5, max_queue_bytes=1)
    keys = jax.random.split(jax.random.key(0), 2)
    sample = jax.tree.map(lambda x: jnp.broadcast_to(x, (2, *x.shape)), SAMPLE)
    template = jax.vmap(solver0)(keys)
    state = saver.init(sample, template, chains=2)
    part = jax.jit(lambda s, sv, start, stop: run(saver, s, sv, start, stop), static_argnums=(2, 3))
    with caplog.at_level("INFO", logger="jaxsave"):
        fast = jax.block_until_ready(part(_one(state, 0), _one(template, 0), 0, 35))  # held: 10, 20, 30
        slow = jax.block_until_ready(part(_one(state, 1), _one(template, 1), 0, 12))
        with pytest.raises(jaxsave.JaxsaveError, match="no checkpoint"):
            jaxsave.resume(collector)  # chain 0's step 10 was dropped, its 30 is the one kept
    assert "many checkpoints apart" in caplog.text
    slow = jax.block_until_ready(part(*slow, 12, 35))
    assert jaxsave.resume(collector).step.tolist() == [30, 30]
    for final in (fast, slow):
        assert int(saver.postprocess(final[0], None)["sample_count"]) == len(range(0, 35, THIN))


def _checkpointed_run(path, mode, solver):
    saver = jaxsave.save(jaxsave.HDF5Collector(path, mode=mode), checkpoint_every=2)
    state = saver.init({"x": jnp.zeros(3)}, solver)
    body = lambda c, i: ((saver.save(c[0], True, {"x": jnp.zeros(3)}, solver_state=c[1])[0], c[1]), None)  # noqa: E731
    state, _ = jax.jit(lambda s, v: jax.lax.scan(body, (s, v), jnp.arange(4))[0])(state, solver)
    saver.postprocess(state, None)


def test_continuing_a_file_with_another_sampler_state_is_refused_at_init(tmp_path):
    # the checkpoint file holds one structure for every chain: a chain of another state relabelled
    # the stored chains' leaves ({'pos', 'mom'} came back as {'vel', 'mom'})
    path = tmp_path / "run.h5"
    _checkpointed_run(path, "w", {"pos": jnp.full(3, 1.0), "mom": jnp.full(3, 2.0)})
    _checkpointed_run(path, "a", {"pos": jnp.zeros(3), "mom": jnp.zeros(3)})  # the same state: fine
    with pytest.raises(
        jaxsave.StructureMismatchError,
        match=r"init_checkpoint does not match the checkpoints stored already \(another sampler state\)",
    ):
        _checkpointed_run(path, "a", {"vel": jnp.zeros(3), "mom": jnp.zeros(3)})
    assert jaxsave.resume(path, chains=[0]).solver_state["pos"].tolist() == [1.0, 1.0, 1.0]


def test_a_new_file_drops_the_checkpoints_of_the_one_it_replaces(tmp_path):
    # mode='w' replaced the samples and kept the old .ckpt: resume offered chains the file lacks
    path = tmp_path / "run.h5"
    _checkpointed_run(path, "w", {"v": jnp.zeros((3,))})
    _checkpointed_run(path, "a", {"v": jnp.zeros((3,))})  # chain 1
    assert jaxsave.resume(path).chain_ids.tolist() == [0, 1]
    _checkpointed_run(path, "w", {"w": jnp.zeros((2,))})
    assert jaxsave.resume(path).chain_ids.tolist() == [0]


def test_resume_like_takes_python_scalars_as_the_run_stored_them(tmp_path):
    # a Python float or int in the state is stored as jnp.asarray has it (float32, int32); the
    # template was compared as given (float64 != float32) once its class was registered
    path = tmp_path / "run.h5"
    _checkpointed_run(path, "w", {"x": jnp.zeros(3), "scale": 1.0, "step": 0})
    like = ({"x": jnp.zeros(3), "scale": 1.0, "step": 0}, None)
    for _ in range(2):
        assert jaxsave.resume(path, like=like).solver_state["scale"] == 1.0


def test_one_vmapped_chain_resumes_stacked_with_chains_1(tmp_path):
    # a checkpoint of one chain has no chain axis: init(resume=) returned an unstacked state,
    # and a stacked init_checkpoint was refused
    path = tmp_path / "run.h5"

    def run(saver, state, x):
        def chain(state, x):
            def body(c, i):
                s, x = c
                return (saver.save(s, True, {"x": x + 1.0}, solver_state={"x": x + 1.0})[0], x + 1.0), None

            return jax.lax.scan(body, (state, x), jnp.arange(10))[0]

        saver.postprocess(jax.jit(jax.vmap(chain))(state, x)[0], None)

    x0, info = jnp.zeros((1, 2)), jaxsave.static_information(samples_collected=20)
    saver = jaxsave.save(jaxsave.HDF5Collector(path), checkpoint_every=5)
    run(saver, saver.init({"x": x0}, {"x": x0}, info, chains=1), x0)
    ckpt = jaxsave.resume(path)
    assert int(ckpt.step) == 10 and ckpt.solver_state["x"].shape == (2,)
    saver = jaxsave.save(jaxsave.HDF5Collector(path, mode="a"), checkpoint_every=5)
    with pytest.raises(ValueError, match=r"init\(chains=2, resume=...\): the checkpoint holds 1 chain"):
        saver.init({"x": jnp.zeros((2, 2))}, {"x": jnp.zeros((2, 2))}, info, chains=2, resume=ckpt)
    state = saver.init({"x": x0}, {"x": x0}, info, chains=1, resume=ckpt)
    assert state.chain_id.tolist() == [0] and state.step.tolist() == [10]
    run(saver, state, jax.tree.map(lambda v: v[None], ckpt.solver_state)["x"])
    np.testing.assert_array_equal(jaxsave.load_samples(path)["x"][0, :, 0], np.arange(1.0, 21.0))
