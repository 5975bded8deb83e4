"""One benchmark, two versions of jaxsave, in alternating processes: is the new one slower?

Checks out ``--old`` (a commit) into a temporary git worktree and runs the benchmark script
(from this checkout, so both versions run the same script) with ``PYTHONPATH`` pointing at the
old tree, then at this one, for ``--rounds`` rounds: old, new, old, new, ... Each run writes
its JSON; the table gives, per case and variant, the best microseconds per step of each
version over the rounds and their ratio (new / old; above 1 is slower).

    python benchmarks/commits.py --old 2c22155                       # benchmarks/stream.py
    python benchmarks/commits.py --old 2c22155 --rounds 2 -- --quick --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def run(tree: Path, script: Path, out: Path, extra: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    cmd = [sys.executable, str(script), *extra, "--out", str(out)]
    subprocess.run(cmd, env=env, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def best(runs: list[dict]) -> dict:
    """``{(case, variant): best us/step}`` over the runs."""
    table: dict = {}
    for result in runs:
        for row in result["rows"]:
            for kind, us in row["us_per_step"].items():
                key = (row["case"], kind)
                table[key] = min(table.get(key, float("inf")), us)
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--old", required=True, help="the commit to compare against")
    parser.add_argument("--script", default=str(HERE / "stream.py"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=str(HERE / "results" / "commits.json"))
    parser.add_argument("extra", nargs="*", help="arguments for the benchmark script (after --)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        old_tree = Path(tmp) / "old"
        subprocess.run(
            ["git", "worktree", "add", "--detach", "-q", str(old_tree), args.old], cwd=ROOT, check=True
        )
        try:
            runs: dict[str, list[dict]] = {"old": [], "new": []}
            for r in range(args.rounds):
                for name, tree in (("old", old_tree), ("new", ROOT)):
                    runs[name].append(
                        run(tree, Path(args.script), Path(tmp) / f"{name}-{r}.json", args.extra)
                    )
                    print(f"round {r + 1}: {name} done", file=sys.stderr)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(old_tree)], cwd=ROOT, check=False)
    old, new = best(runs["old"]), best(runs["new"])
    rows = [
        {"case": case, "variant": kind, "old_us": old[case, kind], "new_us": new[case, kind]}
        for case, kind in old
        if (case, kind) in new
    ]
    print(f"| case | variant | old ({args.old}) us/step | new us/step | new/old |")
    print("|---|---|---|---|---|")
    for row in rows:
        row["new/old"] = row["new_us"] / row["old_us"]
        cells = [row["case"], row["variant"], f"{row['old_us']:.2f}", f"{row['new_us']:.2f}"]
        print("| " + " | ".join([*cells, f"{row['new/old']:.2f}"]) + " |")
    Path(args.out).write_text(json.dumps({"old": args.old, "rounds": args.rounds, "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
