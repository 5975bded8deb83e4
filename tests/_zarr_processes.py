"""Starting the 2 jax.distributed processes that write one Zarr store (tests/_zarr_multiprocess_child.py).

Used by tests/test_zarr_multiprocess.py and tests/reliability/test_zarr_multiprocess_kill.py.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from _helpers import child_env, free_port

HERE = Path(__file__).parent
ROOT = HERE.parent
CHILD = HERE / "_zarr_multiprocess_child.py"
CHILD_TIMEOUT_S = 180
#: Chains per process, processes (as in the child).
LOCAL, PROCESSES = 4, 2


def start_processes(store, mode: str, **env: str) -> list[subprocess.Popen]:
    """The processes of one run on a fresh loopback coordinator, writing ``store`` (output piped)."""
    port = free_port()
    return [
        subprocess.Popen(
            [sys.executable, str(CHILD), str(port), str(PROCESSES), str(pid), str(store), mode],
            env=child_env(**env),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for pid in range(PROCESSES)
    ]


def wait_all(procs: list[subprocess.Popen], timeout: float = CHILD_TIMEOUT_S) -> list[str]:
    """Every process's (remaining) output, once all have ended; all are killed if one outlives ``timeout``."""
    outputs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=timeout)
            outputs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return outputs
