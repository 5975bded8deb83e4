"""The interpreter-exit hook: stop every live writer before daemon threads freeze.

Each streamer that starts a writer thread is :func:`watch`-ed; at exit the hook
waits for the running computations, then calls each live streamer's
``stop_at_exit(deadline)``, which writes what is queued and closes its collector.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
import weakref
from typing import Protocol

import jax

logger = logging.getLogger("jaxsave")

#: At interpreter exit, how long the writers may take to write what is queued.
EXIT_TIMEOUT_S = 60.0


class Stoppable(Protocol):
    """A streamer, as the exit hook sees it."""

    @property
    def writing(self) -> bool:
        """Whether its writer thread is running."""
        ...

    def stop_at_exit(self, deadline: float) -> None:
        """Write what is queued (until ``deadline``, a ``time.monotonic()``), stop, close."""
        ...


#: Every streamer that started a writer thread; the exit hook stops the live ones.
_STREAMERS: weakref.WeakSet[Stoppable] = weakref.WeakSet()
_HOOKED = threading.Lock()
_EARLY: list[bool] = []  # the hook is also registered with threading's exit hooks (once)


def _register_early() -> None:
    """Also run the hook from ``threading``'s exit hooks, which run before ``atexit``'s and
    before ``concurrent.futures`` shuts its executors down: collectors whose stores write
    through a thread pool (zarr's) can still write then. The ``atexit`` hook stays, for
    interpreters without that (private) registry; a second call finds no live writer."""
    register = getattr(threading, "_register_atexit", None)
    if _EARLY or register is None:
        return
    try:
        register(_at_exit)
        _EARLY.append(True)
    except RuntimeError:  # the interpreter is shutting down already
        pass


def watch(streamer: Stoppable) -> None:
    """Have the exit hook stop ``streamer``'s writer if the interpreter exits first."""
    with _HOOKED:
        if not _STREAMERS:  # registered late, so it runs before JAX's own exit hooks
            atexit.unregister(_at_exit)
            atexit.register(_at_exit)
        _register_early()
        _STREAMERS.add(streamer)


def _at_exit() -> None:
    """Before daemon threads freeze: finish the running computations, stop every live writer.

    A writer frozen inside the collector would hold h5py's lock (the interpreter hangs
    at exit), and an XLA thread entering a callback during shutdown aborts the process.
    A second Ctrl-C skips the wait for the computations.
    """
    live = [s for s in list(_STREAMERS) if s.writing]
    if not live:
        return
    try:
        jax.effects_barrier()  # the blocks of computations still running reach the writers
    except BaseException as error:  # noqa: BLE001 - exiting anyway; the writers must still stop
        logger.error("jaxsave: interpreter exit: waiting for the computations failed: %r", error)
    deadline = time.monotonic() + EXIT_TIMEOUT_S
    for streamer in live:
        try:
            streamer.stop_at_exit(deadline)
        except BaseException as error:  # noqa: BLE001 - the other savers must still stop
            logger.error("jaxsave: interpreter exit: stopping a saver failed: %r", error)
