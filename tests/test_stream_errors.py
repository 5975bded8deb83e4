"""Bad input to the streaming core ends in a clear exception, never a hang or silent loss."""

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsave


def scan_save(saver, state, n, keep=lambda i: True, make=lambda i: {"x": jnp.full(2, i, jnp.float32)}):
    return jax.lax.scan(lambda s, i: saver.save(s, keep(i), make(i)), state, jnp.arange(n))[0]


@pytest.fixture
def saver():
    s = jaxsave.save(jaxsave.MemoryCollector(), block_size=4)
    yield s
    # Finish whatever a test left open, so no writer thread outlives it.
    streamer = s.init.__self__
    if streamer.writer is not None:
        streamer.writer.close()


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"y": jnp.zeros(2)}, "missing leaf 'x'"),
        ({"x": jnp.zeros(3)}, r"leaf 'x': shape \(3,\) != expected \(2,\)"),
        ({"x": jnp.zeros(2, jnp.int32)}, "leaf 'x': dtype int32 != expected float32"),
        ({"x": jnp.zeros(2), "extra": 1.0}, "unexpected leaf 'extra'"),
    ],
)
def test_sample_mismatch_fails_at_trace_time_naming_the_leaf(saver, bad, message):
    state = saver.init({"x": jnp.zeros(2)}, None)
    with pytest.raises(jaxsave.StructureMismatchError, match=message):
        jax.jit(lambda s: saver.save(s, True, bad))(state)


@pytest.mark.parametrize("keep", [1, jnp.int32(1), jnp.array([True, False]), 0.5])
def test_keep_must_be_a_boolean_scalar(saver, keep):
    state = saver.init({"x": jnp.zeros(2)}, None)
    with pytest.raises(TypeError, match="keep must be a boolean scalar"):
        saver.save(state, keep, {"x": jnp.zeros(2)})


class Boom(RuntimeError):
    pass


class FailingCollector(jaxsave.MemoryCollector):
    def __init__(self, fail_at_call):
        super().__init__()
        self.calls = 0
        self.fail_at_call = fail_at_call

    def save(self, chain_id, values):
        self.calls += 1
        if self.calls == self.fail_at_call:
            raise Boom(f"disk on fire at call {self.calls}")
        super().save(chain_id, values)


def test_collector_exception_is_reraised_from_postprocess(one_call_per_block):
    collector = FailingCollector(fail_at_call=2)
    saver = jaxsave.save(collector, block_size=4)
    state = saver.init({"x": jnp.zeros(2)}, None)
    start = time.monotonic()
    state = jax.jit(lambda s: scan_save(saver, s, 40))(state)  # the run itself is not interrupted
    with pytest.raises(Boom, match="disk on fire at call 2"):
        saver.postprocess(state, None)
    assert time.monotonic() - start < 30


def test_collector_exception_in_save_block_under_vmap():
    class FailingBlocks(jaxsave.MemoryCollector):
        def save_block(self, chain_ids, values):
            raise OSError(28, "No space left on device")

    saver = jaxsave.save(FailingBlocks(), block_size=4)
    state = saver.init({"x": jnp.zeros((3, 2))}, None, chains=3)
    state = jax.jit(jax.vmap(lambda s: scan_save(saver, s, 20)))(state)
    with pytest.raises(OSError, match="No space left on device"):
        saver.postprocess(state, None)


def test_more_kept_samples_than_samples_collected_names_both_numbers():
    saver = jaxsave.save(jaxsave.MemoryCollector(), block_size=4)
    state = saver.init({"x": jnp.zeros(2)}, None, jaxsave.static_information(samples_collected=5))
    state = scan_save(saver, state, 12)
    # The writer joins the blocks it has at hand: it stops at the 2nd block (8) or the 3rd (12).
    with pytest.raises(jaxsave.CapacityError, match=r"kept (8|12) samples.*samples_collected=5"):
        saver.postprocess(state, None)

    device = jaxsave.no_save()
    state = device.init({"x": jnp.zeros(2)}, None, jaxsave.static_information(samples_collected=5))
    state = scan_save(device, state, 12)
    with pytest.raises(jaxsave.CapacityError, match=r"kept 12 samples.*samples_collected=5"):
        device.postprocess(state, None)


def test_no_save_needs_a_sample_count():
    with pytest.raises(ValueError, match="samples_collected"):
        jaxsave.no_save().init({"x": jnp.zeros(2)}, None)


