"""HDF5Collector files: layout read by xarray/h5netcdf and ArviZ, chunking, compression, attributes."""

import datetime
import json
import math

import arviz as az
import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import xarray as xr
from _helpers import group_names

import jaxsave


def sampler_run(collector, chains=3, steps=40, thin=1, samples_collected=None, block_size=8, dim=4):
    """A jit-compiled vmapped scan; the sample at step i of chain c is x = c * 1000 + i (plus lp, step_size)."""
    init, save, post = jaxsave.save(collector, block_size=block_size)
    template = {"x": jnp.zeros((chains, dim)), "lp": jnp.zeros(chains), "step_size": jnp.zeros(chains)}
    state = init(template, None, jaxsave.static_information(samples_collected), chains=chains)

    def chain(state, c):
        def step(s, i):
            v = (c * 1000 + i).astype(jnp.float32)
            return save(s, i % thin == 0, {"x": jnp.full(dim, v), "lp": -v, "step_size": v / 10})

        return jax.lax.scan(step, state, jnp.arange(steps))[0]

    state = jax.jit(jax.vmap(chain))(state, jnp.arange(chains))
    return post(state, None)


def expected_x(chains, steps, thin=1):
    i = np.arange(0, steps, thin)
    return (np.arange(chains)[:, None] * 1000 + i[None, :]).astype(np.float32)


def test_xarray_opens_posterior_and_sample_stats_with_named_dims(tmp_path):
    path = tmp_path / "s.h5"
    sampler_run(jaxsave.HDF5Collector(path, sample_stats=("lp", "step_size")), thin=2)
    with xr.open_dataset(path, group="posterior", engine="h5netcdf") as post:
        assert dict(post["x"].sizes) == {"chain": 3, "draw": 20, "x_dim_0": 4}
        assert set(post.data_vars) == {"x"}
        np.testing.assert_array_equal(post["x"].values[..., 0], expected_x(3, 40, 2))
        np.testing.assert_array_equal(post["chain"].values, [0, 1, 2])
        np.testing.assert_array_equal(post["draw"].values, np.arange(20))
    with xr.open_dataset(path, group="sample_stats", engine="h5netcdf") as stats:
        assert set(stats.data_vars) == {"lp", "step_size"}
        assert stats["lp"].dims == ("chain", "draw")
        np.testing.assert_array_equal(stats["lp"].values, -expected_x(3, 40, 2))


def test_arviz_reads_the_file_directly(tmp_path):
    path = tmp_path / "s.h5"
    sampler_run(jaxsave.HDF5Collector(path, sample_stats=lambda key: key[0] in ("lp", "step_size")))
    idata = az.from_netcdf(path)
    assert {"posterior", "sample_stats"} <= group_names(idata)
    assert dict(idata.posterior["x"].sizes) == {"chain": 3, "draw": 40, "x_dim_0": 4}
    np.testing.assert_allclose(idata.sample_stats["step_size"].values, expected_x(3, 40) / 10, rtol=1e-6)
    summary = az.summary(idata, var_names=["x"])
    assert len(summary) == 4
    tree = xr.open_datatree(path, engine="h5netcdf")  # how ArviZ 1.x reads files
    assert dict(tree["posterior"].dataset["x"].sizes) == {"chain": 3, "draw": 40, "x_dim_0": 4}
    assert tree["sample_stats"].dataset["lp"].dims == ("chain", "draw")
    tree.close()


@pytest.mark.parametrize("known", [True, False])
def test_preallocated_or_growing_datasets_end_trimmed(tmp_path, known):
    path = tmp_path / "s.h5"
    result = sampler_run(
        jaxsave.HDF5Collector(path), steps=50, thin=3, samples_collected=100 if known else None
    )
    assert result["sample_count"].tolist() == [17, 17, 17]
    with h5py.File(path, "r") as f:
        ds = f["posterior/x"]
        assert ds.shape == (3, 17, 4)
        assert ds.maxshape == (None, None, 4)
        assert ds.chunks[:2] == (1, 100 if known else ds.chunks[1])
        if not known:
            assert ds.chunks[1] >= 1024  # many draws per chunk: reading draws is fast
        assert f["posterior/draw"].shape == (17,)
        np.testing.assert_array_equal(ds[..., 0], expected_x(3, 50, 3))
        assert f.attrs["sample_counts"].tolist() == [17, 17, 17]


