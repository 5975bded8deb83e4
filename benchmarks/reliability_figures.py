"""The figures of docs/reliability.md: run the reliability suite and tabulate what it measured.

The tests in ``tests/reliability/`` record their figures (kills survived/tried,
faults surfaced/injected with the seconds they took, hostile inputs
handled/tried, memory); this script runs them with ``pytest -m reliability``,
collects the figures as JSON and prints one table per family. ``--long`` adds
a long run (64 chains x 1.6M steps to HDF5) that shows host memory reaching a
plateau, with the writer drained after each chunk.

    python benchmarks/reliability_figures.py          # about 5 minutes on 2 cores
    python benchmarks/reliability_figures.py --long   # plus about a minute
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "reliability.json"


def run_suite() -> dict:
    with tempfile.TemporaryDirectory() as d:
        figures = Path(d) / "figures.json"
        env = {**os.environ, "JAXSAVE_RELIABILITY_JSON": str(figures), "PYTHONPATH": str(ROOT)}
        start = time.monotonic()
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "-m",
                "reliability",
                "-p",
                "no:randomly",
                "-q",
                str(ROOT / "tests" / "reliability"),
            ],
            cwd=ROOT,
            env=env,
        )
        seconds = time.monotonic() - start
        if not figures.exists():
            sys.exit(f"the suite recorded no figures (pytest exit code {proc.returncode})")
        out = json.loads(figures.read_text())
    out["suite"] = {"pytest": {"exit_code": proc.returncode, "seconds": round(seconds, 1)}}
    return out


def long_run(chains: int = 64, steps: int = 1_600_000, chunks: int = 40) -> dict:
    """Host RSS after each chunk of a long run (writer drained): it must level off."""
    import jax
    import jax.numpy as jnp
    import psutil

    import jaxsave

    path = Path(tempfile.mkdtemp()) / "long.h5"
    saver = jaxsave.save(jaxsave.HDF5Collector(path))
    state = saver.init({"x": jnp.zeros((chains, 4)), "i": jnp.zeros(chains, jnp.int32)}, None, chains=chains)
    per = steps // chunks

    def chain(state, x, start):
        def step(carry, i):
            state, x = carry
            x = 0.99 * x + 0.01 * jnp.sin(i + x)
            return (saver.save(state, True, {"x": x, "i": i})[0], x), None

        return jax.lax.scan(step, (state, x), start + jnp.arange(per))[0]

    run = jax.jit(jax.vmap(chain, in_axes=(0, 0, None)))
    x, proc, rss = jnp.zeros((chains, 4)), psutil.Process(), []
    base = proc.memory_info().rss
    for k in range(chunks):
        state, x = run(state, x, k * per)
        jax.block_until_ready(state)
        saver.init.__self__.writer.drain()
        rss.append(round((proc.memory_info().rss - base) / 2**20, 1))
    saver.postprocess(state, None)
    path.unlink()
    half = chunks // 2
    return {
        "samples": chains * steps,
        "rss_over_start_mb_per_chunk": rss,
        "growth_second_half_mb": round(max(rss[half:]) - max(rss[:half]), 1),
        "peak_mb": max(rss),
    }


def table(figures: dict) -> str:
    lines = []
    for family, cases in sorted(figures.items()):
        if family == "suite":
            continue
        lines += [f"\n{family}", "-" * len(family)]
        for case, numbers in sorted(cases.items()):
            shown = ", ".join(f"{k}={v}" for k, v in numbers.items() if k != "rss_over_start_mb_per_chunk")
            lines.append(f"  {case:55s} {shown}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--long", action="store_true", help="add the 64 x 1.6M-step memory plateau run")
    args = parser.parse_args()
    figures = run_suite()
    if args.long:
        figures.setdefault("load", {})["long run: 64 chains x 1.6M steps (writer drained)"] = long_run()
    figures["machine"] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(figures, indent=2, sort_keys=True))
    print(table({k: v for k, v in figures.items() if k != "machine"}))
    print(f"\nwritten to {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
