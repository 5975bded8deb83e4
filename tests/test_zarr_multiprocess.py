"""Many processes, one Zarr store: 2 jax.distributed processes (2 CPU devices each) on loopback.

Both write their own chains into ONE store at the same time (tests/_zarr_multiprocess_child.py):
no merge step, global chain ids, and xarray, ArviZ and jaxsave's readers see one posterior of
all chains. The kill tests are in tests/reliability/test_zarr_multiprocess_kill.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from _zarr_processes import LOCAL, PROCESSES, start_processes, wait_all

import jaxsave

zarr = pytest.importorskip("zarr")
# 2 x 2 process starts: about 25 s on 2 idle cores, several times that on 2 cores shared with
# other jobs: more than the suite's 300 s timeout.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def run_processes(store, mode: str, **env: str) -> list[str]:
    procs = start_processes(store, mode, **env)
    outputs = wait_all(procs)
    for pid, out in enumerate(outputs):  # shown with any later failure of the test (captured stdout)
        print(f"--- process {pid} ({mode}), exit {procs[pid].returncode}:\n{out[-4000:]}")
    for pid, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0 and f"process {pid}: ok" in out, f"process {pid} failed:\n{out[-4000:]}"
    return outputs


def expected(draws: int) -> np.ndarray:
    """``x[..., 0]`` of every global chain (``lp`` is its negative): chain ``c`` at step ``i``."""
    return 1000.0 * np.arange(LOCAL * PROCESSES)[:, None] + np.arange(draws)[None, :]


def check_store(store, draws: int) -> None:
    """All chains of both processes, through jaxsave, zarr, xarray and ArviZ."""
    expect = expected(draws)
    samples = jaxsave.load_samples(store)
    np.testing.assert_array_equal(samples["x"][..., 0], expect)
    np.testing.assert_array_equal(samples["lp"], -expect)
    info = jaxsave.file_info(store)
    assert info.chains == LOCAL * PROCESSES and info.sample_counts.tolist() == [draws] * (LOCAL * PROCESSES)

    group = zarr.open_group(str(store), mode="r")
    assert group["posterior/x"].metadata.dimension_names == ("chain", "draw", "x_dim_0")
    assert group["sample_counts"][:].tolist() == [draws] * (LOCAL * PROCESSES)

    import xarray as xr

    tree = xr.open_datatree(str(store), engine="zarr")
    posterior = tree["posterior"].to_dataset()
    assert dict(posterior["x"].sizes) == {"chain": 8, "draw": 32, "x_dim_0": 3}
    np.testing.assert_array_equal(posterior["x"].values[:, :draws, 0], expect)
    np.testing.assert_array_equal(tree["sample_stats"]["lp"].values[:, :draws], -expect)

    idata = jaxsave.to_inference_data(store)
    assert dict(idata["posterior"]["x"].sizes)["chain"] == LOCAL * PROCESSES
    np.testing.assert_array_equal(idata["posterior"]["x"].values[..., 0], expect)

    import arviz as az

    if int(az.__version__.split(".")[0]) >= 1:  # ArviZ 1.x opens the store itself
        opened = az.from_zarr(str(store))
        np.testing.assert_array_equal(opened["posterior"]["x"].values[:, :draws, 0], expect)
        summary = az.summary(opened.sel(draw=slice(0, draws)), var_names=["x"])
    else:  # ArviZ 0.x reads zarr 2 only; xarray's DataTree converts
        opened = az.InferenceData.from_datatree(tree)
        summary = az.summary(opened.sel(draw=slice(0, draws)), var_names=["x"])
    assert len(summary) == 3


def check_who_wrote_what(log) -> None:
    """Process 0 writes every metadata key and its own chains' keys; process 1 only its own
    chains' data chunks, count keys and checkpoint; nobody deletes a key."""
    written = {}
    for pid in range(PROCESSES):
        lines = Path(f"{log}-{pid}").read_text().split()
        ops, keys = lines[0::2], lines[1::2]
        assert set(ops) <= {"set", "set_if_not_exists"}, set(ops)
        written[pid] = set(keys)

    def chain_of(key):  # the chain of a data chunk or count key, else None (metadata)
        parts = key.split("/")
        if "c" in parts and not key.endswith("zarr.json"):
            return int(parts[parts.index("c") + 1])
        return None

    metadata = {k for k in written[0] if chain_of(k) is None and "jaxsave_checkpoints" not in k}
    assert {
        "zarr.json",
        "posterior/zarr.json",
        "posterior/x/zarr.json",
        "sample_stats/lp/zarr.json",
    } <= metadata
    assert "sample_counts/zarr.json" in metadata
    for pid in range(PROCESSES):
        mine = set(range(LOCAL * pid, LOCAL * (pid + 1)))
        data = {k for k in written[pid] if chain_of(k) is not None}
        assert {chain_of(k) for k in data} == mine, (pid, sorted(data))
        assert {f"sample_counts/c/{c}" for c in mine} <= data
        assert {f"posterior/x/c/{c}/0/0" for c in mine} <= data
        others = written[pid] - data - (metadata if pid == 0 else set())
        assert others == {f"sample_counts/jaxsave_checkpoints/{LOCAL * pid}"}, (pid, sorted(others))


def test_two_processes_write_one_store(tmp_path):
    """Both processes stream into one store at once; the store is one posterior of 8 chains."""
    store = tmp_path / "run.zarr"
    run_processes(store, "run", KEYLOG=str(tmp_path / "keys"))
    check_store(store, draws=16)
    check_who_wrote_what(tmp_path / "keys")
    group = zarr.open_group(str(store), mode="r")
    # Each process checkpointed its own chains into its own key.
    keys = sorted(k for k in os.listdir(store / "sample_counts" / "jaxsave_checkpoints"))
    assert keys == ["0", "4"], keys
    assert group.attrs["jaxsave_run"]  # the run id process 0 created the store with

    # Both resume from their own checkpoints into the same store, and continue every chain.
    run_processes(store, "resume")
    check_store(store, draws=32)
