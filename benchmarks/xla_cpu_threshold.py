"""The XLA:CPU floor under the tiny-step case: a loop that updates a buffer over 512 bytes.

XLA:CPU runs a loop body's operations one after the other only while every buffer
they touch is at most 512 bytes (a constant of its ThunkExecutor); beyond that
it runs them as a dependency graph, about 1.2-1.5 us more per iteration. This
script times the 1 chain x 10 floats SGLD loop of ``stream.py`` carrying a
float32 ``(rows, 10)`` buffer it writes one row per step and never sends, for
rows = 12 (480 B), 13 (520 B) and 4096, against the loop without it; no jaxsave.
The last variant also hands each full 4096-row buffer to a no-op ``io_callback``
under ``lax.cond``: what any per-step ``save()`` that streams needs at the least.

On jax 0.12 the buffer costs nothing (session 11: 0.37-0.38 us a step with and
without it) and the ``cond`` around the callback is the whole floor (1.18-1.23 us;
a ``while_loop`` of zero or one trips instead of the ``cond``: the same).

    python benchmarks/xla_cpu_threshold.py
"""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import io_callback
from stream import RESULTS, interleaved, sgld_step, timed

STEPS = 100_000


def timer(rows: int | None, send: bool = False):
    """Seconds per step of the loop, with a ``(rows, 10)`` buffer (None: without), each full
    one handed to a no-op ``io_callback`` under ``cond`` if ``send``."""

    def run(buf, x, key):
        def body(carry, _):
            buf, count, x, key = carry
            key, sub = jax.random.split(key)
            x = sgld_step(x, sub)
            if rows is not None:
                row = count % rows
                buf = lax.dynamic_update_index_in_dim(buf, x, row, 0)
                if send:
                    noop = lambda: io_callback(lambda b: None, None, buf, ordered=False)  # noqa: E731
                    lax.cond(row == rows - 1, noop, lambda: None)
            return (buf, count + 1, x, key), None

        return lax.scan(body, (buf, jnp.int32(0), x, key), None, length=STEPS)[0]

    buf, x, key = jnp.zeros((rows or 1, 10)), jnp.zeros(10), jax.random.key(0)
    compiled = jax.jit(run).lower(buf, x, key).compile()

    return lambda: timed(lambda: jax.block_until_ready(compiled(buf, x, key)), STEPS)


def main() -> None:
    variants = {
        "baseline": timer(None),
        "rows=12 (480 B)": timer(12),
        "rows=13 (520 B)": timer(13),
        "rows=4096": timer(4096),
        "rows=4096 + cond(io_callback)": timer(4096, send=True),
    }
    row = interleaved({"case": "1 chain x 10 floats", "us_per_step": variants}, repeats=5)
    base = row["us_per_step"]["baseline"]
    cpu = row["cpu_us_per_step"]
    print("| buffer carried | us/step (wall) | ratio | us/step (CPU) |\n|---|---|---|---|")
    for name, us in row["us_per_step"].items():
        print(f"| {name} | {us:.2f} | {us / base:.2f} | {cpu[name]:.2f} |")
    out = RESULTS / f"xla_cpu_threshold-jax{jax.__version__}.json"
    out.write_text(json.dumps({"jax": jax.__version__, "steps": STEPS, **row}, indent=2))
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
