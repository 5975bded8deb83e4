"""ZarrCollector: jit-compiled vmapped loops streaming into Zarr v3 stores (a local directory,
``memory://``), read back bit-exact by jaxsave's readers, xarray and ArviZ."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jaxsave

zarr = pytest.importorskip("zarr", reason="the Zarr tests need zarr (pip install 'jaxsave[zarr]')")
xr = pytest.importorskip("xarray")

STEPS = 23


def _sample(i, key, chain_offset=0.0):
    """A sample of several dtypes: float32 vector, int32 scalar, bfloat16, bool, a typed PRNG key."""
    x = jax.random.normal(key, (3,)) + chain_offset
    return {
        "x": x,
        "i": i.astype(jnp.int32),
        "h": x[:2].astype(jnp.bfloat16),
        "flag": x[0] > 0,
        "key": jax.random.fold_in(jax.random.key(1), i),
        "lp": -jnp.sum(x**2),
    }


TEMPLATE = jax.eval_shape(lambda: _sample(jnp.int32(0), jax.random.key(0)))


def run_vmapped(collector, chains=3, steps=STEPS, thin=2, block_size=4, static=None, **init_kw):
    """A jit-ed, vmapped loop keeping every ``thin``-th step; returns postprocess's result."""
    saver = jaxsave.save(collector, block_size=block_size)
    batched = jax.tree.map(lambda s: jax.ShapeDtypeStruct((chains, *s.shape), s.dtype), TEMPLATE)
    state = saver.init(batched, None, static, chains=chains, **init_kw)

    def chain(state, key):
        def step(state, i):
            sample = _sample(i, jax.random.fold_in(key, i))
            return saver.save(state, i % thin == 0, sample)[0], None

        return jax.lax.scan(step, state, jnp.arange(steps))[0]

    keys = jax.random.split(jax.random.key(0), chains)
    state = jax.jit(jax.vmap(chain))(state, keys)
    return saver.postprocess(state, None)


def _store(kind, tmp_path):
    return os.fspath(tmp_path / "run.zarr") if kind == "dir" else f"memory://jaxsave-test-{uuid.uuid4().hex}"