def test_chunks_of_big_samples_are_whole_rows(tmp_path):
    path = tmp_path / "s.h5"
    init, save, post = jaxsave.save(jaxsave.HDF5Collector(path), block_size=2)
    state = init({"w": jnp.zeros((512, 1024))})
    for i in range(3):
        state, _ = save(state, True, {"w": jnp.full((512, 1024), i, jnp.float32)})
    post(state, None)
    with h5py.File(path, "r") as f:
        assert f["posterior/w"].chunks == (1, 1, 512, 1024)
        assert f["posterior/w"][0, :, 0, 0].tolist() == [0, 1, 2]


@pytest.mark.parametrize("compression", [None, "gzip", "lzf"])
def test_compression(tmp_path, compression):
    path = tmp_path / "s.h5"
    sampler_run(jaxsave.HDF5Collector(path, compression=compression), chains=2)
    with h5py.File(path, "r") as f:
        assert f["posterior/x"].compression == compression
        assert f["posterior/x"].shuffle == (compression is not None)
    np.testing.assert_array_equal(jaxsave.load_samples(path)["x"][..., 0], expected_x(2, 40))


def test_root_attributes(tmp_path):
    path = tmp_path / "s.h5"
    sampler_run(jaxsave.HDF5Collector(path, sample_stats=("lp",)), chains=2, steps=10)
    with h5py.File(path, "r") as f:
        attrs = dict(f.attrs)
    assert attrs["jaxsave_version"] == jaxsave.__version__
    assert attrs["jaxsave_format"] == jaxsave.hdf5.FORMAT_VERSION
    assert attrs["jaxsave_layout"] == "posterior"
    created = datetime.datetime.fromisoformat(attrs["created"])
    assert abs((datetime.datetime.now(datetime.timezone.utc) - created).total_seconds()) < 600
    assert attrs["sample_counts"].tolist() == [10, 10]
    structure = json.loads(attrs["jaxsave_structure"])
    assert [(v["group"], v["name"], v["shape"], v["dtype"]) for v in structure["leaves"]] == [
        ("sample_stats", "lp", [], "float32"),
        ("posterior", "step_size", [], "float32"),
        ("posterior", "x", [4], "float32"),
    ]
    assert structure["treespec"]["root"]["t"] == "dict"


def test_older_chains_layout(tmp_path):
    path = tmp_path / "s.h5"
    sampler_run(jaxsave.HDF5Collector(path, layout="chains"), chains=2, steps=10, thin=2)
    with h5py.File(path, "r") as f:
        assert sorted(f) == ["chain~0", "chain~1"]
        assert f["chain~1/x"].shape == (5, 4)
        assert f["chain~1"].attrs["sample_count"] == 5
        np.testing.assert_array_equal(f["chain~1/lp"][:], -expected_x(2, 10, 2)[1])
    np.testing.assert_array_equal(jaxsave.load_samples(path, chain=1)["x"][:, 0], expected_x(2, 10, 2)[1])


def test_sample_stats_and_names_are_checked(tmp_path):
    def register(collector, sample):
        try:
            collector.register_chain(init_sample=sample)
        finally:
            collector.close()

    with pytest.raises(jaxsave.StructureMismatchError, match="not top-level keys"):
        register(jaxsave.HDF5Collector(tmp_path / "a.h5", sample_stats=("logp",)), {"lp": jnp.zeros(())})
    with pytest.raises(ValueError, match="layout='posterior'"):
        jaxsave.HDF5Collector(tmp_path / "b.h5", layout="chains", sample_stats=("lp",))
    with pytest.raises(jaxsave.StructureMismatchError, match="both become posterior/a.b"):
        register(jaxsave.HDF5Collector(tmp_path / "c.h5"), {"a.b": jnp.zeros(()), "a": {"b": jnp.zeros(())}})
    with pytest.raises(jaxsave.StructureMismatchError, match="dimension name"):
        register(jaxsave.HDF5Collector(tmp_path / "d.h5"), {"draw": jnp.zeros(())})
    with pytest.raises(jaxsave.StructureMismatchError, match="dimension name"):
        register(jaxsave.HDF5Collector(tmp_path / "e.h5"), {"w": jnp.zeros(2), "w_dim_0": jnp.zeros(())})


