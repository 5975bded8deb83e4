"""Hostile and damaged Zarr stores: every file of a written store truncated, overwritten with
junk or with valid JSON of the wrong shape; the readers either read it or raise a
``JaxsaveError`` (a ``FileFormatError`` for the store itself), never another exception."""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsave

zarr = pytest.importorskip("zarr", reason="the Zarr tests need zarr (pip install 'jaxsave[zarr]')")

pytestmark = pytest.mark.reliability

JUNK = [
    b"",
    b"\x00" * 7,
    b"{}",
    b"[]",
    b"null",
    b'{"zarr_format": 3, "node_type": "array"}',
    b'{"zarr_format": 2, "node_type": "group"}',
    json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {"jaxsave_format": "1"}}).encode(),
    os.urandom(64),
]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    path = tmp_path_factory.mktemp("pristine") / "run.zarr"
    saver = jaxsave.save(jaxsave.ZarrCollector(path, sample_stats=("lp",)), block_size=4)
    state = saver.init(
        {"x": jnp.zeros((2, 3)), "lp": jnp.zeros(2), "k": jax.random.split(jax.random.key(0), 2)},
        None,
        chains=2,
    )
    step = lambda s, i: (
        saver.save(s, True, {"x": jnp.full(3, i, jnp.float32), "lp": -i * 1.0, "k": jax.random.key(i)})[0],
        None,
    )
    saver.postprocess(jax.jit(jax.vmap(lambda s: jax.lax.scan(step, s, jnp.arange(9))[0]))(state), None)
    return path


def _files(path):
    return sorted(os.path.relpath(os.path.join(r, n), path) for r, _, names in os.walk(path) for n in names)


def _read_all(path):
    info = jaxsave.file_info(path)
    jaxsave.load_samples(path)
    jaxsave.load_samples(path, chain=1, draws=slice(None, None, -2))
    jaxsave.to_inference_data(path)
    return info


def test_every_file_damaged_every_way(tmp_path, pristine, figures):
    cases = refused = 0
    rng = np.random.default_rng(0)
    for name in _files(pristine):
        for junk in [*JUNK, None]:
            path = tmp_path / "case.zarr"
            shutil.rmtree(path, ignore_errors=True)
            shutil.copytree(pristine, path)
            target = path / name
            data = target.read_bytes()
            if junk is None:  # flip bytes in place
                flipped = bytearray(data)
                for i in rng.integers(0, max(1, len(data)), size=3):
                    if flipped:
                        flipped[i] ^= 0xFF
                junk = bytes(flipped)
            target.write_bytes(junk)
            cases += 1
            try:
                _read_all(path)
            except jaxsave.JaxsaveError:
                refused += 1
            except Exception as error:  # noqa: BLE001 - that is what the test is looking for
                pytest.fail(f"{name} <- {junk[:40]!r}: {type(error).__name__}: {error}")
    figures("hostile", "zarr store: every file damaged", handled=cases, refused=refused)


@pytest.mark.filterwarnings("ignore:Consolidated metadata")  # zarr's own, on consolidate_metadata
def test_a_chunk_far_larger_than_its_array_is_refused(tmp_path):
    """A 50 kB store declared its (2, 9, 3) array in one zstd chunk of 2**26 draws: every read
    decoded the whole chunk (1.6 GB), the size guards bounding only what the read returns. An
    array whose chunks decode to more than MAX_CHUNK_BYTES (unless one draw of it is that big)
    is now a FileFormatError, for the readers and for mode="a"."""
    path = tmp_path / "run.zarr"
    saver = jaxsave.save(jaxsave.ZarrCollector(path, compression="zstd"), block_size=4)
    state = saver.init({"x": jnp.zeros((2, 3))}, None, chains=2)
    step = lambda s, i: (saver.save(s, True, {"x": jnp.full(3, i, jnp.float32)})[0], None)  # noqa: E731
    saver.postprocess(jax.jit(jax.vmap(lambda s: jax.lax.scan(step, s, jnp.arange(9.0))[0]))(state), None)
    x = jaxsave.load_samples(path)["x"]
    group = zarr.open_group(path, mode="r+")
    old = group["posterior/x"]
    attrs, dims = dict(old.attrs), old.metadata.dimension_names
    bomb = group.create_array(
        "posterior/x",
        shape=old.shape,
        chunks=(2, 2**21, 3),  # 48 MiB a chunk, stored in a few kB
        dtype=old.dtype,
        compressors=zarr.codecs.ZstdCodec(),
        dimension_names=dims,
        attributes=attrs,
        overwrite=True,
    )
    bomb[...] = x
    zarr.consolidate_metadata(path)
    stored = sum(f.stat().st_size for f in (path / "posterior" / "x").rglob("*") if f.is_file())
    assert stored < 100_000
    for read in (jaxsave.load_samples, jaxsave.to_inference_data):
        with pytest.raises(jaxsave.FileFormatError, match=r"posterior/x.*chunks of shape \(2, 2097152, 3\)"):
            read(path)
    with pytest.raises(jaxsave.FileFormatError, match=r"posterior/x.*chunks of shape"):
        collector = jaxsave.ZarrCollector(path, mode="a", compression="zstd")
        try:
            collector.register_chain(init_sample={"x": np.zeros(3, np.float32)})
            collector.save_block([2], [np.ones((1, 4, 3), np.float32)])
        finally:
            collector.close()


@pytest.mark.filterwarnings("ignore:Consolidated metadata")  # zarr's own, on consolidate_metadata
def test_a_padded_array_metadata_backs_no_draws(tmp_path):
    """The size guard counted an array's zarr.json as stored data, times the compression bound:
    a 44 kB store with no chunk and a 40 kB attribute made load_samples allocate 1 GiB."""
    path = tmp_path / "pad.zarr"
    c = jaxsave.ZarrCollector(path, compression="zstd")
    ids = [c.register_chain(init_sample={"x": np.zeros(4, np.float32)}) for _ in range(2)]
    c.save_block(ids, [np.ones((2, 1, 4), np.float32)])
    for i in ids:
        c.finalize(i)
    c.close()
    draws = 2**25
    group = zarr.open_group(path, mode="r+")
    x = group["posterior/x"]
    x.resize((2, draws, 4))
    x.attrs["pad"] = "a" * 40_000
    shutil.rmtree(path / "posterior" / "x" / "c")
    group["sample_counts"][:] = np.array([draws, draws])
    zarr.consolidate_metadata(path)
    with pytest.raises(jaxsave.FileFormatError, match="stores only 0 for it"):
        jaxsave.load_samples(path)
