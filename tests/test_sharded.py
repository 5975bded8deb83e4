"""Sharded chains (8 CPU devices), multi-process runs (jax.distributed) and jaxsave.merge.

The device and process tests run real child processes (XLA_FLAGS must be set
before jax is imported); every child has a timeout and is killed on failure.
"""

import os
import pathlib
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import child_env, free_port

import jaxsave
from jaxsave._stream.writer import Block, Writer

HERE = Path(__file__).parent
ROOT = HERE.parent
CHILD_TIMEOUT_S = 120


def _run_all(commands):
    """Start every command at once; wait for all (killing all on a timeout); return their outputs."""
    procs = [
        subprocess.Popen(c, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for c in commands
    ]
    outputs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=CHILD_TIMEOUT_S)
            outputs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, f"child {p.args} failed:\n{out[-4000:]}"
    return outputs


def test_chains_sharded_over_eight_devices(tmp_path):
    """shard_map and pmap over 8 devices: distinct chain ids, one callback per device and flush, whole
    blocks of a sharded sample leaf (see _sharded_child.py for the checks)."""
    (out,) = _run_all([[sys.executable, str(HERE / "_sharded_child.py"), str(tmp_path)]])
    assert "shard_map: 24 callbacks for 3 flushes on 8 devices" in out
    assert "pmap: 24 callbacks" in out
    assert out.rstrip().endswith("ok")


def _multiprocess_run(tmp_path, mode=""):
    port = free_port()
    script = str(HERE / "_multiprocess_child.py")
    return _run_all(
        [
            [sys.executable, script, str(port), "2", str(i), str(tmp_path)] + ([mode] if mode else [])
            for i in range(2)
        ]
    )


def test_two_processes_write_resume_and_merge(tmp_path):
    """2 jax.distributed processes (2 devices each): each writes its own chains, resumes from its own
    checkpoint, and merge() shows all chains as one posterior that xarray, ArviZ and jaxsave read."""
    for out in _multiprocess_run(tmp_path):
        assert "ok" in out
    for out in _multiprocess_run(tmp_path, "resume"):
        assert "ok" in out
    sources = [tmp_path / "run-0.h5", tmp_path / "run-1.h5"]
    merged = jaxsave.merge(sources, tmp_path / "all.h5")
    expect = 1000.0 * np.arange(8)[:, None] + np.arange(16)[None, :]
    np.testing.assert_array_equal(jaxsave.load_samples(merged)["x"][..., 0], expect)

    # The merged file survives moving the directory (sources are named relative to it).
    moved = tmp_path.parent / (tmp_path.name + "-moved")
    shutil.move(str(tmp_path), str(moved))
    path = moved / "all.h5"
    import xarray as xr

    with xr.open_dataset(path, engine="h5netcdf", group="posterior") as ds:
        assert dict(ds.sizes) == {"chain": 8, "draw": 16, "x_dim_0": 3}
        np.testing.assert_array_equal(ds["x"].values[..., 0], expect)
    idata = jaxsave.to_inference_data(path)
    assert dict(idata.posterior["x"].sizes) == {"chain": 8, "draw": 16, "x_dim_0": 3}
    np.testing.assert_array_equal(idata.sample_stats["lp"].values, -expect)
    info = jaxsave.file_info(path)
    assert info.chains == 8 and info.sample_counts.tolist() == [16] * 8


