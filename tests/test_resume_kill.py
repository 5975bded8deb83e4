"""Kill a sampler with SIGKILL at a random step, resume from its last checkpoint: the samples
file ends bit-identical to an uninterrupted run with the same seed."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import h5py
import numpy as np
import pytest

CHILD = textwrap.dedent(
    """
    import sys, time, jax, jax.numpy as jnp, jaxsave
    path, mode, chains, total, every, thin = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:7])
    paced = sys.argv[7:] == ["paced"]  # after each "step" line, wait for the parent's "go"
    CHUNK = 20

    def template(key):
        return {"x": jnp.zeros(3), "key": key, "n": jnp.int32(0)}

    def chunk(saver, state, solver, start):
        def step(carry, i):
            state, s = carry
            key, sub = jax.random.split(s["key"])
            x = 0.9 * s["x"] + 0.1 * jax.random.normal(sub, (3,))
            s = {"x": x, "key": key, "n": s["n"] + 1}
            state, _ = saver.save(state, (i >= 5) & (i % thin == 0), {"x": x, "lp": -jnp.sum(x**2)},
                                  solver_state=s)
            return (state, s), None
        body = lambda st, sv: jax.lax.scan(step, (st, sv), start + jnp.arange(CHUNK))[0]
        return jax.vmap(body)(state, solver) if chains > 1 else body(state, solver)

    keys = jax.random.split(jax.random.key(42), chains)
    solver = jax.vmap(template)(keys) if chains > 1 else template(keys[0])
    one = template(keys[0])
    sample = {"x": jnp.zeros((chains, 3) if chains > 1 else 3), "lp": jnp.zeros(chains) if chains > 1 else 0.0}
    if mode == "fresh":
        saver = jaxsave.save(jaxsave.HDF5Collector(path), checkpoint_every=every, block_size=8)
        state = saver.init(sample, solver, chains=chains if chains > 1 else None)
        start = 0
    else:
        ckpt = jaxsave.resume(path, like=(one, None))
        saver = jaxsave.save(jaxsave.HDF5Collector(path, mode="a"), checkpoint_every=every, block_size=8)
        state = saver.init(sample, solver, resume=ckpt)
        solver, start = ckpt.solver_state, int(ckpt.step if chains == 1 else ckpt.step[0])
    run = jax.jit(lambda st, sv, s0: chunk(saver, st, sv, s0))
    for s0 in range(start, total, CHUNK):
        state, solver = run(state, solver, s0)
        jax.block_until_ready(state)
        print("step", s0 + CHUNK, flush=True)
        if paced:
            sys.stdin.readline()
        time.sleep(0.02)  # a real step takes time; the writer (and its checkpoints) keep up
    saver.postprocess(state, None)
    print("done", flush=True)
    """
)


def _has_checkpoint(path) -> bool:
    return os.path.exists(f"{path}.ckpt")


def run_child(
    script, path, mode, chains, total, every, thin, kill_after_step=None, has_checkpoint=_has_checkpoint
):
    """Run the child; with ``kill_after_step``, SIGKILL it during the chunk after that step, once
    ``has_checkpoint(path)``.

    The killed child is paced: after each ``step`` line it waits for the parent's ``go``, so it
    cannot finish before the kill, however far its writer lags (checkpoints land asynchronously,
    and on busy cores the first one can come after the last step). The kill comes 0 to 20 ms
    after a ``go``, while the child runs its next chunk and its writer may be writing.
    """
    args = [sys.executable, str(script), str(path), mode, str(chains), str(total), str(every), str(thin)]
    if kill_after_step is None:
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err[-3000:]
        return None
    proc = subprocess.Popen(
        [*args, "paced"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdin is not None and proc.stdout is not None
    reached = 0
    for line in proc.stdout:
        if line.startswith("step"):
            reached = int(line.split()[1])
            if reached >= kill_after_step:  # the child waits: its writer stores what it was sent
                deadline = time.monotonic() + 120
                while not has_checkpoint(path) and time.monotonic() < deadline and proc.poll() is None:
                    time.sleep(0.01)
                assert has_checkpoint(path), f"no checkpoint stored in 120 s after step {reached}"
            proc.stdin.write("go\n")
            proc.stdin.flush()
            if reached >= kill_after_step:
                time.sleep(np.random.default_rng(reached).uniform(0, 0.02))
                proc.send_signal(signal.SIGKILL)
                break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the child finished before it could be killed"
    return reached


def samples(path):
    with h5py.File(path, "r") as f:
        counts = f.attrs["sample_counts"][:]
        return counts, {k: f["posterior"][k][:] for k in ("x", "lp")}


@pytest.mark.parametrize(
    "chains,thin",
    [pytest.param(1, 3, marks=pytest.mark.slow), (3, 2)],  # one chain: 17 s, in the slow suite
)
def test_sigkill_then_resume_gives_the_uninterrupted_file(tmp_path, chains, thin):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    total, every = 400, 40
    reference = tmp_path / "reference.h5"
    run_child(script, reference, "fresh", chains, total, every, thin)
    want_counts, want = samples(reference)

    rng = np.random.default_rng(chains)
    for trial, kill_at in enumerate(sorted(rng.integers(60, total - 60, size=2))):
        path = tmp_path / f"killed{trial}.h5"
        run_child(script, path, "fresh", chains, total, every, thin, kill_after_step=int(kill_at))
        assert os.path.exists(str(path) + ".ckpt"), "no checkpoint was written before the kill"
        run_child(script, path, "resume", chains, total, every, thin)
        counts, got = samples(path)
        np.testing.assert_array_equal(counts, want_counts)
        for k in want:
            assert got[k].shape == want[k].shape
            np.testing.assert_array_equal(got[k], want[k])  # bit-identical draws, none duplicated or missing
