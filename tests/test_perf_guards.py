"""Regression guards for the streaming cost (issue 17): what the compiled step contains, not timings.

The cost of ``save()`` per step is the work XLA runs in the loop body, so these tests count
the equations jaxsave adds to it, check that ``jaxsave.scan``'s steps are as light as a loop
that stacks its samples, and that chains ``init``-ed one by one and stacked compile to the very
program of ``init(..., chains=C)``. Timings are in ``benchmarks/peer.py``. For pytree files: the
header's bytes per leaf and the read calls of a load (timings in ``benchmarks/serialize.py``).
"""

import io
import json
import re
import struct
import threading

import jax
import jax.extend
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from _helpers import scan_carries

import jaxsave


def _sgld(x, k):
    return x - 1e-3 * x + 1e-2 * jax.random.normal(k, x.shape, x.dtype)


def _equations(jaxpr) -> int:
    """Equations of ``jaxpr``, those of nested jaxprs (jit, cond branches, scans) included."""
    n = 0
    for eqn in jaxpr.eqns:
        n += 1
        for name in ("jaxpr", "branches", "call_jaxpr"):
            value = eqn.params.get(name)
            for sub in value if isinstance(value, (tuple, list)) else [value] if value is not None else []:
                n += _equations(getattr(sub, "jaxpr", sub))
    return n