def test_postprocess_twice_is_an_error(saver):
    state = scan_save(saver, saver.init({"x": jnp.zeros(2)}, None), 6)
    saver.postprocess(state, None)
    with pytest.raises(jaxsave.SaverStateError, match="already called for chain"):
        saver.postprocess(state, None)

    device = jaxsave.no_save()
    state = device.init({"x": jnp.zeros(2)}, None, jaxsave.static_information(samples_collected=6))
    device.postprocess(state, None)
    with pytest.raises(jaxsave.SaverStateError, match="already called for chain"):
        device.postprocess(state, None)


def test_saving_after_postprocess_is_an_error(saver):
    init_state = saver.init({"x": jnp.zeros(2)}, None)
    run = jax.jit(lambda s: scan_save(saver, s, 6))
    state = run(init_state)
    saver.postprocess(state, None)
    # Tracing save again: refused at once.
    with pytest.raises(jaxsave.SaverStateError, match="finished by postprocess"):
        scan_save(saver, state, 6)
    # Running the already compiled loop again: the flush callback refuses it.
    with pytest.raises(Exception, match="after postprocess"):
        jax.block_until_ready(run(state))
    with pytest.raises(jaxsave.SaverStateError):
        saver.postprocess(state, None)


def test_reusing_an_old_state_is_detected():
    saver = jaxsave.save(jaxsave.MemoryCollector(), block_size=4)
    state0 = saver.init({"x": jnp.zeros(2)}, None)
    run = jax.jit(lambda s: scan_save(saver, s, 10))
    state = run(state0)
    # The same steps again, from the same starting state: the host counted those steps already.
    with pytest.raises(Exception, match="advanced twice"):
        jax.block_until_ready(run(state0))
    with pytest.raises(jaxsave.SaverStateError, match="advanced twice"):
        saver.postprocess(state, None)
    saver.init.__self__.writer.close()


def test_running_an_older_state_past_the_newest_block_is_detected():
    """A state a few steps older than the newest block sent: its next block would cover steps the
    host has, and fewer steps than it has rows since the host's last block end."""
    saver = jaxsave.save(jaxsave.MemoryCollector(), block_size=4)
    state = saver.init({"x": jnp.zeros(2)}, None)
    two = jax.jit(lambda s: scan_save(saver, s, 2))
    older = two(state)  # 2 steps, still in the ring buffer
    newer = two(two(older))  # the first block (steps 0..4) has left
    with pytest.raises(Exception, match="advanced twice"):
        jax.block_until_ready(jax.jit(lambda s: scan_save(saver, s, 3))(older))  # steps 2..5, 4 rows
    with pytest.raises(jaxsave.SaverStateError, match="advanced twice"):
        saver.postprocess(newer, None)
    saver.init.__self__.writer.close()


def test_one_collector_cannot_serve_two_savers():
    collector = jaxsave.MemoryCollector()
    jaxsave.save(collector)
    with pytest.raises(jaxsave.SaverStateError, match="already belongs to another saver"):
        jaxsave.save(collector)


def test_new_chain_with_a_different_sample_structure(saver):
    saver.init({"x": jnp.zeros(2)}, None)
    with pytest.raises(jaxsave.StructureMismatchError, match="missing leaf 'x'"):
        saver.init({"y": jnp.zeros(2)}, None)


def test_chains_needs_a_leading_axis(saver):
    with pytest.raises(jaxsave.StructureMismatchError, match="leading axis of size 4"):
        saver.init({"x": jnp.zeros(2)}, None, chains=4)


def test_registering_a_dictionize_rule_twice_is_an_error():
    class Node:
        pass

    jaxsave.register_dictionize_rule(Node)(lambda n: {})
    with pytest.raises(ValueError, match="already registered"):
        jaxsave.register_dictionize_rule(Node)(lambda n: {})


def test_bad_arguments():
    with pytest.raises(ValueError, match="block_size"):
        jaxsave.save(jaxsave.MemoryCollector(), block_size=0)
    with pytest.raises(TypeError, match="DataCollector"):
        jaxsave.save("chains.h5")
    with pytest.raises(ValueError, match="samples_collected must be >= 0"):
        jaxsave.save(jaxsave.MemoryCollector()).init(
            jnp.zeros(2), None, jaxsave.static_information(samples_collected=-1)
        )
    with pytest.raises(jaxsave.SaverStateError, match="before init"):
        jaxsave.save(jaxsave.MemoryCollector()).postprocess(None, None)


