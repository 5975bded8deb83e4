"""SIGKILL a sharded sampler (shard_map over 2 CPU devices) at random moments, then resume it.

The devices run their chains independently between two jitted calls, so one
device's chains can be many checkpoints ahead of the other's when the process is
killed. Whatever the moment, ``resume`` must give every chain the same step, and
the run continued from there with the docs' loop must end with exactly the
samples of an uninterrupted run: every chain its intended count, bit for bit.
"""

from __future__ import annotations

import os
import queue
import signal
import textwrap
import threading
import time

import h5py
import numpy as np
import pytest
from _reliability import child_env, python

import jaxsave

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(600)]

CHAINS, EVERY, CHUNK, TOTAL = 4, 10, 100, 600
KILLS = 3
#: The chains of the second device do this many times the work per step: they fall behind.
SLOW = 30

CHILD = textwrap.dedent(f"""
    import os, sys, time
    import jax, jax.numpy as jnp, numpy as np, jaxsave
    from jax.sharding import PartitionSpec as P

    assert jax.device_count() == 2, jax.devices()
    path = sys.argv[1]
    mesh = jax.make_mesh((2,), ("chains",))
    W = jnp.asarray(np.random.default_rng(0).normal(size=(64, 64)) / 8, jnp.float32)

    def solver0():
        keys = jax.random.split(jax.random.key(3), {CHAINS})
        work = jnp.where(jnp.arange({CHAINS}) < {CHAINS} // 2, 1, {SLOW}).astype(jnp.int32)
        return {{"x": jnp.zeros(({CHAINS}, 64)), "key": keys, "work": work}}

    sample = {{"x": jnp.zeros(({CHAINS}, 64)), "i": jnp.zeros({CHAINS}, jnp.int32)}}
    if os.path.exists(path + ".ckpt"):
        ckpt = jaxsave.resume(path)
        saver = jaxsave.save(jaxsave.HDF5Collector(path, mode="a", checkpoint_interval=0),
                             checkpoint_every={EVERY})
        state = saver.init(sample, solver0(), resume=ckpt)
        solver, start = ckpt.solver_state, int(np.asarray(ckpt.step).reshape(-1)[0])
    else:
        saver = jaxsave.save(jaxsave.HDF5Collector(path, checkpoint_interval=0),
                             checkpoint_every={EVERY})
        state = saver.init(sample, solver0(), chains={CHAINS})
        solver, start = solver0(), 0

    def chain(state, s, start, length):
        def step(carry, i):
            state, s = carry
            key, sub = jax.random.split(s["key"])
            x = 0.9 * s["x"] + 0.1 * jax.random.normal(sub, (64,))
            x = jax.lax.fori_loop(0, s["work"], lambda _, y: 0.5 * y + 0.5 * jnp.tanh(W @ y), x)
            s = {{"x": x, "key": key, "work": s["work"]}}
            state, _ = saver.save(state, i % 3 != 1, {{"x": x, "i": i}}, solver_state=s)
            return (state, s), None
        return jax.lax.scan(step, (state, s), start + jnp.arange(length))[0]

    def sharded(length):
        body = jax.vmap(lambda st, s, s0: chain(st, s, s0, length), in_axes=(0, 0, None))
        return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("chains"), P("chains"), P()),
                                     out_specs=(P("chains"), P("chains"))))

    print("start", start, flush=True)
    runs = {{}}
    state, solver = jaxsave.shard_state(state, mesh), jaxsave.shard_state(solver, mesh)
    s0 = start
    while s0 < {TOTAL}:
        length = min({CHUNK} - s0 % {CHUNK}, {TOTAL} - s0)
        run = runs.setdefault(length, sharded(length))
        state, solver = jax.block_until_ready(run(state, solver, jnp.int32(s0)))
        s0 += length
        print("steps", s0, flush=True)
    out = saver.postprocess(state, None)
    print("done", out["sample_count"].tolist(), flush=True)
""")

WANT = sum(1 for i in range(TOTAL) if i % 3 != 1)


def _env() -> dict:
    return child_env(XLA_FLAGS="--xla_force_host_platform_device_count=2")


def _finish(script, path) -> str:
    proc = python(script, path, env=_env())
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    return out


def _lines(proc, into: queue.Queue) -> None:
    for line in proc.stdout:
        into.put(line.split())
    into.put(None)  # the child closed its output: it ended


def _kill_during_run(script, path, rng: np.random.Generator) -> bool:
    """Start the child and SIGKILL it just after it reports one of its next two chunk ends (while
    the writer still stores that chunk's blocks, from both devices); False if it finished first."""
    proc = python(script, path, env=_env())
    try:
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=_lines, args=(proc, lines), daemon=True).start()
        target = TOTAL
        while True:
            words = lines.get(timeout=240)
            if words is None:
                proc.wait(timeout=60)
                raise AssertionError(f"the child failed ({proc.returncode}): {proc.stderr.read()[-3000:]}")
            if words[:1] == ["done"]:
                proc.wait(timeout=60)
                return False
            if words[:1] == ["start"]:
                start = int(words[1])
                target = min(TOTAL, (start // CHUNK + 1 + int(rng.integers(0, 2))) * CHUNK)
            if words[:1] == ["steps"] and int(words[1]) >= target:
                break
        time.sleep(float(rng.uniform(0.0, 0.05)))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        return proc.returncode == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=60)


def _stored(path) -> tuple[np.ndarray, dict]:
    with h5py.File(path, "r") as f:
        return f.attrs["sample_counts"][:], {k: f["posterior"][k][:] for k in ("x", "i")}


def test_sigkill_sharded_run_then_resume_is_exact(tmp_path, figures):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    reference = tmp_path / "reference.h5"
    assert "done [" + ", ".join([str(WANT)] * CHAINS) + "]" in _finish(script, reference)
    want_counts, want = _stored(reference)
    assert want_counts.tolist() == [WANT] * CHAINS

    rng = np.random.default_rng(15)
    path = tmp_path / "killed.h5"
    kills, apart, mixed = 0, 0, []
    for _ in range(KILLS):
        if not _kill_during_run(script, path, rng):
            break  # the run finished before the kill
        kills += 1
        if os.path.exists(f"{path}.ckpt"):
            counts = jaxsave.file_info(path).sample_counts
            apart += int(counts.min() != counts.max())  # the devices were apart when killed
            steps = np.atleast_1d(jaxsave.resume(path).step)
            if (steps != steps[0]).any():
                mixed.append(steps.tolist())
    assert kills >= 2, f"only {kills} of {KILLS} runs were killed before they finished"
    out = _finish(script, path)
    counts, got = _stored(path)
    assert counts.tolist() == [WANT] * CHAINS, (counts.tolist(), out)
    for k in want:
        assert got[k].shape == want[k].shape
        np.testing.assert_array_equal(got[k], want[k])  # bit-identical: none duplicated or missing
    assert not mixed, f"checkpoints with chains at different steps: {mixed}"
    figures(
        "kills", "sharded resume (2 devices x 2 chains, HDF5)", killed=kills, tried=KILLS, devices_apart=apart
    )