def test_uneven_chains_single_chain_saves(tmp_path):
    """Chains kept different numbers of samples (separate, unvmapped runs)."""
    path = tmp_path / "s.h5"
    init, save, post = jaxsave.save(jaxsave.HDF5Collector(path), block_size=4)
    run = jax.jit(lambda s, n: jax.lax.scan(lambda s, i: save(s, i < n, {"v": i}), s, jnp.arange(10))[0])
    states = [init({"v": jnp.int32(0)}) for _ in range(2)]
    post(run(states[0], 7), None)
    post(run(states[1], 3), None)
    with h5py.File(path, "r") as f:
        assert f.attrs["sample_counts"].tolist() == [7, 3]
        assert f["posterior/v"].shape == (2, 7)
    both = jaxsave.load_samples(path)["v"]
    assert both.tolist() == [list(range(7)), [0, 1, 2, 0, 0, 0, 0]]


def test_swmr_off_writes_an_hdf5_1_8_file(tmp_path):
    path = tmp_path / "s.h5"
    collector = jaxsave.HDF5Collector(path, swmr=False)
    assert collector.file.libver[0] == "earliest"
    sampler_run(collector, chains=2, steps=8)
    with open(path, "rb") as fh:
        assert fh.read(9)[8] == 0  # superblock version 0
    np.testing.assert_array_equal(jaxsave.load_samples(path)["x"][..., 0], expected_x(2, 8))


def test_user_supplied_file(tmp_path):
    path = tmp_path / "s.h5"
    with h5py.File(path, "w", libver="latest") as f:
        f.attrs["mine"] = 1
        collector = jaxsave.HDF5Collector(f)
        assert collector.swmr
        sampler_run(collector, chains=2, steps=8)
        assert f.id.valid  # not closed by the collector
    with h5py.File(path, "r") as f:
        assert f.attrs["mine"] == 1 and f["posterior/x"].shape == (2, 8, 4)
    with h5py.File(tmp_path / "old.h5", "w") as f:
        with pytest.raises(ValueError, match="libver='latest'"):
            jaxsave.HDF5Collector(f, swmr=True)


class CountingDataset:
    """A real h5py dataset that counts the chunks written to it directly."""

    def __init__(self, ds):
        self.ds, self.direct = ds, []
        outer = self

        class _Id:
            def __getattr__(self, name):
                return getattr(ds.id, name)

            def write_direct_chunk(self, offsets, data):
                outer.direct.append(offsets)
                ds.id.write_direct_chunk(offsets, data)

        self.id = _Id()

    def __getattr__(self, name):
        return getattr(self.ds, name)

    def __setitem__(self, index, value):
        self.ds[index] = value


@pytest.mark.parametrize("compression", [None, "gzip"])
@pytest.mark.parametrize(("start", "n"), [(0, 4), (0, 16), (4, 8), (2, 13), (5, 2), (4, 16), (12, 8)])
def test_blocks_write_whole_chunks_directly_and_edges_through_hdf5(tmp_path, start, n, compression):
    """Chunks of 4 draws x 64 Ki floats (1 MiB) in a dataset of 18 draws: whole chunks go to the file."""
    from jaxsave._store.hdf5.datasets import write_block, write_rows

    width, chains, draws = 2**16, 3, 18
    rng = np.random.default_rng(start)
    block = rng.normal(size=(chains, n, width)).astype(np.float32)
    with h5py.File(tmp_path / "d.h5", "w", libver="latest") as f:
        post = CountingDataset(
            f.create_dataset(
                "post",
                shape=(chains, draws, width),
                chunks=(1, 4, width),
                dtype="f4",
                fillvalue=np.float32(np.nan),
                compression=compression,
            )
        )
        per_chain = CountingDataset(
            f.create_dataset(
                "chain",
                shape=(draws, width),
                chunks=(4, width),
                dtype="f4",
                fillvalue=np.float32(np.nan),
                compression=compression,
            )
        )
        stop = min(start + n, draws)
        block = block[:, : stop - start]
        write_block(post, 0, start, block)  # each chain's rows contiguous: written as they are
        strided = np.repeat(block, 2, axis=2)[:, :, ::2]  # the same rows, not contiguous: copied first
        write_rows(per_chain, (), start, strided[1])
        expected = np.full((chains, draws, width), np.nan, np.float32)
        expected[:, start:stop] = block
        np.testing.assert_array_equal(post.ds[...], expected)
        np.testing.assert_array_equal(per_chain.ds[...], expected[1])
        whole = [
            k for k in range(0, 16, 4) if start <= k and k + 4 <= stop
        ]  # draws 16, 17: chunk past the end
        assert [o[1] for o in post.direct] == ([] if compression else whole * chains)
        assert [o[0] for o in per_chain.direct] == ([] if compression else whole)


