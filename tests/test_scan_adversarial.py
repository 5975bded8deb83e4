"""Bad input to ``jaxsave.scan`` ends in an exception that names the problem, never a hang, a
silently lost checkpoint or a wrong file."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsave
from jaxsave._stream.packing import with_span


def _step(c, i):
    return c + 1, (True, {"i": i})


@pytest.fixture
def saver():
    s = jaxsave.save(jaxsave.MemoryCollector(), block_size=4)
    yield s
    streamer = s.init.__self__
    if streamer.writer is not None:  # no writer thread outlives a test
        streamer.writer.close()


@pytest.fixture
def state(saver):
    return saver.init({"i": jnp.int32(0)})


@pytest.mark.parametrize(
    "xs, length, message",
    [
        (jnp.arange(3), 4, r"leading axes of xs and length disagree \(\[3, 4\]\)"),
        ({"a": jnp.arange(3), "b": jnp.arange(5)}, None, r"disagree \(\[3, 5\]\)"),
        (None, None, "needs xs with a leading axis or length"),
        ((), None, "needs xs with a leading axis or length"),
        (jnp.int32(3), None, "every leaf of xs needs a leading axis"),
        (None, -1, "length must be an int >= 0, got -1"),
        (None, 2.0, "length must be an int >= 0, got 2.0"),
        (None, True, "length must be an int >= 0, got True"),
        (None, "3", "length must be an int >= 0"),
    ],
)
def test_length_and_xs_are_checked(saver, state, xs, length, message):
    with pytest.raises(ValueError, match=message):
        jaxsave.scan(saver, lambda c, x: (c, (True, {"i": jnp.int32(0)})), state, 0, xs, length)


@pytest.mark.parametrize("thin", [0, -2, True, 2.5, "2", None])
def test_thin_must_be_a_positive_int(saver, state, thin):
    with pytest.raises(ValueError, match="thin must be a positive int"):
        jaxsave.scan(saver, _step, state, 0, jnp.arange(4), thin=thin)


@pytest.mark.parametrize("make", [jnp.int32, np.array], ids=["jnp.int32", "np.array"])
def test_an_array_thin_or_length_must_be_a_static_int(saver, state, make):
    with pytest.raises(ValueError, match="thin must be a static Python int"):
        jaxsave.scan(saver, _step, state, 0, jnp.arange(20), thin=make(10))
    with pytest.raises(ValueError, match="length must be a static Python int"):
        jaxsave.scan(saver, _step, state, 0, length=make(20))


def test_a_traced_thin_must_be_a_static_int(saver, state):
    run = jax.jit(lambda s, thin: jaxsave.scan(saver, _step, s, 0, jnp.arange(20), thin=thin)[0])
    with pytest.raises(ValueError, match="thin must be a static Python int.*pass e.g. thin=10"):
        run(state, 10)


def test_thin_must_divide_checkpoint_every():
    saver = jaxsave.save(jaxsave.MemoryCollector(), checkpoint_every=10)
    state = saver.init({"i": jnp.int32(0)}, {"c": jnp.int32(0)})
    with pytest.raises(ValueError, match="thin=3 must divide the saver's checkpoint_every=10"):
        jaxsave.scan(saver, _step, state, 0, jnp.arange(30), thin=3, checkpoint=lambda c: {"c": c})
    saver.postprocess(state)


@pytest.mark.parametrize(
    "f, error, message",
    [
        (lambda c, i: c + 1, TypeError, r"must return \(carry, \(keep, sample\)\)"),
        (lambda c, i: (c + 1, {"i": i}), TypeError, r"must return \(carry, \(keep, sample\)\)"),
        (lambda c, i: (c, (True, {"i": i}, 0)), TypeError, r"must return \(carry, \(keep, sample\)\)"),
        (lambda c, i: ((c, c), (True, {"i": i})), TypeError, "a carry of the structure of init"),
        (lambda c, i: (jnp.zeros(3, jnp.int32), (True, {"i": i})), TypeError, r"shape.*\(\) to \(3,\)"),
        (lambda c, i: (c, (1, {"i": i})), TypeError, "keep must be a boolean scalar"),
        (lambda c, i: (c, (True, {"j": i})), jaxsave.StructureMismatchError, "missing leaf 'i'"),
        (lambda c, i: (c, (True, {"i": jnp.zeros(2)})), jaxsave.StructureMismatchError, "leaf 'i'"),
        ("not a function", TypeError, "f must be the step function"),
    ],
)
def test_a_step_of_the_wrong_shape_is_refused_at_trace_time(saver, state, f, error, message):
    with pytest.raises(error, match=message):
        jax.jit(lambda s: jaxsave.scan(saver, f, s, 0, jnp.arange(6), thin=2))(state)
    saver.postprocess(state)  # nothing was sent: the state is still usable


def test_only_a_streaming_saver_or_its_save_is_accepted(saver, state):
    others = [
        saver.init,
        saver.postprocess,
        lambda s, keep, sample: (s, None),
        jaxsave.Saver(saver.init, lambda *a: None, saver.postprocess),
        saver.init.__self__,
        None,
        jaxsave.no_save(),
    ]
    for other in others:
        with pytest.raises(TypeError, match="needs the saver returned by jaxsave.save"):
            jaxsave.scan(other, _step, state, 0, jnp.arange(3))
    for ok in (saver, saver.save):
        state, n = jax.jit(lambda s, ok=ok: jaxsave.scan(ok, _step, s, 0, jnp.arange(3)))(state)
        assert int(n) == 3
    assert saver.postprocess(state)["samples"]["i"].tolist() == [0, 1, 2, 0, 1, 2]


def test_the_state_must_be_one_chains_save_state(saver):
    with pytest.raises(TypeError, match="state must be the SaveState returned by init"):
        jaxsave.scan(saver, _step, {"i": 0}, 0, jnp.arange(3))
    stacked = saver.init({"i": jnp.zeros(2, jnp.int32)}, chains=2)
    with pytest.raises(TypeError, match="holds 2 chains stacked"):
        jaxsave.scan(saver, _step, stacked, 0, jnp.arange(3))
    saver.postprocess(stacked)


def test_checkpoint_must_be_a_function_of_the_right_tree():
    saver = jaxsave.save(jaxsave.MemoryCollector(), checkpoint_every=4)
    state = saver.init({"i": jnp.int32(0)}, {"c": jnp.int32(0)})
    with pytest.raises(TypeError, match="checkpoint must be a function of the carry"):
        jaxsave.scan(saver, _step, state, 0, jnp.arange(8), checkpoint={"c": 0})
    with pytest.raises(jaxsave.StructureMismatchError, match="checkpoint of jaxsave.scan's carry"):
        jax.jit(lambda s: jaxsave.scan(saver, _step, s, 0, jnp.arange(8), checkpoint=lambda c: {"d": c}))(
            state
        )
    saver.postprocess(state)


def test_a_block_that_would_pass_a_checkpoint_step_is_refused(tmp_path):
    """save() for 3 steps, then jaxsave.scan's blocks of 10 steps: they would end at 13, 23, ...
    and never on the checkpoint steps 10, 20: the host refuses them instead of losing them."""
    path = tmp_path / "run.h5"
    saver = jaxsave.save(jaxsave.HDF5Collector(path), checkpoint_every=10)
    state = saver.init({"i": jnp.int32(0)}, {"c": jnp.int32(0)})

    def run(state):
        state, _ = jax.lax.scan(
            lambda s, i: saver.save(s, True, {"i": i}, solver_state={"c": i}), state, jnp.arange(3)
        )
        return jaxsave.scan(saver, _step, state, 0, jnp.arange(3, 33), checkpoint=lambda c: {"c": c})

    with pytest.raises(Exception, match="passes the checkpoint step 10"):
        state, _ = jax.jit(run)(state)
        jax.block_until_ready(state)
        saver.postprocess(state)
    streamer = saver.init.__self__
    streamer.writer.close()
    streamer.collector.close()


def test_steps_that_end_no_group_are_refused_at_postprocess_if_they_pass_a_checkpoint():
    """A thinned scan's last steps (fewer than thin) make no block; postprocess still refuses
    a state whose uncovered steps passed a checkpoint step."""
    saver = jaxsave.save(jaxsave.MemoryCollector(), checkpoint_every=4)
    state = saver.init({"i": jnp.int32(0)}, {"c": jnp.int32(0)})
    run = jax.jit(
        lambda s: jaxsave.scan(saver, _step, s, 0, jnp.arange(8), thin=4, checkpoint=lambda c: {"c": c})
    )
    state, _ = run(state)
    assert int(state.step) == 8
    assert saver.postprocess(state)["samples"]["i"].tolist() == [3, 7]

    saver = jaxsave.save(jaxsave.MemoryCollector(), checkpoint_every=4)
    state = saver.init({"i": jnp.int32(0)}, {"c": jnp.int32(0)})
    # a state that took 3 steps and sent nothing (fill: no row, a span of 3 steps)
    state = state._replace(step=state.step + 3, fill=with_span(jnp.int32(0), 3))
    with pytest.raises(jaxsave.SaverStateError, match="passes the checkpoint step 4"):
        saver.postprocess(
            jax.jit(
                lambda s: jaxsave.scan(saver, _step, s, 0, length=2, thin=4, checkpoint=lambda c: {"c": c})[0]
            )(state)
        )


def test_a_scan_of_no_steps_changes_nothing(saver, state):
    state, c = jax.jit(lambda s: jaxsave.scan(saver, _step, s, 7, length=0, thin=3))(state)
    assert int(c) == 7 and int(state.step) == 0
    out = saver.postprocess(state)
    assert int(out["sample_count"]) == 0
    assert np.asarray(out["samples"]["i"]).shape[0] == 0
