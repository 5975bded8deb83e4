"""Helpers of the reliability suite: child processes, the fuzzing profile, a small disk."""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import subprocess
import sys
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, settings

ROOT = pathlib.Path(__file__).resolve().parents[2]

#: Deterministic fuzzing (the same examples on every run), no deadline (files, 2 shared cores).
FUZZ = settings(
    derandomize=True,
    deadline=None,
    max_examples=500,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def child_env(**extra: str) -> dict:
    """Environment of a child Python process that imports this checkout's jaxsave on the CPU."""
    return {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", **extra}


def python(script: str | os.PathLike, *args, **kwargs) -> subprocess.Popen:
    """Start ``script`` with this interpreter, stdout and stderr piped as text."""
    kwargs.setdefault("env", child_env())
    return subprocess.Popen(
        [sys.executable, os.fspath(script), *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def samples_of_a_whole_run(script: str | os.PathLike, path: str | os.PathLike) -> dict:
    """The samples of ``script`` run to its end writing ``path`` (a kill test's reference)."""
    import jaxsave

    proc = python(script, path)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return jaxsave.load_samples(path)


@contextlib.contextmanager
def small_disk(tmp_path: pathlib.Path, size: str) -> Iterator[pathlib.Path]:
    """A tmpfs of ``size`` (``"1m"``) mounted on ``tmp_path / "small"`` for the ``with`` block and
    unmounted after it (what is open on it must be closed by then); the test is skipped where it
    cannot be mounted (it needs root and ``mount``)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    cmd = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)]
    if (
        os.geteuid() != 0
        or shutil.which("mount") is None
        or subprocess.run(cmd, capture_output=True).returncode
    ):
        pytest.skip(f"cannot mount a tmpfs of {size} here (needs root and mount)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