def test_small_whole_chunks_go_directly_other_dtypes_and_cut_rows_through_hdf5(tmp_path):
    """A whole chunk of any size is one direct write (as fast or faster than a hyperslab even at
    160 bytes); rows of another dtype, or chunks that cut a row, go through HDF5."""
    from jaxsave._store.hdf5.datasets import Target, write_rows

    with h5py.File(tmp_path / "d.h5", "w") as f:
        small = CountingDataset(f.create_dataset("small", shape=(8, 10), chunks=(4, 10), dtype="f4"))
        write_rows(small, (), 0, np.arange(80, dtype=np.float32).reshape(8, 10))
        wide = CountingDataset(f.create_dataset("wide", shape=(4, 2**16), chunks=(1, 2**16), dtype="f8"))
        write_rows(wide, (), 0, np.ones((4, 2**16), np.float32))  # converted by HDF5, not copied raw
        cut = CountingDataset(f.create_dataset("cut", shape=(8, 10), chunks=(4, 5), dtype="f4"))
        write_rows(cut, (), 0, np.ones((8, 10), np.float32), Target.of(cut.ds, 0))
        assert small.direct == [(0, 0), (4, 0)] and wide.direct == [] and cut.direct == []
        assert (small.ds[...] == np.arange(80).reshape(8, 10)).all()
        assert (wide.ds[...] == 1).all() and (cut.ds[...] == 1).all()
        assert Target.of(small.ds, 0) == (4, True, np.dtype("f4")) and not Target.of(cut.ds, 0).direct


def big_sample(shape, dtype, c, i):
    """A sample whose every element differs (within bfloat16's 8 bits: exact up to 256)."""
    return (jnp.arange(math.prod(shape)) % 251 + c * 3 + i).astype(dtype).reshape(shape)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_big_samples_leave_one_row_at_a_time_without_a_device_buffer(tmp_path, dtype):
    """Rows over 2 MiB: blocks of one row sent as they are made, each a whole chunk on disk."""
    path, chains, steps = tmp_path / "s.h5", 3, 7
    init, save, post = jaxsave.save(jaxsave.HDF5Collector(path))
    shape = (2**10, 2**10) if dtype == jnp.bfloat16 else (2**9, 2**10)  # 2 MiB, + 4 B of "i"
    state = init({"w": jnp.zeros((chains, *shape), dtype), "i": jnp.zeros(chains, jnp.int32)}, chains=chains)
    assert sorted(b.shape for b in state.data) == [(chains, 0, 1), (chains, 0, math.prod(shape))]

    def chain(state, c):
        def step(s, i):
            return save(s, (i + c) % 2 == 0, {"w": big_sample(shape, dtype, c, i), "i": i})[0], None

        return jax.lax.scan(step, state, jnp.arange(steps))[0]

    state = jax.jit(jax.vmap(chain))(state, jnp.arange(chains))
    assert post(state, None)["sample_count"].tolist() == [4, 3, 4]
    samples = jaxsave.load_samples(path)
    for c in range(chains):
        kept = [i for i in range(steps) if (i + c) % 2 == 0]
        assert samples["i"][c, : len(kept)].tolist() == kept
        for d, i in enumerate(kept):
            np.testing.assert_array_equal(samples["w"][c, d], np.asarray(big_sample(shape, dtype, c, i)))
    with h5py.File(path, "r") as f:
        assert f["posterior/w"].chunks == (1, 1, *shape)


def test_one_row_blocks_with_checkpoints_and_a_single_chain(tmp_path):
    """block_size=1: checkpoint steps that keep nothing send an empty block; every kept row arrives."""
    path = tmp_path / "s.h5"
    init, save, post = jaxsave.save(jaxsave.HDF5Collector(path), checkpoint_every=3, block_size=1)
    shape = (300, 1024)  # 1.2 MB rows: whole 1-row chunks written directly
    state = init({"w": jnp.zeros(shape), "k": jax.random.key(0)}, {"n": jnp.int32(0)})
    assert [b.shape[0] for b in state.data] == [0, 0]

    def step(s, i):
        sample = {"w": big_sample(shape, jnp.float32, 0, i), "k": jax.random.fold_in(jax.random.key(0), i)}
        return save(s, i % 4 == 1, sample, solver_state={"n": i})[0], None

    state = jax.jit(lambda s: jax.lax.scan(step, s, jnp.arange(14))[0])(state)
    assert int(post(state, None)["sample_count"]) == 4
    samples = jaxsave.load_samples(path)
    for d, i in enumerate([1, 5, 9, 13]):
        np.testing.assert_array_equal(samples["w"][0, d], np.asarray(big_sample(shape, jnp.float32, 0, i)))
        assert (
            jax.random.key_data(samples["k"][0, d]).tolist()
            == jax.random.key_data(jax.random.fold_in(jax.random.key(0), i)).tolist()
        )
    assert int(jaxsave.resume(path).step) == 12