def test_uneven_chains_are_zero_padded():
    saver = jaxsave.save(jaxsave.MemoryCollector(), block_size=3)
    state = saver.init({"x": jnp.zeros((2, 2))}, None, chains=2)
    keep = lambda c, i: (i % (c + 1)) == 0
    state = jax.vmap(
        lambda s, c: jax.lax.scan(
            lambda s, i: saver.save(s, keep(c, i), {"x": jnp.full(2, i, jnp.float32)}), s, jnp.arange(6)
        )[0]
    )(state, jnp.arange(2))
    out = saver.postprocess(state, None)
    assert out["sample_count"].tolist() == [6, 3]
    np.testing.assert_array_equal(out["samples"]["x"][:, :, 0], [[0, 1, 2, 3, 4, 5], [0, 2, 4, 0, 0, 0]])


def test_a_failing_register_chain_leaves_no_thread(tmp_path):
    class Refusing(jaxsave.MemoryCollector):
        def register_chain(self, *args, **kwargs):
            raise OSError("read-only file system")

    saver = jaxsave.save(Refusing())
    with pytest.raises(OSError, match="read-only"):
        saver.init(jnp.zeros(2), None)
    # the autouse fixture checks that no writer thread is left running


def test_stacking_chains_at_different_steps_is_refused():
    saver = jaxsave.save(jaxsave.MemoryCollector(), block_size=4)
    a = saver.init(jnp.zeros(2), None)
    b = saver.init(jnp.zeros(2), None)
    a = scan_save(saver, a, 2, make=lambda i: jnp.zeros(2))  # a is two steps ahead of b
    stacked = jax.tree.map(lambda x, y: jnp.stack([x, y]), a, b)
    with pytest.raises(Exception, match="different steps"):
        jax.block_until_ready(
            jax.vmap(lambda s: scan_save(saver, s, 4, make=lambda i: jnp.zeros(2)))(stacked)
        )
    streamer = saver.init.__self__
    streamer.writer.close()


def test_no_save_refuses_a_one_chain_state_closed_over_by_vmap():
    """Each vmapped lane writes its own copy of the closed-over buffer, but all under chain id 0:
    postprocess names the mistake instead of returning 4 chains that the saver counts as one."""
    init, save, postprocess = jaxsave.no_save()
    state = init({"x": jnp.zeros(2)}, None, jaxsave.static_information(samples_collected=5))

    def chain(x0):
        return jax.lax.scan(lambda s, i: save(s, True, {"x": x0 + i}), state, jnp.arange(3.0))[0]

    out = jax.vmap(chain)(jnp.zeros((4, 2)))
    with pytest.raises(jaxsave.SaverStateError, match=r"chain id\(s\) \[0\] more than once"):
        postprocess(out, None)


def test_postprocess_refuses_a_state_stacked_with_itself():
    saver = jaxsave.save(jaxsave.MemoryCollector(), block_size=4)
    state = saver.init({"x": jnp.zeros(2)}, None)
    twice = jax.tree.map(lambda x: jnp.stack([x, x]), state)
    with pytest.raises(jaxsave.SaverStateError, match="more than once"):
        saver.postprocess(twice, None)
    assert saver.postprocess(state, None)["sample_count"] == 0  # the chain is still open


def test_no_save_refuses_a_solver_state_it_cannot_checkpoint():
    init, save, _ = jaxsave.no_save()
    state = init({"x": jnp.zeros(2)}, None, jaxsave.static_information(samples_collected=2))
    with pytest.raises(jaxsave.SaverStateError, match="solver_state"):
        jax.jit(lambda s: save(s, True, {"x": jnp.ones(2)}, None, {"w": jnp.zeros(())}))(state)


def test_no_save_refuses_to_resume():
    init, _, _ = jaxsave.no_save()
    with pytest.raises(jaxsave.SaverStateError, match="cannot resume"):
        init({"x": jnp.zeros(2)}, None, jaxsave.static_information(samples_collected=2), resume=object())


@pytest.mark.parametrize(
    "make",
    [lambda: jaxsave.save(jaxsave.MemoryCollector()), lambda: jaxsave.no_save()],
    ids=["memory", "no_save"],
)
def test_a_state_of_several_chains_without_vmap_is_refused(make):
    """A forgotten ``vmap`` names the fix, instead of an assertion deep inside a JAX update."""
    saver = make()
    info = jaxsave.static_information(samples_collected=2)
    state = saver.init({"w": jnp.zeros((4, 3))}, None, info, chains=4)
    with pytest.raises(TypeError, match=r"holds 4 chains .*jax\.vmap"):
        jax.jit(lambda s: saver.save(s, True, {"w": jnp.zeros(3)})[0])(state)
    saver.postprocess(jax.vmap(lambda s: saver.save(s, True, {"w": jnp.zeros(3)})[0])(state), None)


