"""The reliability suite: process kills, injected faults, hostile files, load and hygiene.

Every test here is marked ``reliability`` (run with ``pytest -m reliability``).
Tests record the figures they measure with the ``figures`` fixture; they are
printed at the end of the run and, when ``JAXSAVE_RELIABILITY_JSON`` names a
file, written there as JSON (``benchmarks/reliability_figures.py`` does that).
"""

from __future__ import annotations

import json
import os
import pathlib

import pytest

FIGURES: dict[str, dict[str, dict]] = {}


@pytest.fixture
def figures():
    """``figures(family, case, **numbers)`` records a measured figure for the reliability page."""

    def record(family: str, case: str, **numbers) -> None:
        FIGURES.setdefault(family, {})[case] = numbers

    return record


def pytest_terminal_summary(terminalreporter):
    if not FIGURES:
        return
    terminalreporter.section("jaxsave reliability figures")
    for family, cases in sorted(FIGURES.items()):
        for case, numbers in sorted(cases.items()):
            shown = ", ".join(f"{k}={v}" for k, v in numbers.items())
            terminalreporter.write_line(f"{family:12s} {case:40s} {shown}")
    out = os.environ.get("JAXSAVE_RELIABILITY_JSON")
    if out:
        pathlib.Path(out).write_text(json.dumps(FIGURES, indent=2, sort_keys=True))