def _scan_bodies(jaxpr, length=None):
    """The bodies of the scans in ``jaxpr`` (of ``length`` steps, if given), outermost first."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "scan":
            body = eqn.params["jaxpr"].jaxpr
            if length is None or eqn.params["length"] == length:
                yield body
            yield from _scan_bodies(body, length)


def test_save_adds_a_bounded_number_of_operations_per_step():
    """save() adds 12 equations to the step (the row write, keep mask, counters, flush predicate,
    the flush's cond); more means every step of every user's loop got slower."""
    keys = jax.random.split(jax.random.key(0), 100)
    saver = jaxsave.save(jaxsave.MemoryCollector())
    state = saver.init({"x": jnp.zeros(10)})

    def with_save(state, x):
        def step(carry, inp):
            state, x = carry
            i, k = inp
            x = _sgld(x, k)
            return saver.save(state, i % 2 == 0, {"x": x})[0], x

        return jax.lax.scan(lambda c, inp: (step(c, inp), None), (state, x), (jnp.arange(100), keys))[0]

    def plain(x):
        return jax.lax.scan(lambda x, inp: (_sgld(x, inp[1]), inp[0] % 2 == 0), x, (jnp.arange(100), keys))

    ours = next(_scan_bodies(jax.make_jaxpr(with_save)(state, jnp.zeros(10)).jaxpr))
    peer = next(_scan_bodies(jax.make_jaxpr(plain)(jnp.zeros(10)).jaxpr))
    saver.postprocess(state)
    assert _equations(ours) - _equations(peer) <= 12


def _updated_int_carries(fn, *args) -> list[tuple[int, ...]]:
    """The shapes of the int32 values that the body of ``fn``'s outer scan carries and changes
    (a carry passed through unchanged costs nothing per step)."""
    eqn = next(e for e in jax.make_jaxpr(fn)(*args).jaxpr.eqns if e.primitive.name == "scan")
    body = eqn.params["jaxpr"].jaxpr
    made_by = {id(v): e for e in body.eqns for v in e.outvars}

    def source(v):  # through custom_vmap calls that return an input unchanged (XLA drops them)
        e = made_by.get(id(v))
        if e is not None and e.primitive.name == "custom_vmap_call":
            inner = e.params["call"].jaxpr
            k = inner.outvars[e.outvars.index(v)]
            if k in inner.invars:
                return source(e.invars[inner.invars.index(k)])
        return v

    inputs = {id(v) for v in body.invars}
    carried = [source(v) for v in body.outvars[: scan_carries(eqn)]]
    return sorted(v.aval.shape for v in carried if id(v) not in inputs and v.aval.dtype == jnp.int32)


@pytest.mark.parametrize("chains", [None, 4])
def test_save_carries_no_counter_the_host_can_count(chains):
    """Issue 17: a carried counter that the step updates cost 1.3 us a step at one chain (2.5
    against 1.2 us on a 0.75 us step): the host counts each block's first step and its kept
    samples, so save() updates only the step and the ring buffer's fill. Under vmap it keeps the
    block start too (it orders XLA:CPU's loop body; 25 against 29 us a step at 64 chains)."""
    saver = jaxsave.save(jaxsave.MemoryCollector())
    x0 = jnp.zeros((chains, 10) if chains else (10,))
    state = saver.init({"x": x0}, chains=chains)

    def chain(state, x):
        def step(carry, i):
            state, x = carry
            x = x + 1.0
            return (saver.save(state, i % 2 == 0, {"x": x})[0], x), None

        return jax.lax.scan(step, (state, x), jnp.arange(100))[0]

    run = jax.vmap(chain) if chains else chain
    updated = _updated_int_carries(run, state, x0)
    saver.postprocess(state)
    assert updated == ([(4,)] * 3 if chains else [()] * 2), updated


_HLO_LINE = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = .*? ([\w\-]+)\((.*)$")


def _hlo_computations(text: str) -> dict[str, dict[str, tuple[str, list[str]]]]:
    """Compiled HLO text as ``{computation: {instruction: (opcode, operand names)}}``."""
    comps: dict[str, dict[str, tuple[str, list[str]]]] = {}
    current: dict[str, tuple[str, list[str]]] | None = None
    for line in text.splitlines():
        if line.endswith("{") and not line.startswith(" "):
            current = comps.setdefault(line.split()[1 if line.startswith("ENTRY") else 0].lstrip("%"), {})
        elif line.startswith("}"):
            current = None
        elif current is not None and (m := _HLO_LINE.match(line)):
            args = m.group(3).split("), ")[0]  # the operands, not the attributes after them
            current[m.group(1)] = (m.group(2), re.findall(r"%([\w.\-]+)", args))
    return comps


def _conditional_operands_copied_from_the_carry(text: str) -> int:
    """How many operands of the conditionals in loop bodies are copies of a carried value,
    i.e. the value at the start of the step of something the step overwrites."""
    comps = _hlo_computations(text)
    bodies = set(re.findall(r"body=%?([\w.\-]+)", text))
    copied = 0
    for name in bodies:
        body = comps[name]
        for opcode, operands in body.values():
            if opcode != "conditional":
                continue
            passed = [x for tup in operands[1:] for x in body.get(tup, ("", [tup]))[1]]
            for x in passed:
                op, srcs = body.get(x, ("", []))
                if op == "copy" and srcs and body.get(srcs[0], ("",))[0] == "get-tuple-element":
                    copied += 1
    return copied


def test_the_flush_reads_no_copy_of_the_carried_state():
    """Issue 17: the flush's cond read the carried block_start that the same step replaces, so
    XLA:CPU copied it and ran the loop body on two threads: 4.1 us a step instead of 1.5 (the
    ring+cb floor is 1.3) on a 0.66 us step. The compiled body must pass the cond no such copy."""
    saver = jaxsave.save(jaxsave.MemoryCollector())
    state = saver.init({"x": jnp.zeros(10)})

    def run(state, x, key):
        def step(carry, i):
            state, x, key = carry
            key, k = jax.random.split(key)
            x = _sgld(x, k)
            return (saver.save(state, i % 2 == 0, {"x": x})[0], x, key), None

        return jax.lax.scan(step, (state, x, key), jnp.arange(100))[0]

    text = jax.jit(run).lower(state, jnp.zeros(10), jax.random.key(0)).compile().as_text()
    saver.postprocess(state)
    assert "conditional(" in text
    assert _conditional_operands_copied_from_the_carry(text) == 0


_HLO_TYPE = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (\(.*?\)|\S+) ")


@pytest.mark.parametrize("keep", ["constant", "traced"])
def test_a_one_chain_flush_is_passed_no_predicate(keep):
    """For one chain the flush's ``active`` is its cond's predicate, true in the branch taken.
    Passed in, it made XLA compute the predicate twice, once as its own kernel, in every step:
    the cond is given the rows and counters only."""
    saver = jaxsave.save(jaxsave.MemoryCollector())
    state = saver.init({"x": jnp.zeros(10)})

    def run(state, x, keys):
        def step(carry, inp):
            state, x = carry
            i, k = inp
            x = _sgld(x, k)
            return (saver.save(state, True if keep == "constant" else i % 2 == 0, {"x": x})[0], x), None

        return jax.lax.scan(step, (state, x), (jnp.arange(100), keys))[0]

    keys = jax.random.split(jax.random.key(0), 100)
    text = jax.jit(run).lower(state, jnp.zeros(10), keys).compile().as_text()
    saver.postprocess(state)
    types = {m.group(1): m.group(2) for line in text.splitlines() if (m := _HLO_TYPE.match(line))}
    comps = _hlo_computations(text)
    passed = [
        types[tup]
        for name in set(re.findall(r"body=%?([\w.\-]+)", text))
        for opcode, operands in comps[name].values()
        if opcode == "conditional"
        for tup in operands[1:]
    ]
    assert passed and all("f32[4096,10]" in t for t in passed if t != "()"), passed
    assert not any("pred[]" in t for t in passed), passed


def test_scan_steps_are_the_stacking_loops_steps():
    """The body of jaxsave.scan's inner scan adds at most the packing of the sample into a row
    to a plain lax.scan that stacks the samples: no ring buffer, counter, mask or flush per step."""
    step = lambda x, k: (_sgld(x, k), (True, {"x": x}))  # noqa: E731
    keys = jax.random.split(jax.random.key(0), 64)
    saver = jaxsave.save(jaxsave.MemoryCollector(), block_size=16)
    state = saver.init({"x": jnp.zeros(10)})
    ours = jax.make_jaxpr(lambda s: jaxsave.scan(saver, step, s, jnp.zeros(10), keys))(state)
    peer = jax.make_jaxpr(lambda: jax.lax.scan(lambda x, k: (step(x, k)[0], x), jnp.zeros(10), keys[:16]))()
    inner = next(_scan_bodies(ours.jaxpr, 16))
    saver.postprocess(state)
    assert _equations(inner) <= _equations(next(_scan_bodies(peer.jaxpr, 16))) + 2


def test_chains_initialised_one_by_one_compile_to_the_same_program(tmp_path):
    """jax-sgmc's solvers init chains one by one and stack the states: that must cost exactly what
    init(..., chains=C) costs, i.e. lower to the same program for the same input layout."""
    chains, x0 = 4, jnp.zeros((4, 10))
    lowered = []
    for one_by_one in (False, True):
        saver = jaxsave.save(jaxsave.HDF5Collector(tmp_path / f"{one_by_one}.h5"))
        if one_by_one:
            states = [saver.init({"x": x0[c]}) for c in range(chains)]
            state = jax.tree.map(lambda *leaves: jnp.stack(leaves), *states)
        else:
            state = saver.init({"x": x0}, chains=chains)

        def chain(state, x, saver=saver):
            def step(carry, i):
                state, x = carry
                x = x + 1.0
                return (saver.save(state, i % 2 == 0, {"x": x})[0], x), None

            return jax.lax.scan(step, (state, x), jax.numpy.arange(50))[0]

        run = jax.jit(jax.vmap(chain))
        lowered.append(run.lower(state, x0).as_text())
        saver.postprocess(run(state, x0)[0])
    assert lowered[0] == lowered[1]


# ----------------------------------------------------------------------------- pytree files


def _ten_thousand_leaves() -> dict:
    """benchmarks/serialize.py's small tree: 10k tiny leaves of four dtypes in 100 dicts."""
    rng = np.random.default_rng(0)
    tree: dict = {}
    for i in range(10_000):
        dtype = (np.float32, np.int32, ml_dtypes.bfloat16, np.float16)[i % 4]
        leaf = rng.normal(size=((4,), (2, 3), (), (8,))[i % 4]).astype(dtype)
        tree.setdefault(f"module_{i // 100:03d}", {})[f"param_{i % 100:03d}"] = leaf
    return tree


def _header(raw: bytes) -> tuple[int, dict]:
    (hlen,) = struct.unpack("<Q", raw[8:16])
    return hlen, json.loads(raw[24 : 24 + hlen])


def test_a_pytree_files_header_costs_few_bytes_per_leaf():
    """The header is parsed whole at every load: format 1's per-leaf objects took 62 bytes a leaf."""
    buf = io.BytesIO()
    jaxsave.save_pytree(buf, _ten_thousand_leaves())
    hlen, header = _header(buf.getvalue())
    table = len(json.dumps(header["leaves"], separators=(",", ":")))
    assert table <= 40 * 10_000, table  # names (27 bytes with quotes here), dtypes, shapes: 37
    assert hlen <= 60 * 10_000, hlen  # with the tree structure (21 bytes a leaf)


class _CountingFile(io.BytesIO):
    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.reads = 0

    def read(self, *args):
        self.reads += 1
        return super().read(*args)

    def readinto(self, buffer):
        self.reads += 1
        return super().readinto(buffer)


def test_a_tree_of_large_and_small_arrays_is_read_in_one_call():
    """The arrays a load needs, contiguous in the file, are read with one ``readinto`` into one buffer."""
    rng = np.random.default_rng(1)
    tree = {"big": [rng.normal(size=(512, 512 + 64 * i)).astype(np.float32) for i in range(4)]}
    tree["small"] = [np.arange(i, dtype=np.int16) for i in range(50)]
    buf = io.BytesIO()
    jaxsave.save_pytree(buf, tree)
    f = _CountingFile(buf.getvalue())
    out = jaxsave.load_pytree(f, as_numpy=True)
    assert f.reads <= 3 + 1, f.reads  # sniff, prefix, header; all the data
    assert all(a.ctypes.data % 64 == 0 for a in out["big"] + out["small"])
    for a, b in zip(out["big"] + out["small"], tree["big"] + tree["small"]):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("layout", ["posterior", "chains"])
def test_hdf5_blocks_of_many_leaves_are_one_direct_chunk_write_per_leaf(tmp_path, monkeypatch, layout):
    """Issue 17's many-leaf case: the chunks are as long as a block, so every block is one whole
    chunk per leaf, written with ``write_direct_chunk`` (no hyperslab goes through HDF5's chunk
    cache), and each dataset's chunk layout is read from h5py once, not at every block."""
    import h5py
    import numpy as np

    from jaxsave._store.hdf5 import chunks

    slabs, targets = [], []
    real_slab, real_target = chunks._write_slab, chunks.Target.of.__func__

    def counted_slab(ds, offset, rows):
        if rows.size:
            slabs.append(offset)
        real_slab(ds, offset, rows)

    def counted_target(cls, ds, axis):
        targets.append(ds.name)
        return real_target(cls, ds, axis)

    monkeypatch.setattr(chunks, "_write_slab", counted_slab)
    monkeypatch.setattr(chunks.Target, "of", classmethod(counted_target))
    leaves, width, block, blocks = 20, 256, 96, 4  # 20 KiB a draw: the usual chunk would be 64 draws
    path = tmp_path / "s.h5"
    init, save, post = jaxsave.save(jaxsave.HDF5Collector(path, layout=layout), block_size=block)
    sample = [jnp.zeros(width) for _ in range(leaves)]
    state = init(sample, static_information=jaxsave.static_information(samples_collected=block * blocks))

    @jax.jit
    def run(state):
        def step(state, i):
            return save(state, True, [jnp.full(width, i * 100 + j, jnp.float32) for j in range(leaves)])[
                0
            ], None

        return jax.lax.scan(step, state, jnp.arange(block * blocks))[0]

    post(run(state), None)
    assert slabs == []  # every row went in a whole chunk
    assert len(targets) == leaves  # one look at each dataset, for all blocks
    with h5py.File(path, "r") as f:
        for j in range(leaves):
            ds = f[f"posterior/list_element_{j}" if layout == "posterior" else f"chain~0/list_element_{j}"]
            lead = (1,) if layout == "posterior" else ()
            assert ds.chunks == (*lead, block, width) and ds.id.get_num_chunks() == blocks
            np.testing.assert_array_equal(ds[(0,) * len(lead)][:, 0], np.arange(block * blocks) * 100 + j)


def _callbacks(jaxpr):
    """The io_callback equations in ``jaxpr`` and every jaxpr nested in its equations' params."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "io_callback":
            yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else [value]:
                sub = getattr(sub, "jaxpr", sub)
                if isinstance(sub, jax.extend.core.Jaxpr):
                    yield from _callbacks(sub)


def test_a_small_block_leaves_as_one_callback_operand():
    """Each io_callback argument costs about what the call does (0.05 ms of 0.1 ms on CPU): the
    header, the samples of two dtypes and a checkpoint's solver state travel as one byte array,
    with save() and with jaxsave.scan."""
    keys = jax.random.split(jax.random.key(0), 100)
    saver = jaxsave.save(jaxsave.MemoryCollector(), checkpoint_every=20)
    sample = {"x": jnp.zeros(10), "i": jnp.int32(0)}
    state = saver.init(sample, {"x": jnp.zeros(10)})

    def step(x, inp):
        i, k = inp
        x = _sgld(x, k)
        return x, (True, {"x": x, "i": i})

    def with_save(state, x):
        def body(carry, inp):
            state, x = carry
            x, (keep, s) = step(x, inp)
            return (saver.save(state, keep, s, solver_state={"x": x})[0], x), None

        return jax.lax.scan(body, (state, x), (jnp.arange(100), keys))[0]

    def with_scan(state, x):
        return jaxsave.scan(saver, step, state, x, (jnp.arange(100), keys), checkpoint=lambda x: {"x": x})

    for run in (with_save, with_scan):
        calls = list(_callbacks(jax.make_jaxpr(run)(state, jnp.zeros(10)).jaxpr))
        assert calls and [len(c.invars) for c in calls] == [1] * len(calls), run.__name__
    saver.postprocess(state)


def test_thinned_scan_carries_only_the_users_carry_per_step():
    """jaxsave.scan(thin=10): the scans that run steps carry the user's carry and nothing of the
    saving state (no buffer, counter or mask per step), and only every 10th step is stacked."""
    saver = jaxsave.save(jaxsave.MemoryCollector(), block_size=25)
    state = saver.init({"x": jnp.zeros(10)})
    keys = jax.random.split(jax.random.key(0), 1000)

    def step(carry, k):
        x, key = carry
        key, k2 = jax.random.split(key)
        x = _sgld(x, k) + _sgld(x, k2)
        return (x, key), (True, {"x": x})

    jaxpr = jax.make_jaxpr(
        lambda s: jaxsave.scan(saver, step, s, (jnp.zeros(10), jax.random.key(1)), keys, thin=10)
    )(state)
    saver.postprocess(state)
    user_carry = 2  # x and the key
    inner = [
        (eqn.params["length"], scan_carries(eqn), len(eqn.outvars) - scan_carries(eqn))
        for eqn in _scan_eqns(jaxpr.jaxpr)
    ]
    blocks, rows, skipped = inner
    assert rows == (25, user_carry, 2)  # 25 kept rows a block: their keep bits and packed samples
    assert skipped == (9, user_carry, 0)  # the 9 steps between kept ones: no outputs
    assert blocks[0] == 4


def _scan_eqns(jaxpr):
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "scan":
            yield eqn
            yield from _scan_eqns(getattr(eqn.params["jaxpr"], "jaxpr", eqn.params["jaxpr"]))


# The loop body's thunk graph (tests/_thunk_graph.py): XLA:CPU hands half of the ready thunks
# to another thread whenever more than 8 are ready, at every step. With the benchmark's step
# (benchmarks/peer.py) that was the 1-chain slowdown of hdf5 thin 1 and of hdf5+ckpt (4.2 us a
# step instead of 1.4-2.1; the CPU time doubled): save()'s bookkeeping must leave that room.
_STEPS = [f"{k}-{b}-{t}" for k in ("hdf5", "ckpt") for b in ("light", "heavy") for t in (1, 10)]
# While the state carries block_start and saved_samples, their copies at the top of the body
# pass the threshold in these cases (without them, the host counting them, none does).
_OVER_WITH_OLD_COUNTERS = {"hdf5-light-1", "hdf5-heavy-1", "ckpt-light-1", "ckpt-heavy-1", "ckpt-heavy-10"}


# Known, not fixed: on jax 0.12 the unthinned heavy step still has 10 thunks ready at once (the
# loop counter's copy feeds four of save()'s scalar kernels while the key split's second stage is
# ready): 3.2 us a step against 1.3 for the light step (docs/performance.md, session 11); with a
# constant keep it was 9 until save() tied a constant keep to the sample (ordering.tied_to).
_OVER_ON_JAX_012 = {"hdf5-heavy-1"}


def _carries_old_counters() -> bool:
    saver = jaxsave.save(jaxsave.MemoryCollector())
    state = saver.init({"x": jnp.zeros(2)})
    saver.postprocess(state)
    return (
        getattr(state, "block_start", None) is not None and getattr(state, "saved_samples", None) is not None
    )


def _jax_version() -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", jax.__version__)[:2])


@pytest.fixture(scope="module")
def thunk_logs():
    import _thunk_graph

    return _thunk_graph.compile_cases(_STEPS)


def _check_not_split(log: str, case: str, known: str | None) -> None:
    """At most 8 thunks of the one loop body in ``log`` are ready at once; a case ``known`` to
    split (why) must still split, and is an expected failure."""
    import _thunk_graph

    bodies = _thunk_graph.loop_bodies(log)
    assert len(bodies) == 1, f"expected one loop body in XLA's log, found {len(bodies)}"
    ready = _thunk_graph.most_ready(bodies[0])
    if known:
        assert ready > _thunk_graph.SPLIT_THRESHOLD, (
            f"{case} is no longer split: drop it from the known cases"
        )
        pytest.xfail(f"{ready} ready thunks: {known}")
    assert ready <= _thunk_graph.SPLIT_THRESHOLD, f"{ready} thunks ready at once: XLA:CPU splits every step"


def _known_on_jax_012(case: str) -> str | None:
    if case in _OVER_ON_JAX_012 and _jax_version() >= (0, 12):
        return f"a known case on jax {jax.__version__} (docs/performance.md)"
    return None


@pytest.mark.parametrize("case", _STEPS)
def test_the_loop_body_is_not_split_over_threads(thunk_logs, case):
    """At most 8 thunks of the loop body are ready at once (one thread's walk of XLA's graph),
    with and without checkpoints (checkpoint_every=500), thinned or not."""
    known = _known_on_jax_012(case)
    if case in _OVER_WITH_OLD_COUNTERS and _carries_old_counters():
        known = "the copies of the carried block_start and saved_samples"
    _check_not_split(thunk_logs[case], case, known)


# The same for vmapped chains (64, as benchmarks/peer.py) and for `keep=True` (a constant, as many
# users write it), slow: 16 more compilations. A constant keep let XLA fuse the fill's advance into
# each of its five readers, all ready as soon as the fill's copy was, beside the user's step: 12
# ready under vmap with the light step, 1.8-2.4x the CPU time of `keep=i % 1 == 0`
# (`python benchmarks/constant_keep.py`). save() now ties a constant keep to the sample
# (ordering.tied_to): 6. With checkpoints and a traced keep, the checkpoint's remainder was read
# at the top of the step too (ckpt-light-1-64: 9); it now waits for the fill's advance (8).
# Known, not fixed (docs/performance.md, session 17): the heavy step under vmap with a constant
# keep, where the key split's nine roots and the copies of the carried step, fill and block start
# are ready at once.
_VMAPPED_STEPS = [f"{k}-{b}-all" for k in ("hdf5", "ckpt") for b in ("light", "heavy")] + [
    f"{k}-{b}-{t}-64" for k in ("hdf5", "ckpt") for b in ("light", "heavy") for t in ("all", "1", "10")
]
_SPLIT_KNOWN = {"hdf5-heavy-all-64", "ckpt-heavy-all-64"}


@pytest.fixture(scope="module")
def vmapped_thunk_logs():
    import _thunk_graph

    return _thunk_graph.compile_cases(_VMAPPED_STEPS)


@pytest.mark.slow
@pytest.mark.parametrize("case", _VMAPPED_STEPS)
def test_the_vmapped_loop_body_is_not_split_over_threads(vmapped_thunk_logs, case):
    """As above, for 64 vmapped chains and for a constant ``keep=True``; the known splits must
    stay known (a fix shows up as a case to drop)."""
    known = _known_on_jax_012(case)
    if case in _SPLIT_KNOWN:
        known = "a known case (docs/performance.md, session 16)"
    _check_not_split(vmapped_thunk_logs[case], case, known)


def _blocks_to_hdf5(path, blocks: int, block: int = 4, width: int = 3, known: int | None = None) -> None:
    saver = jaxsave.save(jaxsave.HDF5Collector(path), block_size=block)
    state = saver.init(
        {"x": jnp.zeros(width)}, static_information=jaxsave.static_information(samples_collected=known)
    )
    run = jax.jit(
        lambda s: jax.lax.scan(
            lambda s, i: saver.save(s, True, {"x": jnp.full(width, i, jnp.float32)}),
            s,
            jnp.arange(block * blocks),
        )[0]
    )
    saver.postprocess(run(state))


def test_a_block_reads_no_driver_and_checks_the_free_space_once(tmp_path, monkeypatch, one_call_per_block):
    """Per block the HDF5 writer checks the free space (one statvfs: the full-disk safety) but
    reads no ``File.driver`` (10 us each; read once per handle opened)."""
    import os

    import h5py

    counts = {"driver": 0, "statvfs": 0}
    driver = h5py.File.driver
    statvfs = os.statvfs

    def counting_driver(self):
        counts["driver"] += 1
        return driver.fget(self)

    def counting_statvfs(path):
        counts["statvfs"] += 1
        return statvfs(path)

    monkeypatch.setattr(h5py.File, "driver", property(counting_driver))
    monkeypatch.setattr(os, "statvfs", counting_statvfs)
    seen = []
    for blocks in (4, 16):
        counts.update(driver=0, statvfs=0)
        _blocks_to_hdf5(tmp_path / f"{blocks}.h5", blocks)
        seen.append(dict(counts))
    assert seen[0]["driver"] == seen[1]["driver"], seen  # per handle, not per block
    assert seen[1]["statvfs"] - seen[0]["statvfs"] == 12, seen  # one per block


@pytest.mark.parametrize("known", [True, False])
def test_a_block_opens_no_hdf5_object_and_grows_no_dataset_sized_for_it(tmp_path, monkeypatch, known):
    """Issue 17, one chain: the writer's CPU competes with the loop on a small machine. Per block
    it opens no object by its path (the dimension scales' handles are kept: 0.1-0.3 ms each), and a
    known count of up to 16384 draws is allocated at once: no resize (0.2-0.6 ms each) but the
    trim's, for 16384 draws as for 4096."""
    import h5py

    counts = {"opened": 0, "resized": 0}
    getitem, resize = h5py.Group.__getitem__, h5py.Dataset.resize

    def counting_getitem(self, name):
        counts["opened"] += 1
        return getitem(self, name)

    def counting_resize(self, size, axis=None):
        counts["resized"] += 1
        return resize(self, size, axis)

    monkeypatch.setattr(h5py.Group, "__getitem__", counting_getitem)
    monkeypatch.setattr(h5py.Dataset, "resize", counting_resize)
    seen = []
    for blocks in (1, 4):  # blocks of 1 MiB, each a collector call of its own (not joined)
        counts.update(opened=0, resized=0)
        _blocks_to_hdf5(tmp_path / f"{blocks}.h5", blocks, 4096, 64, 4096 * blocks if known else None)
        seen.append(dict(counts))
    monkeypatch.undo()
    with h5py.File(tmp_path / "4.h5", "r") as f:
        np.testing.assert_array_equal(f["posterior/draw"][:], np.arange(4 * 4096))
    assert seen[0]["opened"] == seen[1]["opened"], seen
    if known:
        assert seen[0]["resized"] == seen[1]["resized"], seen


def test_the_callback_leaves_the_unpacking_of_samples_to_the_writer(monkeypatch):
    """Issue 17: the flush callback runs on the XLA thread that the loop waits for; cutting a
    block of 100 leaves into per-leaf views took 0.46 of its 0.65 ms. Only the writer unpacks."""
    from jaxsave._stream.packing import Packing

    threads = []
    original = Packing.unpack

    def unpack(self, buffers):
        threads.append(threading.current_thread().name)
        return original(self, buffers)

    monkeypatch.setattr(Packing, "unpack", unpack)
    saver = jaxsave.save(jaxsave.MemoryCollector(), block_size=4)
    sample = {f"w{i}": jnp.zeros(3) for i in range(10)}
    state = saver.init(sample)
    run = jax.jit(lambda s: jax.lax.scan(lambda s, i: saver.save(s, True, sample), s, jnp.arange(20))[0])
    out = saver.postprocess(run(state))
    assert out["sample_count"] == 20
    from_callbacks = [t for t in threads if t != threading.main_thread().name]
    assert len(from_callbacks) == 5 and all(t.startswith("jaxsave-writer") for t in from_callbacks), threads


@pytest.mark.parametrize("layout", ["posterior", "chains"])
@pytest.mark.parametrize("one_by_one", [False, True], ids=["chains=C", "one by one"])
def test_the_datasets_are_created_while_the_loop_compiles(tmp_path, monkeypatch, layout, one_by_one):
    """Issue 17, 64 chains, thin 10: a short run's one block reaches the host at postprocess,
    and creating the datasets there (a copy of the file renamed over it: 3.5-4.3 ms) added to
    the run. With the count of samples known, they are created when the loop is traced, on the
    writer thread, while XLA compiles: the run and postprocess copy the file no more. Unknown,
    the first block's length sets the chunks, as before."""
    import h5py

    from jaxsave._store.hdf5.held_file import HeldFile

    chains, x0 = 4, jnp.zeros((4, 10))
    names = ["posterior/x"] if layout == "posterior" else [f"chain~{c}/x" for c in range(chains)]
    for known in (True, False):
        path = tmp_path / f"{known}.h5"
        collector = jaxsave.HDF5Collector(path, layout=layout)
        saver = jaxsave.save(collector)
        info = jaxsave.static_information(samples_collected=25 if known else None)
        if one_by_one:
            states = [saver.init({"x": x0[c]}, None, info) for c in range(chains)]
            state = jax.tree.map(lambda *leaves: jnp.stack(leaves), *states)
        else:
            state = saver.init({"x": x0}, None, info, chains=chains)

        def chain(state, x, saver=saver):
            def step(carry, i):
                state, x = carry
                return (saver.save(state, i % 2 == 0, {"x": x + i})[0], x), None

            return jax.lax.scan(step, (state, x), jnp.arange(50))[0][0]

        run = jax.jit(jax.vmap(chain)).lower(state, x0).compile()
        saver.init.__self__.drain()  # the streamer's: wait for the writer
        with h5py.File(path, "r", swmr=collector.swmr) as f:
            assert [n in f for n in names] == [known] * len(names)
        changes: list = []
        change = HeldFile.change
        monkeypatch.setattr(
            HeldFile, "change", lambda self, *a, **k: changes.append(a) or change(self, *a, **k)
        )
        saver.postprocess(run(state, x0))
        monkeypatch.undo()
        assert len(changes) == (0 if known else 1)
        assert jaxsave.load_samples(path)["x"].shape == (chains, 25, 10)
