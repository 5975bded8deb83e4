"""SIGKILL a sampler streaming into a Zarr store at random moments, and kill-then-resume.

Whatever the moment, the store opens (with jaxsave's readers and with xarray), every chain
holds a prefix of the uninterrupted run's samples (at most one flush interval short), the
checkpoint is a complete one, and a run resumed from it ends bit-identical to an
uninterrupted run. The draw axis grows while the run goes (the count is unknown), so kills
also land between a resize and the writes it makes room for.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import test_kills
import test_resume_kill
from _reliability import python, samples_of_a_whole_run
from test_kills import _kill_at
from test_resume_kill import run_child

import jaxsave

zarr = pytest.importorskip("zarr", reason="the Zarr tests need zarr (pip install 'jaxsave[zarr]')")
xr = pytest.importorskip("xarray")

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(900)]

KILLS = 20
FLUSH_INTERVAL = 0.2
WRITER_LAG = 1.5  # the writer thread's time from the sampler to the store, on 2 busy cores: the zarr event
# loop's thread is one more thread to schedule (0.5 s, as for HDF5, failed 2 of 3 runs under load 10-15)
CHAINS, CHUNK, CHUNKS, EVERY = 3, 64, 40, 128
CHECKPOINT_KEY = os.path.join("sample_counts", "jaxsave_checkpoints", "0")

#: The HDF5 kill test's sampler, writing a Zarr store.
STREAM = test_kills.STREAM.replace("jaxsave.HDF5Collector(path", "jaxsave.ZarrCollector(path")
assert STREAM != test_kills.STREAM


@pytest.fixture(scope="module")
def stream_script(tmp_path_factory):
    path = tmp_path_factory.mktemp("zarr_stream") / "stream.py"
    path.write_text(STREAM)
    return path


@pytest.fixture(scope="module")
def reference(stream_script):
    return samples_of_a_whole_run(stream_script, stream_script.parent / "reference.zarr")


def test_sigkill_while_streaming_to_zarr_at_20_random_moments(tmp_path, stream_script, reference, figures):
    rng = np.random.default_rng(2025)
    survived = trimmed = 0
    for k, delay in enumerate(rng.uniform(0.0, 1.5, size=KILLS)):
        path = tmp_path / f"run{k}.zarr"
        killed, progress = _kill_at(python(stream_script, path), float(delay))
        if not (path / "zarr.json").exists():
            continue  # killed before the store was made
        # 1. The store opens with jaxsave's readers and with xarray.
        info = jaxsave.file_info(path)
        counts = info.sample_counts
        got = jaxsave.load_samples(path) if info.variables and counts.size else None
        if counts.size:  # a kill between two arrays' resizes leaves them unequal: recover aligns them
            trimmed += jaxsave.recover(path)
            tree = xr.open_datatree(path, engine="zarr", consolidated=False)
            assert tree["posterior"]["x"].shape[:2] == (CHAINS, counts.max())
        # 2. Every chain holds an exact prefix of the uninterrupted run.
        for c, n in enumerate(counts.tolist()):
            for leaf in ("x", "i"):
                np.testing.assert_array_equal(got[leaf][c, :n], reference[leaf][c, :n])
        # 3. ... at most one flush interval (plus the writer's lag) short of what the sampler had produced.
        due = max([s for s, t in progress if t <= killed - FLUSH_INTERVAL - WRITER_LAG], default=0)
        assert counts.size == 0 or counts.min() >= due, (counts, due, progress)
        assert counts.size == 0 or counts.max() <= max(s for s, _ in progress) + CHUNK
        # 4. The checkpoint is a complete one, counting only stored samples.
        if (path / CHECKPOINT_KEY).exists():
            ckpt = jaxsave.resume(path)
            steps = np.atleast_1d(ckpt.step)
            assert (steps % EVERY == 0).all() and (steps > 0).all()
            assert (np.atleast_1d(ckpt.sample_count) <= counts).all()
            for c, s in zip(ckpt.chain_ids.tolist(), steps.tolist()):
                np.testing.assert_array_equal(np.asarray(ckpt.solver_state["x"])[c], reference["x"][c, s - 1])
        # 5. Taking the store over (mode="a") removes the killed writes' temporaries.
        jaxsave.ZarrCollector(path, mode="a").close()
        left = [n for _, _, files in os.walk(path) for n in files if n.endswith(".partial")]
        assert not left, left
        survived += int(counts.size > 0 and counts.min() > 0)
    assert survived >= KILLS // 2, f"only {survived} kills landed while samples were being written"
    figures("kills", "ZarrCollector streaming", survived=survived, tried=KILLS, trimmed_by_recover=trimmed)


#: The HDF5 kill-and-resume test's sampler, writing a Zarr store.
RESUME = test_resume_kill.CHILD.replace("jaxsave.HDF5Collector(path", "jaxsave.ZarrCollector(path")
assert RESUME.count("jaxsave.ZarrCollector(path") == 2


def _has_checkpoint(path) -> bool:
    return (path / CHECKPOINT_KEY).exists()


def _stored(path):
    group = zarr.open_group(path, mode="r")
    return group["sample_counts"][:], {"x": group["posterior/x"][:], "lp": group["posterior/lp"][:]}


@pytest.mark.parametrize("chains,thin", [(1, 3), (3, 2)])
def test_sigkill_then_resume_gives_the_uninterrupted_store(tmp_path, chains, thin):
    script = tmp_path / "child.py"
    script.write_text(RESUME)
    total, every = 400, 40
    reference = tmp_path / "reference.zarr"
    run_child(script, reference, "fresh", chains, total, every, thin)
    want_counts, want = _stored(reference)
    for trial, kill_at in enumerate(sorted(np.random.default_rng(3).integers(60, total - 60, size=2))):
        path = tmp_path / f"killed{trial}.zarr"
        run_child(script, path, "fresh", chains, total, every, thin, int(kill_at), _has_checkpoint)
        run_child(script, path, "resume", chains, total, every, thin)
        counts, got = _stored(path)
        np.testing.assert_array_equal(counts, want_counts)
        for k in want:
            assert got[k].shape == want[k].shape
            np.testing.assert_array_equal(got[k], want[k])  # bit-identical, none duplicated or missing
        tree = xr.open_datatree(path, engine="zarr")
        np.testing.assert_array_equal(tree["posterior"]["x"].values.reshape(want["x"].shape), want["x"])
