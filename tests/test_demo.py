"""The demo: ``jaxsave demo`` runs real SGLD chains on real data, streams them, prints a summary."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("sklearn")

from jaxsave import demo  # noqa: E402
from jaxsave.__main__ import main  # noqa: E402


def test_cli_demo_writes_the_file_and_prints_the_summary(tmp_path, capsys):
    path = tmp_path / "out.h5"
    code = main(
        [
            "demo",
            "--chains",
            "2",
            "--steps",
            "3000",
            "--burn-in",
            "1000",
            "--thin",
            "5",
            "--output",
            str(path),
            "--seed",
            "1",
        ]
    )
    assert code == 0
    out = capsys.readouterr()
    assert "breast-cancer data (569 x 30)" in out.out
    assert "r_hat" in out.out and "ess_bulk" in out.out and "samples/s" in out.out
    lines = out.out.splitlines()
    assert any(line.startswith("b ") for line in lines)
    assert sum(line.startswith("w[") for line in lines) == 30
    assert "sampling" in out.err and "3000/3000" in out.err  # the tqdm bar, on stderr
    assert "posterior-predictive accuracy" in out.out and "worst r_hat" in out.out
    assert f"jaxsave inspect {path}" in out.out

    import jaxsave

    info = jaxsave.file_info(path)
    assert info.sample_counts.tolist() == [400, 400]
    assert {(v.group, v.name) for v in info.variables} == {
        ("posterior", "w"),
        ("posterior", "b"),
        ("sample_stats", "lp"),
    }
    idata = jaxsave.to_inference_data(path)
    assert dict(idata.posterior["w"].sizes) == {"chain": 2, "draw": 400, "w_dim_0": 30}


def test_default_run_mixes_and_predicts(tmp_path):
    """The defaults (what `jaxsave demo` runs) give converged chains and a sensible classifier."""
    result = demo.run(output=tmp_path / "chains.h5", progress=False, quiet=True)
    assert result.sample_counts.tolist() == [2000] * 4
    assert result.samples["w"].shape == (4, 2000, 30)
    rhat = [row["r_hat"] for row in result.summary]
    ess = [row["ess_bulk"] for row in result.summary]
    assert len(result.summary) == 31
    assert max(rhat) < 1.01 and min(ess) > 400, (max(rhat), min(ess))  # what the demo prints as met
    assert result.accuracy > 0.95  # the data set is nearly separable
    # The chains differ (own keys and starts) but agree on the posterior.
    means = result.samples["w"].mean(axis=1)
    assert not np.allclose(result.samples["w"][0, :10], result.samples["w"][1, :10])
    assert np.abs(means - means.mean(0)).max() < 0.5


def test_no_save_gives_the_samples_of_the_file(tmp_path):
    """Streaming to HDF5 and keeping everything on the device store the same draws."""
    kwargs = dict(chains=2, steps=600, burn_in=100, thin=7, seed=3, progress=False, quiet=True)
    from_file = demo.run(output=tmp_path / "c.h5", collector="hdf5", **kwargs)
    on_device = demo.run(output=tmp_path / "unused.h5", collector="no_save", **kwargs)
    assert not (tmp_path / "unused.h5").exists() and on_device.output is None
    assert from_file.sample_counts.tolist() == on_device.sample_counts.tolist() == [72, 72]
    # The two loops are different XLA programs: jax 0.12.1 fuses them differently, and the draws
    # differ in the last bit (9.5e-7 at most). Thinned draws 7 steps apart differ by ~0.1, so a row
    # stored in the wrong place fails this by five orders of magnitude.
    for key in ("w", "b", "lp"):
        np.testing.assert_allclose(from_file.samples[key], on_device.samples[key], rtol=1e-5, atol=1e-5)


def test_memory_collector_via_the_cli(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert (
        main(
            [
                "demo",
                "--collector",
                "memory",
                "--chains",
                "1",
                "--steps",
                "300",
                "--burn-in",
                "100",
                "--thin",
                "1",
                "--no-progress",
            ]
        )
        == 0
    )
    out = capsys.readouterr()
    assert "collector: memory" in out.out and "200 samples kept ([200] per chain)" in out.out
    assert "sampling" not in out.err and not list(tmp_path.iterdir())  # no bar, no file


def test_bad_options_are_usage_errors(tmp_path, capsys):
    assert main(["demo", "--burn-in", "50", "--steps", "50", "--output", str(tmp_path / "x.h5")]) == 2
    assert "burn_in (50) must be smaller than steps (50)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["demo", "--collector", "parquet"])


SHORT = ["--chains", "2", "--steps", "600", "--burn-in", "100", "--thin", "5", "--no-progress"]


def test_an_output_ending_in_zarr_is_a_zarr_store(tmp_path, capsys):
    pytest.importorskip("zarr")
    import jaxsave

    path = tmp_path / "out.zarr"
    assert main(["demo", *SHORT, "--output", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"collector: zarr -> {path}" in out and f"jaxsave inspect {path}" in out
    assert (path / "zarr.json").is_file() and not (tmp_path / "chains.h5").exists()
    info = jaxsave.file_info(path)
    assert info.sample_counts.tolist() == [100, 100]
    assert {(v.group, v.name) for v in info.variables} == {
        ("posterior", "w"),
        ("posterior", "b"),
        ("sample_stats", "lp"),
    }


def test_zarr_output_without_zarr_names_the_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "zarr", None)  # `import zarr` now raises ImportError
    assert main(["demo", *SHORT, "--output", str(tmp_path / "out.zarr")]) == 2
    assert "pip install 'jaxsave[zarr]'" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_hdf5_collector_with_a_zarr_output_is_refused(tmp_path, capsys):
    assert main(["demo", *SHORT, "--collector", "hdf5", "--output", str(tmp_path / "out.zarr")]) == 2
    assert "names a Zarr store (.zarr), but the collector is hdf5" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_numpy_diagnostics_agree_with_arviz():
    az = pytest.importorskip("arviz")
    rng = np.random.default_rng(0)
    ar = np.zeros((4, 2000))
    for t in range(1, ar.shape[1]):
        ar[:, t] = 0.8 * ar[:, t - 1] + rng.normal(size=4)
    shifted = ar + np.array([0.0, 0.0, 0.0, 1.0])[:, None]
    for draws in (ar, shifted):
        ess_az = float(az.ess(draws, method="mean"))  # same estimator, no rank normalization
        rhat_az = float(az.rhat(draws, method="split"))
        assert demo.effective_sample_size(draws) == pytest.approx(ess_az, rel=0.02)
        assert demo.split_rhat(draws) == pytest.approx(rhat_az, rel=1e-3)


def test_summary_without_arviz_uses_numpy(monkeypatch):
    monkeypatch.setitem(sys.modules, "arviz", None)  # `import arviz` now raises ImportError
    rng = np.random.default_rng(1)
    rows = demo.summarize({"b": rng.normal(size=(2, 500)), "w": rng.normal(size=(2, 500, 3))})
    assert [r["name"] for r in rows] == ["b", "w[0]", "w[1]", "w[2]"]
    assert all(np.isnan(r["ess_tail"]) and abs(r["r_hat"] - 1) < 0.02 for r in rows)


@pytest.mark.slow
def test_console_script_and_python_m(tmp_path):
    """The README's command, as a fresh process would run it (entry point and `python -m`)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    for cmd in (
        ["jaxsave", "demo", "--steps", "2000", "--burn-in", "500"],
        [sys.executable, "-m", "jaxsave", "demo", "--steps", "2000", "--burn-in", "500"],
    ):
        if cmd[0] == "jaxsave":
            exe = os.path.join(os.path.dirname(sys.executable), "jaxsave")
            if not os.path.exists(exe):
                continue
            cmd[0] = exe
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stderr
        assert "samples/s" in proc.stdout and (tmp_path / "chains.h5").exists()
        (tmp_path / "chains.h5").unlink()
