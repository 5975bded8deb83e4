"""The direct read path of local Zarr stores (``jaxsave/_store/zarr/chunk_files.py``).

Uncompressed chunks of a local store are read with plain file reads into the result; every
read here is compared bit for bit with zarr-python's own read of the same store, and the
stores are real: written by zarr or by a jit-compiled loop through ``ZarrCollector``.
"""

from __future__ import annotations

import os
import threading

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jaxsave
from jaxsave._store.zarr import chunk_files as direct
from jaxsave._store.zarr.sample_store import ZarrLeaf, open_sample_store

zarr = pytest.importorskip("zarr")
pytestmark = pytest.mark.skipif(not direct.SUPPORTED, reason="no O_NOFOLLOW / dir_fd / preadv here")


def same_bits(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def values(dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """Distinct values of ``dtype`` (NaN among them for floats)."""
    n = int(np.prod(shape))
    if dtype == np.bool_:
        out = (np.arange(n) % 3 == 0).astype(dtype)
    elif dtype.kind == "c":
        out = (np.arange(n) + 1j * np.arange(n)[::-1]).astype(dtype)
    else:
        out = (np.arange(n) % 120 + 1).astype(dtype)
    if dtype.kind in "fc":
        out[::7] = np.nan
    return out.reshape(shape)


SELECTIONS = [
    np.s_[:, :],
    np.s_[1:4, 2:19],
    np.s_[2, :],
    np.s_[0, 5:6],
    np.s_[-1, 3:22:4],
    np.s_[:, ::5],
    np.s_[1:2, 7:15],
    np.s_[3:5, 21:],
    np.s_[:, 30:],  # empty
]


@pytest.mark.parametrize("chunks", [(1, 7, 3), (2, 5, 3), (5, 23, 3), (3, 1, 3)])
@pytest.mark.parametrize("name", sorted(direct.DATA_TYPES))
def test_reads_equal_zarrs_for_every_dtype_chunking_and_selection(tmp_path, name, chunks):
    """Partial edge chunks, chunks never written (the fill value, NaN for floats), chains sharing a
    chunk, every selection the readers make: the bytes zarr reads, read without zarr."""
    dtype = np.dtype(name)
    fill = np.nan if dtype.kind in "fc" else 0
    array = zarr.create_array(
        str(tmp_path / "a"), shape=(5, 23, 3), chunks=chunks, dtype=dtype, fill_value=fill, compressors=None
    )
    data = values(dtype, (5, 23, 3))
    array[:4, :17] = data[:4, :17]  # chain 4 and the draws past 17 have no chunks
    leaf = ZarrLeaf(array, "a")
    assert leaf.files is not None, "an uncompressed local array takes the direct path"
    from_json = direct.local_chunk_files(str(tmp_path), "a")  # its zarr.json read without zarr
    assert from_json is not None and same_bits(from_json.fill, leaf.files.fill)
    assert (from_json.shape, from_json.chunks, from_json.dtype) == (array.shape, array.chunks, dtype)
    for selection in SELECTIONS:
        assert same_bits(leaf[selection], array[selection]), selection
    out = np.full((5, 23, 3), 1, dtype)
    leaf.read_direct(out, np.s_[1:4, 2:19], np.s_[0:3, 4:21])
    want = np.full((5, 23, 3), 1, dtype)
    want[0:3, 4:21] = array[1:4, 2:19]
    assert same_bits(out, want)
    leaf.read_direct(out, np.s_[2, 3:9], np.s_[4, 10:16])
    want[4, 10:16] = array[2, 3:9]
    assert same_bits(out, want)
    chunk_files = [p for p in (tmp_path / "a" / "c").rglob("*") if p.is_file()]
    stored = sum(p.stat().st_size for p in chunk_files)
    assert chunk_files and leaf.stored_bytes() == stored
    # what no read can take is not counted: a file outside the grid, one of another size, a sparse giant
    (tmp_path / "a" / "c" / "99" / "0").mkdir(parents=True)
    (tmp_path / "a" / "c" / "99" / "0" / "0").write_bytes(b"\0" * leaf.files.chunk_nbytes)
    with open(chunk_files[0], "r+b") as f:
        f.truncate(2**40)
    assert leaf.stored_bytes() == stored - leaf.files.chunk_nbytes


def _many_dtypes(chains: int, wide: bool) -> tuple[dict, object]:
    """A sample of every kind of leaf the collector stores, and its value at step ``i`` of chain ``c``."""
    template = {
        "f32": jnp.zeros((chains, 3), jnp.float32),
        "f16": jnp.zeros((chains, 2), jnp.float16),
        "bf16": jnp.zeros((chains, 2), jnp.bfloat16),
        "fp8": jnp.zeros((chains, 2), jnp.float8_e4m3fn),
        "i8": jnp.zeros((chains,), jnp.int8),
        "u16": jnp.zeros((chains, 2), jnp.uint16),
        "i32": jnp.zeros((chains,), jnp.int32),
        "flag": jnp.zeros((chains,), bool),
        "c64": jnp.zeros((chains, 2), jnp.complex64),
        "key": jax.random.split(jax.random.key(0), chains),
    }
    if wide:  # 128 KiB a draw: chunks of 8 draws, so the reads cross chunk edges
        template["wide"] = jnp.zeros((chains, 128, 256), jnp.float32)

    def sample(c, i):
        x = (c * 1000 + i).astype(jnp.float32)
        out = {
            "f32": jnp.stack([x, jnp.nan, -x]),
            "f16": jnp.full(2, x, jnp.float16),
            "bf16": jnp.full(2, x / 3, jnp.bfloat16),
            "fp8": jnp.full(2, i % 7, jnp.float8_e4m3fn),
            "i8": (i % 100 - 50).astype(jnp.int8),
            "u16": jnp.full(2, c * 100 + i, jnp.uint16),
            "i32": c * 100000 + i,
            "flag": i % 3 == 0,
            "c64": jnp.full(2, x + 1j * c, jnp.complex64),
            "key": jax.random.fold_in(jax.random.key(c), i),
        }
        if wide:
            out["wide"] = jnp.full((128, 256), x, jnp.float32)
        return out

    return template, sample


def _write(path, chains: int, steps: int, wide: bool) -> None:
    """Chain ``c`` keeps every ``c + 1``-th step: counts differ, short chains are padded."""
    template, sample = _many_dtypes(chains, wide)
    init, save, post = jaxsave.save(jaxsave.ZarrCollector(path), block_size=4)
    state = init(template, None, chains=chains)

    def chain(s, c):
        return jax.lax.scan(lambda s, i: save(s, i % (c + 1) == 0, sample(c, i)), s, jnp.arange(steps))[0]

    post(jax.jit(jax.vmap(chain))(state, jnp.arange(chains)), None)


def _bits(tree):
    return {
        k: np.asarray(jax.random.key_data(v))
        if jnp.issubdtype(v.dtype, jax.dtypes.prng_key)
        else np.asarray(v)
        for k, v in tree.items()
    }


def _through_zarr(monkeypatch, *args, **kwargs):
    with monkeypatch.context() as m:
        m.setattr(direct, "SUPPORTED", False)
        return jaxsave.load_samples(*args, **kwargs)


@pytest.mark.parametrize("kind", ["wide", "shared-chunk"])
def test_load_samples_equals_zarrs_read(tmp_path, monkeypatch, kind):
    """``load_samples`` of a store a jit loop wrote: the direct path gives, bit for bit, what the
    zarr path gives, for every dtype (bfloat16, fp8, PRNG keys, bool, complex), padded chains,
    ``draws=`` slices (forward, strided, reversed) and one chain at a time."""
    wide = kind == "wide"
    chains, steps = (3, 40) if wide else (8, 60)
    path = str(tmp_path / "run.zarr")
    _write(path, chains, steps, wide)
    with open_sample_store(path) as store:
        leaves = [store.dataset("posterior", v) for v in store.variables()]
        counts = store.counts()
    assert all(leaf.files is not None for leaf in leaves)
    assert (leaves[0].array.chunks[0] == 1) == wide  # one chain a chunk, or all chains in one
    assert wide == (leaves[0].array.chunks[1] < max(counts))  # reads that cross chunk edges
    assert counts.tolist() == [-(-steps // (c + 1)) for c in range(chains)]
    if wide:
        monkeypatch.setattr(direct, "THREADED_BYTES", 1)  # the threaded read too
    for chain in (None, 0, chains - 1):
        for draws in (None, slice(3, 17), slice(2, None, 3), slice(None, None, -2), slice(-5, None)):
            got = _bits(jaxsave.load_samples(path, chain=chain, draws=draws))
            want = _bits(_through_zarr(monkeypatch, path, chain=chain, draws=draws))
            assert got.keys() == want.keys()
            for k in got:
                assert same_bits(got[k], want[k]), (chain, draws, k)
    full = _bits(jaxsave.load_samples(path))
    assert np.isnan(full["f32"][chains - 1, counts[-1] :]).all()  # padding: NaN, or 0 for ints
    assert not full["i32"][chains - 1, counts[-1] :].any()
    assert full["bf16"].dtype == ml_dtypes.bfloat16
    assert full["i32"][1, 2] == 100000 + 4  # chain 1 keeps every other step


def test_compressed_and_memory_stores_go_through_zarr(tmp_path):
    """Only uncompressed local chunks are read directly; the same samples read the same either way."""
    template, sample = _many_dtypes(2, False)
    got = []
    for store in (str(tmp_path / "z.zarr"), "memory://jaxsave-read-path", str(tmp_path / "plain.zarr")):
        compression = "zstd" if store.endswith("z.zarr") else None
        init, save, post = jaxsave.save(jaxsave.ZarrCollector(store, compression=compression))
        state = init(template, None, chains=2)
        run = lambda s, c: jax.lax.scan(lambda s, i: save(s, True, sample(c, i)), s, jnp.arange(5))[0]  # noqa: B023
        post(jax.vmap(run)(state, jnp.arange(2)), None)
        with open_sample_store(store) as opened:
            assert [opened.dataset("posterior", v).files is None for v in opened.variables()] == [
                not store.endswith("plain.zarr")
            ] * len(opened.variables())
        got.append(_bits(jaxsave.load_samples(store)))
    for k in got[0]:
        assert same_bits(got[0][k], got[1][k]) and same_bits(got[0][k], got[2][k]), k


@pytest.mark.parametrize(
    ("compression", "dtype"),
    [("zstd", np.float32), ("gzip", np.float32), ("blosc", np.float32), ("zstd", np.int32)],
)
def test_a_compressed_store_of_constant_samples_loads(tmp_path, compression, dtype):
    """72 MB of zero samples, zstd-compressed to 5 kB (17000:1; blosc 7900:1), were refused by every reader as
    "a sparse or hostile file": the size guard took compressed chunks to expand at most 1024:1;
    integer zeros (their fill value) were not stored at all: zarr skipped their chunks."""
    path = tmp_path / "z.zarr"
    collector = jaxsave.ZarrCollector(path, compression=compression)
    collector.register_chain(init_sample={"x": np.zeros(1000, dtype)})
    for _ in range(9):
        collector.save_block([0], [np.zeros((1, 2000, 1000), dtype)])
    collector.finalize(0)
    collector.close()
    x = jaxsave.load_samples(path)["x"]
    assert x.shape == (1, 18000, 1000) and not x.any()


def test_metadata_outside_the_whitelist_goes_through_zarr(tmp_path):
    """Big-endian chunks, a transpose, sharding, string data: zarr reads them, not the direct path."""
    cases = {
        "big": {"serializer": zarr.codecs.BytesCodec(endian="big")},
        "transposed": {"filters": [zarr.codecs.TransposeCodec(order=(1, 0))]},
        "sharded": {"shards": (4, 4)},
    }
    for name, options in cases.items():
        array = zarr.create_array(
            str(tmp_path / name), shape=(4, 8), chunks=(2, 2), dtype="int32", compressors=None, **options
        )
        array[:] = np.arange(32, dtype=np.int32).reshape(4, 8)
        leaf = ZarrLeaf(array, name)
        assert leaf.files is None, name
        assert same_bits(leaf[1:3, ::3], np.arange(32, dtype=np.int32).reshape(4, 8)[1:3, ::3])
    assert (
        direct.chunk_files(zarr.create_array(str(tmp_path / "ok"), shape=(2,), dtype="int32")) is None
    )  # zstd
    ok = zarr.create_array(str(tmp_path / "raw"), shape=(2,), dtype="int32", compressors=None)
    assert direct.chunk_files(ok) is not None


def _small_store(tmp_path) -> tuple[str, str]:
    """A local store of 3 chains whose leaf ``w`` has one chunk per chain; returns it and that chunk dir."""
    path = str(tmp_path / "s.zarr")
    init, save, post = jaxsave.save(jaxsave.ZarrCollector(path, shared=True, chains=3, draws=4))
    state = init({"w": jnp.zeros((3, 5))}, None, jaxsave.static_information(samples_collected=4), chains=3)
    run = lambda s: jax.lax.scan(
        lambda s, i: save(s, True, {"w": jnp.full(5, i, jnp.float32)}), s, jnp.arange(4)
    )[0]
    post(jax.vmap(run)(state), None)
    chunk_dir = os.path.join(path, "posterior", "w", "c", "1", "0")
    assert os.listdir(chunk_dir) == ["0"]
    return path, chunk_dir


@pytest.mark.parametrize("hostile", ["symlink", "fifo", "short", "long", "dir-symlink", "chunk-is-dir"])
def test_hostile_chunk_files_are_refused(tmp_path, hostile):
    """A chunk file that is a link (to a file of the right size outside the store), a FIFO, of the
    wrong size, or a directory that is a link out of the store: a FileFormatError naming the key,
    never a read outside the store, never a hang."""
    path, chunk_dir = _small_store(tmp_path)
    chunk = os.path.join(chunk_dir, "0")
    size = os.path.getsize(chunk)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "0").write_bytes(b"\x01" * size)
    os.unlink(chunk)
    if hostile == "symlink":
        os.symlink(outside / "0", chunk)
    elif hostile == "fifo":
        os.mkfifo(chunk)
    elif hostile in ("short", "long"):
        with open(chunk, "wb") as f:
            f.write(b"\0" * (size - 4 if hostile == "short" else size + 4))
    elif hostile == "dir-symlink":
        os.rmdir(chunk_dir)
        os.symlink(outside, chunk_dir)
    else:
        os.mkdir(chunk)
    result: list[BaseException | object] = []

    def read() -> None:
        try:
            result.append(jaxsave.load_samples(path))
        except BaseException as error:  # noqa: BLE001 - handed to the test thread
            result.append(error)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(60)
    assert not reader.is_alive(), "the read hung"
    (error,) = result
    assert isinstance(error, jaxsave.FileFormatError), error
    assert "c/1" in str(error) and "posterior/w" in str(error), str(error)


def test_a_missing_chunk_reads_as_the_fill_value(tmp_path):
    """A counted chunk that is gone reads as the fill value (NaN), as zarr reads it."""
    path, chunk_dir = _small_store(tmp_path)
    os.unlink(os.path.join(chunk_dir, "0"))
    got = jaxsave.load_samples(path)["w"]
    assert np.isnan(got[1]).all() and got[0].tolist() == [[float(i)] * 5 for i in range(4)]
    assert same_bits(got, np.asarray(zarr.open_array(os.path.join(path, "posterior", "w"), mode="r")[:]))


@pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning", "ignore:This process:DeprecationWarning")
def test_the_read_threads_are_renewed_after_fork(tmp_path, monkeypatch):
    """A child forked after a threaded read reads with threads of its own (the parent's are gone)."""
    array = zarr.create_array(
        str(tmp_path / "a"), shape=(8, 1000), chunks=(1, 100), dtype="f8", compressors=None
    )
    array[:] = np.arange(8000.0).reshape(8, 1000)
    files = direct.chunk_files(array)
    assert files is not None
    monkeypatch.setattr(direct, "THREADED_BYTES", 1)
    monkeypatch.setattr(direct, "THREADS", 2)
    out = np.empty((8, 1000))
    files.read(out, [range(8), range(1000)])
    assert direct._pool is not None and same_bits(out, array[:])
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no jax, no zarr, just the read
        code = 1
        try:
            mine = np.empty((8, 1000))
            fresh = direct._pool is None
            files.read(mine, [range(8), range(1000)])
            code = 0 if fresh and direct._pool is not None and mine.sum() == out.sum() else 3
        finally:
            os.write(write_end, bytes([code]))
            os._exit(code)
    os.close(write_end)
    import select

    ready = select.select([read_end], [], [], 60)[0]
    if not ready:
        os.kill(pid, 9)
    answer = os.read(read_end, 1) if ready else b"hung"
    os.close(read_end)
    assert os.waitpid(pid, 0)[1] == 0 and answer == b"\0", answer
