"""The ``jaxsave`` command line: ``inspect`` and ``recover``."""

import os
import pathlib
import subprocess
import sys

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsave
from jaxsave.__main__ import build_parser, main

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sample_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "chains.h5"
    init, save, post = jaxsave.save(jaxsave.HDF5Collector(path, sample_stats=("lp",)), block_size=4)
    state = init(
        {
            "w": jnp.zeros((2, 3, 5), jnp.bfloat16),
            "lp": jnp.zeros(2),
            "key": jax.random.split(jax.random.key(0), 2),
        },
        None,
        chains=2,
    )
    run = jax.vmap(
        lambda s, n: jax.lax.scan(
            lambda s, i: save(
                s, i < n, {"w": jnp.zeros((3, 5), jnp.bfloat16), "lp": -1.0 * i, "key": jax.random.key(i)}
            ),
            s,
            jnp.arange(10),
        )[0]
    )
    post(jax.jit(run)(state, jnp.array([10, 6])), None)
    return path


def test_inspect_prints_chains_variables_shapes_dtypes_counts(sample_file, capsys):
    assert main(["inspect", str(sample_file)]) == 0
    out = capsys.readouterr().out
    assert "jaxsave format 1" in out and "layout 'posterior'" in out
    assert "chains:   2" in out
    assert "samples:  [10, 6] (total 16)" in out
    lines = {line.split()[0]: line.split() for line in out.splitlines()[6:] if line.startswith("  ")}
    assert lines["w"] == ["w", "posterior", "(3,", "5)", "bfloat16"]
    assert lines["lp"] == ["lp", "sample_stats", "()", "float32"]
    assert lines["key"] == ["key", "posterior", "()", "key<threefry2x32>"]


def test_inspect_chains_layout(tmp_path, capsys):
    path = tmp_path / "old.h5"
    init, save, post = jaxsave.save(jaxsave.HDF5Collector(path, layout="chains"))
    post(save(init({"a": [jnp.zeros(4)]}), True, {"a": [jnp.ones(4)]})[0], None)
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "layout 'chains'" in out and "samples:  [1] (total 1)" in out
    assert "a/list_element_0  chain~*  (4,)" in out


def test_inspect_rejects_files_that_are_not_jaxsave(tmp_path, capsys):
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = np.zeros(2)
    text = tmp_path / "text.h5"
    text.write_text("not hdf5")
    for path, message in (
        (foreign, "not a jaxsave sample file"),
        (text, "cannot be opened as an HDF5 file"),
        (tmp_path / "missing.h5", "no such file"),
    ):
        assert main(["inspect", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("jaxsave inspect: error:") and message in err


def test_recover_subcommand(sample_file, capsys):
    assert main(["recover", str(sample_file)]) == 0
    assert "nothing to recover" in capsys.readouterr().out


def test_parser_has_one_function_per_subcommand():
    parser = build_parser()
    args = parser.parse_args(["inspect", "x.h5"])
    assert args.command.__name__ == "_cmd_inspect"
    with pytest.raises(SystemExit):
        parser.parse_args([])


def test_python_dash_m_jaxsave(sample_file, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    ok = subprocess.run(
        [sys.executable, "-m", "jaxsave", "inspect", str(sample_file)],
        env=env,
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0 and "samples:  [10, 6]" in ok.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "jaxsave", "inspect", str(tmp_path / "none.h5")],
        env=env,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "no such file" in bad.stderr and "Traceback" not in bad.stderr
