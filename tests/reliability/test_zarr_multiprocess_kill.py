"""SIGKILL one of 2 jax.distributed processes that stream into ONE Zarr store, at a random moment.

The processes (tests/_zarr_multiprocess_child.py, mode ``long``) write their own chains of the
shared store. A killed process loses only its own unflushed blocks: every chain of a process that
lives on is complete, every chain of the killed one reads as an exact prefix of what it saved.
Killing process 0, which runs JAX's coordinator, makes JAX terminate process 1 as well (its
runtime does that, not jaxsave): then both processes' chains are exact prefixes.
"""

from __future__ import annotations

import random
import signal
import time

import numpy as np
import pytest
from _zarr_processes import LOCAL, PROCESSES, start_processes, wait_all

import jaxsave

zarr = pytest.importorskip("zarr")
pytestmark = [pytest.mark.reliability, pytest.mark.timeout(600)]

ROUNDS, STEPS = 400, 8  # 3200 draws per chain, blocks of 4 rows
TOTAL = ROUNDS * STEPS


def wait_for_line(proc, text: str, timeout: float = 120) -> list[str]:
    """Read ``proc``'s output until a line contains ``text``; the lines read."""
    lines, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if text in line:
            return lines
    raise AssertionError(f"no {text!r} from the child (exit {proc.poll()}):\n{''.join(lines)[-4000:]}")


def check_prefixes(store) -> list[int]:
    """Every chain's counted draws are exactly what it saved; its count, per chain."""
    group = zarr.open_group(str(store), mode="r")
    counts = group["sample_counts"][:].tolist()
    assert len(counts) == LOCAL * PROCESSES
    x, lp = group["posterior/x"], group["sample_stats/lp"]
    for c, n in enumerate(counts):
        want = 1000.0 * c + np.arange(n)
        np.testing.assert_array_equal(x[c, :n, 0], want, err_msg=f"chain {c}, {n} draws counted")
        np.testing.assert_array_equal(x[c, :n, 2], want)
        np.testing.assert_array_equal(lp[c, :n], -want)
    # jaxsave's reader sees the same counts and draws.
    assert jaxsave.file_info(store).sample_counts.tolist() == counts
    samples = jaxsave.load_samples(store)
    for c, n in enumerate(counts):
        np.testing.assert_array_equal(samples["x"][c, :n, 0], 1000.0 * c + np.arange(n))
    return counts


@pytest.mark.parametrize("victim", [1, 0])
def test_killed_process_loses_only_its_own_unflushed_blocks(tmp_path, victim, figures):
    store = tmp_path / "run.zarr"
    seed = random.randrange(2**32)
    delay = random.Random(seed).uniform(0.0, 1.5)
    procs = start_processes(store, "long", ROUNDS=str(ROUNDS))
    try:
        heard = {pid: wait_for_line(p, f"process {pid}: streaming") for pid, p in enumerate(procs)}
    except AssertionError as error:  # show every process's output: one's failure ends the other
        outputs = wait_all(procs, timeout=30)
        raise AssertionError(
            f"{error}\nall outputs:\n" + "\n---\n".join(o[-3000:] for o in outputs)
        ) from None
    time.sleep(delay)
    procs[victim].send_signal(signal.SIGKILL)
    outputs = wait_all(procs)
    outputs = ["".join(heard[pid]) + out for pid, out in enumerate(outputs)]
    assert procs[victim].returncode == -signal.SIGKILL
    counts = check_prefixes(store)
    mine = lambda pid: counts[LOCAL * pid : LOCAL * (pid + 1)]  # noqa: E731
    other = 1 - victim
    assert max(mine(victim)) < TOTAL, f"process {victim} had finished before the kill (seed {seed}): {counts}"
    if victim == 1:  # the survivor ran to the end: all its chains complete
        assert procs[other].returncode == 0 and "process 0: ok" in outputs[other], outputs[other][-4000:]
        assert mine(other) == [TOTAL] * LOCAL, counts
    elif procs[other].returncode == 0:  # process 1 finished before the coordinator died
        assert mine(other) == [TOTAL] * LOCAL, counts
    else:  # JAX terminated it when the coordinator died; its chains are prefixes too (checked)
        assert "JAX distributed service detected fatal errors" in outputs[other], outputs[other][-4000:]
    figures("zarr-multiprocess-kill", f"victim {victim}", seed=seed, delay_s=round(delay, 3), counts=counts)
