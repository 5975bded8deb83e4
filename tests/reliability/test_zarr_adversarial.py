"""Adversarial cases of the Zarr backend: a full disk under the writer, leaf names Zarr cannot
store, two writers of one store (in one process, and two owners of a shared store in two
processes), and hostile local stores (symbolic links out of the store, FIFOs, ``/dev/zero``)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _reliability import python, small_disk

import jaxsave

zarr = pytest.importorskip("zarr", reason="the Zarr tests need zarr (pip install 'jaxsave[zarr]')")

pytestmark = pytest.mark.reliability


# -- A: a full disk ----------------------------------------------------------------------------------

WIDTH = 1000  # floats a draw: random, so that zstd cannot shrink them (the disk fills as draws come)


def _noisy(i):
    noise = jax.random.uniform(jax.random.fold_in(jax.random.key(0), i), (WIDTH,))
    return noise.at[0].set(i.astype(jnp.float32))


@contextlib.contextmanager
def _store_on_a_small_disk(tmp_path, **kwargs):
    """``(path, collector)``: a ZarrCollector (zstd) of a store on a 1 MiB tmpfs, closed before the
    tmpfs is unmounted (its lock file is there)."""
    with small_disk(tmp_path, "1m") as mnt:
        path = mnt / "run.zarr"
        collector = jaxsave.ZarrCollector(path, compression="zstd", **kwargs)
        try:
            yield path, collector
        finally:
            with contextlib.suppress(OSError):
                collector.close()


def test_full_disk_never_counts_draws_it_did_not_store(tmp_path):
    with _store_on_a_small_disk(tmp_path, flush_interval=0) as (path, collector):
        saver = jaxsave.save(collector, block_size=8)
        state = saver.init({"x": jnp.zeros((2, WIDTH))}, None, chains=2)
        step = lambda s, i: (saver.save(s, True, {"x": _noisy(i)})[0], None)
        run = jax.jit(jax.vmap(lambda s: jax.lax.scan(step, s, jnp.arange(400))[0]))  # 3.2 MB of draws
        with pytest.raises(OSError) as raised:
            saver.postprocess(run(state), None)
        assert raised.value.errno in (errno.ENOSPC, errno.EFBIG), raised.value
        assert str(path) in str(raised.value) and "disk is full" in str(raised.value)
        counts = jaxsave.file_info(path).sample_counts
        assert counts.min() > 0, counts  # something was stored before the disk filled up ...
        x = jaxsave.load_samples(path)["x"]
        for c, n in enumerate(counts.tolist()):  # ... and every counted draw is in the store, exact
            assert n < 400
            want = np.stack([np.asarray(_noisy(jnp.int32(i))) for i in range(n)])
            np.testing.assert_array_equal(x[c, :n], want)
        live = jaxsave.open_live(path)
        assert live.refresh()["x"].shape[:2] == (2, counts.max())
        assert live.sample_counts.tolist() == counts.tolist()


def test_rows_of_a_failed_write_are_kept_and_counted_once_there_is_room(tmp_path):
    """A chunk write that found the disk full keeps its rows: the counts do not cover them, and
    once there is room again the next commit (here ``close``) stores them and then counts them."""
    with _store_on_a_small_disk(tmp_path, flush_interval=1e9) as (path, collector):
        chain = collector.register_chain({"x": jnp.zeros(64)})
        rows = np.arange(10 * 64, dtype=np.float32).reshape(1, 10, 64)
        collector.save_block([chain], [rows[:, :5]])  # the first block: committed at once
        assert jaxsave.file_info(path).sample_counts.tolist() == [5]
        collector.save_block([chain], [rows[:, 5:]])  # kept until the next commit
        filler = path.parent / "filler"
        with contextlib.suppress(OSError), open(filler, "wb", buffering=0) as f:  # the rest of the disk
            while True:
                f.write(b"\1" * 4096)
        with pytest.raises(OSError, match="disk is full") as raised:
            collector.finalize(chain)
        assert raised.value.errno == errno.ENOSPC and str(path) in str(raised.value)
        assert jaxsave.file_info(path).sample_counts.tolist() == [5]  # not stored, so not counted
        np.testing.assert_array_equal(jaxsave.load_samples(path)["x"][0], rows[0, :5])
        filler.unlink()
        collector.close()
        assert jaxsave.file_info(path).sample_counts.tolist() == [10]
        np.testing.assert_array_equal(jaxsave.load_samples(path)["x"][0], rows[0])


# -- B: names Zarr cannot store -------------------------------------------------------------------------

BAD_NAMES = ["..", "zarr.json", "ZARR.JSON", "__x", "a\\b", "x\\..", ".", ""]
GOOD_NAMES = ["a/b", "..a", "x/..", "../x", "zarr.json/x", "c", "sample_counts", " "]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_leaf_names_zarr_cannot_store_are_refused_at_init(tmp_path, name):
    path = tmp_path / "run.zarr"
    saver = jaxsave.save(jaxsave.ZarrCollector(path), block_size=2)
    with pytest.raises(jaxsave.StructureMismatchError) as raised:
        saver.init({name: jnp.zeros(2), "ok": jnp.zeros(())}, None)
    assert repr(name) in str(raised.value) or repr((name,)) in str(raised.value)
    assert not (tmp_path / "run.zarr" / "posterior").exists()  # nothing written, nowhere else either
    assert sorted(os.listdir(tmp_path)) == ["run.zarr"]


def test_leaf_names_zarr_can_store_round_trip(tmp_path):
    path = tmp_path / "run.zarr"
    saver = jaxsave.save(jaxsave.ZarrCollector(path), block_size=2)
    sample = lambda i: {name: jnp.full(2, i + k, jnp.float32) for k, name in enumerate(GOOD_NAMES)}
    state = saver.init(sample(0), None)
    for i in range(3):
        state, _ = saver.save(state, True, sample(i))
    saver.postprocess(state, None)
    got = jaxsave.load_samples(path)
    for k, name in enumerate(GOOD_NAMES):
        np.testing.assert_array_equal(got[name][0, :, 0], np.arange(3.0) + k)
    assert sorted(os.listdir(tmp_path)) == ["run.zarr"]  # no node outside the store


# -- C and D: two writers of one store -------------------------------------------------------------------


def _write(collector, value, draws=4):
    saver = jaxsave.save(collector, block_size=2)
    state = saver.init({"x": jnp.zeros(2)}, None, jaxsave.static_information(draws))
    for _ in range(draws):
        state, _ = saver.save(state, True, {"x": jnp.full(2, value, jnp.float32)})
    return saver.postprocess(state, None)


@pytest.mark.parametrize("kind", ["memory-url", "memory-object", "group-object"])
def test_a_second_collector_of_one_store_in_one_process_is_refused(tmp_path, kind):
    if kind == "memory-url":
        store = f"memory://adversarial-{os.getpid()}-{time.monotonic_ns()}"
    elif kind == "memory-object":
        store = zarr.storage.MemoryStore()
    else:
        _write(jaxsave.ZarrCollector(tmp_path / "g.zarr"), 0.0)  # a jaxsave store, opened by the user
        store = zarr.open_group(zarr.storage.LocalStore(tmp_path / "g.zarr"), mode="r+")
    first = jaxsave.ZarrCollector(store)
    for mode in ("w", "a"):
        with pytest.raises(jaxsave.FileInUseError, match="another ZarrCollector of this process"):
            jaxsave.ZarrCollector(store, mode=mode)
    with pytest.raises(jaxsave.FileInUseError):  # a shared store's owner is the only writer too
        jaxsave.ZarrCollector(store, shared=True, chains=1, run_id="r")
    _write(first, 1.0)  # the first one is untouched; closing it frees the store
    np.testing.assert_array_equal(jaxsave.load_samples(store)["x"][0, :, 0], np.ones(4))
    _write(jaxsave.ZarrCollector(store), 2.0)
    np.testing.assert_array_equal(jaxsave.load_samples(store)["x"][0, :, 0], np.full(4, 2.0))


def test_shared_writers_of_one_process_need_their_own_first_chain():
    store = f"memory://adversarial-shared-{os.getpid()}-{time.monotonic_ns()}"
    owner = jaxsave.ZarrCollector(store, shared=True, chains=4, first_chain=0, run_id="r", draws=4)
    other = jaxsave.ZarrCollector(store, shared=True, chains=4, first_chain=2, run_id="r", draws=4)
    with pytest.raises(jaxsave.FileInUseError, match="its chains from 2 on"):
        jaxsave.ZarrCollector(store, shared=True, chains=4, first_chain=2, run_id="r", draws=4)
    with pytest.raises(jaxsave.FileInUseError, match="writes this store"):
        jaxsave.ZarrCollector(store, shared=True, chains=4, first_chain=0, run_id="r", draws=4)
    owner.close()
    other.close()


OWNER_CHILD = textwrap.dedent("""
    import sys, jaxsave
    collector = jaxsave.ZarrCollector(sys.argv[1], shared=True, chains=2, first_chain=0, run_id="r", draws=4)
    print("READY", flush=True)
    sys.stdin.readline()
    collector.close()
    print("DONE", flush=True)
