"""HDF5 and Zarr write and read throughput of jaxsave, against plain h5py / zarr in the same run.

Write: ``n`` samples of 4 MB (float32) streamed from a jit-compiled ``lax.scan``
through ``jaxsave.save(HDF5Collector(path))``, wall time from the start of the
run to the end of ``postprocess`` (the file is flushed and closed), compared with
one bulk ``h5py`` write of the same bytes (same chunking filter, flushed and
closed). Read: ``jaxsave.load_samples(path)`` of the whole file, and of a slice
of draws, from the page cache. With zarr installed, the same for
``ZarrCollector`` on a local directory store (uncompressed), against one bulk
``zarr`` array write of the same bytes in the same chunks.

Run: ``python benchmarks/hdf5_io.py [--samples 64] [--repeat 3] [--quick]``; prints a table
and writes ``benchmarks/results/hdf5_io.json``. Not a test.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import pathlib
import platform
import statistics
import tempfile
import time

import h5py
import jax
import jax.numpy as jnp
import numpy as np

import jaxsave

SAMPLE_FLOATS = 2**20  # 4 MB of float32
RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "hdf5_io.json"


def make_pool(k: int = 8) -> jax.Array:
    """Random data (compressible like real float samples, i.e. hardly) the loop copies from."""
    return jax.random.normal(jax.random.key(0), (k, SAMPLE_FLOATS), jnp.float32)


def jaxsave_write(path: str, pool: jax.Array, n: int, compression: str | None, swmr: bool) -> float:
    os.sync()
    return _stream_to(jaxsave.HDF5Collector(path, compression=compression, swmr=swmr), pool, n)


def _stream_to(collector: jaxsave.DataCollector, pool: jax.Array, n: int) -> float:
    """Seconds to run and postprocess ``n`` jitted steps saving a sample of ``pool`` to ``collector``."""
    init, save, post = jaxsave.save(collector)
    state = init({"w": jnp.zeros(SAMPLE_FLOATS)})

    def step(s, i):
        return save(s, True, {"w": pool[i % pool.shape[0]] + i.astype(jnp.float32)})

    run = jax.jit(lambda s: jax.lax.scan(step, s, jnp.arange(n))[0]).lower(state).compile()
    start = time.perf_counter()
    post(run(state), None)
    return time.perf_counter() - start


def zarr_write(path: str, pool: jax.Array, n: int) -> float:
    """``jaxsave_write`` with ``ZarrCollector`` on a local directory store, uncompressed."""
    import shutil

    shutil.rmtree(path, ignore_errors=True)
    os.sync()
    return _stream_to(jaxsave.ZarrCollector(path, compression=None), pool, n)


def zarr_bulk_write(path: str, data: np.ndarray, chunk_draws: int) -> float:
    """One plain ``zarr`` write of ``data`` as a ``(1, draw, w)`` array, uncompressed, in the same chunks."""
    import shutil

    import zarr

    shutil.rmtree(path, ignore_errors=True)
    os.sync()
    start = time.perf_counter()
    array = zarr.create_array(
        path,
        shape=(1, *data.shape),
        chunks=(1, chunk_draws, data.shape[1]),
        dtype=data.dtype,
        compressors=None,
    )
    array[0] = data
    return time.perf_counter() - start


def dir_size(path: str) -> int:
    return sum(f.stat().st_size for f in pathlib.Path(path).rglob("*") if f.is_file())


def zarr_chunk_draws(path: str) -> int:
    """The draw extent of the chunks ``ZarrCollector`` gave the sample ``w`` at ``path``."""
    import zarr

    return zarr.open_group(path, mode="r")["posterior/w"].chunks[1]


def plain_readinto(array_dir: str, like: np.ndarray) -> np.ndarray:
    """The floor: a new array like ``like`` (as ``load_samples`` allocates its result), each
    chunk file of ``array_dir`` (chunks of one draw, ``c/0/<draw>/0``) ``readinto`` its row,
    one after the other in one thread, with no jaxsave or zarr code."""
    out = np.empty_like(like)
    for d in range(out.shape[0]):
        with open(os.path.join(array_dir, "c", "0", str(d), "0"), "rb", buffering=0) as f:
            f.readinto(memoryview(out[d]).cast("B"))
    return out


def zarr_read_rounds(
    path: str, h5_path: str, data: np.ndarray, rounds: int
) -> dict[str, tuple[float, float]]:
    """Best (wall, CPU) seconds of each way to read the ``(draw, w)`` samples at ``path``, in
    interleaved rounds: jaxsave's ``load_samples`` (direct chunk reads), the same through zarr
    (the direct reader switched off: the reader before it), zarr's own ``array[0]``, HDF5's
    ``load_samples`` of the same data, and the plain-``readinto`` floor. CPU time is the
    process's (``RUSAGE_SELF``: all threads)."""
    import importlib
    import resource

    import zarr

    direct = importlib.import_module("jaxsave._store.zarr.chunk_files")
    array = zarr.open_array(os.path.join(path, "posterior", "w"), mode="r")

    def through_zarr() -> object:
        direct.SUPPORTED = False
        try:
            return jaxsave.load_samples(path, chain=0)
        finally:
            direct.SUPPORTED = True

    ways = {
        "load_samples": lambda: jaxsave.load_samples(path, chain=0),
        "load_samples_via_zarr": through_zarr,
        "zarr_array": lambda: array[0],
        "hdf5_load_samples": lambda: jaxsave.load_samples(h5_path, chain=0),
        "floor_readinto": lambda: plain_readinto(os.path.join(path, "posterior", "w"), data),
        "load_quarter_slice": lambda: jaxsave.load_samples(
            path, chain=0, draws=slice(len(data) // 4, len(data) // 2)
        ),
    }
    assert np.array_equal(ways["load_samples"]()["w"], data)
    assert np.array_equal(through_zarr()["w"], data) and np.array_equal(array[0], data)
    assert np.array_equal(plain_readinto(os.path.join(path, "posterior", "w"), data), data)
    best = {k: (float("inf"), float("inf")) for k in ways}
    for _ in range(rounds):
        for name, fn in ways.items():
            usage = resource.getrusage(resource.RUSAGE_SELF)
            start = time.perf_counter()
            fn()
            wall = time.perf_counter() - start
            after = resource.getrusage(resource.RUSAGE_SELF)
            cpu = (after.ru_utime - usage.ru_utime) + (after.ru_stime - usage.ru_stime)
            best[name] = (min(best[name][0], wall), min(best[name][1], cpu))
    return best


def expected(pool: jax.Array, n: int) -> np.ndarray:
    p = np.asarray(pool)
    return np.stack([p[i % len(p)] + np.float32(i) for i in range(n)])


def h5py_write(path: str, data: np.ndarray, compression: str | None) -> float:
    os.sync()
    start = time.perf_counter()
    with h5py.File(path, "w") as f:
        chunks = (1,) + data.shape[1:] if compression else None
        f.create_dataset(
            "w", data=data, chunks=chunks, compression=compression, shuffle=compression is not None
        )
    return time.perf_counter() - start


def timed(fn, repeat: int) -> float:
    """Median seconds of ``fn()`` (which may return its own time, or anything else)."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        times.append(out if isinstance(out, float) else time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write the files (default: a temporary dir)")
    parser.add_argument("--quick", action="store_true", help="16 samples, 1 repeat: a smoke run")
    parser.add_argument("--no-hdf5", action="store_true", help="only the Zarr rows")
    args = parser.parse_args()
    if args.quick:
        args.samples, args.repeat = min(args.samples, 16), 1
    n = args.samples
    pool = make_pool()
    data = expected(pool, n)
    nbytes = data.nbytes
    rows = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        hdf5_cases = () if args.no_hdf5 else ((None, True), (None, False), ("lzf", True), ("gzip", True))
        if args.quick:
            hdf5_cases = hdf5_cases[:1]
        for compression, swmr in hdf5_cases:
            path = os.path.join(tmp, "jaxsave.h5")
            reps = args.repeat if compression != "gzip" else 1
            t_save = timed(lambda: jaxsave_write(path, pool, n, compression, swmr), reps)
            t_h5 = timed(lambda: h5py_write(os.path.join(tmp, "h5py.h5"), data, compression), reps)
            os.sync()  # let writeback finish: reads are timed from the page cache, not against the disk
            got = jaxsave.load_samples(path, chain=0)["w"]
            assert np.array_equal(got, data), "jaxsave wrote different bytes"
            t_read = timed(lambda: jaxsave.load_samples(path, chain=0), args.repeat)
            t_slice = timed(
                lambda: jaxsave.load_samples(path, chain=0, draws=slice(n // 4, n // 2)), args.repeat
            )
            rows.append(
                {
                    "store": "hdf5",
                    "compression": compression or "none",
                    "swmr": swmr,
                    "samples": n,
                    "sample_mb": 4,
                    "file_mb": round(os.path.getsize(path) / 1e6, 1),
                    "jaxsave_write_mb_s": round(nbytes / t_save / 1e6, 1),
                    "bulk_write_mb_s": round(nbytes / t_h5 / 1e6, 1),
                    "write_fraction": round(t_h5 / t_save, 3),
                    "load_samples_gb_s": round(nbytes / t_read / 1e9, 2),
                    "load_quarter_slice_gb_s": round(nbytes / 4 / t_slice / 1e9, 2),
                }
            )
        if importlib.util.find_spec("zarr") is not None and hasattr(jaxsave, "ZarrCollector"):
            path = os.path.join(tmp, "jaxsave.zarr")
            t_save = timed(lambda: zarr_write(path, pool, n), args.repeat)
            chunk_draws = zarr_chunk_draws(path)
            t_bulk = timed(
                lambda: zarr_bulk_write(os.path.join(tmp, "bulk.zarr"), data, chunk_draws), args.repeat
            )
            os.sync()
            got = jaxsave.load_samples(path, chain=0)["w"]
            assert np.array_equal(got, data), "jaxsave wrote different bytes to Zarr"
            h5_path = os.path.join(tmp, "same.h5")
            jaxsave_write(h5_path, pool, n, None, True)
            os.sync()
            best = zarr_read_rounds(path, h5_path, data, max(3, args.repeat))
            t_read, t_slice = best["load_samples"][0], best["load_quarter_slice"][0]
            reads = {
                f"read_{name}_gb_s": {
                    "wall": round(nbytes / wall / 1e9, 2),
                    "cpu": round(nbytes / cpu / 1e9, 2),
                }
                for name, (wall, cpu) in best.items()
                if name != "load_quarter_slice"
            }
            rows.append(
                {
                    "store": "zarr (directory)",
                    "compression": "none",
                    "swmr": "-",
                    "samples": n,
                    "sample_mb": 4,
                    "file_mb": round(dir_size(path) / 1e6, 1),
                    "jaxsave_write_mb_s": round(nbytes / t_save / 1e6, 1),
                    "bulk_write_mb_s": round(nbytes / t_bulk / 1e6, 1),
                    "write_fraction": round(t_bulk / t_save, 3),
                    "load_samples_gb_s": round(nbytes / t_read / 1e9, 2),
                    "load_quarter_slice_gb_s": round(nbytes / 4 / t_slice / 1e9, 2),
                    "chunk_draws": chunk_draws,
                    "read_rounds": max(3, args.repeat),
                    **reads,
                }
            )
            print(
                f"Zarr reads of the same {nbytes / 1e6:.0f} MB, "
                f"best of {max(3, args.repeat)} interleaved rounds:"
            )
            for name, value in reads.items():
                print(f"  {name}: wall {value['wall']} GB/s, CPU {value['cpu']} GB/s")
    header = [
        "store",
        "compression",
        "swmr",
        "jaxsave write MB/s",
        "bulk write MB/s",
        "fraction",
        "load GB/s",
        "slice load GB/s",
        "file MB",
    ]
    keys = [
        "store",
        "compression",
        "swmr",
        "jaxsave_write_mb_s",
        "bulk_write_mb_s",
        "write_fraction",
        "load_samples_gb_s",
        "load_quarter_slice_gb_s",
        "file_mb",
    ]
    print(f"{n} samples of 4 MB ({nbytes / 1e6:.0f} MB), median of {args.repeat} (gzip: 1)")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(str(row[k]) for k in keys) + " |")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "jax": jax.__version__,
        "h5py": h5py.__version__,
        "hdf5": h5py.version.hdf5_version,
        "zarr": importlib.metadata.version("zarr") if importlib.util.find_spec("zarr") else None,
        "quick": args.quick,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "samples": n,
        "load_average_1min_at_end": round(os.getloadavg()[0], 2),
    }
    RESULTS.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
