"""The XLA:CPU floor under the tiny-step case: a loop that updates a buffer over 512 bytes.

XLA:CPU runs a loop body's operations one after the other only while every buffer
they touch is at most 512 bytes (a constant of its ThunkExecutor); beyond that
it runs them as a dependency graph, about 1.2-1.5 us more per iteration. This
script times the 1 chain x 10 floats SGLD loop of ``stream.py`` carrying a
float32 ``(rows, 10)`` buffer it writes one row per step and never sends, for
rows = 12 (480 B), 13 (520 B) and 4096, against the loop without it; no jaxsave.

    python benchmarks/xla_cpu_threshold.py
"""

from __future__ import annotations

import json
import sys
import time

import jax
import jax.numpy as jnp
from jax import lax
from stream import RESULTS, interleaved, sgld_step

STEPS = 100_000


def timer(rows: int | None):
    """Seconds per step of the loop, with a ``(rows, 10)`` buffer (None: without)."""

    def run(buf, x, key):
        def body(carry, _):
            buf, count, x, key = carry
            key, sub = jax.random.split(key)
            x = sgld_step(x, sub)
            if rows is not None:
                buf = lax.dynamic_update_index_in_dim(buf, x, count % rows, 0)
            return (buf, count + 1, x, key), None

        return lax.scan(body, (buf, jnp.int32(0), x, key), None, length=STEPS)[0]

    buf, x, key = jnp.zeros((rows or 1, 10)), jnp.zeros(10), jax.random.key(0)
    compiled = jax.jit(run).lower(buf, x, key).compile()

    def once():
        start = time.perf_counter()
        jax.block_until_ready(compiled(buf, x, key))
        return (time.perf_counter() - start) / STEPS

    return once


def main() -> None:
    variants = {"baseline": None, "rows=12 (480 B)": 12, "rows=13 (520 B)": 13, "rows=4096": 4096}
    row = interleaved(
        {"case": "1 chain x 10 floats", "us_per_step": {k: timer(r) for k, r in variants.items()}}, repeats=5
    )
    base = row["us_per_step"]["baseline"]
    print("| buffer carried | us/step | ratio |\n|---|---|---|")
    for name, us in row["us_per_step"].items():
        print(f"| {name} | {us:.2f} | {us / base:.2f} |")
    out = RESULTS / "xla_cpu_threshold.json"
    out.write_text(json.dumps({"jax": jax.__version__, "steps": STEPS, **row}, indent=2))
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
