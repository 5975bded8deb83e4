"""ZarrCollector's two write paths: blocks of whole chunks are written at once (no copy kept until
the commit), other blocks are kept and written once per commit. Both give the samples bit for bit."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsave

zarr = pytest.importorskip("zarr")


def run(collector, width: int, steps: int, chains: int, block_size: int, info=None) -> dict:
    saver = jaxsave.save(collector, block_size=block_size)
    state = saver.init({"w": jnp.zeros((chains, width))}, None, info, chains=chains)

    def step(carry, i):
        state, key = carry
        key, sub = jax.random.split(key)
        return (saver.save(state, True, {"w": jax.random.normal(sub, (width,))})[0], key), None

    def chain(state, key):
        return jax.lax.scan(step, (state, key), jnp.arange(steps))[0][0]

    keys = jax.random.split(jax.random.key(1), chains)
    return saver.postprocess(jax.jit(jax.vmap(chain))(state, keys), None)


@pytest.mark.parametrize(
    "width, steps, block_size, known, whole_chunks",
    [
        (2**18, 7, 3, False, True),  # 1 MiB rows: one draw a chunk, every block whole chunks
        (10, 2 * 4096 + 5, 4096, False, True),  # 4096-draw chunks, blocks of 4096 rows
        (10, 23, 5, True, False),  # one 23-draw chunk, filled by blocks of 5 rows
    ],
)
def test_zarr_write_paths_are_exact(tmp_path, width, steps, block_size, known, whole_chunks):
    info = jaxsave.static_information(samples_collected=steps) if known else None
    store = tmp_path / "run.zarr"
    run(jaxsave.ZarrCollector(store), width, steps, 2, block_size, info)
    want = run(jaxsave.MemoryCollector(), width, steps, 2, block_size, info)["samples"]["w"]
    group = zarr.open_group(str(store), mode="r")
    chunk = group["posterior/w"].chunks[1]
    assert (block_size % chunk == 0) == whole_chunks, chunk
    got = jaxsave.load_samples(store)["w"]
    assert got.dtype == want.dtype and got.tobytes() == np.asarray(want).tobytes()
    assert jaxsave.file_info(store).sample_counts.tolist() == [steps, steps]
    # Reads decoded straight into the result: one chain, slices of draws, strided and reversed.
    want = np.asarray(want)
    for chain, draws in [(1, slice(2, 6)), (0, slice(1, None, 2)), (None, slice(None, None, -3))]:
        part = jaxsave.load_samples(store, chain=chain, draws=draws)["w"]
        expect = want[chain, draws] if chain is not None else want[:, draws]
        assert part.tobytes() == expect.tobytes(), (chain, draws)


def _logged_store(path, log: list):
    """A real ``LocalStore`` at ``path`` whose ``set`` and ``get`` calls are logged, ``(op, key)``.

    A subclass, so that jaxsave keeps it as given (a plain ``LocalStore`` is swapped for the
    confined store, whose calls these tests would not see)."""

    class LoggedStore(zarr.storage.LocalStore):
        async def set(self, key, *args, **kwargs):
            log.append(("set", key))
            return await super().set(key, *args, **kwargs)

        async def get(self, key, *args, **kwargs):
            log.append(("get", key))
            return await super().get(key, *args, **kwargs)

    return LoggedStore(str(path))


def _chunk_calls(log: list, op: str, leaf: str = "posterior/w/c/") -> list[str]:
    return [key for o, key in log if o == op and key.startswith(leaf)]


def test_whole_chunk_blocks_put_each_chunk_once(tmp_path):
    """64 chains x 10 floats, blocks of 4096 rows, chunks of 64 chains x 256 draws: every chunk is
    one put (a block's 16 at once), nothing is read; the partly filled last chunk is put once at
    the end (not once per finalized chain); the counts (one key) once per commit."""
    log: list = []
    steps = 2 * 4096 + 100
    collector = jaxsave.ZarrCollector(_logged_store(tmp_path / "run.zarr", log), flush_interval=1e9)
    out = run(collector, 10, steps, 64, 4096)
    assert out["sample_count"].tolist() == [steps] * 64
    group = zarr.open_group(str(tmp_path / "run.zarr"), mode="r")
    assert group["posterior/w"].chunks[:2] == (64, 256)
    puts = _chunk_calls(log, "set")
    assert sorted(puts) == sorted(f"posterior/w/c/0/{d}/0" for d in range(33)), puts
    assert _chunk_calls(log, "get") == []
    assert len(_chunk_calls(log, "set", "sample_counts/c/")) <= 3  # the last block's commit, close
    assert jaxsave.load_samples(tmp_path / "run.zarr")["w"].shape == (64, steps, 10)


def test_blocks_across_chunks_never_read_a_chunk(tmp_path, one_call_per_block):
    """Blocks of 100 rows into chunks of 256 draws, a commit after every block: each commit puts
    the chunks the block touched (the one not yet full padded, from the rows kept on the host)
    and reads none; the stored samples are the exact ones."""
    log: list = []
    steps, width = 1000, 1024
    info = jaxsave.static_information(samples_collected=steps)
    store = _logged_store(tmp_path / "run.zarr", log)
    run(jaxsave.ZarrCollector(store, flush_interval=0), width, steps, 1, 100, info)
    assert zarr.open_group(str(tmp_path / "run.zarr"), mode="r")["posterior/w"].chunks[:2] == (1, 256)
    puts = _chunk_calls(log, "set")
    # 10 blocks, each one put per chunk it touches: 3 of them cross a chunk boundary.
    assert len(puts) == 13, puts
    assert sorted(set(puts)) == [f"posterior/w/c/0/{d}/0" for d in range(4)]
    assert _chunk_calls(log, "get") == []
    want = run(jaxsave.MemoryCollector(), width, steps, 1, 100, info)["samples"]["w"]
    assert jaxsave.load_samples(tmp_path / "run.zarr")["w"].tobytes() == np.asarray(want).tobytes()


def test_compressed_arrays_take_zarrs_codec_pipeline(tmp_path):
    """A compressed array is not written by the raw path: its chunks are zstd frames zarr reads."""
    steps = 300
    store = tmp_path / "run.zarr"
    run(jaxsave.ZarrCollector(store, compression="zstd"), 16, steps, 2, 64)
    want = run(jaxsave.MemoryCollector(), 16, steps, 2, 64)["samples"]["w"]
    assert jaxsave.load_samples(store)["w"].tobytes() == np.asarray(want).tobytes()
    raw = (store / "posterior" / "w" / "c" / "0" / "0" / "0").read_bytes()
    assert raw[:4] == b"\x28\xb5\x2f\xfd"  # the zstd frame magic


def test_resume_reads_the_chunk_it_continues_once(tmp_path):
    """A resumed run (mode="a") continues a chunk the run before left part full: it reads that
    chunk once, for both its blocks, and the store is bit for bit the uninterrupted run."""
    steps, every = 40, 8

    def vrun(saver, start, stop):
        def step(carry, i):
            state, (x, key) = carry
            key, sub = jax.random.split(key)
            x = 0.9 * x + 0.1 * jax.random.normal(sub, x.shape)
            state, _ = saver.save(state, True, {"w": x}, solver_state=(x, key))
            return (state, (x, key)), None

        chain = lambda s, sv: jax.lax.scan(step, (s, sv), jnp.arange(start, stop))[0]  # noqa: E731
        return jax.jit(jax.vmap(chain))

    template = (jnp.zeros((2, 3)), jax.random.split(jax.random.key(0), 2))
    sample = {"w": jnp.zeros((2, 3))}
    info = jaxsave.static_information(samples_collected=steps)
    ref = jaxsave.save(jaxsave.MemoryCollector(), block_size=4)
    want = ref.postprocess(vrun(ref, 0, steps)(ref.init(sample, template, info, chains=2), template)[0], None)

    path = tmp_path / "run.zarr"
    saver = jaxsave.save(
        jaxsave.ZarrCollector(path, checkpoint_interval=0), checkpoint_every=every, block_size=4
    )
    saver.postprocess(vrun(saver, 0, 21)(saver.init(sample, template, info, chains=2), template)[0], None)
    ckpt = jaxsave.resume(path)
    assert ckpt.step.tolist() == [16, 16]
    assert zarr.open_group(str(path), mode="r")["posterior/w"].chunks[:2] == (2, 40)  # one chunk

    log: list = []
    store = _logged_store(path, log)
    saver = jaxsave.save(jaxsave.ZarrCollector(store, mode="a"), checkpoint_every=every, block_size=4)
    state = saver.init(sample, template, info, resume=ckpt)
    saver.postprocess(vrun(saver, 16, steps)(state, ckpt.solver_state)[0], None)
    assert _chunk_calls(log, "get") == ["posterior/w/c/0/0/0"]
    assert jaxsave.load_samples(path)["w"].tobytes() == np.asarray(want["samples"]["w"]).tobytes()


def test_concurrent_writes_into_new_directories_never_fail(tmp_path):
    """zarr writes a block's chunks concurrently: while one write makes a chunk's directory,
    another write into it must not take the directory it is about to open for a missing one
    (stop 20's CI failed on ``FileNotFoundError: 'c'`` in such a race)."""
    import zarr

    from jaxsave._store.zarr.store import confined_store

    for trial in range(30):
        store = confined_store(str(tmp_path / f"s{trial}.zarr"))
        array = zarr.create_array(
            store, name="a", shape=(8, 8, 4), chunks=(1, 1, 4), dtype="f8", compressors=None
        )
        array[:] = np.arange(256.0).reshape(8, 8, 4)
        assert np.array_equal(array[:], np.arange(256.0).reshape(8, 8, 4))


def test_postprocess_consolidates_the_metadata_once(tmp_path):
    """The last finalized chain trims the store and copies the arrays' metadata into the root's
    ``zarr.json``; ``close`` after it does neither again (nothing changed since): one put of
    the root's ``zarr.json`` after the last chunk, holding the copy."""
    import json

    log: list = []
    store = tmp_path / "run.zarr"
    out = run(jaxsave.ZarrCollector(_logged_store(store, log)), 10, 100, 2, 32)
    assert out["sample_count"].tolist() == [100, 100]
    last_chunk = max(i for i, (op, key) in enumerate(log) if op == "set" and key.startswith("posterior/w/c/"))
    assert [key for op, key in log[last_chunk:] if op == "set" and key == "zarr.json"] == ["zarr.json"]
    assert "consolidated_metadata" in json.loads((store / "zarr.json").read_text())
    assert jaxsave.load_samples(store)["w"].shape == (2, 100, 10)