def assert_same(got, want):
    """Every leaf equal bit for bit (keys by their key data, bfloat16 by its bits)."""
    for key in want:
        a, b = got[key], want[key]
        if jnp.issubdtype(getattr(b, "dtype", np.float32), jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        a, b = np.asarray(a), np.asarray(b)
        assert a.dtype == b.dtype, key
        if a.dtype == ml_dtypes.bfloat16:
            a, b = a.view(np.uint16), b.view(np.uint16)
        np.testing.assert_array_equal(a, b, err_msg=key)


def open_everywhere(store):
    """xarray.open_datatree(engine="zarr") and the installed ArviZ open ``store`` with no glue."""
    tree = xr.open_datatree(store, engine="zarr", consolidated=None)
    assert {"posterior"} <= set(tree.children)
    x = tree["posterior"]["x"]
    assert x.dims == ("chain", "draw", "x_dim_0")
    az = pytest.importorskip("arviz")
    if int(az.__version__.split(".")[0]) >= 1:
        data = az.from_zarr(store)  # ArviZ 1.x: a DataTree
        assert x.shape == data["posterior"]["x"].shape
    else:  # ArviZ 0.x refuses zarr>=3 in from_zarr and points to from_datatree
        data = az.InferenceData.from_datatree(tree)
        assert "posterior" in data.groups()
    return tree


@pytest.mark.parametrize("kind", ["dir", "memory"])
def test_vmapped_loop_streams_bit_exact_with_thinning(tmp_path, kind):
    store = _store(kind, tmp_path)
    want = run_vmapped(jaxsave.MemoryCollector())
    got = run_vmapped(jaxsave.ZarrCollector(store, sample_stats=("lp",)))
    assert got["sample_count"].tolist() == want["sample_count"].tolist() == [12] * 3
    loaded = jaxsave.load_samples(store)
    assert_same(loaded, want["samples"])
    assert_same(jaxsave.load_samples(store, chain=1), jax.tree.map(lambda a: a[1], want["samples"]))
    assert jaxsave.file_info(store).sample_counts.tolist() == [12] * 3

    group = zarr.open_group(store, mode="r")
    assert group["posterior/x"].shape == (3, 12, 3)
    assert group["posterior/x"].chunks[0] == 3  # one writer: its small rows of all chains share a chunk
    assert group["posterior/key"].metadata.dimension_names == ("chain", "draw", "key_dim_0")
    assert group["sample_stats/lp"].metadata.dimension_names == ("chain", "draw")
    assert group["sample_counts"][:].tolist() == [12] * 3
    assert group.attrs["jaxsave_format"] == jaxsave.hdf5.FORMAT_VERSION
    assert group.attrs["jaxsave_layout"] == "posterior"
    assert json.loads(group.attrs["jaxsave_structure"])["leaves"][0]["key"] == ["flag"]
    assert group["posterior/x"].metadata.codecs[-1].to_dict()["name"] == "bytes"  # uncompressed

    tree = open_everywhere(store)
    np.testing.assert_array_equal(tree["posterior"]["x"].values, np.asarray(want["samples"]["x"]))
    data = jaxsave.to_inference_data(store)
    np.testing.assert_array_equal(np.asarray(data["sample_stats"]["lp"]), np.asarray(want["samples"]["lp"]))


def test_chains_initialised_one_by_one_then_stacked(tmp_path):
    """The jax-sgmc pattern: init each chain alone, stack the states, run them under vmap."""
    path = tmp_path / "run.zarr"

    def stacked(collector):
        saver = jaxsave.save(collector, block_size=3)
        states = [saver.init(TEMPLATE, None) for _ in range(3)]
        state = jax.tree.map(lambda *xs: jnp.stack(xs), *states)

        def chain(state, key):
            step = lambda s, i: (saver.save(s, i % 3 != 1, _sample(i, jax.random.fold_in(key, i)))[0], None)
            return jax.lax.scan(step, state, jnp.arange(STEPS))[0]

        state = jax.jit(jax.vmap(chain))(state, jax.random.split(jax.random.key(2), 3))
        return saver.postprocess(state, None)

    want = stacked(jaxsave.MemoryCollector())
    got = stacked(jaxsave.ZarrCollector(path))
    np.testing.assert_array_equal(got["sample_count"], want["sample_count"])
    assert_same(jaxsave.load_samples(path), want["samples"])
    open_everywhere(os.fspath(path))


def test_uneven_chains_counts_per_chain(tmp_path):
    """Chains that keep different steps: per-chain counts, shorter chains read as fill."""
    path = tmp_path / "run.zarr"
    saver = jaxsave.save(jaxsave.ZarrCollector(path), block_size=5)
    state = saver.init({"x": jnp.zeros((3, 2))}, None, chains=3)

    def chain(state, c):
        step = lambda s, i: (saver.save(s, i % (c + 1) == 0, {"x": jnp.full(2, 10.0 * c + i)})[0], None)
        return jax.lax.scan(step, state, jnp.arange(12))[0]

    out = saver.postprocess(jax.jit(jax.vmap(chain))(state, jnp.arange(3)), None)
    assert out["sample_count"].tolist() == [12, 6, 4]
    assert jaxsave.file_info(path).sample_counts.tolist() == [12, 6, 4]
    x = jaxsave.load_samples(path)["x"]
    assert x.shape == (3, 12, 2)
    np.testing.assert_array_equal(x[1, :6, 0], 10.0 + np.arange(0, 12, 2))
    assert np.isnan(x[1, 6:]).all() and np.isnan(x[2, 4:]).all()
    np.testing.assert_array_equal(jaxsave.load_samples(path, chain=2)["x"][:, 0], 20.0 + np.arange(0, 12, 3))
    assert zarr.open_group(path, mode="r")["posterior/x"].shape == (3, 12, 2)  # trimmed to the longest


@pytest.mark.parametrize("known", [True, False])
def test_draw_axis_preallocated_or_grown_then_trimmed(tmp_path, known):
    path = tmp_path / "run.zarr"
    static = jaxsave.static_information(samples_collected=50) if known else None
    collector = jaxsave.ZarrCollector(path, flush_interval=0)
    saver = jaxsave.save(collector, block_size=2)
    state = saver.init({"x": jnp.zeros((2, 1))}, None, static, chains=2)
    body = jax.jit(
        jax.vmap(
            lambda s, start: jax.lax.scan(
                lambda s, i: (saver.save(s, True, {"x": i[None].astype(jnp.float32)})[0], None),
                s,
                start + jnp.arange(10),
            )[0]
        )
    )
    shapes = []
    for k in range(3):
        state = body(state, jnp.full(2, 10 * k))
        jax.block_until_ready(state)
        jaxsave.collectors.drain_writer(collector)
        shapes.append(zarr.open_group(path, mode="r")["posterior/x"].shape[1])
        live = jaxsave.open_live(path).refresh()["x"]
        np.testing.assert_array_equal(
            live[:, :, 0], np.broadcast_to(np.arange(10 * (k + 1)), (2, 10 * (k + 1)))
        )
    if known:
        assert shapes == [50, 50, 50]
    else:
        assert shapes[0] >= 10 and shapes[1] >= 20 and shapes[2] >= 30 and shapes[2] < 50
    saver.postprocess(state, None)
    assert zarr.open_group(path, mode="r")["posterior/x"].shape == (2, 30, 1)
    np.testing.assert_array_equal(jaxsave.load_samples(path)["x"][0, :, 0], np.arange(30))


def test_live_reading_while_the_sampler_runs(tmp_path):
    path = tmp_path / "run.zarr"
    init, save, post = jaxsave.save(jaxsave.ZarrCollector(path, flush_interval=0), block_size=2)
    state = init({"w": jnp.zeros(())})
    for i in range(3):
        state, _ = save(state, True, {"w": jnp.float32(i)})
    live = jaxsave.open_live(path)
    deadline = time.monotonic() + 60  # the writer thread stores the first block
    while live.refresh()["w"].size < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert live.refresh(chain=0)["w"].tolist() == [0.0, 1.0]
    assert live.sample_counts.tolist() == [2]
    post(state, None)
    assert live.refresh(chain=0)["w"].tolist() == [0.0, 1.0, 2.0]


def _interrupted_and_resumed(path, steps, stop, keep_every, between=lambda ckpt: None):
    """Two vmapped AR(1) chains (``x`` and ``lp``, a sample kept every ``keep_every`` steps,
    checkpoints every 8): run for ``steps`` steps in memory (the reference), then into the Zarr
    store ``path``, interrupted after ``stop`` steps, then ``between(checkpoint)``, then resumed
    from the checkpoint to ``steps``. Returns the reference's and the resumed run's postprocess,
    and the checkpoint."""

    def run(saver, state, solver, start, stop):
        def step(carry, i):
            state, (x, key) = carry
            key, sub = jax.random.split(key)
            x = 0.9 * x + 0.1 * jax.random.normal(sub, x.shape)
            sample = {"x": x, "lp": -jnp.sum(x**2)}
            state, _ = saver.save(state, i % keep_every == 0, sample, solver_state=(x, key))
            return (state, (x, key)), None

        return jax.lax.scan(step, (state, solver), jnp.arange(start, stop))[0]

    keys = jax.random.split(jax.random.key(0), 2)
    template = (jnp.zeros((2, 3)), keys)
    sample = {"x": jnp.zeros((2, 3)), "lp": jnp.zeros(2)}
    vrun = lambda saver, a, b: jax.jit(jax.vmap(lambda s, sv: run(saver, s, sv, a, b)))

    ref = jaxsave.save(jaxsave.MemoryCollector(), block_size=4)
    state, _ = vrun(ref, 0, steps)(ref.init(sample, template, chains=2), template)
    want = ref.postprocess(state, None)

    saver = jaxsave.save(jaxsave.ZarrCollector(path, checkpoint_interval=0), checkpoint_every=8, block_size=4)
    state, _ = vrun(saver, 0, stop)(saver.init(sample, template, chains=2), template)
    saver.postprocess(state, None)  # the interrupted run
    ckpt = jaxsave.resume(path)
    between(ckpt)

    saver = jaxsave.save(jaxsave.ZarrCollector(path, mode="a"), checkpoint_every=8, block_size=4)
    state = saver.init(sample, template, resume=ckpt)
    state, _ = vrun(saver, int(ckpt.step[0]), steps)(state, ckpt.solver_state)
    return want, saver.postprocess(state, None), ckpt


def _assert_resumed_exactly(path, want, got):
    np.testing.assert_array_equal(got["sample_count"], want["sample_count"])
    stored = jaxsave.load_samples(path)
    for leaf in ("x", "lp"):
        np.testing.assert_array_equal(stored[leaf], want["samples"][leaf])  # no NaN draw
    open_everywhere(os.fspath(path))


def test_checkpoint_and_exact_resume_in_the_store(tmp_path):
    path = tmp_path / "run.zarr"
    want, got, ckpt = _interrupted_and_resumed(path, steps=30, stop=21, keep_every=3)
    assert ckpt.step.tolist() == [16, 16] and ckpt.chain_ids.tolist() == [0, 1]  # the last at 16
    _assert_resumed_exactly(path, want, got)
    assert int(jaxsave.resume(path).step[0]) == 24


@pytest.mark.parametrize("longer", ["lp", "x"])
def test_resume_after_a_kill_between_two_leaves_resizes(tmp_path, longer):
    """A writer killed while it grew its leaf arrays (one ``zarr.json`` each) leaves one leaf
    longer than the others; the resumed run writes the draws past the shorter ones' end too
    (zarr clipped them silently: NaN draws that the counts said were stored)."""
    path = tmp_path / "run.zarr"

    def kill_while_growing(ckpt):
        assert ckpt.step.tolist() == [16, 16] and ckpt.sample_count.tolist() == [8, 8]
        grown = zarr.open_array(store=os.fspath(path), path=f"posterior/{longer}", mode="r+")
        grown.resize((2, 12, *grown.shape[2:]))  # the kill: this leaf grew, the other did not

    # The draw axis of the interrupted run ends at the checkpoint's count (8).
    want, got, _ = _interrupted_and_resumed(path, steps=40, stop=16, keep_every=2, between=kill_while_growing)
    _assert_resumed_exactly(path, want, got)


def test_resume_skips_the_temporary_of_a_killed_checkpoint_write(tmp_path):
    """A writer killed while it replaced its checkpoint key leaves zarr's temporary beside it
    (``0.<hex>.partial``, possibly empty); resume reads the checkpoint, not the temporary."""
    path = tmp_path / "run.zarr"
    saver = jaxsave.save(jaxsave.ZarrCollector(path), checkpoint_every=4, block_size=4)
    state = saver.init({"x": jnp.zeros(())}, {"x": jnp.int32(0)})

    def step(state, i):
        return saver.save(state, True, {"x": i.astype(jnp.float32)}, solver_state={"x": i})[0], None

    saver.postprocess(jax.jit(lambda s: jax.lax.scan(step, s, jnp.arange(10))[0])(state), None)
    keys = path / "sample_counts" / "jaxsave_checkpoints"
    (keys / f"0.{uuid.uuid4().hex}.partial").write_bytes(b"")
    ckpt = jaxsave.resume(path)
    assert int(ckpt.step) == 8 and int(ckpt.sample_count) == 8


def test_a_write_past_an_arrays_end_is_refused(tmp_path):
    """zarr clips a slice past an array's end; the arrays refuse rather than lose the rows."""
    from jaxsave._store.names import leaf_entries
    from jaxsave._store.zarr.arrays import StoreArrays
    from jaxsave.collectors import sample_layout

    path = tmp_path / "run.zarr"
    run_vmapped(jaxsave.ZarrCollector(path), chains=2, steps=8)
    layout = sample_layout(TEMPLATE)
    arrays = StoreArrays(
        zarr.open_group(path, mode="r+"), leaf_entries(layout.keys, None, "posterior"), layout
    )
    assert arrays.bind() and arrays.shape == (2, 4)
    rows = [np.zeros((1, 2, *a.shape[2:]), a.dtype) for a in arrays.leaves]
    with pytest.raises(jaxsave.FileChangedError, match="too small for draws 3..5"):
        arrays.write(0, 3, rows)
    arrays.write(0, 2, rows)  # within the end: written


def test_cli_inspect_a_zarr_store(tmp_path, capsys):
    path = tmp_path / "run.zarr"
    run_vmapped(jaxsave.ZarrCollector(path, sample_stats=("lp",)), chains=2, steps=6)
    from jaxsave.__main__ import main

    assert main(["inspect", os.fspath(path)]) == 0
    out = capsys.readouterr().out
    assert "chains:   2" in out and "samples:  [3, 3]" in out and "sample_stats" in out
    assert jaxsave.recover(path) is False


def test_rows_unlike_the_sample_are_refused(tmp_path):
    collector = jaxsave.ZarrCollector(tmp_path / "run.zarr")
    chain = collector.register_chain({"x": jnp.zeros(3, jnp.float32)})
    with pytest.raises(TypeError, match="shape"):
        collector.save_block([chain], [np.zeros((1, 2, 4), np.float32)])
    with pytest.raises(TypeError, match="float64"):
        collector.save_block([chain], [np.zeros((1, 2, 3), np.float64)])
    with pytest.raises(TypeError, match="leaves"):
        collector.save_block([chain], [np.zeros((1, 2, 3), np.float32)] * 2)
    with pytest.raises(jaxsave.SaverStateError, match="not registered"):
        collector.save_block([5], [np.zeros((1, 2, 3), np.float32)])
    with pytest.raises(jaxsave.StructureMismatchError):
        collector.register_chain({"y": jnp.zeros(3)})
    collector.save_block([chain], [np.ones((1, 2, 3), np.float32)])
    collector.finalize(chain)
    collector.close()
    assert jaxsave.load_samples(tmp_path / "run.zarr")["x"].tolist() == [[[1.0] * 3] * 2]


def test_bad_arguments_and_places(tmp_path):
    with pytest.raises(ValueError, match="mode"):
        jaxsave.ZarrCollector(tmp_path / "a.zarr", mode="r")
    with pytest.raises(ValueError, match="compression"):
        jaxsave.ZarrCollector(tmp_path / "a.zarr", compression="lzma")
    with pytest.raises(ValueError, match="chains="):
        jaxsave.ZarrCollector(tmp_path / "a.zarr", shared=True)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        jaxsave.ZarrCollector(tmp_path / "missing" / "a.zarr")
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("do not delete")
    with pytest.raises(FileExistsError, match="not a Zarr store"):
        jaxsave.ZarrCollector(precious)
    assert (precious / "thesis.tex").exists()
    other = tmp_path / "other.zarr"
    zarr.open_group(other, mode="w").create_array("data", shape=(3,), dtype="f4")
    with pytest.raises(jaxsave.FileFormatError, match="not written by jaxsave"):
        jaxsave.ZarrCollector(other)
    assert "data" in zarr.open_group(other, mode="r")
    run_vmapped(jaxsave.ZarrCollector(tmp_path / "run.zarr"), chains=1, steps=2)
    with pytest.raises(FileExistsError, match="mode='x'"):
        jaxsave.ZarrCollector(tmp_path / "run.zarr", mode="x")


def test_two_writers_on_one_directory_are_refused(tmp_path):
    first = jaxsave.ZarrCollector(tmp_path / "run.zarr")
    with pytest.raises(jaxsave.FileInUseError):
        jaxsave.ZarrCollector(tmp_path / "run.zarr")
    first.close()
    jaxsave.ZarrCollector(tmp_path / "run.zarr").close()


def _written(tmp_path):
    path = tmp_path / "run.zarr"
    run_vmapped(jaxsave.ZarrCollector(path), chains=2, steps=6)
    return path


def _edit_json(path, change):
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta))


