"""Process CPU per step (all threads: ``getrusage(RUSAGE_SELF)``) of ``stream.py``'s cases, and wall.

On a machine shared with other jobs wall time says little; the CPU a process spends on its
run (the compiled loop, the writer thread, zarr's and h5py's threads) says what saving costs.
Each ``--trees`` entry (a directory holding a ``jaxsave`` package) runs in its own process,
alternating, ``--rounds`` times; inside, every variant runs once per repeat, round-robin; each
figure is the best (lowest) over all of them. ``overhead`` is ``(variant - baseline)`` and the
ratio is Zarr's overhead over HDF5's (issue 18's target: at most 1.1).

    python benchmarks/stream_cpu.py --trees /tmp/old,. --cases 64,4mb,mlp
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

HERE = Path(__file__).resolve().parent
CASES = {
    "64": ("64 chains x 10 floats", dict(steps=10_000, dim=10, chains=64, thin=1)),
    "4mb": ("1 chain x 1M floats (4 MB)", dict(steps=200, dim=2**20, chains=1, thin=1)),
    "mlp": ("SGLD Haiku MLP, 4 chains", dict(steps=10_000, chains=4, thin=10)),
}
KINDS = ("baseline", "no_save", "hdf5", "zarr")


def measure(case: str, repeats: int) -> dict:
    """``{kind: [wall us/step, cpu us/step]}``, best of ``repeats`` round-robin rounds (this process)."""
    sys.path.insert(0, str(HERE))
    import stream

    marks: list[float] = []

    def clock() -> float:  # stream.py times its region with two perf_counter calls: note the CPU at each
        usage = resource.getrusage(resource.RUSAGE_SELF)
        marks.append(usage.ru_utime + usage.ru_stime)
        return time.perf_counter()

    stream.time = types.SimpleNamespace(perf_counter=clock, monotonic_ns=time.monotonic_ns)
    tmp = tempfile.mkdtemp(dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    _, c = CASES[case]
    best: dict = {}
    for _ in range(repeats):
        for kind in KINDS:
            marks.clear()
            if case == "mlp":
                wall = stream.mlp_case(kind, c["steps"], c["chains"], c["thin"], tmp)
            else:
                wall = stream.run_stream_case(kind, c["steps"], c["dim"], c["chains"], c["thin"], tmp)
            cpu = (marks[-1] - marks[0]) / c["steps"]
            old = best.get(kind, [float("inf")] * 2)
            best[kind] = [min(old[0], wall * 1e6), min(old[1], cpu * 1e6)]
    os.rmdir(tmp)
    return best


def ratio(row: dict, i: int) -> float | None:
    base = row["baseline"][i]
    hdf5, zarr = row["hdf5"][i] - base, row["zarr"][i] - base
    return zarr / hdf5 if hdf5 > 0 else None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--trees", default=".", help="comma-separated directories to import jaxsave from")
    parser.add_argument("--cases", default="64,4mb,mlp")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=str(HERE / "results" / "stream_cpu.json"))
    parser.add_argument("--one", help=argparse.SUPPRESS)  # child: measure one case, print JSON
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.one, args.repeats)))
        return
    trees = [str(Path(t).resolve()) for t in args.trees.split(",")]
    table: dict = {}
    for case in args.cases.split(","):
        for _ in range(args.rounds):
            for tree in trees:
                env = {**os.environ, "PYTHONPATH": tree}
                cmd = [sys.executable, __file__, "--one", case, "--repeats", str(args.repeats)]
                out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
                got = json.loads(out.strip().splitlines()[-1])
                row = table.setdefault(tree, {}).setdefault(case, {})
                for kind, (wall, cpu) in got.items():
                    old = row.get(kind, [float("inf")] * 2)
                    row[kind] = [min(old[0], wall), min(old[1], cpu)]
    print(
        "| tree | case | "
        + " | ".join(f"{k} wall / cpu" for k in KINDS)
        + " | zarr/hdf5 overhead wall / cpu |"
    )
    print("|---" * (len(KINDS) + 3) + "|")
    for tree, rows in table.items():
        for case, row in rows.items():
            cells = [f"{row[k][0]:.1f} / {row[k][1]:.1f}" for k in KINDS]
            ratios = [ratio(row, i) for i in (0, 1)]
            r = " / ".join("-" if x is None else f"{x:.2f}" for x in ratios)
            print(f"| {tree} | {CASES[case][0]} | " + " | ".join(cells) + f" | {r} |")
    result = {
        "meta": {
            "python": sys.version.split()[0],
            "cpus": os.cpu_count(),
            "rounds": args.rounds,
            "repeats": args.repeats,
            "units": "us/step, [wall, process CPU]",
        },
        "trees": {
            tree: {
                CASES[case][0]: {
                    "us_per_step": row,
                    "zarr_overhead_over_hdf5": {"wall": ratio(row, 0), "cpu": ratio(row, 1)},
                }
                for case, row in rows.items()
            }
            for tree, rows in table.items()
        },
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
