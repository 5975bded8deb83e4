import json
import os
import pathlib
import threading

import jax.numpy as jnp
import pytest

# Child scripts that the tests run in their own processes (they set XLA_FLAGS before importing jax).
collect_ignore_glob = ["_*.py"]


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on a free loopback port, in its own process, for the whole session
    (tests/_s3.py); skips where moto[server] or s3fs is not installed."""
    pytest.importorskip("moto.server", reason="the S3 tests need moto[server]")
    pytest.importorskip("s3fs", reason="the S3 tests need s3fs")
    from _s3 import S3Server

    with S3Server() as server:
        yield server


@pytest.fixture
def s3_bucket(s3_server):
    """A new, empty bucket on the loopback S3 server: ``.url``, ``.storage_options``, ``.fs()``."""
    return s3_server.bucket()


@pytest.fixture
def one_call_per_block(monkeypatch):
    """The writer hands each block to the collector as it came (no runs of small blocks joined
    into one call): for tests that watch, through the collector, the blocks the device sends."""
    from jaxsave._stream import writer

    monkeypatch.setattr(writer, "COALESCE_BYTES", 0)


@pytest.fixture
def sample():
    return {"x": jnp.zeros(3), "stats": (jnp.int32(0), jnp.float32(0))}


@pytest.fixture(autouse=True)
def no_leaked_writer_threads():
    """Every test must leave no jaxsave writer thread behind (one that an earlier test leaked is
    that test's error, reported once, not every later test's)."""
    before = set(threading.enumerate())
    yield
    alive = [t for t in threading.enumerate() if t.name.startswith("jaxsave-writer") and t not in before]
    for t in alive:
        t.join(timeout=5)
    alive = [t for t in alive if t.is_alive()]
    assert not alive, f"writer threads left running: {alive}"


# -- figures of the reliability suite (tests/reliability, marker "reliability") ------------------
# Tests record what they measured with the ``figures`` fixture; the figures are printed at the end
# of the run and, when JAXSAVE_RELIABILITY_JSON names a file, written there as JSON
# (benchmarks/reliability_figures.py does that). Kept here, not in tests/reliability/conftest.py:
# a second conftest module would shadow this one for ``from conftest import ...``.

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
