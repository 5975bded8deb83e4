"""Streaming overhead: time per step of an SGLD loop with and without saving.

For each case, in one run: (a) the loop without saving, (ring) the same loop
carrying a device buffer of jaxsave's automatic block size that it updates in
place and never sends (the floor of any device-side buffering; see
docs/performance.md), (ring+cb) the same, handing each full buffer to a Python
``io_callback`` that does nothing (the floor of any design built on
``io_callback``), (b) ``no_save``,
(c) ``MemoryCollector``, (d) ``HDF5Collector``, (zarr) ``ZarrCollector`` on a
local directory store (when zarr is installed), (e) the naive way (one
``io_callback`` per sample), and optionally (f) HDF5 with ``checkpoint_every``
and (``--floors``) jaxsave with a collector that drops the rows (``drop``) or
``os.write``-s their raw bytes to a file (``os.write``).
Times are end to end (the compiled run plus ``postprocess``, which waits until
every sample is written), the best of ``--repeats`` rounds that
time every variant in turn. Ratios are to (a).

Every variant's wall time and process CPU time (``getrusage(RUSAGE_SELF)``: user + system,
all threads, the compiled loop's, the writer's and zarr's and h5py's) are recorded, each the
best over the rounds. ``--cpu`` prints the table in CPU time: on a machine shared with other
jobs wall time says little, the CPU a run spends says what saving costs. ``--trees A,B``
runs this script once per tree (a directory holding a ``jaxsave`` package, on
``PYTHONPATH``) in alternating processes, ``--rounds`` times, and compares them.

    python benchmarks/stream.py            # the full cases of issue 2
    python benchmarks/stream.py --quick    # 10x fewer steps, for a smoke run
    python benchmarks/stream.py --floors --cases "4 MB" --out benchmarks/results/stream_floors.json
    python benchmarks/stream.py --cpu --cases "64 chains,4 MB,mlp" --kinds no_save,hdf5,zarr
    python benchmarks/stream.py --cpu --trees /tmp/old,. --rounds 2 --cases "64 chains"
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

import jaxsave

RESULTS = Path(__file__).parent / "results"
RING_ROWS = 4096


class Step(NamedTuple):
    """Seconds per step of one timed run: wall, and process CPU (all threads)."""

    wall: float
    cpu: float


def process_cpu() -> float:
    """User + system CPU seconds of this process so far, all threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed(fn, steps) -> Step:
    """Run ``fn()``; its wall and CPU time per step."""
    cpu, start = process_cpu(), time.perf_counter()
    fn()
    return Step((time.perf_counter() - start) / steps, (process_cpu() - cpu) / steps)


def sgld_step(x, key, eps=1e-3):
    grad = x  # U(x) = |x|^2 / 2
    return x - eps * grad + jnp.sqrt(2 * eps) * jax.random.normal(key, x.shape, x.dtype)


def as_sample(x, leaves):
    """The sample: ``x`` itself, or its ``leaves`` rows as separate leaves (a model's parameter list)."""
    return {"x": x} if leaves == 1 else {"x": [x[..., i, :] for i in range(leaves)]}


def make_loop(saver, steps, dim, chains, thin, kind, leaves=1):
    """A jit-compiled run of ``steps`` SGLD steps over ``chains`` vmapped chains."""

    def chain(state, x, key):
        def body(carry, i):
            state, x, key = carry
            key, sub = jax.random.split(key)
            x = sgld_step(x, sub)
            keep = i % thin == 0
            if kind == "naive":
                io_callback(naive_sink, None, keep, x, ordered=False)
            elif kind in ("ring", "ring+cb"):
                rows = state.shape[0]
                state = jax.lax.dynamic_update_index_in_dim(state, x, i % rows, 0)
                if kind == "ring+cb":  # ... and hands it to a Python function that does nothing when full
                    jax.lax.cond(
                        i % rows == rows - 1,
                        lambda s: io_callback(discard, None, s, ordered=False),
                        lambda s: None,
                        state,
                    )
            elif kind == "hdf5+ckpt":
                state, _ = saver.save(state, keep, as_sample(x, leaves), solver_state={"x": x, "key": key})
            elif kind != "baseline":
                state, _ = saver.save(state, keep, as_sample(x, leaves))
            return (state, x, key), None

        return jax.lax.scan(body, (state, x, key), jnp.arange(steps))[0]

    state_axis = None if kind in ("baseline", "naive") or chains == 1 else 0
    return jax.jit(jax.vmap(chain, in_axes=(state_axis, 0, 0)) if chains > 1 else chain)