def _sparse_huge(path):
    """Declares 10**9 draws of every leaf (and counts them), stores 3: reading it would allocate GBs."""
    for leaf in [p for p in (path / "posterior").iterdir() if p.is_dir()]:
        _edit_json(leaf / "zarr.json", lambda m: m["shape"].__setitem__(1, 10**9))
    for c in "01":
        (path / "sample_counts" / "c" / c).write_bytes(np.int64(10**9).tobytes())


@pytest.mark.parametrize(
    "damage",
    [
        lambda p: (p / "zarr.json").write_text("{not json"),
        lambda p: (p / "zarr.json").write_bytes(b"\x00" * 10),
        lambda p: _edit_json(p / "zarr.json", lambda m: m["attributes"].pop("jaxsave_format")),
        lambda p: _edit_json(p / "zarr.json", lambda m: m["attributes"].update(jaxsave_format=99)),
        lambda p: _edit_json(p / "zarr.json", lambda m: m["attributes"].update(jaxsave_layout="other")),
        lambda p: _edit_json(p / "zarr.json", lambda m: m["attributes"].update(jaxsave_structure="[1, 2")),
        lambda p: _edit_json(p / "zarr.json", lambda m: m["attributes"].update(jaxsave_structure=7)),
        lambda p: (p / "posterior" / "x" / "zarr.json").unlink(),
        lambda p: _edit_json(p / "posterior" / "x" / "zarr.json", lambda m: m.update(shape=[2, 1, 3])),
        lambda p: _edit_json(p / "posterior" / "x" / "zarr.json", lambda m: m.update(data_type="int8")),
        lambda p: _sparse_huge(p),
        lambda p: (p / "posterior" / "x" / "c" / "0" / "0" / "0").write_bytes(b"short"),
        lambda p: (p / "sample_counts" / "c" / "0").write_bytes(np.array([-3, 6], np.int64).tobytes()),
        lambda p: (p / "sample_counts" / "c" / "0").write_bytes(np.array([3, 10**12], np.int64).tobytes()),
        lambda p: _edit_json(p / "sample_counts" / "zarr.json", lambda m: m.update(data_type="float32")),
    ],
)
def test_damaged_stores_raise_file_format_errors(tmp_path, damage):
    path = _written(tmp_path)
    damage(path)
    with pytest.raises(jaxsave.FileFormatError):
        jaxsave.load_samples(path)
    try:
        jaxsave.file_info(path)
    except jaxsave.FileFormatError:
        pass