def _closed_over(saver, state):
    return jax.vmap(lambda key: scan_save(saver, state, 8, make=lambda i: {"x": jnp.full(2, i) + key[0]}))


def _unmapped(saver, state):
    def chain(state, key):
        return scan_save(saver, state, 8, make=lambda i: {"x": jnp.full(2, i) + key[0]})

    return lambda keys: jax.vmap(chain, in_axes=(None, 0))(state, keys)


def _scanned(saver, state):
    def step(c, i):
        return c, (True, {"x": jnp.full(2, i) + c})

    return jax.vmap(lambda key: jaxsave.scan(saver, step, state, key[0], jnp.arange(8))[0])


@pytest.mark.parametrize("run", [_closed_over, _unmapped, _scanned], ids=["closure", "in_axes-None", "scan"])
def test_a_one_chain_state_under_vmap_names_chains(saver, run):
    """``init`` without ``chains=``, then vmapped chains: a trace-time error naming the fix,
    not every chain's samples saved as one chain's (then a count mismatch at postprocess)."""
    state = saver.init({"x": jnp.zeros(2)}, None)
    keys = jnp.arange(8, dtype=jnp.float32).reshape(4, 2)
    with pytest.raises(
        jaxsave.SaverStateError, match=r"holds one chain.*init\(init_sample, \.\.\., chains=C\)"
    ):
        jax.jit(run(saver, state))(keys)
    assert saver.postprocess(state, None)["sample_count"] == 0  # nothing was sent


def test_a_stacked_init_sample_without_chains_names_chains(saver):
    """``init({"x": zeros((4, 2))})`` for 4 vmapped chains, ``chains=4`` forgotten."""
    state = saver.init({"x": jnp.zeros((4, 2))}, None)
    run = jax.vmap(lambda i: saver.save(state, True, {"x": jnp.full(2, i, jnp.float32)})[0])
    with pytest.raises(jaxsave.StructureMismatchError, match=r"(?s)\(2,\) != expected \(4, 2\).*chains=4\)"):
        jax.jit(run)(jnp.arange(4))
    saver.postprocess(state, None)


@pytest.mark.parametrize(
    "bad, message",
    [
        (
            "run.h5",
            r"got the path 'run.h5': pass a collector for it, e\.g\. jaxsave\.HDF5Collector\('run.h5'\)",
        ),
        (jaxsave.MemoryCollector, r"got the class MemoryCollector: pass an instance"),
        (3, "got int$"),
    ],
)
def test_save_of_something_else_than_a_collector_names_the_fix(bad, message):
    with pytest.raises(TypeError, match=f"data_collector must be a jaxsave.DataCollector, {message}"):
        jaxsave.save(bad)


# Reused older states that the host's count of block starts does not catch (a block that covers at
# least as many steps as it has rows since the chain's last block end passes _check_advanced). The
# code before 28bed9c (the state carried block_start, the writer compared it) refused all three.


def _thinned(saver, thin, batched=False):
    def run(state, start, n):
        step = lambda s, i: (saver.save(s, i % thin == 0, jnp.float32(i))[0], None)
        return jax.lax.scan(step, state, start + jnp.arange(n))[0]

    return jax.jit(jax.vmap(run, in_axes=(0, None, None)) if batched else run, static_argnums=2)


@pytest.mark.parametrize("batched", [False, True], ids=["one chain", "vmapped"])
def test_an_older_state_run_again_with_sparser_thinning_is_detected(batched):
    saver = jaxsave.save(jaxsave.MemoryCollector(), block_size=4)
    state = saver.init(jnp.zeros(2) if batched else jnp.float32(0), None, chains=2 if batched else None)
    every, fifth = _thinned(saver, 1, batched), _thinned(saver, 5, batched)
    older = every(state, 0, 6)  # block 0..4 sent, rows 4, 5 held
    every(older, 6, 4)  # the newest: block 4..8 (rows 4..7) sent
    try:
        again = fifth(older, 100, 40)  # older's rows 4, 5 again, then 100, 105, ...: a block of 31 steps
        jax.block_until_ready(again)
        out = saver.postprocess(again, None)
    except Exception as error:  # noqa: BLE001 - the refusal may come at the run or at postprocess
        assert "advanced twice" in str(error)
        return
    finally:
        saver.init.__self__.writer.close()
    first = np.atleast_2d(np.asarray(out["samples"]))[0]
    pytest.fail(f"no error; chain 0 got {first.tolist()} (rows 4 and 5 twice)")


