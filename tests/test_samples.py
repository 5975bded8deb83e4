"""Reading sample files back: load_samples, like=, draws=, dtypes, to_inference_data, file_info, bad files."""

import os
import shutil
from collections import namedtuple

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsave

State = namedtuple("State", ["pos", "aux"])


def write(path, make_sample, chains=2, steps=12, collector_kwargs=None, block_size=5):
    """Run a jit-compiled vmapped scan saving ``make_sample(c, i)`` at every step; returns every sample."""
    init, save, post = jaxsave.save(
        jaxsave.HDF5Collector(path, **(collector_kwargs or {})), block_size=block_size
    )
    template = jax.eval_shape(jax.vmap(lambda c: make_sample(c, jnp.int32(0))), jnp.arange(chains))
    state = init(template, None, chains=chains)

    def chain(s, c):
        return jax.lax.scan(lambda s, i: save(s, True, make_sample(c, i)), s, jnp.arange(steps))[0]

    post(jax.jit(jax.vmap(chain))(state, jnp.arange(chains)), None)
    cs, ii = np.meshgrid(np.arange(chains), np.arange(steps), indexing="ij")
    return jax.jit(jax.vmap(jax.vmap(make_sample)))(jnp.asarray(cs), jnp.asarray(ii))


def all_dtypes(c, i):
    v = (c * 100 + i).astype(jnp.float32) / 8 - 3
    return {
        "f16": v.astype(jnp.float16),
        "bf16": jnp.stack([v, -v]).astype(jnp.bfloat16),
        "fp8": v.astype(jnp.float8_e4m3fn),
        "fp8b": v.astype(jnp.float8_e5m2),
        "i8": i.astype(jnp.int8),
        "u32": (c * 7 + i).astype(jnp.uint32),
        "i32": jnp.full((2, 2), i - c),
        "b": i % 3 == 0,
        "c64": (v + 1j * i).astype(jnp.complex64),
        "key": jax.random.fold_in(jax.random.key(c), i),
        "rbg": jax.random.fold_in(jax.random.key(c, impl="rbg"), i),
    }


