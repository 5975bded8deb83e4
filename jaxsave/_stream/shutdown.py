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
from typing import Any

import jax

logger = logging.getLogger("jaxsave")

#: At interpreter exit, how long the writers may take to write what is queued.
EXIT_TIMEOUT_S = 60.0


#: Every streamer that started a writer thread; the exit hook stops the live ones.
_STREAMERS: weakref.WeakSet = weakref.WeakSet()
_HOOKED = threading.Lock()


def watch(streamer: Any) -> None:
    """Have the exit hook stop ``streamer``'s writer if the interpreter exits first."""
    with _HOOKED:
        if not _STREAMERS:  # registered late, so it runs before JAX's own exit hooks
            atexit.unregister(_at_exit)
            atexit.register(_at_exit)
        _STREAMERS.add(streamer)


def _at_exit() -> None:
    """Before daemon threads freeze: finish the running computations, stop every live writer.

    A writer frozen inside the collector would hold h5py's lock (the interpreter hangs
    at exit), and an XLA thread entering a callback during shutdown aborts the process.
    A second Ctrl-C skips the wait for the computations.
    """
    live = [s for s in list(_STREAMERS) if s.writer is not None and s.writer.alive]
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