NAIVE: list = []


def discard(block):
    """The host side of the ``ring+cb`` floor: receive the block, keep nothing."""


def naive_sink(keep, x):
    keep, x = np.asarray(keep), np.asarray(x)
    if keep.ndim == 0:
        if keep:
            NAIVE.append(x.copy())
    else:
        NAIVE.append(x[keep].copy())


class RawFileCollector(jaxsave.DataCollector):
    """The ``--floors`` collectors: ``os.write`` the rows' bytes to a file, or (no path) drop them.

    Not a real collector (no format, one chain): the floor of getting the bytes
    that jaxsave delivers into a file at all, or of delivering them at all.
    """

    def __init__(self, path=None):
        self.fd = None if path is None else os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        self.chains = 0

    def register_chain(self, *args, **kwargs):
        self.chains += 1
        return self.chains - 1

    def save(self, chain_id, values):
        if self.fd is not None:
            for rows in values:
                os.write(self.fd, np.ascontiguousarray(rows))

    def close(self):
        if self.fd is not None:
            os.close(self.fd)


def make_saver(kind, tmp, checkpoint_every=0):
    """The saver of variant ``kind`` and the file it writes (``None`` if it writes none)."""
    if kind == "no_save":
        return jaxsave.no_save(), None
    if kind == "memory":
        return jaxsave.save(jaxsave.MemoryCollector()), None
    if kind == "drop":
        return jaxsave.save(RawFileCollector()), None
    if kind == "os.write":
        path = Path(tmp) / f"bench-{time.monotonic_ns()}.bin"
        return jaxsave.save(RawFileCollector(path)), path
    if kind == "zarr":
        path = Path(tmp) / f"bench-{time.monotonic_ns()}.zarr"
        return jaxsave.save(jaxsave.ZarrCollector(path)), path
    path = Path(tmp) / f"bench-{time.monotonic_ns()}.h5"
    extra = {"checkpoint_every": checkpoint_every} if kind == "hdf5+ckpt" else {}
    return jaxsave.save(jaxsave.HDF5Collector(path), **extra), path


def remove(path):
    """Delete what a variant wrote: a file and its checkpoint, or a Zarr directory store."""
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()
        Path(f"{path}.ckpt").unlink(missing_ok=True)


def have_zarr():
    return hasattr(jaxsave, "ZarrCollector") and importlib.util.find_spec("zarr") is not None


