"""A second process follows a sample file while this one still writes it (SWMR)."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np

import jaxsave

ROOT = pathlib.Path(__file__).resolve().parents[1]

READER = textwrap.dedent("""
    import json, sys, time
    import numpy as np
    import jaxsave

    live = jaxsave.open_live(sys.argv[1])
    for line in sys.stdin:
        want = int(line)
        deadline = time.monotonic() + 30
        while True:
            samples = live.refresh()
            if live.sample_counts.min() >= want or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        counts = live.sample_counts.tolist()
        ok = all(np.array_equal(samples["v"][c, :n], c * 1000 + np.arange(n)) for c, n in enumerate(counts))
        info = jaxsave.file_info(sys.argv[1])
        print(json.dumps({"counts": counts, "ok": ok, "open": info.open_for_writing}), flush=True)
""")


def test_a_second_process_reads_while_the_sampler_writes(tmp_path):
    path = tmp_path / "live.h5"
    init, save, post = jaxsave.save(jaxsave.HDF5Collector(path, flush_interval=0), block_size=10)
    state = init({"v": jnp.zeros(2, jnp.int32)}, None, chains=2)

    def chain(s, c):
        return jax.lax.scan(lambda s, i: save(s, True, {"v": c * 1000 + s.step}), s, jnp.arange(30))[0]

    run = jax.jit(jax.vmap(chain))
    state = run(state, jnp.arange(2))
    script = tmp_path / "reader.py"
    script.write_text(READER)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    reader = subprocess.Popen(
        [sys.executable, str(script), str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    )
    try:
        seen = []
        for k in range(1, 4):
            if k > 1:
                state = run(state, jnp.arange(2))
            reader.stdin.write(f"{30 * k}\n")
            reader.stdin.flush()
            seen.append(json.loads(reader.stdout.readline()))
        post(state, None)
        reader.stdin.write("90\n")
        reader.stdin.flush()
    finally:
        reader.stdin.close()
    final = json.loads(reader.stdout.readline())
    assert reader.wait(timeout=60) == 0
    assert [s["counts"] for s in seen] == [[30, 30], [60, 60], [90, 90]]
    assert all(s["ok"] and s["open"] for s in seen)  # read while the writer had the file open
    assert final == {"counts": [90, 90], "ok": True, "open": False}
    np.testing.assert_array_equal(jaxsave.load_samples(path)["v"][1], 1000 + np.arange(90))


def test_a_reader_in_this_process_polling_while_the_file_changes(tmp_path):
    """file_info polled from a thread of the writer's own process, while the writer creates its
    datasets (a copy that replaces the file, then reopened): the writer waits for the reader's
    open instead of failing with "file is already open" (before the fix it failed every time we ran it)."""
    import threading

    path = tmp_path / "s.h5"
    for attempt in range(5):
        path.unlink(missing_ok=True)
        saver = jaxsave.save(
            jaxsave.HDF5Collector(path, flush_interval=0.0), checkpoint_every=64, block_size=16
        )
        state = saver.init({"i": jnp.zeros((), jnp.int32), "w": jnp.zeros(1024)}, {"n": jnp.int32(0)})

        def step(s, i):
            return saver.save(s, True, {"i": i, "w": jnp.full(1024, i, jnp.float32)}, solver_state={"n": i})

        run = jax.jit(lambda s, k: jax.lax.scan(lambda s, i: step(s, k * 64 + i), s, jnp.arange(64))[0])
        done = threading.Event()

        def poll():
            while not done.is_set():
                try:
                    jaxsave.file_info(path)
                except (FileNotFoundError, jaxsave.FileFormatError):
                    pass  # not created yet, or caught mid-replace: readers retry

        reader = threading.Thread(target=poll)
        reader.start()
        try:
            for k in range(4):
                state = run(state, k)
            assert int(saver.postprocess(state, None)["sample_count"]) == 256
        finally:
            done.set()
            reader.join()
        np.testing.assert_array_equal(jaxsave.load_samples(path)["i"][0], np.arange(256))
