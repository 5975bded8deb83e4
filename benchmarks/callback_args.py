"""What each ``io_callback`` argument costs: 200 callbacks in a jitted scan, 1, 2 or 3 arguments.

The same bytes each time (a 500-row block of 10 floats, its int32 header, a 10-float solver
state), as one ``uint8`` array or as separate arrays. Best of ``--repeats`` interleaved rounds,
wall and CPU time (``getrusage``: every thread of the process).

    python benchmarks/callback_args.py
"""

from __future__ import annotations

import argparse
import resource
import time

import jax
import jax.numpy as jnp
from jax.experimental import io_callback

ROWS, CALLS = 500, 200


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _receive(*arrays) -> None:
    pass


def make(arguments: int):
    """The jitted loop of ``CALLS`` callbacks of ``arguments`` arguments."""

    def body(c, _):
        header = jnp.zeros((6 + ROWS,), jnp.int32) + c
        data = jnp.zeros((ROWS, 10), jnp.float32) + c
        solver = jnp.zeros((10,), jnp.float32) + c
        if arguments == 1:
            args = [
                jnp.zeros((header.nbytes + data.nbytes + solver.nbytes,), jnp.uint8) + c.astype(jnp.uint8)
            ]
        else:
            args = [header, data, solver][:arguments]
        io_callback(_receive, None, *args, ordered=False)
        return c + 1, None

    return jax.jit(lambda: jax.lax.scan(body, jnp.int32(0), length=CALLS)[0])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    runs = {n: make(n) for n in (1, 2, 3)}
    for run in runs.values():
        run().block_until_ready()
    best: dict[int, tuple[float, float]] = {}
    for _ in range(args.repeats):
        for n, run in runs.items():
            wall, cpu = time.perf_counter(), _cpu_s()
            run().block_until_ready()
            wall, cpu = time.perf_counter() - wall, _cpu_s() - cpu
            old = best.get(n, (float("inf"), float("inf")))
            best[n] = (min(old[0], wall), min(old[1], cpu))
    for n, (wall, cpu) in best.items():
        print(f"{n} argument(s): {wall * 1e3:.1f} ms wall, {cpu * 1e3:.1f} ms CPU per {CALLS} callbacks")


if __name__ == "__main__":
    main()
