"""Helpers of the reliability suite: child processes, the fuzzing profile."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

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


def mount_tmpfs(directory: str | os.PathLike, size: str) -> bool:
    """Mount a tmpfs of ``size`` (``"1m"``) on ``directory``; ``False`` where that is not allowed."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    cmd = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)]
    return subprocess.run(cmd, capture_output=True).returncode == 0
