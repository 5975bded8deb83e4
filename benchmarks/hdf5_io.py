"""HDF5 write and read throughput of jaxsave, against plain h5py in the same run.

Write: ``n`` samples of 4 MB (float32) streamed from a jit-compiled ``lax.scan``
through ``jaxsave.save(HDF5Collector(path))``, wall time from the start of the
run to the end of ``postprocess`` (the file is flushed and closed), compared with
one bulk ``h5py`` write of the same bytes (same chunking filter, flushed and
closed). Read: ``jaxsave.load_samples(path)`` of the whole file, and of a slice
of draws, from the page cache.

Run: ``python benchmarks/hdf5_io.py [--samples 64] [--repeat 3]``; prints a table
and writes ``benchmarks/results/hdf5_io.json``. Not a test.
"""

from __future__ import annotations

import argparse
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
    init, save, post = jaxsave.save(jaxsave.HDF5Collector(path, compression=compression, swmr=swmr))
    state = init({"w": jnp.zeros(SAMPLE_FLOATS)})

    def step(s, i):
        return save(s, True, {"w": pool[i % pool.shape[0]] + i.astype(jnp.float32)})

    run = jax.jit(lambda s: jax.lax.scan(step, s, jnp.arange(n))[0]).lower(state).compile()
    start = time.perf_counter()
    post(run(state), None)
    return time.perf_counter() - start


def expected(pool: jax.Array, n: int) -> np.ndarray:
    p = np.asarray(pool)
    return np.stack([p[i % len(p)] + np.float32(i) for i in range(n)])


def h5py_write(path: str, data: np.ndarray, compression: str | None) -> float:
    os.sync()
    start = time.perf_counter()
    with h5py.File(path, "w") as f:
        chunks = (1,) + data.shape[1:] if compression else None
        f.create_dataset("w", data=data, chunks=chunks, compression=compression, shuffle=compression is not None)
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
    args = parser.parse_args()
    n = args.samples
    pool = make_pool()
    data = expected(pool, n)
    nbytes = data.nbytes
    rows = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for compression, swmr in ((None, True), (None, False), ("lzf", True), ("gzip", True)):
            path = os.path.join(tmp, "jaxsave.h5")
            reps = args.repeat if compression != "gzip" else 1
            t_save = timed(lambda: jaxsave_write(path, pool, n, compression, swmr), reps)
            t_h5 = timed(lambda: h5py_write(os.path.join(tmp, "h5py.h5"), data, compression), reps)
            os.sync()  # let writeback finish: reads are timed from the page cache, not against the disk
            got = jaxsave.load_samples(path, chain=0)["w"]
            assert np.array_equal(got, data), "jaxsave wrote different bytes"
            t_read = timed(lambda: jaxsave.load_samples(path, chain=0), args.repeat)
            t_slice = timed(lambda: jaxsave.load_samples(path, chain=0, draws=slice(n // 4, n // 2)), args.repeat)
            rows.append({
                "compression": compression or "none", "swmr": swmr, "samples": n, "sample_mb": 4,
                "file_mb": round(os.path.getsize(path) / 1e6, 1),
                "jaxsave_write_mb_s": round(nbytes / t_save / 1e6, 1),
                "h5py_bulk_write_mb_s": round(nbytes / t_h5 / 1e6, 1),
                "write_fraction": round(t_h5 / t_save, 3),
                "load_samples_gb_s": round(nbytes / t_read / 1e9, 2),
                "load_quarter_slice_gb_s": round(nbytes / 4 / t_slice / 1e9, 2),
            })
    header = ["compression", "swmr", "jaxsave write MB/s", "h5py bulk MB/s", "fraction", "load GB/s",
              "slice load GB/s", "file MB"]
    keys = ["compression", "swmr", "jaxsave_write_mb_s", "h5py_bulk_write_mb_s", "write_fraction",
            "load_samples_gb_s", "load_quarter_slice_gb_s", "file_mb"]
    print(f"{n} samples of 4 MB ({nbytes / 1e6:.0f} MB), median of {args.repeat} (gzip: 1)")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(str(row[k]) for k in keys) + " |")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    meta = {"jax": jax.__version__, "h5py": h5py.__version__, "hdf5": h5py.version.hdf5_version,
            "machine": platform.machine(), "cpus": os.cpu_count(), "samples": n}
    RESULTS.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