def bits(x):
    """A leaf as ``(numpy array, key impl or None)``: keys as their key data."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return np.asarray(jax.random.key_data(x)), str(jax.random.key_impl(x))
    return np.asarray(x), None


def assert_exact(got, want, index=lambda a: a):
    """``got`` equals ``index(want)`` bit for bit, with the same tree, dtypes and key impls."""
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        (g, gi), (w, wi) = bits(g), bits(w)
        w = np.ascontiguousarray(index(w))
        assert gi == wi and g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_array_equal(g.view(np.uint8), w.view(np.uint8))  # bit-exact


def test_every_dtype_round_trips_exactly(tmp_path):
    path = tmp_path / "s.h5"
    want = write(path, all_dtypes)
    assert_exact(jaxsave.load_samples(path), want)
    assert_exact(jaxsave.load_samples(path, chain=1), want, lambda a: a[1])
    like = jax.eval_shape(lambda: all_dtypes(jnp.int32(0), jnp.int32(0)))
    assert_exact(jaxsave.load_samples(path, like=like, draws=slice(3, 9, 2)), want, lambda a: a[:, 3:9:2])
    with h5py.File(path, "r") as f:  # ml_dtypes as same-width uint views, keys as key data
        assert (
            f["posterior/bf16"].dtype == np.uint16
            and f["posterior/bf16"].attrs["jaxsave_dtype"] == "bfloat16"
        )
        assert (
            f["posterior/key"].shape == (2, 12, 2)
            and f["posterior/key"].attrs["jaxsave_dtype"] == "key<threefry2x32>"
        )
    import xarray as xr

    with xr.open_dataset(path, group="posterior", engine="h5netcdf") as ds:  # every dtype opens in xarray
        assert ds["c64"].dtype == np.complex64 and ds["b"].dtype == bool and ds["f16"].dtype == np.float16


def test_tree_structure_and_like(tmp_path):
    path = tmp_path / "s.h5"

    def sample(c, i):
        x = (c * 100 + i).astype(jnp.float32)
        return State(pos=[x, jnp.stack([x, x])], aux={"i": i, "none": None})

    want = write(path, sample)
    got = jaxsave.load_samples(path)
    assert (
        isinstance(got, State) and isinstance(got.pos, list) and got.aux["none"] is None
    )  # stored structure
    assert_exact(got, want)
    like = jax.eval_shape(lambda: sample(jnp.int32(0), jnp.int32(0)))
    assert_exact(jaxsave.load_samples(path, like=like), want)
    bad = like._replace(pos=[like.pos[0], jax.ShapeDtypeStruct((3,), jnp.float32)])
    with pytest.raises(jaxsave.StructureMismatchError, match="pos/list_element_1"):
        jaxsave.load_samples(path, like=bad)
    with pytest.raises(jaxsave.StructureMismatchError, match="no leaf 'extra'"):
        jaxsave.load_samples(path, like={"extra": like.aux["i"], **like._asdict()})


def test_unknown_classes_fall_back_to_nested_dicts(tmp_path):
    path = tmp_path / "s.h5"
    write(path, lambda c, i: State(pos=[i], aux=i * 2), chains=1, steps=4)
    with h5py.File(path, "r+") as f:  # as if written by another process with a class not known here
        f.attrs["jaxsave_structure"] = f.attrs["jaxsave_structure"].replace("State", "Unknown.Class")
    with pytest.warns(UserWarning, match="nested dicts"):
        got = jaxsave.load_samples(path, chain=0)
    assert got["pos"][0].tolist() == [0, 1, 2, 3] and got["aux"].tolist() == [0, 2, 4, 6]


@pytest.mark.parametrize(
    "draws",
    [
        slice(None),
        slice(2, 9),
        slice(None, None, 3),
        slice(-4, None),
        slice(None, None, -1),
        slice(10, 2, -3),
        slice(50, 60),
        slice(7, 7),
    ],
)
def test_draw_slices_match_numpy(tmp_path_factory, draws):
    path = tmp_path_factory.getbasetemp() / "slices.h5"
    if not path.exists():
        write(path, lambda c, i: {"v": c * 100 + i}, chains=3, steps=12)
    full = np.arange(3)[:, None] * 100 + np.arange(12)
    assert jaxsave.load_samples(path, draws=draws)["v"].tolist() == full[:, draws].tolist()
    assert jaxsave.load_samples(path, chain=2, draws=draws)["v"].tolist() == full[2, draws].tolist()


def test_uneven_chains_are_padded_and_sliced(tmp_path):
    path = tmp_path / "s.h5"
    for layout in ("posterior", "chains"):
        init, save, post = jaxsave.save(jaxsave.HDF5Collector(path, layout=layout), block_size=4)
        run = jax.jit(
            jax.vmap(
                lambda s, n: jax.lax.scan(
                    lambda s, i: save(s, i < n, {"v": i.astype(jnp.float32)}), s, jnp.arange(10)
                )[0]
            )
        )
        post(run(init({"v": jnp.zeros(3)}, None, chains=3), jnp.array([7, 3, 0])), None)
        got = jaxsave.load_samples(path, draws=slice(1, None, 2))["v"]
        np.testing.assert_array_equal(got, [[1, 3, 5], [1, np.nan, np.nan], [np.nan] * 3])
        assert jaxsave.load_samples(path, chain=1)["v"].tolist() == [0, 1, 2]
        assert jaxsave.load_samples(path, chain=2)["v"].shape == (0,)
        assert jaxsave.file_info(path).sample_counts.tolist() == [7, 3, 0]
        with pytest.raises(IndexError, match="chain 3"):
            jaxsave.load_samples(path, chain=3)


@pytest.mark.parametrize("layout", ["posterior", "chains"])
def test_very_unequal_chains_read_one_at_a_time(tmp_path, layout):
    """An intact file whose chains differ ~1000-fold: all at once is a size error, each chain reads."""
    path, chains, long = tmp_path / "s.h5", 80, 1000
    init, save, post = jaxsave.save(jaxsave.HDF5Collector(path, layout=layout), block_size=100)
    run = jax.jit(
        jax.vmap(
            lambda s, c, n: jax.lax.scan(
                lambda s, i: save(s, i < n, {"v": jnp.full(256, c * 10_000 + i, jnp.float32)}),
                s,
                jnp.arange(long),
            )[0]
        )
    )
    counts = np.ones(chains, np.int32)
    counts[3] = long  # chain 3 keeps 1000 draws, the 79 others one each
    post(
        run(
            init({"v": jnp.zeros((chains, 256))}, None, chains=chains),
            jnp.arange(chains),
            jnp.asarray(counts),
        ),
        None,
    )
    assert jaxsave.file_info(path).sample_counts.tolist() == counts.tolist()

    padded = chains * long * 256 * 4  # 82 MB for 1.1 MB of draws
    with pytest.raises(jaxsave.ReadTooLargeError) as e:
        jaxsave.load_samples(path)
    message = str(e.value)
    assert not isinstance(e.value, jaxsave.FileFormatError) and isinstance(e.value, MemoryError)
    assert f"needs {padded:,} bytes" in message and "1 to 1000 draws" in message
    assert "chain=i" in message and "draws=" in message
    with pytest.raises(jaxsave.ReadTooLargeError):
        jaxsave.to_inference_data(path)

    for c in range(chains):
        got = jaxsave.load_samples(path, chain=c)["v"]
        assert got.shape == (counts[c], 256)
        np.testing.assert_array_equal(got[:, 0], c * 10_000 + np.arange(counts[c]))
        assert (got == got[:, :1]).all()
    head = jaxsave.load_samples(path, draws=slice(0, 2))["v"]  # a short span of every chain pads little
    assert head.shape == (chains, 2, 256) and head[:, 0, 0].tolist() == [c * 10_000 for c in range(chains)]
    assert np.isnan(head[np.arange(chains) != 3, 1]).all() and head[3, 1, 0] == 30_001


def test_lazy_draws_read_only_what_is_asked(tmp_path, monkeypatch):
    path = tmp_path / "s.h5"
    write(
        path,
        lambda c, i: {"w": jnp.full((256,), c * 100 + i, jnp.float32)},
        chains=2,
        steps=200,
        block_size=64,
    )
    reads = []
    getitem, read_direct = h5py.Dataset.__getitem__, h5py.Dataset.read_direct
    monkeypatch.setattr(
        h5py.Dataset, "__getitem__", lambda self, sel, **kw: reads.append(sel) or getitem(self, sel, **kw)
    )
    monkeypatch.setattr(
        h5py.Dataset,
        "read_direct",
        lambda self, dest, source_sel=None, dest_sel=None: (
            reads.append(source_sel) or read_direct(self, dest, source_sel, dest_sel)
        ),
    )
    got = jaxsave.load_samples(path, chain=1, draws=slice(190, 195))["w"]
    assert got[:, 0].tolist() == [290, 291, 292, 293, 294]
    assert reads == [(slice(1, 2), slice(190, 195, 1))]
    reads.clear()
    assert jaxsave.load_samples(path, draws=slice(None, 4, 2))["w"][:, :, 0].tolist() == [[0, 2], [100, 102]]
    assert reads == [(slice(0, 2), slice(0, 3, 2))]


def test_to_inference_data_from_file_and_from_result(tmp_path):
    path = tmp_path / "s.h5"

    def sample(c, i):
        return {"x": jnp.full(2, c * 100 + i, jnp.bfloat16), "lp": -i.astype(jnp.float32)}

    write(path, sample, collector_kwargs={"sample_stats": ("lp",)})
    idata = jaxsave.to_inference_data(path)
    assert dict(idata.posterior["x"].sizes) == {"chain": 2, "draw": 12, "x_dim_0": 2}
    assert idata.posterior["x"].dtype == np.float32
    assert idata.sample_stats["lp"].values[1].tolist() == [-i for i in range(12)]
    init, save, post = jaxsave.save()
    state = init(jax.eval_shape(jax.vmap(lambda c: sample(c, jnp.int32(0))), jnp.arange(2)), None, chains=2)
    run = jax.vmap(lambda s, c: jax.lax.scan(lambda s, i: save(s, True, sample(c, i)), s, jnp.arange(5))[0])
    idata2 = jaxsave.to_inference_data(post(run(state, jnp.arange(2)), None), sample_stats=("lp",))
    np.testing.assert_array_equal(idata2.posterior["x"].values, idata.posterior["x"].values[:, :5])


def test_file_info(tmp_path):
    path = tmp_path / "s.h5"
    write(path, lambda c, i: {"x": jnp.zeros((2, 3)), "k": jax.random.key(i)}, chains=2, steps=3)
    info = jaxsave.file_info(path)
    assert (info.format, info.layout, info.chains, info.version) == (1, "posterior", 2, jaxsave.__version__)
    assert [(v.name, v.shape, v.dtype) for v in info.variables] == [
        ("k", (), "key<threefry2x32>"),
        ("x", (2, 3), "float32"),
    ]
    assert not info.open_for_writing


# -- bad files -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def good_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("good") / "s.h5"
    write(path, lambda c, i: {"w": jnp.full((64,), i, jnp.float32)}, chains=2, steps=50)
    return path


def bad_copy(good_file, tmp_path, mutate):
    path = tmp_path / "bad.h5"
    shutil.copy(good_file, path)
    mutate(path)
    return path


def truncate(fraction):
    def mutate(path):
        os.truncate(path, int(os.path.getsize(path) * fraction))

    return mutate


def scribble(offset):
    def mutate(path):
        size = os.path.getsize(path)
        with open(path, "r+b") as fh:
            fh.seek(offset if offset >= 0 else size + offset)
            fh.write(np.random.default_rng(0).bytes(2048))

    return mutate


@pytest.mark.parametrize(
    "mutate",
    [truncate(0.5), truncate(0.02), truncate(0), scribble(0), scribble(64), scribble(800)],
    ids=["half", "head", "empty", "superblock", "after-superblock", "metadata"],
)
def test_damaged_files_raise_file_format_error(good_file, tmp_path, mutate):
    path = bad_copy(good_file, tmp_path, mutate)
    for read in (jaxsave.load_samples, jaxsave.file_info, lambda p: jaxsave.open_live(p).refresh()):
        with pytest.raises(jaxsave.FileFormatError):
            read(path)


def test_damaged_raw_data_still_loads(good_file, tmp_path):
    """Scribbled sample bytes (not metadata) are not detectable: the file still loads, with the right shape."""
    path = bad_copy(good_file, tmp_path, scribble(-2048))
    assert jaxsave.load_samples(path)["w"].shape == (2, 50, 64)


def test_foreign_and_newer_files(tmp_path, good_file):
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["data"] = np.zeros(3)
    text = tmp_path / "notes.txt"
    text.write_text("hello\n" * 100)
    for path, match in ((foreign, "not a jaxsave sample file"), (text, "cannot be opened as an HDF5 file")):
        for read in (jaxsave.load_samples, jaxsave.file_info, jaxsave.open_live, jaxsave.to_inference_data):
            with pytest.raises(jaxsave.FileFormatError, match=match):
                read(path)
    newer = bad_copy(good_file, tmp_path, lambda p: h5py.File(p, "r+").attrs.modify("jaxsave_format", 99))
    with pytest.raises(jaxsave.FileFormatError, match="format 99"):
        jaxsave.load_samples(newer)
    broken = bad_copy(
        good_file, tmp_path, lambda p: h5py.File(p, "r+").attrs.modify("jaxsave_structure", "{")
    )
    with pytest.raises(jaxsave.FileFormatError, match="malformed"):
        jaxsave.load_samples(broken)
    with pytest.raises(FileNotFoundError):
        jaxsave.load_samples(tmp_path / "missing.h5")


@pytest.mark.parametrize("counts", [[np.nan, 1.0], [2.5, 1.0], [-1, 1]], ids=["nan", "fraction", "negative"])
def test_sample_counts_that_are_not_counts_are_refused(tmp_path, counts):
    """A file whose sample counts were NaN was refused as "negative sample counts
    [-9223372036854775808, 1]", and 2.5 was read as 2 draws; both now name what is wrong."""
    path = tmp_path / "s.h5"
    init, save, post = jaxsave.save(jaxsave.HDF5Collector(path))
    state = init({"x": jnp.zeros((2, 2))}, chains=2)
    state, _ = jax.vmap(lambda s: save(s, True, {"x": jnp.ones(2)}))(state)
    post(state, None)
    with h5py.File(path, "r+") as f:
        f.attrs["sample_counts"] = np.asarray(counts)
    problem = "negative sample counts" if counts[0] == -1 else r"sample counts \[.*\] are not integers"
    with pytest.raises(jaxsave.FileFormatError, match=problem):
        jaxsave.load_samples(path)
    with pytest.raises(jaxsave.FileFormatError, match=problem):
        jaxsave.HDF5Collector(path, mode="a")


def test_load_pytree_of_a_sample_file_points_to_load_samples(tmp_path):
    """load_pytree on a sample file said "an HDF5 file without a jaxsave header (not written by
    jaxsave)", naming neither the file nor the reader to use."""
    path = tmp_path / "run.h5"
    init, save, post = jaxsave.save(jaxsave.HDF5Collector(path))
    state, _ = save(init({"x": jnp.zeros(2)}), True, {"x": jnp.ones(2)})
    post(state, None)
    with pytest.raises(jaxsave.FileFormatError, match=r"run\.h5.* is a jaxsave sample file .*load_samples"):
        jaxsave.load_pytree(path)
