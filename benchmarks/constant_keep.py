"""Benchmark: ``save(state, True, sample)`` against ``save(state, i % 1 == 0, sample)``.

Both keep every sample; they differ only in whether XLA sees ``keep`` as a constant. With 64
vmapped chains and a constant ``keep``, XLA:CPU's loop body has more than 8 thunks ready at
once, so its executor splits every step over two threads (``tests/_thunk_graph.py``,
``test_the_vmapped_loop_body_is_not_split_over_threads``). Each variant is timed against the
stacking peer (samples as ``lax.scan`` outputs) in the same interleaved rounds; the step is
``benchmarks/peer.py``'s light body (10 floats, keys precomputed) or, with ``--body heavy``, its
heavy one (the key split in the carry), HDF5 in ``--dir``.

    python benchmarks/constant_keep.py               # 1 and 64 chains, best of 5
    python benchmarks/constant_keep.py --repeats 3 --chains 64 --body heavy

Prints a table (wall / CPU us a step, ratio to the peer's wall time) and writes JSON to
benchmarks/results/constant_keep.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from peer import DIM, _cpu_s, sgld  # the same step and clock as benchmarks/peer.py

import jaxsave

KINDS = ["stack", "keep=True", "keep=i%1==0"]


def run_case(kind: str, chains: int, steps: int, tmp: str, body: str = "light") -> tuple[float, float]:
    """Microseconds a step of one variant, ``(wall, cpu)``, compilation excluded."""
    batched = chains > 1
    key = jax.random.key(0)
    split = lambda k: jax.random.split(k, steps)  # noqa: E731
    keys = jax.vmap(split)(jax.random.split(key, chains)) if batched else split(key)
    x0 = jnp.zeros((chains, DIM) if batched else (DIM,))
    saver, state = None, jnp.zeros(())
    if kind != "stack":
        saver = jaxsave.save(jaxsave.HDF5Collector(os.path.join(tmp, f"{time.monotonic_ns()}.h5")))
        info = jaxsave.static_information(samples_collected=steps)
        state = saver.init({"x": x0}, None, info, chains=chains if batched else None)

    def chain(state, x, key, ks):
        def step(carry, inp):
            state, x, key = carry
            i, k = inp
            if body == "heavy":  # the key split in the carry, as peer.py's heavy body
                key, k = jax.random.split(key)
            x = sgld(x, k)
            if saver is None:
                return (state, x, key), x
            keep = True if kind == "keep=True" else i % 1 == 0
            return (saver.save(state, keep, {"x": x})[0], x, key), None

        return jax.lax.scan(step, (state, x, key), (jnp.arange(steps), ks))

    run = jax.vmap(chain, in_axes=(None if saver is None else 0, 0, 0, 0)) if batched else chain
    key = jax.random.split(key, chains) if batched else key
    compiled = jax.jit(run).lower(state, x0, key, keys).compile()
    start, cpu = time.perf_counter(), _cpu_s()
    (state, x, _), _ = compiled(state, x0, key, keys)
    jax.block_until_ready(x)
    if saver is not None:
        saver.postprocess(state)
    return (time.perf_counter() - start) / steps * 1e6, (_cpu_s() - cpu) / steps * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--chains", default="1,64", help="comma-separated chain counts")
    p.add_argument("--body", choices=("light", "heavy"), default="light")
    p.add_argument("--dir", default="/dev/shm" if os.path.isdir("/dev/shm") else None)
    p.add_argument("--output", default=str(Path(__file__).parent / "results" / "constant_keep.json"))
    args = p.parse_args()
    tmp = tempfile.mkdtemp(dir=args.dir)
    rows = []
    try:
        for chains in map(int, args.chains.split(",")):
            steps = 100_000 if chains == 1 else 10_000
            best = {k: [float("inf"), float("inf")] for k in KINDS}
            for _ in range(args.repeats):  # interleaved rounds
                for kind in KINDS:
                    wall, cpu = run_case(kind, chains, steps, tmp, args.body)
                    best[kind] = [min(best[kind][0], wall), min(best[kind][1], cpu)]
            rows.append({"chains": chains, "steps": steps, "body": args.body, "us_per_step": best})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{args.body} body, best of {args.repeats}, wall / CPU us a step (ratio: wall to the peer's)")
    print("| chains | " + " | ".join(KINDS) + " |")
    print("|---|" + "---|" * len(KINDS))
    for r in rows:
        b = r["us_per_step"]
        cells = [f"{b[k][0]:.2f} / {b[k][1]:.2f} ({b[k][0] / b['stack'][0]:.2f})" for k in KINDS]
        print(f"| {r['chains']} | " + " | ".join(cells) + " |")
    meta = {"jax": jax.__version__, "python": platform.python_version(), "cpus": os.cpu_count()}
    meta["load_average"] = os.getloadavg()
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