def test_the_state_from_before_a_resume_is_refused_after_it(tmp_path):
    """init(resume=ckpt) resets the host's count to the checkpoint; the abandoned run's state,
    continued by mistake, must not pass as the resumed chain (its samples from the checkpoint
    step to where it stopped would be missing)."""
    path = str(tmp_path / "run.h5")
    collector = jaxsave.HDF5Collector(path, checkpoint_interval=0)
    saver = jaxsave.save(collector, checkpoint_every=30, block_size=4)

    def chunk(state, s, start, n):
        def step(carry, i):
            state, s = carry
            s = s + 1
            return (saver.save(state, i % 3 == 0, jnp.float32(i), solver_state=s)[0], s), None

        return jax.lax.scan(step, (state, s), start + jnp.arange(n))[0]

    run = jax.jit(chunk, static_argnums=3)
    old, s = run(saver.init(jnp.float32(0), jnp.float32(0)), jnp.float32(0), 0, 75)
    jax.effects_barrier()
    ckpt = jaxsave.resume(collector)
    assert int(ckpt.step) == 60
    saver.init(jnp.float32(0), jnp.float32(0), resume=ckpt)  # the state to continue: not used
    try:
        old, s = run(old, s, 75, 62)  # the pre-resume state, at step 75
        jax.block_until_ready(old)
        saver.postprocess(old, None)
    except Exception as error:  # noqa: BLE001 - the refusal may come at the run or at postprocess
        assert "advanced twice" in str(error)
        return
    finally:
        saver.init.__self__.writer.close()
        collector.close()
    got = np.asarray(jaxsave.load_samples(path)).reshape(-1).tolist()
    pytest.fail(f"no error; the file holds {len(got)} samples, steps 60..69 missing: {got[18:22]}")


def test_a_block_naming_one_chain_twice_reaches_no_collector():
    """A one-chain state stacked with itself and run under vmap: postprocess refuses it, but the
    blocks sent during the run were each handed to the collector twice (a file keeps them)."""
    saver = jaxsave.save(jaxsave.MemoryCollector(), block_size=4)
    state = saver.init(jnp.float32(0), None)
    twice = jax.tree.map(lambda x: jnp.stack([x, x]), state)
    run = jax.jit(
        jax.vmap(lambda s: jax.lax.scan(lambda s, i: saver.save(s, True, i), s, jnp.arange(10.0))[0])
    )
    try:
        jax.block_until_ready(run(twice))
    except Exception:  # noqa: BLE001, S110 - refusing the block at the callback is one right answer
        pass
    jax.effects_barrier()
    writer = saver.init.__self__.writer
    writer.drain()
    try:
        assert writer.written[0] == 0, (
            f"chain 0's rows were handed over twice: {writer.written[0]} for 8 steps"
        )
    finally:
        writer.close()


def test_a_state_of_another_saver_is_refused():
    """A notebook cell re-run: a new saver (and its chain 0), but the old saver's state, 10 steps
    in, run with the new saver's save: chain 0 of the new saver must not take its samples."""

    def make():
        saver = jaxsave.save(jaxsave.MemoryCollector(), block_size=4)
        step = lambda s, i: (saver.save(s, True, jnp.float32(i))[0], None)
        return saver, jax.jit(lambda s, t: jax.lax.scan(step, s, t + jnp.arange(10))[0])

    old_saver, old_run = make()
    old = old_run(old_saver.init(jnp.float32(0), None), 0)  # steps 0..9, rows 8 and 9 held
    saver, run = make()
    saver.init(jnp.float32(0), None)
    try:
        out = saver.postprocess(run(old, 10), None)
    except Exception as error:  # noqa: BLE001 - the refusal may come at the run or at postprocess
        assert "advanced twice" in str(error)
        return
    finally:
        old_saver.init.__self__.writer.close()
        saver.init.__self__.writer.close()
    pytest.fail(f"no error; the new saver's chain 0 got {np.asarray(out['samples']).tolist()}")
