"""SIGKILL at random moments: streaming runs, save_pytree and Checkpointer writes.

Whatever the moment, the file opens, every chain holds a prefix of the
uninterrupted run's samples (at most one flush interval short), the checkpoint
is a complete one, the old file of an atomic write survives, and the leftovers
of the killed writer are cleaned up when the file is next opened.
"""

from __future__ import annotations

import os
import queue
import signal
import textwrap
import threading
import time

import numpy as np
import pytest
from _reliability import python, samples_of_a_whole_run

import jaxsave
from jaxsave._core.atomic import is_temporary

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(600)]

KILLS = 20
FLUSH_INTERVAL = 0.2
#: Time the writer thread may take to get a sample from the sampler to the file, on 2 busy cores.
WRITER_LAG = 0.5
CHAINS, CHUNK, CHUNKS, EVERY = 3, 64, 40, 128

STREAM = textwrap.dedent(f"""
    import sys, time
    import jax, jax.numpy as jnp, jaxsave

    path = sys.argv[1]
    saver = jaxsave.save(jaxsave.HDF5Collector(path, flush_interval={FLUSH_INTERVAL}, checkpoint_interval=0.1),
                         checkpoint_every={EVERY}, block_size=16)
    keys = jax.random.split(jax.random.key(7), {CHAINS})
    solver = {{"x": jnp.zeros(({CHAINS}, 8)), "key": keys}}
    state = saver.init({{"x": jnp.zeros(({CHAINS}, 8)), "i": jnp.zeros({CHAINS}, jnp.int32)}}, solver,
                       chains={CHAINS})

    def chunk(state, solver, start):
        def step(carry, i):
            state, s = carry
            key, sub = jax.random.split(s["key"])
            x = 0.9 * s["x"] + 0.1 * jax.random.normal(sub, (8,))
            s = {{"x": x, "key": key}}
            state, _ = saver.save(state, True, {{"x": x, "i": i}}, solver_state=s)
            return (state, s), None
        return jax.lax.scan(step, (state, solver), start + jnp.arange({CHUNK}))[0]

    run = jax.jit(jax.vmap(chunk, in_axes=(0, 0, None)))
    for k in range({CHUNKS}):
        state, solver = run(state, solver, k * {CHUNK})
        jax.block_until_ready(state)
        print("steps", (k + 1) * {CHUNK}, time.monotonic(), flush=True)
        time.sleep(0.01)
    saver.postprocess(state, None)
    print("done", flush=True)
""")


def _lines(proc, into: queue.Queue) -> None:
    for line in proc.stdout:
        into.put((time.monotonic(), line.split()))


def _kill_at(proc, delay: float) -> tuple[float, list[tuple[int, float]]]:
    """SIGKILL ``proc`` ``delay`` s after its first progress line; returns (kill time, [(steps, time)])."""
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_lines, args=(proc, lines), daemon=True).start()
    progress = []
    first = lines.get(timeout=120)
    progress.append((int(first[1][1]), float(first[1][2])))
    deadline = time.monotonic() + delay
    while time.monotonic() < deadline:
        try:
            _, words = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            if len(words) == 3 and words[0] == "steps":
                progress.append((int(words[1]), float(words[2])))
        except queue.Empty:
            break
    killed = time.monotonic()
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    while not lines.empty():  # lines printed before the kill landed
        _, words = lines.get()
        if len(words) == 3 and words[0] == "steps" and float(words[2]) <= killed:
            progress.append((int(words[1]), float(words[2])))
    return killed, progress


@pytest.fixture(scope="module")
def stream_script(tmp_path_factory):
    path = tmp_path_factory.mktemp("stream") / "stream.py"
    path.write_text(STREAM)
    return path


@pytest.fixture(scope="module")
def reference(stream_script):
    """The uninterrupted run's samples, (chain, draw, ...)."""
    return samples_of_a_whole_run(stream_script, stream_script.parent / "reference.h5")


def test_sigkill_while_streaming_at_20_random_moments(tmp_path, stream_script, reference, figures):
    rng = np.random.default_rng(2024)
    survived, lag = 0, []
    for k, delay in enumerate(rng.uniform(0.0, 1.5, size=KILLS)):
        path = tmp_path / f"run{k}.h5"
        killed, progress = _kill_at(python(stream_script, path), float(delay))
        # 1. The file opens, and so does its checkpoint, with plain readers too after recover.
        info = jaxsave.file_info(path)
        counts = info.sample_counts
        got = jaxsave.load_samples(path) if info.variables else None
        # 2. Every chain holds a prefix of the uninterrupted run.
        for c, n in enumerate(counts.tolist()):
            for leaf in ("x", "i"):
                np.testing.assert_array_equal(got[leaf][c, :n], reference[leaf][c, :n])
        # 3. ... at most one flush interval (plus the writer's lag) short of what the sampler had produced.
        due = max([s for s, t in progress if t <= killed - FLUSH_INTERVAL - WRITER_LAG], default=0)
        assert counts.size == 0 or counts.min() >= due, (counts, due, progress)
        produced = max(s for s, _ in progress)
        if counts.size:
            behind = [t for s, t in progress if s > counts.min()]
            lag.append(killed - min(behind) if behind else 0.0)
        assert counts.size == 0 or counts.max() <= produced + CHUNK
        # 4. The checkpoint is a complete one: a multiple of EVERY, counting only stored samples,
        #    holding the sampler state of that step.
        if os.path.exists(f"{path}.ckpt"):
            ckpt = jaxsave.resume(path)
            steps = np.atleast_1d(ckpt.step)
            assert (steps % EVERY == 0).all() and (steps > 0).all()
            assert (np.atleast_1d(ckpt.sample_count) <= counts).all()
            for c, s in zip(ckpt.chain_ids.tolist(), steps.tolist()):
                np.testing.assert_array_equal(np.asarray(ckpt.solver_state["x"])[c], reference["x"][c, s - 1])
        # 5. Taking the file over (mode="a") clears the kill's leftovers.
        jaxsave.HDF5Collector(path, mode="a").close()
        left = [
            n
            for n in os.listdir(tmp_path)
            if n.startswith(path.name) and n.endswith(".tmp") or is_temporary(n)
        ]
        assert left == [], left
        assert (jaxsave.file_info(path).sample_counts == counts).all()
        survived += 1
    figures(
        "kills",
        "streaming (3 vmapped chains, HDF5)",
        survived=survived,
        tried=KILLS,
        flush_interval_s=FLUSH_INTERVAL,
        max_behind_s=round(max(lag, default=0.0), 3),
    )


