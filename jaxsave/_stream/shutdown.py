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
from typing import TYPE_CHECKING, Protocol

import jax

if TYPE_CHECKING:
    from jaxsave._stream.writer import Writer
    from jaxsave.collectors import Collector

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


def report_stop(writer: Writer, collector: Collector, stopped: bool) -> None:
    """Log, once a writer was stopped at exit, the blocks it dropped and whether it is stuck
    inside the collector (``not stopped``: the collector is left open)."""
    if writer.dropped:
        logger.warning(
            "jaxsave: interpreter exit: %d block(s) of samples were not written "
            "(dropped after %.0f s of writing)",
            writer.dropped,
            EXIT_TIMEOUT_S,
        )
    if not stopped:
        logger.error(
            "jaxsave: interpreter exit: the writer thread is still inside %s; the collector is left open",
            type(collector).__name__,
        )


def report_unfinished(
    writer: Writer, collector: Collector, unfinished: list[int], traced: bool, block_size: int | None
) -> None:
    """Warn, once a saver stopped at exit, of its ``unfinished`` chains and what became of
    their samples (silent for a saver whose ``save`` was never ``traced``)."""
    if writer.error is not None and unfinished:
        logger.warning(
            "jaxsave: the interpreter exits before postprocess finished chain(s) %s, after saving "
            "failed (%r): the blocks that reached the host after that error were not written; "
            "those before it %s",
            unfinished,
            writer.error,
            collector.exit_note(),
        )
    elif any(writer.written.get(c, 0) for c in unfinished):
        logger.warning(
            "jaxsave: the interpreter exits before postprocess finished chain(s) %s; "
            "their samples that reached the host %s",
            unfinished,
            collector.exit_note(),
        )
    elif unfinished and traced:
        logger.warning(
            "jaxsave: the interpreter exits before postprocess finished chain(s) %s; none of "
            "their samples reached the host: those kept on the device (up to block_size=%d "
            "per chain) are sent only by postprocess(state), and are lost",
            unfinished,
            block_size,
        )
