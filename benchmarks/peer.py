"""jaxsave against the stacking peer: every sample to disk vs. samples stacked as ``scan`` outputs.

The peer is the NumPyro/BlackJAX way: the step returns its sample as a ``lax.scan`` output, so
the samples are stacked on the device (O(N) device memory, nothing on disk until the run ends).
With ``thin > 1`` the peer runs a nested scan (``thin`` steps inside, one output outside), as a
user who cares about memory would. All variants run the same SGLD step

    x <- x - 1e-3 x + 1e-2 normal(k)

on 10 floats per chain, with two step bodies: ``light`` (the keys precomputed, as scan inputs)
and ``heavy`` (the key split in the carry). Variants, timed in interleaved rounds (every
variant once per round, best of ``--repeats``), ratios to ``baseline`` (the loop without saving):

- ``stack``: the peer;
- ``hdf5``: ``HDF5Collector`` with ``init(..., chains=C)``, ``save()`` called in the user's scan;
- ``hdf5 scan``: the same collector, the loop run by ``jaxsave.scan(..., thin=thin)`` (blocks of
  stacked samples; thinned, a nested scan that stacks only the kept steps, as the peer's);
- ``scan keep``: ``jaxsave.scan`` thinned by its ``keep`` flag instead (every step stacked, the
  host drops the rows not kept): what ``thin=`` saves;
- ``hdf5 1by1``: the same, chains ``init``-ed one by one and stacked (jax-sgmc's solvers);
- ``hdf5+ckpt``: ``checkpoint_every=500`` (its ratio to ``hdf5`` is the checkpoint cost);
- ``ckpt floor``: ``hdf5`` plus, every 500 steps under ``lax.cond``, an ``io_callback`` of the
  solver state to a function that does nothing: what a checkpoint costs at the least (the
  ratio ``ckpt/floor`` is what jaxsave's checkpoints cost beyond it); one chain only (JAX
  refuses an ``io_callback`` under ``vmap`` of a ``cond``);
- ``scan+ckpt``: ``hdf5 scan`` with ``checkpoint_every=500`` (its ratio to ``hdf5 scan``);
- ``stream floor``: the least any ``save()`` called in the user's step can cost: the user's scan
  carrying a ring buffer of ``BLOCK`` rows (all chains' in one, outside ``vmap``), the sample
  written at its fill row every step, the fill advanced by the keep flag, and each full buffer
  handed under ``lax.cond`` to an ``io_callback`` that does nothing (``floor/stack`` is how far
  the peer is out of reach of any streaming ``save()``; ``hdf5/floor`` what jaxsave costs beyond it);
- ``memory``: ``MemoryCollector``.

Times are end to end: the compiled run, then ``postprocess`` (which waits until every sample
is written) or, for the peer, the stacked samples copied to host memory. Each run is timed on
the wall clock and in CPU time (``getrusage(RUSAGE_SELF)``: every thread of the process, XLA's
and the writer's included), which the load of other jobs on the machine disturbs less;
``--cpu`` prints the table of CPU times (both are in the JSON).

    python benchmarks/peer.py                  # the table of issue 17
    python benchmarks/peer.py --quick          # 10x fewer steps
    python benchmarks/peer.py --cpu            # the table in CPU time
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

import jaxsave

RESULTS = Path(__file__).parent / "results"
DIM = 10
KINDS = [
    "baseline",
    "stack",
    "hdf5",
    "hdf5 scan",
    "scan keep",
    "hdf5 1by1",
    "hdf5+ckpt",
    "ckpt floor",
    "scan+ckpt",
    "memory",
    "stream floor",
]
#: The rows of ``save()``'s ring buffer for this sample (its automatic size: at most 4096 rows).
BLOCK = 4096


def sgld(x, k):
    return x - 1e-3 * x + 1e-2 * jax.random.normal(k, x.shape, x.dtype)


def _ignore(_solver_state):
    """The host side of ``ckpt floor``'s callback: nothing."""


def make_floor(steps, thin, body, chains):
    """``stream floor``: ``(x, key, keys) -> x``, all chains in one loop (``vmap`` only around the
    step: JAX refuses an ``io_callback`` under ``vmap`` of a ``cond``)."""

    def advance(x, key, k):
        if body == "heavy":
            key, k = jax.random.split(key)
        return sgld(x, k), key

    if chains > 1:
        advance = jax.vmap(advance)

    def run(x, key, keys):
        def step(carry, inp):
            buf, fill, x, key = carry
            i, k = inp
            x, key = advance(x, key, k)
            buf = jax.lax.dynamic_update_index_in_dim(buf, x, fill, 0)
            fill = fill + (i % thin == 0).astype(jnp.int32)
            full = fill == BLOCK
            jax.lax.cond(full, lambda b: io_callback(_ignore, None, b, ordered=False), lambda b: None, buf)
            return (buf, fill & (full.astype(jnp.int32) - 1), x, key), None

        buf = jnp.zeros((BLOCK, *x.shape), x.dtype)
        ks = keys.T if chains > 1 else keys  # steps first
        (buf, fill, x, _), _ = jax.lax.scan(step, (buf, jnp.int32(0), x, key), (jnp.arange(steps), ks))
        io_callback(_ignore, None, buf, ordered=False)  # the last, partial block (postprocess's)
        return x

    return run


