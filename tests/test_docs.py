"""Every code block in README.md and docs/ runs as written, or says why it cannot run here.

A page's ``python`` blocks run in order in one namespace, and its ``bash`` blocks in a
shell, in a fresh directory, as a reader would paste them into one session. A block that cannot run here (a shell
command, a multi-host snippet, the jax_sgmc "before" half of a migration example,
printed output) is preceded by an HTML comment ``<!-- not-run: <reason> -->``, which
the rendered page does not show.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
FENCE = re.compile(
    r"(?P<marker><!--\s*not-run:(?P<why>.*?)-->\s*\n)?"
    r"^(?P<indent>[ \t]*)```(?P<lang>[\w+-]*)[^\n]*\n(?P<body>.*?)^(?P=indent)```",
    re.S | re.M,
)


def blocks(page: Path) -> list[tuple[str, str, str | None, int]]:
    """``(language, code, not-run reason or None, line)`` for each fenced block of a page."""
    text = page.read_text()
    found = []
    for m in FENCE.finditer(text):
        why = m["why"].strip() if m["marker"] else None
        found.append((m["lang"], textwrap.dedent(m["body"]), why, text.count("\n", 0, m.start("lang")) + 1))
    return found


def test_every_block_runs_or_says_why():
    unmarked = [
        f"{page.relative_to(ROOT)}:{line} ({lang or 'no language'})"
        for page in PAGES
        for lang, _, why, line in blocks(page)
        if lang not in RUNS and why is None
    ]
    assert not unmarked, f"blocks that neither run nor carry <!-- not-run: reason -->: {unmarked}"
    empty = [
        f"{page.relative_to(ROOT)}:{line}" for page in PAGES for _, _, why, line in blocks(page) if why == ""
    ]
    assert not empty, f"not-run markers without a reason: {empty}"


#: The README's first block holds its two one-line commands: .ci/run runs both as written.
EXEMPT = {(ROOT / "README.md", 1)}
RUNS = ("python", "bash")


def runnable(page: Path) -> list[tuple[str, str, int]]:
    return [
        (lang, code, line)
        for lang, code, why, line in blocks(page)
        if lang in RUNS and why is None and (page, line) not in EXEMPT
    ]


RUNNABLE = [page for page in PAGES if runnable(page)]


#: Pages whose code takes 10-14 s and whose integration has its own tests in the default suite
#: (tests/test_integrations_*.py): run in the slow suite, so the default one stays under 10 minutes.
SLOW_PAGES = {ROOT / f"docs/integrations/{name}.md" for name in ("blackjax", "numpyro", "models")}


@pytest.mark.parametrize(
    "page",
    [pytest.param(p, marks=pytest.mark.slow) if p in SLOW_PAGES else p for p in RUNNABLE],
    ids=[str(p.relative_to(ROOT)) for p in RUNNABLE],
)
def test_page_code_runs(page, tmp_path):
    """The page's blocks, in order: ``python`` ones in one namespace, ``bash`` ones in a shell."""
    driver = tmp_path / "page.py"
    driver.write_text(_DRIVER.format(blocks=repr(runnable(page)), page=str(page.relative_to(ROOT))))
    env = {
        **os.environ,
        "MPLBACKEND": "Agg",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    }
    run = subprocess.run(
        [sys.executable, str(driver)], cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env
    )
    assert run.returncode == 0, (
        f"{page.relative_to(ROOT)} failed:\n{run.stdout[-3000:]}\n{run.stderr[-6000:]}"
    )


_DRIVER = """
import subprocess, sys
namespace = {{"__name__": "__main__"}}
for lang, code, line in {blocks}:
    where = "{page}:" + str(line)
    print("--- running", where, flush=True)
    if lang == "python":
        exec(compile(code, where, "exec"), namespace)
    else:
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", code])
        if done.returncode:
            sys.exit(f"{{where}}: the shell block exited {{done.returncode}}")
"""
