"""The writer's host cost of a many-leaf block: jaxsave's HDF5 write against its floors, no XLA.

A sample of 100 leaves x 100 floats, in blocks of 104 draws (jaxsave's automatic 4 MB block),
arrives on the host as one packed ``(1, 104, 10000)`` buffer whose leaves are strided views.
Each block's CPU time (``time.thread_time``: this thread only, so the other core's jobs do
not count), in interleaved rounds, best of each:

- ``copy``: each leaf's rows copied contiguous (what every writer below does first);
- ``os.write``: ``copy`` plus one ``os.write`` per leaf to a plain file (the kernel's page cache);
- ``h5py direct``: ``copy`` plus one ``write_direct_chunk`` per leaf, to a file of 100 datasets
  chunked like jaxsave's (SWMR, ``libver="latest"``): HDF5 with no jaxsave code;
- ``jaxsave``: ``HDF5Collector.save_block`` of the block's views, what the writer thread calls.

    python benchmarks/leaf_writes.py [--rounds 6] [--out benchmarks/results/leaf_writes.json]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import tempfile
import time

import h5py
import numpy as np

import jaxsave

LEAVES, FLOATS, ROWS, BLOCKS = 100, 100, 104, 100
RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "leaf_writes.json"


def block_views() -> list[np.ndarray]:
    """One block as the writer gets it: ``(chains, rows, 100)`` views of one packed buffer."""
    packed = np.random.default_rng(0).random((1, ROWS, LEAVES * FLOATS), np.float32)
    return [packed[:, :, j * FLOATS : (j + 1) * FLOATS] for j in range(LEAVES)]


def copy_only(views: list[np.ndarray], tmp: str) -> float:
    start = time.thread_time()
    for _ in range(BLOCKS):
        for v in views:
            np.ascontiguousarray(v[0])
    return time.thread_time() - start


def os_write(views: list[np.ndarray], tmp: str) -> float:
    path = os.path.join(tmp, "raw.bin")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        start = time.thread_time()
        for _ in range(BLOCKS):
            for v in views:
                os.write(fd, np.ascontiguousarray(v[0]))
        return time.thread_time() - start
    finally:
        os.close(fd)
        os.unlink(path)


def h5py_direct(views: list[np.ndarray], tmp: str) -> float:
    path = os.path.join(tmp, "raw.h5")
    with h5py.File(path, "w", libver="latest") as f:
        shape, maxshape = (1, ROWS * BLOCKS, FLOATS), (None, None, FLOATS)
        dsets = [
            f.create_dataset(f"x{j}", shape=shape, maxshape=maxshape, chunks=(1, ROWS, FLOATS), dtype="f4")
            for j in range(LEAVES)
        ]
        f.swmr_mode = True
        start = time.thread_time()
        for b in range(BLOCKS):
            for ds, v in zip(dsets, views):
                ds.id.write_direct_chunk((0, b * ROWS, 0), np.ascontiguousarray(v[0]))
        seconds = time.thread_time() - start
    os.unlink(path)
    return seconds


def jaxsave_block(views: list[np.ndarray], tmp: str) -> float:
    path = os.path.join(tmp, "jaxsave.h5")
    collector = jaxsave.HDF5Collector(path)
    sample = {"x": [np.zeros(FLOATS, np.float32)] * LEAVES}
    collector.register_chain(sample, None, jaxsave.static_information(samples_collected=ROWS * (BLOCKS + 1)))
    collector.save_block([0], views)  # creates the datasets: not timed
    start = time.thread_time()
    for _ in range(BLOCKS):
        collector.save_block([0], views)
    seconds = time.thread_time() - start
    collector.finalize(0)
    collector.close()
    os.unlink(path)
    return seconds


WAYS = {"copy": copy_only, "os.write": os_write, "h5py direct": h5py_direct, "jaxsave": jaxsave_block}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    views = block_views()
    times: dict[str, list[float]] = {k: [] for k in WAYS}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            for name, way in WAYS.items():
                times[name].append(way(views, tmp) / BLOCKS * 1e3)
    print("| way | ms CPU a block (best) | median | us a leaf (best) |\n|---|---:|---:|---:|")
    for name, ms in times.items():
        print(f"| {name} | {min(ms):.2f} | {float(np.median(ms)):.2f} | {min(ms) * 1e3 / LEAVES:.1f} |")
    meta = {"rounds": args.rounds, "python": platform.python_version(), "h5py": h5py.__version__}
    result = {"meta": meta, "ms_cpu_per_block": times}
    pathlib.Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
