"""What the confined local store costs a Zarr read: zarr's ``LocalStore`` against jaxsave's
``confined_store`` (no symlinks, FIFOs or devices), the same arrays read in interleaved rounds.

    python benchmarks/zarr_confined.py --rounds 7

Two stores on ``/dev/shm`` (else the temporary directory): "many keys" (256 small arrays, one
chunk each: the per-key cost) and "big chunks" (one 32 MiB array of 1 MiB chunks). Each round
reads every array of each store once through each store class; the best round of each is kept,
as CPU time (``getrusage(RUSAGE_SELF)``, zarr's reader threads included) and wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr

from jaxsave._store.zarr.store import confined_store

HERE = Path(__file__).resolve().parent


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def make(root: Path) -> dict[str, Path]:
    many, big = root / "many.zarr", root / "big.zarr"
    group = zarr.open_group(str(many), mode="w", zarr_format=3)
    for k in range(256):
        group.create_array(f"v{k}", shape=(4, 512), chunks=(4, 512), dtype="f4", compressors=None)[:] = k
    group = zarr.open_group(str(big), mode="w", zarr_format=3)
    array = group.create_array("x", shape=(4, 32768, 64), chunks=(1, 4096, 64), dtype="f4", compressors=None)
    array[:] = np.random.default_rng(0).random((4, 32768, 64), dtype=np.float32)
    return {"many keys (256 arrays x 1 chunk)": many, "big chunks (32 x 1 MiB)": big}


def read_all(store: object) -> float:
    group = zarr.open_group(store=store, mode="r", zarr_format=3, use_consolidated=False)
    return float(sum(float(np.asarray(a[...]).sum()) for _, a in group.arrays()))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", default=str(HERE / "results" / "zarr_confined.json"))
    args = parser.parse_args(argv)
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    root = Path(tempfile.mkdtemp(dir=base))
    try:
        stores = make(root)
        kinds = {
            "LocalStore": lambda p: zarr.storage.LocalStore(str(p), read_only=True),
            "confined": lambda p: confined_store(str(p), read_only=True),
        }
        best: dict = {}
        for _ in range(args.rounds):
            for case, path in stores.items():
                for kind, make_store in kinds.items():
                    c0, w0 = cpu(), time.perf_counter()
                    read_all(make_store(path))
                    c, w = cpu() - c0, time.perf_counter() - w0
                    old = best.get((case, kind), (float("inf"), float("inf")))
                    best[case, kind] = (min(old[0], c), min(old[1], w))
        rows = []
        for case in stores:
            plain, confined = best[case, "LocalStore"], best[case, "confined"]
            rows.append(
                {
                    "case": case,
                    "cpu_ms": {"LocalStore": plain[0] * 1e3, "confined": confined[0] * 1e3},
                    "wall_ms": {"LocalStore": plain[1] * 1e3, "confined": confined[1] * 1e3},
                    "cpu_ratio": confined[0] / plain[0],
                    "wall_ratio": confined[1] / plain[1],
                }
            )
            print(
                f"{case:36s} CPU ms {plain[0] * 1e3:8.1f} -> {confined[0] * 1e3:8.1f} "
                f"({confined[0] / plain[0]:.2f}x); wall ms {plain[1] * 1e3:8.1f} -> "
                f"{confined[1] * 1e3:8.1f} ({confined[1] / plain[1]:.2f}x)"
            )
        result = {"rounds": args.rounds, "zarr": zarr.__version__, "rows": rows}
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
