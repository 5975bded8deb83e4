"""Sharded chains on 8 CPU devices in one process; started by test_sharded.py (XLA_FLAGS set here).

    python _sharded_child.py OUT_DIR

Checks, each with real jit-compiled loops and real HDF5 files:
shard_map and pmap over 8 devices (distinct chain ids, one callback per device
per flush, callbacks on several threads), and a sample leaf that is itself
sharded over the devices (the ring buffer stays sharded and holds one block;
the host receives whole blocks).
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import threading  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P

import jaxsave  # noqa: E402
from jaxsave._stream import streamer as _stream  # noqa: E402
from jaxsave._stream.flush import FIELDS  # noqa: E402

out_dir = sys.argv[1]
assert jax.device_count() == 8, jax.devices()
mesh = jax.make_mesh((8,), ("chains",))

# Count the flush callbacks as they reach the host (the real _receive runs unchanged).
CALLS: list = []
_receive = _stream.Streamer._receive


def counting_receive(self, payload, **kwargs):
    CALLS.append((threading.get_ident(), np.shape(payload[0]), [np.shape(x) for x in payload[1]]))
    return _receive(self, payload, **kwargs)


_stream.Streamer._receive = counting_receive

CHAINS, STEPS, BLOCK = 16, 24, 4  # every other step kept: 12 rows, 3 full blocks


def chain_loop(save):
    def step(carry, i):
        state, x = carry
        x = x + 1.0
        state, _ = save(state, i % 2 == 0, {"x": x, "lp": -x[0]})
        return (state, x), None

    return lambda state, x: jax.lax.scan(step, (state, x), jnp.arange(STEPS))[0]


def counting_loop(save, name, steps):
    """``run(state, x)``: ``steps`` steps of ``x += 1``, each saved (kept) as ``{name: x}``."""

    def step(carry, i):
        state, x = carry
        x = x + 1.0
        return (save(state, True, {name: x})[0], x), None

    return lambda state, x: jax.lax.scan(step, (state, x), jnp.arange(steps))[0]


def check_file(path, x0):
    stored = jaxsave.load_samples(path)
    kept = np.arange(1, STEPS + 1)[::2]
    np.testing.assert_array_equal(stored["x"], np.asarray(x0)[:, None, :] + kept[None, :, None])


def shard_map_case():
    path = os.path.join(out_dir, "shard_map.h5")
    init, save, post = jaxsave.save(jaxsave.HDF5Collector(path, sample_stats=("lp",)), block_size=BLOCK)
    state = init({"x": jnp.zeros((CHAINS, 3)), "lp": jnp.zeros(CHAINS)}, chains=CHAINS)
    x0 = jnp.arange(CHAINS * 3, dtype=jnp.float32).reshape(CHAINS, 3) * 100
    state, x = jaxsave.shard_state(state, mesh), jaxsave.shard_state(x0, mesh)
    run = jax.jit(
        jax.shard_map(jax.vmap(chain_loop(save)), mesh=mesh, in_specs=P("chains"), out_specs=P("chains"))
    )
    CALLS.clear()
    out, _ = run(state, x)
    assert out.chain_id.sharding.spec == P("chains")
    np.testing.assert_array_equal(np.asarray(out.chain_id), np.arange(CHAINS))  # distinct ids
    result = post(out, None)
    flushes = STEPS // 2 // BLOCK  # only kept steps take a row
    assert len(CALLS) == 8 * flushes, f"{len(CALLS)} callbacks; one per device and flush is {8 * flushes}"
    assert {c[1] for c in CALLS} == {(CHAINS // 8, len(FIELDS) + BLOCK)}, {
        c[1] for c in CALLS
    }  # each: its 2 chains
    threads = len({c[0] for c in CALLS})
    assert result["sample_count"].tolist() == [STEPS // 2] * CHAINS
    check_file(path, x0)
    print(f"shard_map: {len(CALLS)} callbacks for {flushes} flushes on 8 devices, from {threads} threads")


def pmap_case():
    path = os.path.join(out_dir, "pmap.h5")
    init, save, post = jaxsave.save(jaxsave.HDF5Collector(path, sample_stats=("lp",)), block_size=BLOCK)
    state = init({"x": jnp.zeros((CHAINS, 3)), "lp": jnp.zeros(CHAINS)}, chains=CHAINS)
    x0 = jnp.arange(CHAINS * 3, dtype=jnp.float32).reshape(CHAINS, 3)
    per_device = lambda t: jax.tree.map(lambda a: a.reshape(8, CHAINS // 8, *a.shape[1:]), t)  # noqa: E731
    CALLS.clear()
    out, _ = jax.pmap(jax.vmap(chain_loop(save)))(per_device(state), per_device(x0))
    out = jax.tree.map(lambda a: a.reshape(CHAINS, *a.shape[2:]), out)
    result = post(out, None)
    assert len(CALLS) == 8 * (STEPS // 2 // BLOCK), len(CALLS)
    assert result["sample_count"].tolist() == [STEPS // 2] * CHAINS
    check_file(path, x0)
    print(f"pmap: {len(CALLS)} callbacks")


def sharded_sample_case():
    n = 8 * 1024  # a parameter vector split over the 8 devices; a block (131 KB) is cut into pieces
    path = os.path.join(out_dir, "sharded_sample.h5")
    auto = jax.make_mesh((8,), ("d",), axis_types=(AxisType.Auto,))
    init, save, post = jaxsave.save(jaxsave.HDF5Collector(path), block_size=BLOCK)
    state = init({"w": jnp.zeros(n)})
    state = state._replace(data=(jax.device_put(state.data[0], NamedSharding(auto, P(None, "d"))),))
    w0 = jax.device_put(jnp.arange(n, dtype=jnp.float32), NamedSharding(auto, P("d")))

    compiled = jax.jit(counting_loop(save, "w", STEPS)).lower(state, w0).compile()
    hlo = compiled.as_text()
    gathers = [line for line in hlo.splitlines() if " all-gather(" in line]
    # The only gather is of one block (BLOCK rows), for the callback: never of a whole history.
    assert gathers and all(f"f32[{BLOCK},{n}]" in line for line in gathers), gathers
    stats = compiled.memory_analysis()
    block_bytes = BLOCK * n * 4
    # per device: its shard of the block and of w, plus small fields
    assert stats.argument_size_in_bytes < block_bytes // 8 + n * 4 // 8 + 4096, stats
    CALLS.clear()
    out, w = jax.block_until_ready(compiled(state, w0))
    assert out.data[0].sharding.spec == P(None, "d") and out.data[0].shape == (BLOCK, n)
    assert [c[2] for c in CALLS] == [[(BLOCK, n)]] * (STEPS // BLOCK), [c[2] for c in CALLS]  # whole blocks
    post(out, None)
    stored = jaxsave.load_samples(path, chain=0)["w"]
    np.testing.assert_array_equal(stored, np.arange(n)[None, :] + np.arange(1, STEPS + 1)[:, None])
    print(
        f"sharded sample: per-device arguments {stats.argument_size_in_bytes} B, one block "
        f"{block_bytes} B, temp {stats.temp_size_in_bytes} B; gathers: {len(gathers)}"
    )


def large_blocks_case():
    """Default block size: 8 chains x 4096 rows x 10 floats = 1.3 MB per device and flush.

    Arguments of 100 KiB or more used to hang this run (every device waiting in a
    callback for a host copy no thread would make); jaxsave._stream.callback cuts them.
    """
    path = os.path.join(out_dir, "large_blocks.h5")
    init, save, post = jaxsave.save(jaxsave.HDF5Collector(path))
    state = init({"x": jnp.zeros((64, 10))}, chains=64)
    rows = state.keep_mask.shape[-1]
    steps = 2 * rows + 5
    x0 = jnp.arange(640, dtype=jnp.float32).reshape(64, 10)

    chain = counting_loop(save, "x", steps)
    run = jax.jit(jax.shard_map(jax.vmap(chain), mesh=mesh, in_specs=P("chains"), out_specs=P("chains")))
    CALLS.clear()
    out, _ = run(jaxsave.shard_state(state, mesh), jaxsave.shard_state(x0, mesh))
    assert post(out, None)["sample_count"].tolist() == [steps] * 64
    assert len(CALLS) == 8 * 2, len(CALLS)  # still one callback per device and flush
    stored = jaxsave.load_samples(path)["x"]
    np.testing.assert_array_equal(stored, np.asarray(x0)[:, None, :] + np.arange(1, steps + 1)[None, :, None])
    print(f"large blocks: {rows} rows x 8 chains per device, {len(CALLS)} callbacks")


CASES = sys.argv[2:] or ["shard_map", "pmap", "sharded_sample", "large_blocks"]
for case in CASES:
    globals()[case + "_case"]()
print("ok", flush=True)
