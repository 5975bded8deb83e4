"""One process of a multi-process jaxsave run (jax.distributed on CPU); started by test_sharded.py.

    python _multiprocess_child.py PORT NUM_PROCESSES PROCESS_ID OUT_DIR [resume]

Every process has 2 CPU devices and 2 chains per device; the chains of all
processes form one global array, sharded over a mesh of every process's
devices, and advance in one ``shard_map``'d loop. Each process writes its own
chains to ``OUT_DIR/run-<process>.h5``, taking a checkpoint every 4 steps.
First run: 8 steps, then postprocess. With ``resume``: continue each
process's file from its checkpoint for 8 more steps.
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

port, nproc, pid, out_dir = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
resuming = len(sys.argv) > 5 and sys.argv[5] == "resume"
jax.distributed.initialize(
    coordinator_address=f"127.0.0.1:{port}", num_processes=nproc, process_id=pid, initialization_timeout=60
)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jaxsave  # noqa: E402

LOCAL = 4  # chains per process
STEPS = 8
assert jax.process_count() == nproc and jax.local_device_count() == 2, (jax.process_count(), jax.devices())
mesh = jax.make_mesh((jax.device_count(),), ("chains",))
path = os.path.join(out_dir, f"run-{pid}.h5")


def value(global_chain, step):  # what chain c saves at step i, so every file can be checked
    return 1000.0 * global_chain + step


def step(carry, i):
    state, s = carry
    x = value(s["chain"], i).astype(jnp.float32) * jnp.ones(3, jnp.float32)
    s = {"chain": s["chain"], "i": s["i"] + 1}
    state, _ = saver.save(state, True, {"x": x, "lp": -x[0]}, solver_state=s)
    return (state, s), None


def run(state, s, start):
    return jax.vmap(lambda st, ss: jax.lax.scan(step, (st, ss), start + jnp.arange(STEPS))[0])(state, s)


saver = jaxsave.save(
    jaxsave.HDF5Collector(path, mode="a" if resuming else "w", sample_stats=("lp",), checkpoint_interval=0),
    checkpoint_every=4,
    block_size=2,
)
global_ids = jnp.arange(LOCAL, dtype=jnp.int32) + LOCAL * pid
template = {"chain": global_ids, "i": jnp.zeros(LOCAL, jnp.int32)}
sample = {"x": jnp.zeros((LOCAL, 3)), "lp": jnp.zeros(LOCAL)}
if resuming:
    ckpt = jaxsave.resume(path)
    assert np.asarray(ckpt.step).tolist() == [STEPS] * LOCAL, ckpt.step
    state = saver.init(sample, template, resume=ckpt)
    s, start = ckpt.solver_state, STEPS
else:
    state = saver.init(sample, template, chains=LOCAL)
    s, start = template, 0
assert np.asarray(state.chain_id).tolist() == list(range(LOCAL))  # chain ids within this process's file

state = jaxsave.shard_state(state, mesh)
s = jaxsave.shard_state(s, mesh)
assert not state.chain_id.is_fully_addressable
specs = P("chains")
out_state, _ = jax.jit(
    jax.shard_map(
        lambda st, ss: run(st, ss, start), mesh=mesh, in_specs=(specs, specs), out_specs=(specs, specs)
    )
)(state, s)
result = saver.postprocess(out_state, None)
assert result["sample_count"].tolist() == [start + STEPS] * LOCAL, result["sample_count"]
stored = jaxsave.load_samples(path)
expect = value(np.asarray(global_ids)[:, None], np.arange(start + STEPS)[None, :])
np.testing.assert_array_equal(stored["x"][..., 0], expect)
np.testing.assert_array_equal(stored["lp"], -expect)
print(f"process {pid}: ok {path}", flush=True)
jax.distributed.shutdown()