""")


def test_a_second_owner_of_a_shared_local_store_in_another_process_is_refused(tmp_path):
    path = tmp_path / "shared.zarr"
    script = tmp_path / "owner.py"
    script.write_text(OWNER_CHILD)
    child = python(script, path, stdin=subprocess.PIPE)
    try:
        assert child.stdout.readline().strip() == "READY", child.stderr.read()
        created = (path / "zarr.json").read_bytes()
        for mode in ("w", "a"):
            with pytest.raises(jaxsave.FileInUseError, match=f"another process \\(pid {child.pid}"):
                jaxsave.ZarrCollector(
                    path, shared=True, chains=2, first_chain=0, run_id="r", draws=4, mode=mode
                )
        with pytest.raises(jaxsave.FileInUseError):  # nor may a single writer take it over
            jaxsave.ZarrCollector(path)
        assert (path / "zarr.json").read_bytes() == created  # the owner's store untouched
        # the other process's chains are its own, and can be written meanwhile
        other = jaxsave.ZarrCollector(path, shared=True, chains=2, first_chain=1, run_id="r", draws=4)
        other.close()
        child.stdin.write("\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "DONE"
    finally:
        with contextlib.suppress(OSError):
            child.stdin.close()
        child.wait(60)
    jaxsave.ZarrCollector(path, shared=True, chains=2, first_chain=0, run_id="r2", draws=4).close()


# -- E: hostile local stores -------------------------------------------------------------------------------

HOSTILE_CHILD = textwrap.dedent("""
    import contextlib, io, json, os, resource, shutil, sys
    import numpy as np, jaxsave
    from jaxsave.__main__ import main

    pristine, secret, work = sys.argv[1:4]
    cases = json.loads(sys.argv[4])
    with open("/proc/self/status") as f:  # a read of /dev/zero ends in MemoryError, not the machine's memory
        vm = next(int(line.split()[1]) for line in f if line.startswith("VmSize")) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (vm + 2**31, vm + 2**31))

    def leaked(tree):
        x = np.asarray(tree["posterior"]["x"] if "posterior" in tree else tree["x"])
        return bool((x >= 1000).any())

    def live(path):
        return jaxsave.open_live(path).refresh()

    def idata(path):
        tree = jaxsave.to_inference_data(path)
        return {"x": np.asarray(tree["posterior"]["x"])}

    def inspect(path):
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(["inspect", path])
        if code == 2 and "jaxsave reads only regular files" in err.getvalue():
            raise jaxsave.FileFormatError(err.getvalue())
        return {"x": np.zeros(1)} if code == 0 else None

    def append(path):  # chain 0 gets 4 more draws (leaves lp, x): its chunk is read, rewritten
        collector = jaxsave.ZarrCollector(path, mode="a")
        try:
            collector.reopen_chain(0, 8, {"x": np.zeros(3, np.float32), "lp": np.float32(0)})
            collector.save_block([0], [np.zeros((1, 4), np.float32), np.full((1, 4, 3), 5, np.float32)])
        finally:
            collector.close()

    readers = {
        "load_samples": jaxsave.load_samples,
        "file_info": jaxsave.file_info,
        "open_live().refresh": live,
        "to_inference_data": idata,
        "jaxsave inspect": inspect,
        "mode='a'": append,
        "resume": jaxsave.resume,
    }
    results = {}
    for case, (key, attack) in cases.items():
        path = os.path.join(work, case)
        shutil.copytree(pristine, path, symlinks=True)
        target = os.path.join(path, key)
        if os.path.isdir(target):
            shutil.rmtree(target)
        else:
            os.unlink(target)
        if attack == "symlink out":
            os.symlink(os.path.join(secret, key), target)
        elif attack == "fifo":
            os.mkfifo(target)
        else:
            os.symlink("/dev/zero", target)
        for name, reader in readers.items():
            try:
                out = reader(path)
                results[f"{case} / {name}"] = "secret returned" if isinstance(out, dict) and leaked(out) else "no error"
            except jaxsave.FileFormatError:
                results[f"{case} / {name}"] = "FileFormatError"
            except BaseException as error:
                results[f"{case} / {name}"] = f"{type(error).__name__}: {str(error)[:200]}"
    print(json.dumps(results))
