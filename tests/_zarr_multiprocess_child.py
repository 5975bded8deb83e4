"""One process of a multi-process run that writes ONE Zarr store; started by test_zarr_multiprocess.py.

    python _zarr_multiprocess_child.py PORT NUM_PROCESSES PROCESS_ID STORE MODE

Every process has 2 CPU devices and 4 chains (2 per device); the chains of all
processes form one global array, sharded over a mesh of every process's devices,
and advance in one ``shard_map``'d loop. Every process writes its own chains
(global ids ``4 * PROCESS_ID ...``) into the same ``STORE`` through its own
``ZarrCollector(STORE, chains=4 * NUM_PROCESSES, draws=...)``: no merge step.
Chain ``c`` saves ``x = value(c, i) * ones(3)`` and ``lp = -value(c, i)`` at step
``i``, so the parent can check every draw of the store.

With env ``KEYLOG=<path>``, every key the process writes or deletes through zarr's
``LocalStore`` (or jaxsave's plain file writes of a local store) is logged to
``<path>-<pid>`` (``set <key>``, ``delete <key>``).

MODE:
  ``run``     ROUNDS=2 rounds of 8 steps (16 draws), a checkpoint every 4 steps;
  ``resume``  continue every chain from the store's checkpoints by 16 more draws
              (the store was made with ``draws=32``);
  ``long``    ROUNDS rounds (env ``ROUNDS``, default 400) of 8 steps, blocks of 4
              rows: long enough for the parent to SIGKILL a process mid-run. Prints
              ``streaming`` once the first round is done.

Each process prints ``process <pid>: ok`` after postprocess, once its own chains
read back exactly, then leaves through ``jax.distributed.shutdown`` (a barrier: when
process 0, which runs the coordinator, ends, JAX terminates every other process), or
in mode ``long`` with ``os._exit(0)``: the kill test's killed peer never reaches it.
"""

import os
import sys
import time

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

port, nproc, pid, store, mode = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
jax.distributed.initialize(
    coordinator_address=f"127.0.0.1:{port}", num_processes=nproc, process_id=pid, initialization_timeout=300
)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import zarr  # noqa: E402

if os.environ.get("KEYLOG"):  # record every key this process writes or deletes: KEYLOG-<pid>
    log = open(f"{os.environ['KEYLOG']}-{pid}", "w")  # noqa: SIM115

    def logged(name):
        method = getattr(zarr.storage.LocalStore, name)

        async def wrapper(self, key, *args, **kwargs):
            log.write(f"{name} {key}\n")
            log.flush()
            return await method(self, key, *args, **kwargs)

        setattr(zarr.storage.LocalStore, name, wrapper)

    for name in ("set", "set_if_not_exists", "delete"):
        logged(name)
    # jaxsave writes a local store's chunks and counts as plain files, not through zarr's set.
    from jaxsave._store.zarr import store as _zarr_store  # noqa: E402 (its confined store calls write_confined)

    _write = _zarr_store.write_confined

    def logged_write(root, key, *args, **kwargs):
        log.write(f"set {key}\n")
        log.flush()
        return _write(root, key, *args, **kwargs)

    _zarr_store.write_confined = logged_write
from jax.sharding import PartitionSpec as P  # noqa: E402

import jaxsave  # noqa: E402

LOCAL = 4  # chains per process
STEPS = 8  # steps per round (one jit call)
ROUNDS = int(os.environ.get("ROUNDS", "400")) if mode == "long" else 2
CAPACITY = ROUNDS * STEPS if mode == "long" else 2 * ROUNDS * STEPS  # room for a resume in "run"
assert jax.process_count() == nproc and jax.local_device_count() == 2, (jax.process_count(), jax.devices())
mesh = jax.make_mesh((jax.device_count(),), ("chains",))
first = LOCAL * pid
global_ids = np.arange(first, first + LOCAL)


def value(global_chain, step):
    return 1000.0 * global_chain + step


def step(carry, i):
    state, s = carry
    x = value(s["chain"], i).astype(jnp.float32) * jnp.ones(3, jnp.float32)
    s = {"chain": s["chain"], "i": s["i"] + 1}
    state, _ = saver.save(state, True, {"x": x, "lp": -x[0]}, solver_state=s)
    return (state, s), None


def one_round(state, s, start):
    return jax.vmap(lambda st, ss: jax.lax.scan(step, (st, ss), start + jnp.arange(STEPS))[0])(state, s)


collector = jaxsave.ZarrCollector(
    store,
    mode="a" if mode == "resume" else "w",
    sample_stats=("lp",),
    chains=LOCAL * nproc,
    draws=CAPACITY,
    checkpoint_interval=0,
)
saver = jaxsave.save(collector, checkpoint_every=4, block_size=4 if mode == "long" else 2)
template = {"chain": jnp.asarray(global_ids, jnp.int32), "i": jnp.zeros(LOCAL, jnp.int32)}
sample = {"x": jnp.zeros((LOCAL, 3)), "lp": jnp.zeros(LOCAL)}
if mode == "resume":
    ckpt = jaxsave.resume(collector)
    assert np.asarray(ckpt.step).tolist() == [ROUNDS * STEPS] * LOCAL, ckpt.step
    state = saver.init(sample, template, resume=ckpt)
    s, start = ckpt.solver_state, ROUNDS * STEPS
else:
    state = saver.init(sample, template, chains=LOCAL)
    s, start = template, 0

state = jaxsave.shard_state(state, mesh)
s = jaxsave.shard_state(s, mesh)
assert not state.chain_id.is_fully_addressable
specs = P("chains")
run = jax.jit(jax.shard_map(one_round, mesh=mesh, in_specs=(specs, specs, P()), out_specs=(specs, specs)))
for r in range(ROUNDS):
    state, s = run(state, s, start + r * STEPS)
    if r == 0:
        jax.block_until_ready(state)
        # "streaming" once the store holds the arrays: the writer thread writes the first
        # blocks asynchronously (joined for up to 0.1 s), and a kill before that leaves no store.
        deadline = time.monotonic() + 60
        while mode == "long" and not os.path.exists(os.path.join(store, "sample_counts", "zarr.json")):
            assert time.monotonic() < deadline, "no sample_counts array 60 s after the first round"
            time.sleep(0.01)
        print(f"process {pid}: streaming", flush=True)
result = saver.postprocess(state, None)
total = start + ROUNDS * STEPS
assert result["sample_count"].tolist() == [total] * LOCAL, result["sample_count"]
stored = jaxsave.load_samples(store)
expect = value(global_ids[:, None], np.arange(total)[None, :])
np.testing.assert_array_equal(stored["x"][first : first + LOCAL, :total, 0], expect)
np.testing.assert_array_equal(stored["lp"][first : first + LOCAL, :total], -expect)
print(f"process {pid}: ok", flush=True)
if mode == "long":  # the peer may be dead (killed by the test): do not wait for it
    os._exit(0)
jax.distributed.shutdown()  # a barrier: the coordinator (process 0) outlives every other process
