"""Starting the 2 jax.distributed processes that write one Zarr store (tests/_zarr_multiprocess_child.py).

Used by tests/test_zarr_multiprocess.py and tests/reliability/test_zarr_multiprocess_kill.py.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

from _helpers import child_env, free_port

HERE = Path(__file__).parent
ROOT = HERE.parent
CHILD = HERE / "_zarr_multiprocess_child.py"
#: How long all processes of one run may take together (a run takes about 12 s on 2 idle cores,
#: several times that on 2 cores shared with other jobs).
CHILD_TIMEOUT_S = 300
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
    """Every process's (remaining) output, once all have ended; all are killed, and an
    ``AssertionError`` shows their output, if they are not done within ``timeout`` seconds.

    Every pipe is read at once (a thread each): waiting for one process while another's pipe
    is full would block that one in a write, and with it the first (at JAX's shutdown barrier).
    """
    outputs = [""] * len(procs)

    def drain(i: int) -> None:
        stream = procs[i].stdout
        if stream is not None:
            outputs[i] = stream.read()

    readers = [threading.Thread(target=drain, args=(i,), daemon=True) for i in range(len(procs))]
    for reader in readers:
        reader.start()
    deadline = time.monotonic() + timeout
    late = False
    try:
        for p in procs:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        late = True
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for reader in readers:
            reader.join(timeout=30)
    if late:
        raise AssertionError(
            f"the processes were not done within {timeout:g} s (killed); their output:\n"
            + "\n---\n".join(f"process {pid}:\n{out[-3000:]}" for pid, out in enumerate(outputs))
        )
    return outputs