def test_rows_unlike_the_sample_are_refused(tmp_path):
    collector = jaxsave.HDF5Collector(tmp_path / "s.h5")
    try:
        chain = collector.register_chain(
            init_sample={"a": np.zeros(8, np.float32), "b": np.zeros((), np.int32)}
        )
        with pytest.raises(TypeError, match=r"rows of leaf a have shape \(4,\), the sample's is \(8,\)"):
            collector.save(chain, [np.ones((3, 4), np.float32), np.ones(3, np.int32)])
        with pytest.raises(TypeError, match="got rows of 1 leaves, the sample has 2"):
            collector.save(chain, [np.ones((3, 8), np.float32)])
        with pytest.raises(TypeError, match="disagree on their leading"):
            collector.save_block([chain], [np.ones((1, 3, 8), np.float32), np.ones((1, 2), np.int32)])
        collector.save(chain, [np.ones((3, 8), np.float32), np.arange(3, dtype=np.int32)])
    finally:
        collector.close()
    with h5py.File(tmp_path / "s.h5", "r") as f:
        assert f.attrs["sample_counts"].tolist() == [3]
        assert (f["posterior/a"][0] == 1).all() and f["posterior/b"][0].tolist() == [0, 1, 2]


@pytest.mark.parametrize(
    "sample",
    [{"x": jnp.zeros(2, jnp.int32)}, {"x": jnp.zeros(3)}, {"y": jnp.zeros(2)}],
    ids=["dtype", "shape", "names"],
)
def test_mode_a_refuses_samples_of_another_structure_and_keeps_the_file(tmp_path, sample):
    """A file continued with mode="a" takes only samples like those it holds: another dtype was
    cast into its datasets and the structure attribute overwritten (the old draws then no longer
    loaded), another shape or name failed inside h5py."""
    path = tmp_path / "s.h5"
    init, save, post = jaxsave.save(jaxsave.HDF5Collector(path))
    state = init({"x": jnp.zeros(2)})
    state, _ = save(state, True, {"x": jnp.full(2, 1.5)})
    post(state, None)
    init, save, post = jaxsave.save(jaxsave.HDF5Collector(path, mode="a"))
    with pytest.raises(jaxsave.StructureMismatchError, match="holds samples of another structure"):
        init(sample)
    np.testing.assert_array_equal(jaxsave.load_samples(path)["x"], [[[1.5, 1.5]]])


def test_mode_a_with_swmr_on_a_file_written_without_it_says_what_to_pass(tmp_path):
    """A file written with swmr=False, continued with the default (SWMR), raised HDF5's raw
    OSError "superblock version for SWMR is less than 3"."""
    path = tmp_path / "s.h5"
    init, save, post = jaxsave.save(jaxsave.HDF5Collector(path, swmr=False))
    state, _ = save(init({"x": jnp.zeros(2)}), True, {"x": jnp.ones(2)})
    post(state, None)
    with pytest.raises(jaxsave.FileFormatError, match="written with swmr=False.*pass swmr=False"):
        jaxsave.HDF5Collector(path, mode="a")
    jaxsave.HDF5Collector(path, mode="a", swmr=False).close()


def _replace_leaf(path, name, data, options):
    import h5py

    with h5py.File(path, "r+") as f:
        del f[name]
        f.create_dataset(name, data=data, **options)


