"""Helpers shared by test modules (tests/ is on sys.path through tests/conftest.py)."""

from __future__ import annotations

import os
import socket
import threading
import time

import jax
import jax.numpy as jnp
import psutil


class PeakRSS:
    """Samples this process's resident memory every few milliseconds (``with PeakRSS() as rss``).

    ``extra`` is an optional function sampled at the same moments (e.g. the bytes held
    by live device arrays); its peak is ``extra_peak``, its samples ``extra_samples``.
    """

    def __init__(self, interval: float = 0.005, extra=None):
        self.proc = psutil.Process()
        self.base = self.proc.memory_info().rss
        self.peak = self.base
        self.samples: list[tuple[float, int]] = []
        self.extra, self.extra_peak, self.extra_samples = extra, 0, []
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            rss = self.proc.memory_info().rss
            self.peak = max(self.peak, rss)
            self.samples.append((time.monotonic(), rss))
            if self.extra is not None:
                value = self.extra()
                self.extra_peak = max(self.extra_peak, value)
                self.extra_samples.append(value)
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def open_fds() -> dict[int, str]:
    """This process's open file descriptors and what they point to (Linux: /proc/self/fd)."""
    out = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            out[int(fd)] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            pass  # closed meanwhile (the listing's own descriptor)
    return out


def files_under(fds: dict[int, str], directory) -> list[str]:
    """The targets in ``fds`` that are files inside ``directory``."""
    directory = os.path.realpath(os.fspath(directory))
    return sorted(t for t in fds.values() if t.startswith(directory + os.sep))


def group_names(data) -> set[str]:
    """The group names of ArviZ data: an ``xarray.DataTree`` (ArviZ 1.x) or ``InferenceData`` (0.x)."""
    return set(data.children) if hasattr(data, "children") else set(data.groups())


def random_walk(saver, state, key, steps, burn_in=0, thin=1, phase=0, dim=3):
    """A small SGLD-like chain under jit + scan; keeps ``i >= burn_in and (i - phase) % thin == 0``.

    Works for one chain or, under vmap, for many (``key``/``phase`` batched).
    Returns the final saving state and every sample it produced, kept or not.
    """

    def step(carry, i):
        state, x, key = carry
        key, sub = jax.random.split(key)
        x = 0.9 * x + 0.1 * jax.random.normal(sub, (dim,))
        keep = (i >= burn_in) & ((i - phase) % thin == 0)
        state, _ = saver.save(state, keep, {"x": x, "stats": (i, jnp.sum(x**2))})
        return (state, x, key), (x, keep)

    (state, _, _), (xs, keeps) = jax.lax.scan(step, (state, jnp.zeros(dim), key), jnp.arange(steps))
    return state, xs, keeps


def child_env(**extra: str) -> dict:
    """This checkout's jaxsave on the CPU, for a child process; the child sets its own XLA_FLAGS."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
        JAX_PLATFORMS="cpu",
        **extra,
    )
    env.pop("XLA_FLAGS", None)
    return env


def free_port() -> int:
    """A free TCP port on loopback (for a jax.distributed coordinator)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scan_carries(eqn) -> int:
    """How many of a ``scan`` equation's outputs are its carry (the rest are stacked outputs)."""
    if "num_carry" in eqn.params:
        return eqn.params["num_carry"]
    return len(eqn.params["ft_out"].elts[0])  # jax >= 0.12: (carry, stacked outputs) as flat trees