def run_stream_case(kind, steps, dim, chains, thin, tmp, checkpoint_every=0, leaves=1):
    shape = (dim,) if leaves == 1 else (leaves, dim // leaves)
    x0 = jnp.zeros((chains, *shape) if chains > 1 else shape, jnp.float32)
    keys = jax.random.split(jax.random.key(0), chains) if chains > 1 else jax.random.key(0)
    saver, state, path = None, jnp.zeros(()), None
    kept = -(-steps // thin)
    info = jaxsave.static_information(samples_collected=kept)
    if kind in ("no_save", "memory", "hdf5", "zarr", "hdf5+ckpt", "drop", "os.write"):
        saver, path = make_saver(kind, tmp, checkpoint_every)
        sample = as_sample(x0, leaves)
        solver = {"x": x0, "key": keys} if kind == "hdf5+ckpt" else None
        state = saver.init(sample, solver, info, chains=chains if chains > 1 else None)
    if kind in ("ring", "ring+cb"):
        rows = int(np.clip(4 * 2**20 // (4 * dim), 1, RING_ROWS))  # as jaxsave's automatic block size
        state = jnp.zeros(((chains,) if chains > 1 else ()) + (rows, *shape), jnp.float32)
    run = make_loop(saver, steps, dim, chains, thin, kind, leaves).lower(state, x0, keys).compile()
    NAIVE.clear()

    def region():
        out = run(state, x0, keys)
        jax.block_until_ready(out)
        if saver is not None:
            result = saver.postprocess(out[0], None)
            assert int(np.sum(result["sample_count"])) == kept * chains

    step = timed(region, steps)
    if path is not None:
        remove(path)
    return step


def mlp_case(kind, steps, chains, thin, tmp):
    """SGLD on a small Haiku MLP (regression, minibatches of 32), ``chains`` vmapped chains."""
    import haiku as hk

    rng = np.random.default_rng(0)
    data_x = rng.normal(size=(2000, 8)).astype(np.float32)
    data_y = (np.sin(data_x @ rng.normal(size=8)) + 0.1 * rng.normal(size=2000)).astype(np.float32)
    net = hk.without_apply_rng(hk.transform(lambda x: hk.nets.MLP([64, 64, 1])(x)[:, 0]))
    data_x, data_y = jnp.asarray(data_x), jnp.asarray(data_y)
    params0 = net.init(jax.random.key(0), data_x[:1])
    n, batch, eps = len(data_x), 32, 1e-5

    def potential(params, idx):
        pred = net.apply(params, data_x[idx])
        loglik = -0.5 * jnp.sum((pred - data_y[idx]) ** 2) * (n / batch)
        logprior = -0.5 * sum(jnp.sum(p**2) for p in jax.tree.leaves(params))
        return -(loglik + logprior)

    def chain(state, params, key):
        def body(carry, i):
            state, params, key = carry
            key, k_batch, k_noise = jax.random.split(key, 3)
            idx = jax.random.randint(k_batch, (batch,), 0, n)
            grads = jax.grad(potential)(params, idx)
            leaves, tree = jax.tree.flatten(params)
            noise = jax.random.split(k_noise, len(leaves))
            params = jax.tree.unflatten(
                tree,
                [
                    p - eps * g + jnp.sqrt(2 * eps) * jax.random.normal(k, p.shape)
                    for p, g, k in zip(leaves, jax.tree.leaves(grads), noise)
                ],
            )
            if kind != "baseline":
                state, _ = saver.save(state, i % thin == 0, params)
            return (state, params, key), None

        return jax.lax.scan(body, (state, params, key), jnp.arange(steps))[0]

    params = jax.tree.map(lambda p: jnp.broadcast_to(p, (chains, *p.shape)), params0)
    keys = jax.random.split(jax.random.key(1), chains)
    saver, state, path = None, jnp.zeros(()), None
    kept = -(-steps // thin)
    if kind != "baseline":
        saver, path = make_saver(kind, tmp)
        state = saver.init(params, None, jaxsave.static_information(samples_collected=kept), chains=chains)
    state_axis = None if kind == "baseline" else 0
    run = jax.jit(jax.vmap(chain, in_axes=(state_axis, 0, 0))).lower(state, params, keys).compile()

    def region():
        out = run(state, params, keys)
        jax.block_until_ready(out)
        if saver is not None:
            saver.postprocess(out[0], None)

    step = timed(region, steps)
    if path is not None:
        remove(path)
    return step


def interleaved(row, repeats):
    """Time every variant of ``row`` once per round, ``repeats`` rounds; keep each one's best.

    Round-robin rather than one variant after another, so a burst of load on a
    shared machine hits every variant alike and the ratios stay fair.
    """
    fns, wall, cpu = row["us_per_step"], {}, {}
    for _ in range(repeats):
        for kind, fn in fns.items():
            step = fn()
            wall[kind] = min(wall.get(kind, float("inf")), step.wall * 1e6)
            cpu[kind] = min(cpu.get(kind, float("inf")), step.cpu * 1e6)
    for kind in wall:
        print(
            f"  {row['case']:30s} {kind:10s} {wall[kind]:10.2f} us/step wall {cpu[kind]:10.2f} CPU",
            file=sys.stderr,
        )
    return {**row, "us_per_step": wall, "cpu_us_per_step": cpu}


def summarize(row):
    """Add the ratios to (a), wall and CPU, and Zarr's overhead over HDF5's (issue 18: at most 1.1)."""
    for clock, key in (("", "us_per_step"), ("cpu_", "cpu_us_per_step")):
        times = row[key]
        base = times["baseline"]
        row[f"{clock}ratio"] = {k: v / base for k, v in times.items()}
        if "naive" in times and "hdf5" in times:
            row[f"{clock}hdf5_speedup_over_naive"] = times["naive"] / times["hdf5"]
        if "zarr" in times and "hdf5" in times:
            overhead = {k: times[k] - base for k in ("hdf5", "zarr")}
            row[f"{clock}zarr_overhead_over_hdf5"] = (
                overhead["zarr"] / overhead["hdf5"] if overhead["hdf5"] > 0 else None
            )
    return row


def print_table(rows, kinds, cpu, tree=None):
    """The markdown table of ``rows`` in wall or (``cpu``) CPU time, a column for the tree if given."""
    clock = "cpu_" if cpu else ""
    unit = "CPU us/step" if cpu else "us/step"
    header = ["case", f"(a) {unit}"] + [f"{k}/(a)" for k in kinds[1:]] + ["naive/hdf5"]
    if "zarr" in kinds:
        header.append("zarr/hdf5 overhead")
    if tree is not None:
        header.insert(0, "tree")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        ratios = row[f"{clock}ratio"]
        cells = [row["case"], f"{row[f'{clock}us_per_step' if cpu else 'us_per_step']['baseline']:.2f}"]
        cells += [f"{ratios[k]:.2f}" if k in ratios else "-" for k in kinds[1:]]
        speedup = row.get(f"{clock}hdf5_speedup_over_naive")
        cells.append(f"{speedup:.0f}x" if speedup is not None else "-")
        if "zarr" in kinds:
            ratio = row.get(f"{clock}zarr_overhead_over_hdf5")
            cells.append(f"{ratio:.2f}" if ratio is not None else "-")
        if tree is not None:
            cells.insert(0, row["tree"])
        print("| " + " | ".join(cells) + " |")


def compare_trees(args, argv):
    """``--trees``: this script once per tree and round, alternating; each figure the best of all runs."""
    trees = [str(Path(t).resolve()) for t in args.trees.split(",")]
    forwarded, skip = [], False
    for arg in argv:  # the same options for every child, but --trees, --rounds and --out
        if skip:
            skip = False
        elif arg in ("--trees", "--rounds", "--out"):
            skip = True
        elif not arg.startswith(("--trees=", "--rounds=", "--out=")):
            forwarded.append(arg)
    best: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for i, tree in enumerate(trees):
                out = Path(tmp) / f"{i}-{r}.json"
                cmd = [sys.executable, __file__, *forwarded, "--out", str(out)]
                subprocess.run(
                    cmd, env={**os.environ, "PYTHONPATH": tree}, check=True, stdout=subprocess.DEVNULL
                )
                for row in json.loads(out.read_text())["rows"]:
                    kept = best.setdefault((tree, row["case"]), {**row, "tree": tree})
                    for key in ("us_per_step", "cpu_us_per_step"):
                        for kind, us in row[key].items():
                            kept[key][kind] = min(kept[key].get(kind, float("inf")), us)
                print(f"round {r + 1}: {tree} done", file=sys.stderr)
    rows = [summarize(row) for row in best.values()]
    kinds = list(dict.fromkeys(k for row in rows for k in row["us_per_step"]))
    print_table(rows, kinds, args.cpu, tree=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    meta = {"trees": trees, "rounds": args.rounds, "argv": forwarded, "cpus": os.cpu_count()}
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {args.out}")


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="10x fewer steps")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--checkpoint-every", type=int, default=0, help="also time HDF5 with checkpoint_every=N (issue 4)"
    )
    parser.add_argument(
        "--floors",
        action="store_true",
        help="also time jaxsave with collectors that drop the rows (drop) or os.write "
        "their bytes to a file (os.write): the floors under a real collector",
    )
    parser.add_argument(
        "--cases",
        default="",
        help="run only the cases whose name contains one of these comma-separated words",
    )
    parser.add_argument(
        "--kinds",
        default="",
        help="time only these comma-separated variants (baseline is always timed: the ratios need it)",
    )
    parser.add_argument(
        "--cpu", action="store_true", help="print the table in process CPU time (getrusage, all threads)"
    )
    parser.add_argument(
        "--trees",
        default="",
        help="comma-separated directories holding a jaxsave package: run this script with each on "
        "PYTHONPATH, in alternating processes, and compare them",
    )
    parser.add_argument("--rounds", type=int, default=2, help="with --trees: processes per tree")
    parser.add_argument("--out", default=str(RESULTS / "stream.json"))
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if args.trees:
        compare_trees(args, argv)
        return
    scale = 10 if args.quick else 1
    tmp = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    tmp = tempfile.mkdtemp(dir=tmp)

    cases = [
        ("1 chain x 10 floats", dict(steps=100_000 // scale, dim=10, chains=1, thin=1)),
        ("64 chains x 10 floats", dict(steps=10_000 // scale, dim=10, chains=64, thin=1)),
        ("1 chain x 1M floats (4 MB)", dict(steps=max(20, 200 // scale), dim=2**20, chains=1, thin=1)),
        (
            "1 chain x 100 leaves x 100 floats",
            dict(steps=20_000 // scale, dim=10_000, chains=1, thin=1, leaves=100),
        ),
    ]
    mlp_name = "SGLD Haiku MLP, 4 chains"
    wanted = [w.strip().lower() for w in args.cases.split(",") if w.strip()]
    chosen = lambda name: not wanted or any(w in name.lower() for w in wanted)  # noqa: E731
    cases = [(name, case) for name, case in cases if chosen(name)]
    kinds = ["baseline", "ring", "ring+cb", "no_save", "memory", "hdf5", "naive"]
    if have_zarr():
        kinds.insert(6, "zarr")
    if args.floors:
        kinds[5:5] = ["drop", "os.write"]
    if args.checkpoint_every:
        kinds.insert(4, "hdf5+ckpt")
    only = {k.strip() for k in args.kinds.split(",") if k.strip()}
    if only:
        kinds = [k for k in kinds if k in only or k == "baseline"]
    rows = []
    try:
        for name, case in cases:
            row = {"case": name, **case, "us_per_step": {}}
            for kind in kinds:
                if kind == "ring+cb" and case["chains"] > 1:
                    continue  # an io_callback under vmap-of-cond is refused by JAX (jaxsave works around it)
                steps = case["steps"]
                if kind == "naive" and case["dim"] < 1000:
                    steps = max(1000, steps // 20)  # the naive way is slow; time fewer steps
                row["us_per_step"][kind] = functools.partial(
                    run_stream_case,
                    kind,
                    steps,
                    case["dim"],
                    case["chains"],
                    case["thin"],
                    tmp,
                    args.checkpoint_every,
                    case.get("leaves", 1),
                )
            rows.append(interleaved(row, args.repeats))
        mlp_steps = 10_000 // scale
        if chosen(mlp_name):
            row = {
                "case": mlp_name,
                "steps": mlp_steps,
                "chains": 4,
                "thin": 10,
                "us_per_step": {
                    kind: functools.partial(mlp_case, kind, mlp_steps, 4, 10, tmp)
                    for kind in ["baseline", "no_save", "memory", "hdf5"] + (["zarr"] if have_zarr() else [])
                    if not only or kind in only or kind == "baseline"
                },
            }
            rows.append(interleaved(row, args.repeats))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    rows = [summarize(row) for row in rows]
    print_table(rows, kinds, args.cpu)

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "jax": jax.__version__,
        "jaxsave": jaxsave.__version__,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "quick": args.quick,
        "repeats": args.repeats,
        "units": "us/step: us_per_step wall, cpu_us_per_step process CPU (getrusage, all threads)",
    }
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