SAVE = textwrap.dedent("""
    import sys, numpy as np, jaxsave
    path = sys.argv[1]
    for v in range(1, 10**6):
        jaxsave.save_pytree(path, {"a": np.full(2**19, v, np.float64), "b": [np.full((512, 64), v, np.int32)]},
                            metadata={"v": v})
        print("saved", v, flush=True)
""")

CHECKPOINTER = textwrap.dedent("""
    import sys, numpy as np, jaxsave
    ckpt = jaxsave.Checkpointer(sys.argv[1], keep=2, filename=sys.argv[2])
    for step in range(1, 10**6):
        ckpt.save(step, {"w": np.full(2**19, step, np.float64), "step": step})
        print("saved", step, flush=True)
""")


def _kill_after(proc, delay: float) -> int:
    """SIGKILL ``proc`` ``delay`` s after its first "saved" line; returns the last version it reported."""
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_lines, args=(proc, lines), daemon=True).start()
    last = int(lines.get(timeout=120)[1][1])
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    while not lines.empty():
        words = lines.get()[1]
        if len(words) == 2 and words[0] == "saved" and words[1].isdigit():  # not a line cut by the kill
            last = max(last, int(words[1]))
    return last


@pytest.mark.parametrize("fmt", ["jaxsave", "npz", "safetensors", "h5"])
def test_sigkill_during_save_pytree(tmp_path, fmt, figures):
    script = tmp_path / "save.py"
    script.write_text(SAVE)
    rng = np.random.default_rng(len(fmt))
    kills = KILLS // 4
    survived = 0
    for k, delay in enumerate(rng.uniform(0.0, 0.4, size=kills)):
        path = tmp_path / f"tree{k}.{fmt}"
        last = _kill_after(python(script, path), float(delay))
        tree = jaxsave.load_pytree(path, as_numpy=True)  # a complete version: the last saved or the next
        v = int(tree["a"][0])
        assert v in (last, last + 1)
        assert (tree["a"] == v).all() and (tree["b"][0] == v).all()
        assert jaxsave.read_metadata(path) == {"v": v}
        survived += 1
    figures("kills", f"save_pytree ({fmt})", survived=survived, tried=kills)


def test_sigkill_during_checkpointer_saves(tmp_path, figures):
    script = tmp_path / "ckpt.py"
    script.write_text(CHECKPOINTER)
    rng = np.random.default_rng(11)
    survived = 0
    for k, delay in enumerate(rng.uniform(0.0, 0.4, size=KILLS)):
        directory = tmp_path / f"ckpt{k}"
        name = "ckpt_{step:06d}" + (".jaxsave", ".safetensors")[k % 2]
        last = _kill_after(python(script, directory, name), float(delay))
        ckpt = jaxsave.Checkpointer(directory, keep=2, filename=name)  # cleans the dead writer's temporaries
        assert not [n for n in os.listdir(directory) if is_temporary(n)]
        assert ckpt.latest_step() in (last, last + 1)
        for step in ckpt.steps():
            got_step, tree = ckpt.restore(step)
            assert got_step == step and (np.asarray(tree["w"]) == step).all() and int(tree["step"]) == step
        survived += 1
    figures("kills", "Checkpointer.save", survived=survived, tried=KILLS)


def test_stale_leftovers_of_a_killed_writer_are_removed_on_open(tmp_path):
    """A kill during a change leaves ``.<file>.<pid>.<hex>.jaxsave-tmp`` (or the checkpoint's): cleaned on open."""
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    path = tmp_path / "s.h5"
    jaxsave.HDF5Collector(path).close()
    stale = [
        tmp_path / f".s.h5.{dead.pid}.89abcdef.jaxsave-tmp",
        tmp_path / f".s.h5.ckpt.{dead.pid}.0123abcd.jaxsave-tmp",
    ]
    live = [
        tmp_path / f".s.h5.{os.getppid()}.89abcdef.jaxsave-tmp",  # a live process's change in progress
        tmp_path / f".other.h5.ckpt.{dead.pid}.0123abcd.jaxsave-tmp",
    ]  # another file's
    for p in stale + live:
        p.write_bytes(b"partial")
    jaxsave.HDF5Collector(path, mode="a").close()
    assert sorted(os.listdir(tmp_path)) == sorted(["s.h5"] + [p.name for p in live])