def test_not_a_store(tmp_path):
    with pytest.raises(FileNotFoundError):
        jaxsave.load_samples(tmp_path / "missing.zarr" / "")
    (tmp_path / "empty").mkdir()
    with pytest.raises(jaxsave.FileFormatError, match="not a Zarr store"):
        jaxsave.load_samples(tmp_path / "empty")
    with pytest.raises(FileNotFoundError):
        jaxsave.load_samples(f"memory://jaxsave-nothing-{uuid.uuid4().hex}")


def test_import_jaxsave_without_zarr(tmp_path):
    code = (
        "import sys; sys.modules['zarr'] = None\n"
        "import jaxsave\n"
        "try:\n"
        f"    jaxsave.ZarrCollector({os.fspath(tmp_path / 'x.zarr')!r})\n"
        "except ImportError as e:\n"
        "    print('ERR', e)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert "ERR" in out.stdout and "pip install 'jaxsave[zarr]'" in out.stdout, out.stderr


def _shared_run(collector, chains, first, steps=9):
    saver = jaxsave.save(collector, block_size=4)
    static = jaxsave.static_information(samples_collected=steps)
    state = saver.init({"x": jnp.zeros((chains, 2))}, None, static, chains=chains)
    assert state.chain_id.tolist() == list(range(first, first + chains))

    def chain(state, c):
        step = lambda s, i: (saver.save(s, True, {"x": jnp.stack([c, i]).astype(jnp.float32)})[0], None)
        return jax.lax.scan(step, state, jnp.arange(steps))[0]

    return saver.postprocess(jax.jit(jax.vmap(chain))(state, state.chain_id), None)


@pytest.mark.parametrize("kind", ["dir", "memory"])
def test_two_writers_of_one_shared_store(tmp_path, kind):
    """Two collectors writing their own chains of one store (as two processes would): the
    writer of chain 0 creates it, the other waits for it; global chain ids, no merge."""
    store = _store(kind, tmp_path)
    owner = jaxsave.ZarrCollector(store, shared=True, chains=4, first_chain=0, run_id="run-1")
    other = jaxsave.ZarrCollector(store, shared=True, chains=4, first_chain=2, run_id="run-1")
    assert owner.owner and not other.owner
    _shared_run(owner, 2, 0)
    _shared_run(other, 2, 2)
    assert jaxsave.file_info(store).sample_counts.tolist() == [9] * 4
    x = jaxsave.load_samples(store)["x"]
    np.testing.assert_array_equal(x[:, :, 0], np.repeat(np.arange(4.0)[:, None], 9, axis=1))
    np.testing.assert_array_equal(x[:, :, 1], np.tile(np.arange(9.0), (4, 1)))
    tree = open_everywhere(store)
    assert tree["posterior"]["x"].shape == (4, 9, 2)
    if kind == "dir":  # several writers: one chain a chunk, so that they never share a key
        group = zarr.open_group(str(store), mode="r")
        assert group["posterior/x"].chunks[0] == 1 and group["sample_counts"].chunks == (1,)


def test_shared_store_errors(tmp_path):
    store = tmp_path / "run.zarr"
    with pytest.raises(jaxsave.SaverStateError, match="waited"):
        jaxsave.ZarrCollector(store, shared=True, chains=2, first_chain=1, run_id="r", create_timeout=0.2)
    owner = jaxsave.ZarrCollector(store, shared=True, chains=2, run_id="r")
    with pytest.raises(jaxsave.SaverStateError, match="samples_collected"):
        owner.register_chain({"x": jnp.zeros(2)})
    owner.close()
    with pytest.raises(jaxsave.SaverStateError, match="waited"):  # a store of another run: not ours
        jaxsave.ZarrCollector(store, shared=True, chains=2, first_chain=1, run_id="other", create_timeout=0.2)
    small = jaxsave.ZarrCollector(store, shared=True, chains=1, run_id="r2", draws=5)
    small.register_chain({"x": jnp.zeros(2)})
    with pytest.raises(jaxsave.SaverStateError, match="beyond the store's 1 chains"):
        small.register_chain({"x": jnp.zeros(2)})
    small.close()


def test_compression_and_store_objects(tmp_path):
    store = zarr.storage.MemoryStore()
    want = run_vmapped(jaxsave.MemoryCollector(), chains=2, steps=8)
    run_vmapped(jaxsave.ZarrCollector(store, compression="zstd"), chains=2, steps=8)
    assert_same(jaxsave.load_samples(store), want["samples"])
    codecs = [c.to_dict()["name"] for c in zarr.open_group(store, mode="r")["posterior/x"].metadata.codecs]
    assert "zstd" in codecs
    local = zarr.storage.LocalStore(tmp_path / "obj.zarr")
    run_vmapped(jaxsave.ZarrCollector(local, compression="gzip"), chains=2, steps=8)
    assert_same(jaxsave.load_samples(tmp_path / "obj.zarr"), want["samples"])
    holder = jaxsave.ZarrCollector(tmp_path / "obj.zarr", mode="a")
    with pytest.raises(jaxsave.FileInUseError):  # a LocalStore object is locked like its directory
        jaxsave.ZarrCollector(local, mode="a")
    holder.close()


def test_a_chain_added_after_the_first_block_grows_the_chain_axis(tmp_path):
    path = tmp_path / "run.zarr"
    saver = jaxsave.save(jaxsave.ZarrCollector(path, flush_interval=0), block_size=2)
    run = jax.jit(
        lambda s, c: jax.lax.scan(
            lambda s, i: (saver.save(s, True, {"x": c + i})[0], None), s, jnp.arange(5.0)
        )[0]
    )
    first = run(saver.init({"x": jnp.zeros(())}), 0.0)
    jax.block_until_ready(first)
    second = run(saver.init({"x": jnp.zeros(())}), 10.0)
    for state in (first, second):
        out = saver.postprocess(state, None)
    assert out["sample_count"].tolist() == 5
    x = jaxsave.load_samples(path)["x"]
    np.testing.assert_array_equal(x, [np.arange(5.0), 10 + np.arange(5.0)])
    assert zarr.open_group(path, mode="r")["sample_counts"][:].tolist() == [5, 5]


@pytest.mark.parametrize(
    "damage",
    [
        lambda p: (p / "sample_counts" / "zarr.json").write_text("{"),
        lambda p: (p / "sample_counts" / "c" / "0").write_bytes(np.array([-1, 6], np.int64).tobytes()),
        lambda p: (p / "posterior" / "x" / "zarr.json").write_text("[]"),
    ],
)
def test_continuing_a_damaged_store_is_refused(tmp_path, damage):
    path = _written(tmp_path)
    damage(path)
    with pytest.raises(jaxsave.FileFormatError):
        collector = jaxsave.ZarrCollector(path, mode="a")
        run_vmapped(collector, chains=2, steps=2)


def test_a_huge_draws_extent_is_trimmed_at_close_in_time(tmp_path):
    # zarr's own resize visits every chunk of the old grid: draws=2**40 took hours to close
    path = tmp_path / "s.zarr"
    collector = jaxsave.ZarrCollector(path, draws=2**40)
    init, save, post = jaxsave.save(collector, block_size=8)
    state = init({"x": jnp.zeros(3)}, None, jaxsave.static_information())
    state = jax.lax.scan(
        lambda s, i: save(s, True, {"x": jnp.full(3, i, jnp.float32)}), state, jnp.arange(20)
    )[0]
    start = time.monotonic()
    post(state)
    collector.close()
    assert time.monotonic() - start < 30
    assert jaxsave.load_samples(path)["x"][0, :, 0].tolist() == list(range(20))
    assert zarr.open_group(path, mode="r")["posterior/x"].shape == (1, 20, 3)


def test_a_shrink_deletes_exactly_the_chunks_outside(tmp_path):
    from jaxsave._store.zarr.arrays import resize

    array = zarr.create_array(tmp_path / "a.zarr", shape=(2, 100), chunks=(1, 10), dtype="i4", fill_value=0)
    array[:] = np.arange(200).reshape(2, 100) + 1
    resize(array, (2, 35))
    chunks = sorted(os.listdir(tmp_path / "a.zarr" / "c" / "0"))
    assert chunks == ["0", "1", "2", "3"] and sorted(os.listdir(tmp_path / "a.zarr" / "c" / "1")) == chunks
    resize(array, (1, 35))
    assert not (tmp_path / "a.zarr" / "c" / "1").exists() or not os.listdir(tmp_path / "a.zarr" / "c" / "1")
    resize(array, (1, 100))  # grown again: the deleted chunks read as the fill value
    assert array[0, :35].tolist() == list(range(1, 36)) and not array[0, 40:].any()


@pytest.mark.parametrize("draws", [10**27, 2**62 + 1, -1, True])
def test_a_draws_argument_past_int64_room_is_refused(tmp_path, draws):
    with pytest.raises(ValueError, match=r"draws must be an int from 0 to 2\*\*62 or None"):
        jaxsave.ZarrCollector(tmp_path / "s.zarr", draws=draws)


def test_writers_of_one_store_checkpointing_different_states_are_refused(tmp_path):
    # each writer stores its chains' checkpoints under its own key; read together, writer 0's
    # structure relabelled writer 1's leaves, or np.stack raised a bare ValueError
    store = tmp_path / "run.zarr"
    a = jaxsave.ZarrCollector(store, shared=True, chains=2, first_chain=0, run_id="r", draws=4)
    b = jaxsave.ZarrCollector(store, shared=True, chains=2, first_chain=1, run_id="r", draws=4)
    for collector, solver in ((a, {"pos": jnp.zeros(2)}), (b, {"vel": jnp.zeros(2)})):
        saver = jaxsave.save(collector, checkpoint_every=2)
        state = saver.init({"x": jnp.zeros(2)}, solver)
        body = lambda c, i, saver=saver: (
            (saver.save(c[0], True, {"x": jnp.zeros(2)}, solver_state=c[1])[0], c[1]),
            None,
        )  # noqa: E731
        state = jax.lax.scan(body, (state, solver), jnp.arange(4))[0][0]
        saver.postprocess(state, None)
    with pytest.raises(
        jaxsave.StructureMismatchError,
        match=r"does not match the checkpoints stored already \(another sampler state\)",
    ):
        jaxsave.resume(store)