def test_writer_takes_blocks_from_many_threads():
    """Blocks of different chains submitted by many threads at once (as XLA's device threads do):
    every chain's blocks are written in order, none lost."""
    collector = jaxsave.MemoryCollector()
    chains, blocks, rows = 16, 50, 4
    for _ in range(chains):
        collector.register_chain(init_sample=jax.ShapeDtypeStruct((2,), jnp.float32))
    writer = Writer(collector, max_queue_bytes=4096)  # small: producers also meet backpressure
    for c in range(chains):
        writer.add_chain(c, None)

    def device(ids):
        for b in range(blocks):
            values = np.stack(
                [np.full((rows, 2), 1000 * c + rows * b + np.arange(rows)[:, None], np.float32) for c in ids]
            )
            writer.submit(
                Block(
                    np.array(ids),
                    np.full(len(ids), rows * b),
                    np.full(len(ids), rows * (b + 1)),
                    np.ones((len(ids), rows), bool),
                    [values],
                )
            )

    threads = [threading.Thread(target=device, args=([2 * d, 2 * d + 1],)) for d in range(chains // 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for c in range(chains):  # postprocess's empty tail block finalizes each chain
        writer.submit(
            Block(
                np.array([c]),
                np.array([rows * blocks]),
                np.array([rows * blocks]),
                np.ones((1, 0), bool),
                [np.zeros((1, 0, 2), np.float32)],
                tail=True,
            )
        )
        writer.wait_for(c, rows * blocks, finalized=True)
    writer.close()
    writer.raise_error()
    for c in range(chains):
        got = np.asarray(collector.finished(c))[:, 0]
        np.testing.assert_array_equal(got, 1000 * c + np.arange(rows * blocks))


def _file(path, n_chains=2, draws=3, dim=3, dtype=jnp.float32, stats=True, layout="posterior"):
    extra = {"sample_stats": ("lp",)} if stats and layout == "posterior" else {}
    init, save, post = jaxsave.save(jaxsave.HDF5Collector(path, layout=layout, **extra))
    state = init({"x": jnp.zeros((n_chains, dim), dtype), "lp": jnp.zeros(n_chains)}, chains=n_chains)
    step = lambda s, i: save(s, True, {"x": jnp.full(dim, i, dtype), "lp": -jnp.float32(i)})  # noqa: E731
    post(jax.vmap(lambda s: jax.lax.scan(step, s, jnp.arange(draws))[0])(state), None)
    return path


def test_merge_chains_of_different_lengths(tmp_path):
    a = _file(tmp_path / "a.h5", n_chains=2, draws=5)
    b = _file(tmp_path / "b.h5", n_chains=1, draws=3)
    merged = jaxsave.merge([a, b], tmp_path / "m.h5")
    with h5py.File(merged) as f:
        assert f["posterior/x"].is_virtual and f["posterior/x"].shape == (3, 5, 3)
        assert f.attrs["sample_counts"].tolist() == [5, 5, 3]
        assert f.attrs["jaxsave_chain_offsets"].tolist() == [0, 2]
    x = jaxsave.load_samples(merged)["x"]
    np.testing.assert_array_equal(x[2, :3, 0], [0, 1, 2])
    assert np.isnan(x[2, 3:]).all()  # past a chain's count
    np.testing.assert_array_equal(jaxsave.load_samples(merged, chain=1)["x"][:, 0], np.arange(5))


@pytest.mark.parametrize("kind", ["dtype", "shape", "variables"])
def test_merge_refuses_files_that_do_not_match(tmp_path, kind):
    a = _file(tmp_path / "a.h5")
    other = {"dtype": dict(dtype=jnp.float16), "shape": dict(dim=4), "variables": dict(stats=False)}[kind]
    b = _file(tmp_path / "b.h5", **other)
    with pytest.raises(jaxsave.StructureMismatchError, match="cannot be merged"):
        jaxsave.merge([a, b], tmp_path / "m.h5")
    assert not (tmp_path / "m.h5").exists()


def test_merge_refuses_missing_foreign_and_merged_files(tmp_path):
    a = _file(tmp_path / "a.h5")
    with pytest.raises(jaxsave.FileFormatError, match="no such file"):
        jaxsave.merge([a, tmp_path / "missing.h5"], tmp_path / "m.h5")
    with h5py.File(tmp_path / "plain.h5", "w") as f:
        f["x"] = 1
    with pytest.raises(jaxsave.FileFormatError, match="not a jaxsave sample file"):
        jaxsave.merge([a, tmp_path / "plain.h5"], tmp_path / "m.h5")
    chains = _file(tmp_path / "chains.h5", layout="chains")
    with pytest.raises(jaxsave.FileFormatError, match="layout='posterior'"):
        jaxsave.merge([a, chains], tmp_path / "m.h5")
    merged = jaxsave.merge([a], tmp_path / "m.h5")
    with pytest.raises(jaxsave.FileFormatError, match="merged file"):
        jaxsave.merge([merged], tmp_path / "m2.h5")
    with pytest.raises(ValueError, match="cannot also be a source"):
        jaxsave.merge([a], a)


def test_mode_a_refuses_a_merged_file_and_names_it_as_one(tmp_path):
    merged = pathlib.Path(
        jaxsave.merge([_file(tmp_path / "a.h5"), _file(tmp_path / "b.h5")], tmp_path / "m.h5")
    )
    before = merged.read_bytes()
    with pytest.raises(
        jaxsave.FileFormatError, match="jaxsave.merge wrote this file.*continue a source file"
    ):
        jaxsave.HDF5Collector(merged, mode="a")
    assert merged.read_bytes() == before and not os.path.exists(f"{merged}.lock")


def test_merge_tells_one_file_by_any_path(tmp_path):
    """The output reached through a linked directory replaced the source (its samples lost), and
    one source named twice made a file the readers refuse: both are refused, the source intact."""
    a = _file(tmp_path / "a.h5")
    os.symlink(tmp_path, tmp_path.parent / f"{tmp_path.name}-link")
    via_link = tmp_path.parent / f"{tmp_path.name}-link" / "a.h5"
    with pytest.raises(ValueError, match="cannot also be a source"):
        jaxsave.merge([a], via_link)
    with pytest.raises(ValueError, match="the same source twice"):
        jaxsave.merge([a, tmp_path / "." / "a.h5"], tmp_path / "m.h5")
    os.link(a, tmp_path / "hard.h5")
    with pytest.raises(ValueError, match="the same source twice"):
        jaxsave.merge([a, tmp_path / "hard.h5"], tmp_path / "m.h5")
    assert not (tmp_path / "m.h5").exists()
    assert jaxsave.file_info(a) is not None


def test_merge_refuses_a_file_a_collector_writes(tmp_path):
    """merge replaced the file a running collector wrote (its samples lost, no error until the
    collector's close), and merged a source still being written (its chains cut at a partial
    count): both are a FileInUseError naming the file, and nothing changes."""
    sources = [_file(tmp_path / "a.h5"), _file(tmp_path / "b.h5")]
    live = jaxsave.HDF5Collector(tmp_path / "live.h5", sample_stats=("lp",))
    try:
        live.register_chain(init_sample={"x": np.zeros(3, np.float32), "lp": np.zeros((), np.float32)})
        live.save_block([0], [np.ones((1, 3), np.float32), np.ones((1, 3, 3), np.float32)])
        with pytest.raises(jaxsave.FileInUseError, match="live.h5"):
            jaxsave.merge(sources, tmp_path / "live.h5")
        with pytest.raises(jaxsave.FileInUseError, match=r"cannot merge .*live.h5.*still writing"):
            jaxsave.merge([sources[0], tmp_path / "live.h5"], tmp_path / "m.h5")
        live.finalize(0)
    finally:
        live.close()
    assert not (tmp_path / "m.h5").exists()
    assert list(jaxsave.file_info(tmp_path / "live.h5").sample_counts) == [3]
    merged = jaxsave.merge([sources[0], tmp_path / "live.h5"], tmp_path / "m.h5")  # closed: merged
    assert list(jaxsave.file_info(merged).sample_counts) == [3, 3, 3]
    assert not os.path.exists(f"{merged}.lock")  # the output's lock is released


def test_merge_replaces_only_a_merged_file(tmp_path):
    """merge onto a finished sample file replaced it with no word (its samples lost); a missing
    output directory was reported as the lock file's."""
    a, b = _file(tmp_path / "a.h5"), _file(tmp_path / "b.h5")
    with pytest.raises(FileExistsError, match=r"would replace .*b\.h5.*not a merged file"):
        jaxsave.merge([a], b)
    assert list(jaxsave.file_info(b).sample_counts) == [3, 3]
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a merged file"):
        jaxsave.merge([a], tmp_path / "notes.txt")
    merged = jaxsave.merge([a], tmp_path / "m.h5")
    jaxsave.merge([a, b], merged)  # a merge made again replaces the merged file
    assert list(jaxsave.file_info(merged).sample_counts) == [3, 3, 3, 3]
    with pytest.raises(FileNotFoundError, match=r"the directory .*nodir.* does not exist"):
        jaxsave.merge([a], tmp_path / "nodir" / "m.h5")


def test_merge_into_a_symlinked_directory_reads_the_sources_it_names(tmp_path):
    # the sources were named relative to the link's path; HDF5 resolves '..' from the link's
    # target, and read an unrelated file of the same name there
    (tmp_path / "real" / "sub").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "real" / "sub")
    source = _file(tmp_path / "run-0.h5", draws=2)
    wrong = _file(tmp_path / "real" / "run-0.h5", draws=2)  # where '../run-0.h5' lands
    with h5py.File(wrong, "r+") as f:
        f["posterior/x"][...] = 666
    merged = jaxsave.merge([source], tmp_path / "link" / "all.h5")
    np.testing.assert_array_equal(jaxsave.load_samples(merged)["x"][0, :, 0], [0, 1])
    os.remove(tmp_path / "real" / "run-0.h5")
    assert jaxsave.load_samples(tmp_path / "link" / "all.h5")["x"].shape == (2, 2, 3)


@pytest.mark.parametrize("name", ["run-50%.h5", "run-%b.h5"])
def test_merge_refuses_a_source_name_hdf5_reads_as_a_pattern(tmp_path, name):
    source = _file(tmp_path / name)
    with pytest.raises(ValueError, match=f"cannot name the source .*{name}.*: HDF5 reads a '%'"):
        jaxsave.merge([source], tmp_path / "m.h5")
    assert not (tmp_path / "m.h5").exists()


def test_merge_through_link_dotdot_and_a_merged_file_opened_through_a_link(tmp_path, monkeypatch):
    # 'link/..' was collapsed as text (abspath) to the directory holding the link, not the
    # parent of its target, where the file goes; and a merged file opened through a link from
    # another directory read whatever sat there under its sources' names
    monkeypatch.chdir(tmp_path)
    for d in ("real/a/b", "src", "real/a/src", "elsewhere"):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "link").symlink_to("real/a/b")
    _file(tmp_path / "src" / "run-0.h5", draws=2)
    wrong = _file(tmp_path / "real" / "a" / "src" / "run-0.h5", draws=2)
    with h5py.File(wrong, "r+") as f:
        f["posterior/x"][...] = 666
    merged = jaxsave.merge(["src/run-0.h5"], "link/../all.h5")
    assert os.path.exists(tmp_path / "real" / "a" / "all.h5")
    np.testing.assert_array_equal(jaxsave.load_samples(merged)["x"][0, :, 0], [0, 1])
    os.symlink(tmp_path / "real" / "a" / "all.h5", tmp_path / "elsewhere" / "all.h5")
    with pytest.raises(jaxsave.FileFormatError, match="opened through a link from another directory"):
        jaxsave.load_samples(tmp_path / "elsewhere" / "all.h5")
    (tmp_path / "mirror").symlink_to(tmp_path / "real" / "a")  # a link to its directory is fine
    np.testing.assert_array_equal(jaxsave.load_samples(tmp_path / "mirror" / "all.h5")["x"][0, :, 0], [0, 1])
