"""SIGKILL a process that streams to a Zarr store on S3 (moto's server on loopback), then resume.

The child (tests/_zarr_s3_child.py) streams tests/_zarr_sampler.py's chains to
``s3://<bucket>/run.zarr`` with a checkpoint every round; it is killed at a random moment.
The store then reads as an exact prefix of every chain of the uninterrupted run (through
jaxsave, zarr and xarray), its checkpoint counts only stored draws, and a run resumed
from it in this process ends bit for bit as the uninterrupted run.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from _reliability import child_env
from _zarr_sampler import CHAINS, ROUND, STATS, initial, kept, reference, run, same_bits, sample_template

import jaxsave

zarr = pytest.importorskip("zarr")
pytestmark = [pytest.mark.reliability, pytest.mark.timeout(600)]

TESTS = Path(__file__).resolve().parents[1]
STEPS = 1600  # 200 rounds of 8 steps, 800 draws per chain: 3 to 5 s of streaming
KILLS = 3


def stream_and_kill(bucket, name: str, target: int) -> str:
    """Start the child on ``s3://<bucket>/<name>``; SIGKILL it after its first checkpoint, once it
    reports round ``target`` (of ``STEPS // ROUND``): a point in the run, not a time, so a
    fast machine cannot finish first."""
    url = f"{bucket.url}/{name}"
    env = child_env()
    env["PYTHONPATH"] = os.pathsep.join([env["PYTHONPATH"], str(TESTS)])
    proc = subprocess.Popen(
        [sys.executable, str(TESTS / "_zarr_s3_child.py"), bucket.endpoint_url, url, str(STEPS)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        before = []  # the child's output up to "streaming" (warnings may come first)
        while not before or before[-1].strip() != "streaming":
            line = proc.stdout.readline()
            assert line, "".join(before)[-4000:] + f"\nthe child ended (exit {proc.wait()}) before streaming"
            before.append(line)
        checkpoint = f"{name}/sample_counts/jaxsave_checkpoints/0"
        deadline = time.monotonic() + 60
        while checkpoint not in bucket.keys(name) and time.monotonic() < deadline:
            time.sleep(0.05)  # the kill comes after the first checkpoint, at a random round
        while True:
            line = proc.stdout.readline()
            assert line, "".join(before)[-4000:] + f"\nthe child ended (exit {proc.wait()}) before the kill"
            if line.startswith("round ") and int(line.split()[1]) >= target:
                break
        proc.send_signal(signal.SIGKILL)
        rest = proc.stdout.read()
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, "".join(before)[-2000:] + rest[-4000:]
    assert "done" not in rest, f"the child finished before the kill (at round {target} of {STEPS // ROUND})"
    return url


def test_kill_streaming_to_s3_then_resume(s3_bucket, figures):
    want = reference(STEPS)
    rng = random.Random()
    seed = rng.randrange(2**32)
    rng.seed(seed)
    found = []
    for k in range(KILLS):
        name = f"run-{k}.zarr"
        url = stream_and_kill(s3_bucket, name, rng.randrange(1, 3 * STEPS // ROUND // 4))
        store = zarr.storage.FsspecStore.from_url(url, storage_options=s3_bucket.storage_options)

        # An exact prefix of every chain, through jaxsave, zarr and xarray.
        counts = jaxsave.file_info(store).sample_counts.tolist()
        assert len(counts) == CHAINS and max(counts) < kept(STEPS), counts
        got = jaxsave.load_samples(store)
        group = zarr.open_group(store, mode="r")
        for c, n in enumerate(counts):
            for leaf in ("x", "lp", "n"):
                assert same_bits(got[leaf][c, :n], want[leaf][c, :n]), (seed, k, c, n, leaf)
            assert same_bits(group["posterior/x"][c, :n], want["x"][c, :n])
        import xarray as xr

        tree = xr.open_datatree(  # a killed writer leaves no consolidated metadata
            url, engine="zarr", consolidated=False, storage_options=s3_bucket.storage_options
        )
        assert tree["posterior"]["x"].sizes["chain"] == CHAINS

        # Resume from the checkpoint in the store; the finished store is the uninterrupted run.
        collector = jaxsave.ZarrCollector(
            url, mode="a", sample_stats=STATS, storage_options=s3_bucket.storage_options
        )
        saver = jaxsave.save(collector, block_size=4, checkpoint_every=8)
        ckpt = jaxsave.resume(collector)
        step = int(np.asarray(ckpt.step)[0])
        assert all(n >= kept(step) for n in counts), (counts, step)  # the checkpoint counts stored draws only
        state = saver.init(
            sample_template(),
            initial(),
            jaxsave.static_information(samples_collected=kept(STEPS)),
            resume=ckpt,
        )
        state, _ = run(saver, state, ckpt.solver_state, step, STEPS)
        assert saver.postprocess(state, None)["sample_count"].tolist() == [kept(STEPS)] * CHAINS
        done = jaxsave.load_samples(store)
        for leaf in ("x", "lp", "n"):
            assert same_bits(done[leaf], want[leaf]), (seed, k, leaf)
        found.append((counts, step))
    figures("zarr-s3-kill", "kill and resume", seed=seed, counts_and_checkpoint_steps=found)