""")


ALL = (
    "load_samples",
    "file_info",
    "open_live().refresh",
    "to_inference_data",
    "jaxsave inspect",
    "mode='a'",
    "resume",
)
ARRAYS = ("load_samples", "open_live().refresh", "to_inference_data", "mode='a'")
#: The readers that read each key (its case's name without the attack).
READS = {
    "root": ALL,
    "array-meta": ARRAYS,
    "chunk": ARRAYS,
    "counts-chunk": ALL[:-1],
    "checkpoint": ("resume",),
    "posterior-dir": ARRAYS,
}


def _run(path, value):
    """8 draws of 2 chains, a checkpoint every 4 steps (``x`` is ``value + step``)."""
    collector = jaxsave.ZarrCollector(path, checkpoint_interval=0)
    saver = jaxsave.save(collector, block_size=4, checkpoint_every=4)

    def step(s, i):
        x = jnp.full(3, value + i, jnp.float32)
        return saver.save(s, True, {"x": x, "lp": -i * 1.0}, solver_state=x)[0], None

    solver = jnp.zeros((2, 3))
    state = saver.init({"x": jnp.zeros((2, 3)), "lp": jnp.zeros(2)}, solver, chains=2)
    saver.postprocess(jax.jit(jax.vmap(lambda s: jax.lax.scan(step, s, jnp.arange(8))[0]))(state), None)


def test_hostile_local_stores_are_refused_by_every_reader(tmp_path, figures):
    pristine, secret = tmp_path / "pristine.zarr", tmp_path / "secret.zarr"
    _run(pristine, 0.0)
    _run(secret, 1000.0)  # what must never come back from the pristine store
    keys = {
        "root": "zarr.json",
        "array-meta": "posterior/x/zarr.json",
        "chunk": next(
            os.path.relpath(os.path.join(r, n), pristine)
            for r, _, names in os.walk(pristine / "posterior" / "x" / "c")
            for n in names
        ),
        "counts-chunk": "sample_counts/c/0",
        "checkpoint": next(
            os.path.relpath(os.path.join(r, n), pristine)
            for r, _, names in os.walk(pristine / "sample_counts" / "jaxsave_checkpoints")
            for n in names
        ),
    }
    cases = {
        f"{what}={attack}".replace(" ", "-"): (key, attack)
        for what, key in keys.items()
        for attack in ("symlink out", "fifo", "dev zero")
    }
    cases["posterior-dir=symlink-out"] = ("posterior", "symlink out")
    work = tmp_path / "work"
    work.mkdir()
    script = tmp_path / "hostile.py"
    script.write_text(HOSTILE_CHILD)
    child = python(script, pristine, secret, work, json.dumps(cases))
    try:
        out, err = child.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        child.kill()
        out, err = child.communicate()
        pytest.fail(f"a reader hung on a hostile store: {err[-2000:]}")
    assert child.returncode == 0, err[-3000:]
    results = json.loads(out.strip().splitlines()[-1])
    # every reader that reads the key refuses the store; one that never reads it returns
    wrong = {
        k: v
        for k, v in results.items()
        if v != ("FileFormatError" if k.split(" / ")[1] in READS[k.split("=")[0]] else "no error")
    }
    assert not wrong, json.dumps(wrong, indent=1)
    figures(
        "hostile",
        "zarr store: symlinks out, FIFOs, /dev/zero",
        handled=len(results),
        refused=sum(v == "FileFormatError" for v in results.values()),
    )


def test_the_confined_store_never_writes_through_a_symlink(tmp_path):
    """A writer (mode="a", recover) writes a key only below real directories of the store."""
    import asyncio

    from zarr.core.buffer import default_buffer_prototype

    from jaxsave._store.zarr.store import confined_store

    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "s.zarr").mkdir()
    (tmp_path / "s.zarr" / "posterior").symlink_to(outside)
    store = confined_store(str(tmp_path / "s.zarr"))
    data = default_buffer_prototype().buffer.from_bytes(b"{}")
    for key in ("posterior/zarr.json", "posterior/new/c/0"):
        with pytest.raises(jaxsave.FileFormatError, match="symbolic link"):
            asyncio.run(store.set(key, data))
    asyncio.run(store.set("inside/zarr.json", data))
    assert os.listdir(outside) == [] and (tmp_path / "s.zarr" / "inside" / "zarr.json").read_bytes() == b"{}"


@pytest.mark.parametrize("target", ["empty", "store"])
def test_a_new_store_at_a_symbolic_link_is_refused_and_the_target_kept(tmp_path, target):
    """mode="w" at a path that is a link (to an empty directory or to a store) names the link,
    instead of zarr's "[Errno None] None" from a delete it cannot do, and touches nothing."""
    real = tmp_path / "real.zarr"
    if target == "store":
        saver = jaxsave.save(jaxsave.ZarrCollector(real))
        saver.postprocess(saver.init({"x": jnp.zeros(2)}))
    else:
        real.mkdir()
    before = sorted(os.listdir(real))
    (tmp_path / "link.zarr").symlink_to(real)
    with pytest.raises(FileExistsError, match="link.zarr' is a symbolic link"):
        jaxsave.ZarrCollector(tmp_path / "link.zarr")
    assert sorted(os.listdir(real)) == before and (tmp_path / "link.zarr").is_symlink()
