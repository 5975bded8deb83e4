"""What each piece of ``save()``'s carried state costs, in hand-written loops without jaxsave.

One chain, the ``light`` SGLD step of ``benchmarks/peer.py`` (10 floats, keys as scan inputs),
every sample kept, 4096-row blocks. Variants, timed in interleaved rounds (best and median of
``--repeats``), wall us/step and ratio to ``stack``:

- ``baseline``: the loop without saving; ``stack``: the peer (samples as ``scan`` outputs);
- ``ring``: a ring buffer and a row counter, nothing sent (the buffer is an output of the loop);
- ``ring, cond``: the same, with a ``cond`` per full block that doubles the buffer (no callback);
- ``floor``: a ring buffer and a row counter, a no-op ``io_callback`` under ``cond`` per full block;
- ``two scalars``: what ``save()`` carries: the buffer, one keep bit a row, the step, and the
  packed row/span counter (``jaxsave/_stream/packing.py``), the same predicate and reset;
- ``one vector``: the same, with the step and the counter as one ``int32[2]`` (one add a step);
- ``no keep bits``: ``two scalars`` without the keep bits (one chain, every row kept).

    python benchmarks/carried_state.py --repeats 9
    python benchmarks/carried_state.py --repeats 9 --out benchmarks/results/carried_state-jax0.12.json

(the second on jax 0.12).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import io_callback

RESULTS = Path(__file__).parent / "results"
ROWS = 4096
SHIFT = 13  # rows in the low 13 bits, steps of the block above (as packing.SPAN_SHIFT)
SPAN_MAX = 262_143
KINDS = ("baseline", "stack", "ring", "ring, cond", "floor", "two scalars", "one vector", "no keep bits")


def _ignore(*args) -> None:
    return None


def _send(*arrays) -> None:
    io_callback(_ignore, None, *arrays, ordered=False)


def _sgld(x, k):
    return x - 1e-3 * x + 1e-2 * jax.random.normal(k, x.shape)


def _advance(fill, keep):
    step = jnp.where((fill >> SHIFT) < SPAN_MAX, 1 << SHIFT, 0)
    return fill + keep.astype(jnp.int32) + step


def _rows(fill):
    return fill & (2**SHIFT - 1)


def body(kind: str):
    """The scan body of ``kind``: ``(carry, key) -> (carry, output)``."""

    def step(carry, k):
        x = _sgld(carry[0], k)
        keep = jnp.bool_(True)
        if kind == "baseline":
            return (x,), None
        if kind == "stack":
            return (x,), x
        if kind in ("ring", "ring, cond"):
            _, buf, n = carry
            buf = lax.dynamic_update_slice(buf, x[None], (n, 0))
            n = n + 1
            full = n == ROWS
            if kind == "ring, cond":
                buf = lax.cond(full, lambda: buf * 2, lambda: buf)
            return (x, buf, jnp.where(full, 0, n)), None
        if kind == "floor":
            _, buf, n = carry
            buf = lax.dynamic_update_slice(buf, x[None], (n, 0))
            n = n + 1
            full = n == ROWS
            lax.cond(full, lambda: _send(buf), lambda: None)
            return (x, buf, jnp.where(full, 0, n)), None
        if kind == "one vector":
            _, buf, mask, counters = carry
            row = _rows(counters[1])
            buf = lax.dynamic_update_slice(buf, x[None], (row, 0))
            mask = lax.dynamic_update_slice(mask, keep[None], (row,))
            counters = counters + jnp.stack([jnp.int32(1), _advance(counters[1], keep) - counters[1]])
            full = _rows(counters[1]) == ROWS
            lax.cond(full, lambda: _send(buf, mask, counters), lambda: None)
            counters = counters & jnp.stack([jnp.int32(-1), full.astype(jnp.int32) - 1])
            return (x, buf, mask, counters), None
        with_bits = kind == "two scalars"
        _, buf, *mask, steps, fill = carry
        row = _rows(fill)
        buf = lax.dynamic_update_slice(buf, x[None], (row, 0))
        if with_bits:
            mask = [lax.dynamic_update_slice(mask[0], keep[None], (row,))]
        steps, fill = steps + 1, _advance(fill, keep)
        full = _rows(fill) == ROWS
        lax.cond(full, lambda: _send(buf, *mask, steps, fill), lambda: None)
        fill = fill & (full.astype(jnp.int32) - 1)
        return (x, buf, *mask, steps, fill), None

    return step


def init(kind: str) -> tuple:
    x, buf, zero = jnp.zeros(10), jnp.zeros((ROWS, 10)), jnp.int32(0)
    mask = jnp.zeros(ROWS, bool)
    return {
        "baseline": (x,),
        "stack": (x,),
        "ring": (x, buf, zero),
        "ring, cond": (x, buf, zero),
        "floor": (x, buf, zero),
        "two scalars": (x, buf, mask, zero, zero),
        "one vector": (x, buf, mask, jnp.zeros(2, jnp.int32)),
        "no keep bits": (x, buf, zero, zero),
    }[kind]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--out", default=str(RESULTS / "carried_state.json"))
    args = parser.parse_args(argv)
    keys = jax.random.split(jax.random.key(0), args.steps)
    runs = {
        kind: jax.jit(lambda c, ks, kind=kind: lax.scan(body(kind), c, ks)).lower(init(kind), keys).compile()
        for kind in KINDS
    }
    times: dict[str, list[float]] = {kind: [] for kind in KINDS}
    for _ in range(args.repeats):  # interleaved rounds
        for kind, run in runs.items():
            carry = init(kind)
            start = time.perf_counter()
            jax.block_until_ready(run(carry, keys))
            times[kind].append((time.perf_counter() - start) / args.steps * 1e6)
    stack = min(times["stack"])
    rows = [
        {"kind": k, "best_us": min(v), "median_us": statistics.median(v), "best_over_stack": min(v) / stack}
        for k, v in times.items()
    ]
    print("| variant | best us/step | median us/step | best / stack |")
    print("|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['kind']} | {r['best_us']:.3f} | {r['median_us']:.3f} | {r['best_over_stack']:.2f} |")
    meta = {
        "jax": jax.__version__,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "repeats": args.repeats,
        "steps": args.steps,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