def make_run(kind, saver, steps, thin, body):
    """The compiled loop of one chain, ``(state, x, key, keys) -> (state, x, samples)``."""

    def advance(x, key, k):
        if body == "heavy":
            key, k = jax.random.split(key)
        return sgld(x, k), key

    def chain(state, x, key, keys):
        if kind == "stack" and thin > 1:  # the peer, thinned: thin steps inside, one output outside

            def outer(carry, ks):
                def inner(c, k):
                    x, key = c
                    return advance(x, key, k), None

                (x, key), _ = jax.lax.scan(inner, carry, ks)
                return (x, key), x

            (x, key), xs = jax.lax.scan(outer, (x, key), keys.reshape(steps // thin, thin))
            return state, x, xs

        if kind in ("hdf5 scan", "scan keep", "scan+ckpt"):  # jaxsave.scan owns the loop
            by_keep = kind == "scan keep"

            def body(carry, inp):
                x, key = carry
                i, k = inp
                x, key = advance(x, key, k)
                return (x, key), (i % thin == thin - 1 if by_keep else True, {"x": x})

            state, (x, _) = jaxsave.scan(
                saver,
                body,
                state,
                (x, key),
                (jnp.arange(steps), keys),
                thin=1 if by_keep else thin,
                checkpoint=(lambda c: {"x": c[0]}) if kind == "scan+ckpt" else None,
            )
            return state, x, None

        def step(carry, inp):
            state, x, key = carry
            i, k = inp
            x, key = advance(x, key, k)
            out = x if kind == "stack" else None
            if kind == "hdf5+ckpt":
                state, _ = saver.save(state, i % thin == 0, {"x": x}, solver_state={"x": x})
            elif kind == "ckpt floor":  # the least a checkpoint every 500 steps can cost
                state, _ = saver.save(state, i % thin == 0, {"x": x})
                send = lambda s: io_callback(_ignore, None, s, ordered=False)  # noqa: E731
                jax.lax.cond((i + 1) % 500 == 0, send, lambda s: None, {"x": x})
            elif kind not in ("baseline", "stack"):
                state, _ = saver.save(state, i % thin == 0, {"x": x})
            return (state, x, key), out

        (state, x, _), xs = jax.lax.scan(step, (state, x, key), (jnp.arange(steps), keys))
        return state, x, xs

    return chain


def _cpu_s():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_case(kind, chains, steps, thin, body, tmp):
    """Microseconds per step of one variant, ``(wall, cpu)``; one chain runs unbatched, several
    under ``vmap``."""
    batched = chains > 1
    x0 = jnp.zeros((chains, DIM) if batched else (DIM,), jnp.float32)
    key = jax.random.split(jax.random.key(0), chains) if batched else jax.random.key(0)
    split = lambda k: jax.random.split(k, steps)  # noqa: E731  (precomputed keys, used by "light")
    keys = jax.vmap(split)(key) if batched else split(key)
    saver, path, state = None, None, jnp.zeros(())
    kept = -(-steps // thin)
    if kind not in ("baseline", "stack", "stream floor"):
        path = Path(tmp) / f"peer-{time.monotonic_ns()}.h5"
        ckpt = {"checkpoint_every": 500} if kind.endswith("+ckpt") else {}
        collector = jaxsave.MemoryCollector() if kind == "memory" else jaxsave.HDF5Collector(path)
        saver = jaxsave.save(collector, **ckpt)
        info = jaxsave.static_information(samples_collected=kept)
        solver = {"x": x0} if ckpt else None
        if kind == "hdf5 1by1" and batched:
            one = [saver.init({"x": x0[c]}, None, info) for c in range(chains)]
            state = jax.tree.map(lambda *leaves: jnp.stack(leaves), *one)
        else:
            state = saver.init({"x": x0}, solver, info, chains=chains if batched else None)
    if kind == "stream floor":
        floor = make_floor(steps, thin, body, chains)
        chain = lambda state, x, key, keys: (state, floor(x, key, keys), None)  # noqa: E731
    else:
        chain = make_run(kind, saver, steps, thin, body)
        if batched:
            chain = jax.vmap(chain, in_axes=(None if saver is None else 0, 0, 0, 0))
    compiled = jax.jit(chain).lower(state, x0, key, keys).compile()
    start, cpu = time.perf_counter(), _cpu_s()
    state, _, xs = compiled(state, x0, key, keys)
    jax.block_until_ready(state)
    if saver is not None:
        result = saver.postprocess(state, None)
        assert int(np.sum(result["sample_count"])) == kept * chains
    elif kind == "stack":
        assert np.asarray(xs).shape[batched] == kept
    elapsed, cpu = time.perf_counter() - start, _cpu_s() - cpu
    if path is not None:
        path.unlink(missing_ok=True)
        Path(f"{path}.ckpt").unlink(missing_ok=True)
    return elapsed / steps * 1e6, cpu / steps * 1e6


#: jaxsave against the peer, and the ratios of the targets (name: (variant, divided by)).
PEER = {
    "hdf5/stack": ("hdf5", "stack"),
    "scan/stack": ("hdf5 scan", "stack"),
    "floor/stack": ("stream floor", "stack"),
}
CHECKS = {
    "hdf5/floor": ("hdf5", "stream floor"),
    "1by1/hdf5": ("hdf5 1by1", "hdf5"),
    "ckpt/hdf5": ("hdf5+ckpt", "hdf5"),
    "floor/hdf5": ("ckpt floor", "hdf5"),
    "ckpt/floor": ("hdf5+ckpt", "ckpt floor"),
    "ckpt/scan": ("scan+ckpt", "hdf5 scan"),
    "keep/scan": ("scan keep", "hdf5 scan"),
}


def _ratios(best: dict) -> dict:
    """Microseconds per step, their ratios to the baseline and the ratios of PEER and CHECKS."""
    nan = float("nan")
    out = {"us_per_step": best, "ratio": {k: v / best["baseline"] for k, v in best.items()}}
    for name, (a, b) in {**PEER, **CHECKS}.items():
        out[name] = best.get(a, nan) / best.get(b, nan)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="10x fewer steps")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--kinds", default=",".join(KINDS), help="comma-separated variants to time")
    parser.add_argument("--chains", default="1,64", help="comma-separated chain counts (1, 64)")
    parser.add_argument("--cpu", action="store_true", help="print the table of CPU times")
    parser.add_argument("--out", default=str(RESULTS / "peer.json"))
    args = parser.parse_args(argv)
    kinds = [k for k in KINDS if k in args.kinds.split(",")]
    if "baseline" not in kinds or "stack" not in kinds:
        parser.error("--kinds needs baseline and stack (the ratios are to them)")
    wanted_chains = {int(c) for c in args.chains.split(",")}
    scale = 10 if args.quick else 1
    tmp = tempfile.mkdtemp(dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    cases = [
        (chains, steps // scale, thin, body)
        for chains, steps in ((1, 100_000), (64, 10_000))
        if chains in wanted_chains
        for body in ("light", "heavy")
        for thin in (1, 10)
    ]
    rows = []
    try:
        for chains, steps, thin, body in cases:
            wall: dict = {}
            cpu: dict = {}
            for _ in range(args.repeats):  # interleaved rounds
                for kind in kinds:
                    if kind == "ckpt floor" and chains > 1:  # a callback under vmap of cond
                        continue
                    w, c = run_case(kind, chains, steps, thin, body, tmp)
                    wall[kind] = min(wall.get(kind, float("inf")), w)
                    cpu[kind] = min(cpu.get(kind, float("inf")), c)
            row = {"chains": chains, "steps": steps, "thin": thin, "body": body}
            for clock, best in (("wall", wall), ("cpu", cpu)):
                row[clock] = _ratios(best)
            print(
                f"  {chains} chains {body} thin {thin}: wall "
                + ", ".join(f"{k} {v:.2f}" for k, v in wall.items())
                + "; cpu "
                + ", ".join(f"{k} {v:.2f}" for k, v in cpu.items()),
                file=sys.stderr,
            )
            rows.append(row)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    clock = "cpu" if args.cpu else "wall"
    header = ["chains", "body", "thin", f"loop us/step ({clock})"] + list(kinds[1:])
    header += [f"**{k}**" for k in PEER] + list(CHECKS)
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        t = r[clock]
        cells = [str(r["chains"]), r["body"], str(r["thin"]), f"{t['us_per_step']['baseline']:.2f}"]
        cells += [f"{t['ratio'].get(k, float('nan')):.2f}" for k in kinds[1:]]
        cells += [f"**{t[k]:.2f}**" for k in PEER] + [f"{t[k]:.2f}" for k in CHECKS]
        print("| " + " | ".join(cells) + " |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "jax": jax.__version__,
        "jaxsave": jaxsave.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "quick": args.quick,
        "repeats": args.repeats,
    }
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