@pytest.mark.parametrize("damage", ["row shape", "dtype", "not chunked", "0-d, no counts"])
def test_mode_a_and_merge_refuse_a_leaf_dataset_unlike_its_structure(tmp_path, damage):
    """mode="a" compared only a leaf's leading axes with the counts (and nothing with no counts):
    a (2, 6) dataset for a (3,) leaf was resized, then failed with h5py's raw ValueError; a
    (2, 6, 4) or float64 one was written on. merge read such a source into an unreadable file.
    Now both refuse it by name, the file unchanged."""
    path = tmp_path / "s.h5"
    init, save, post = jaxsave.save(jaxsave.HDF5Collector(path))
    state = init({"a": jnp.zeros((2, 3))}, chains=2)
    run = jax.vmap(
        lambda s: jax.lax.scan(
            lambda s, i: save(s, True, {"a": jnp.full(3, i, jnp.float32)}), s, jnp.arange(6)
        )[0]
    )
    post(run(state), None)
    bad = {
        "row shape": (np.zeros((2, 6, 4), np.float32), {"chunks": True, "maxshape": (None, None, 4)}),
        "dtype": (np.zeros((2, 6, 3), np.float64), {"chunks": True, "maxshape": (None, None, 3)}),
        "not chunked": (np.zeros((2, 6, 3), np.float32), {}),
        "0-d, no counts": (np.float32(0), {}),
    }[damage]
    _replace_leaf(path, "posterior/a", *bad)
    if damage == "0-d, no counts":
        import h5py

        with h5py.File(path, "r+") as f:
            f.attrs["sample_counts"] = np.zeros(0, np.int64)
    before = path.read_bytes()
    with pytest.raises(jaxsave.FileFormatError, match="mode='a'.*dataset 'posterior/a' of leaf 'a'.*damaged"):
        jaxsave.HDF5Collector(path, mode="a")
    assert path.read_bytes() == before
    if damage != "not chunked":  # merge maps any storage layout
        with pytest.raises(jaxsave.FileFormatError, match="dataset /posterior/a is .*need at least"):
            jaxsave.merge([path], tmp_path / "all.h5")


@pytest.mark.parametrize(
    "change", ["newer format", "no layout", "array format", "complex format", "zero format"]
)
def test_mode_a_refuses_a_file_of_a_newer_format_or_no_layout(tmp_path, change):
    """mode="a" checked the format attribute's presence but not its number: a file of a newer
    jaxsave format was continued, rows of this format added under that one's header. Now the
    readers' header check (newer format, unknown layout), with the file unchanged."""
    import h5py

    path = tmp_path / "s.h5"
    init, save, post = jaxsave.save(jaxsave.HDF5Collector(path))
    post(save(init({"x": jnp.zeros(2)}), True, {"x": jnp.ones(2)})[0], None)
    with h5py.File(path, "r+") as f:
        if change == "no layout":
            del f.attrs["jaxsave_layout"]
        else:
            f.attrs["jaxsave_format"] = {
                "newer format": 99,
                "array format": np.array([1, 2]),
                "complex format": 1 + 1j,
                "zero format": 0,
            }[change]
    before = path.read_bytes()
    match = {
        "newer format": "format 99; this jaxsave reads up to 1: upgrade",
        "no layout": "unknown layout",
    }.get(change, "malformed 'jaxsave_format'")
    with pytest.raises(jaxsave.FileFormatError, match=f"mode='a'.*{match}"):
        jaxsave.HDF5Collector(path, mode="a")
    assert path.read_bytes() == before


def test_mode_a_with_another_layout_is_refused_and_keeps_the_file(tmp_path):
    """HDF5Collector(path, mode="a") with the default layout on a file of layout "chains"
    rewrote its layout attribute: the file then claimed the posterior layout over per-chain
    datasets."""
    path = tmp_path / "s.h5"
    init, save, post = jaxsave.save(jaxsave.HDF5Collector(path, layout="chains"))
    state, _ = save(init({"x": jnp.zeros(2)}), True, {"x": jnp.ones(2)})
    post(state, None)
    with pytest.raises(jaxsave.StructureMismatchError, match="layout 'chains'.*layout='chains'"):
        jaxsave.HDF5Collector(path, mode="a")
    assert jaxsave.file_info(path).layout == "chains"
    np.testing.assert_array_equal(jaxsave.load_samples(path)["x"], [[[1.0, 1.0]]])


def test_a_merged_file_refuses_a_source_of_another_format(tmp_path):
    """A merged file's sources were checked for the format attribute's presence only: a source
    of format 99 (or a malformed one) was read through the merged file."""
    import h5py

    paths = []
    for k in range(2):
        paths.append(tmp_path / f"run-{k}.h5")
        init, save, post = jaxsave.save(jaxsave.HDF5Collector(paths[-1]))
        post(save(init({"x": jnp.zeros(2)}), True, {"x": jnp.full(2, k, jnp.float32)})[0], None)
    merged = jaxsave.merge(paths, tmp_path / "all.h5")
    assert jaxsave.load_samples(merged)["x"].shape == (2, 1, 2)
    with h5py.File(paths[1], "r+") as f:
        f.attrs["jaxsave_format"] = 99
    with pytest.raises(jaxsave.FileFormatError, match="its source 'run-1.h5' has jaxsave format 99"):
        jaxsave.load_samples(merged)
