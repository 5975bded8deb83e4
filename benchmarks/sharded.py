"""Sharded chains: time per step with HDF5 saving vs the same sharded run without saving.

Case 1: one process, 8 CPU devices x 8 chains each (64 chains), a 10-float
SGLD step in ``shard_map`` over a ``chains`` mesh axis. Case 2: 2 processes
(``jax.distributed``, loopback coordinator), 4 devices x 8 chains each per
process, each process writing its own file; the ratio is per process.
Saving uses the automatic block size unless ``--block-size`` is given. Times are end to
end (compiled run plus ``postprocess``), best of ``--repeats``, baseline measured in the same process.

    python benchmarks/sharded.py            # both cases, writes results/sharded.json
    python benchmarks/sharded.py --quick    # fewer steps
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).parent.parent


def worker(args) -> dict:
    """Run in a child process: XLA_FLAGS are already set."""
    import jax

    if args.nproc > 1:
        jax.distributed.initialize(
            coordinator_address=f"127.0.0.1:{args.port}",
            num_processes=args.nproc,
            process_id=args.pid,
            initialization_timeout=60,
        )
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import PartitionSpec as P

    import jaxsave

    mesh = jax.make_mesh((jax.device_count(),), ("chains",))
    local = jax.local_device_count() * args.chains_per_device
    dim, steps, thin = 10, args.steps, 1

    def sgld(x, key, eps=1e-3):
        return x - eps * x + jnp.sqrt(2 * eps) * jax.random.normal(key, x.shape, x.dtype)

    def loop(save):
        def chain(state, x, key):
            def body(carry, i):
                state, x, key = carry
                key, sub = jax.random.split(key)
                x = sgld(x, sub)
                if save is not None:
                    state, _ = save(state, i % thin == 0, {"x": x})
                return (state, x, key), None

            return jax.lax.scan(body, (state, x, key), jnp.arange(steps))[0]

        return jax.jit(jax.shard_map(jax.vmap(chain), mesh=mesh, in_specs=P("chains"), out_specs=P("chains")))

    x0 = jaxsave.shard_state(jnp.zeros((local, dim), jnp.float32), mesh)
    keys = jaxsave.shard_state(jax.random.key_data(jax.random.split(jax.random.key(args.pid), local)), mesh)
    keys = jax.random.wrap_key_data(keys)
    times = {"baseline": [], "hdf5": []}
    tmp = tempfile.mkdtemp()
    dummy = jaxsave.shard_state(jnp.zeros(local), mesh)
    base = loop(None).lower(dummy, x0, keys).compile()
    for r in range(args.repeats):
        start = time.perf_counter()
        jax.block_until_ready(base(dummy, x0, keys))
        times["baseline"].append((time.perf_counter() - start) / steps)

        saver = jaxsave.save(
            jaxsave.HDF5Collector(os.path.join(tmp, f"run-{args.pid}-{r}.h5")),
            block_size=args.block_size or None,
        )
        state = saver.init(
            {"x": jnp.zeros((local, dim))},
            None,
            jaxsave.static_information(samples_collected=steps),
            chains=local,
        )
        state = jaxsave.shard_state(state, mesh)
        run = loop(saver.save).lower(state, x0, keys).compile()
        start = time.perf_counter()
        out = run(state, x0, keys)
        result = saver.postprocess(out[0], None)
        times["hdf5"].append((time.perf_counter() - start) / steps)
        assert int(np.sum(result["sample_count"])) == local * steps
    best = {k: min(v) for k, v in times.items()}
    return {
        "process": args.pid,
        "processes": args.nproc,
        "devices": jax.device_count(),
        "local_devices": jax.local_device_count(),
        "chains": local,
        "steps": steps,
        "baseline_us_per_step": 1e6 * best["baseline"],
        "hdf5_us_per_step": 1e6 * best["hdf5"],
        "ratio": best["hdf5"] / best["baseline"],
    }


def launch(nproc: int, devices: int, args) -> list[dict]:
    port = socket.socket()
    port.bind(("127.0.0.1", 0))
    number = port.getsockname()[1]
    port.close()
    env = dict(
        os.environ,
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    )
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        "--nproc",
        str(nproc),
        "--port",
        str(number),
        "--steps",
        str(args.steps),
        "--repeats",
        str(args.repeats),
        "--chains-per-device",
        "8",
        "--block-size",
        str(args.block_size),
    ]
    procs = [
        subprocess.Popen(cmd + ["--pid", str(i)], env=env, stdout=subprocess.PIPE, text=True)
        for i in range(nproc)
    ]
    try:
        outs = [p.communicate(timeout=900)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    if any(p.returncode for p in procs):
        raise SystemExit(f"a worker failed: {[p.returncode for p in procs]}")
    return [json.loads(o.strip().splitlines()[-1]) for o in outs]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--nproc", type=int, default=1)
    parser.add_argument("--pid", type=int, default=0)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--steps", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chains-per-device", type=int, default=8)
    parser.add_argument("--block-size", type=int, default=0, help="rows per block (0: automatic)")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)), flush=True)
        return
    if args.quick:
        args.steps = 2000
    rows = [dict(case="1 process, 8 devices", **r) for r in launch(1, 8, args)]
    rows += [dict(case="2 processes, 4 devices each", **r) for r in launch(2, 4, args)]
    print(f"{'case':30} {'proc':>4} {'chains':>6} {'no save us/step':>16} {'hdf5 us/step':>13} {'ratio':>6}")
    for r in rows:
        print(
            f"{r['case']:30} {r['process']:>4} {r['chains']:>6} {r['baseline_us_per_step']:>16.1f} "
            f"{r['hdf5_us_per_step']:>13.1f} {r['ratio']:>6.2f}"
        )
    RESULTS.mkdir(exist_ok=True)
    out = {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "note": "8 (or 2x4) XLA host-platform devices share the machine's real CPU cores",
        },
        "steps": args.steps,
        "repeats": args.repeats,
        "block_size": args.block_size,
        "rows": rows,
    }
    (RESULTS / "sharded.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
