"""A directory of numbered checkpoints: atomic saves, retention, restore of the latest.

>>> import tempfile, numpy as np, jaxsave
>>> ckpt = jaxsave.Checkpointer(tempfile.mkdtemp(), keep=2, keep_every=100)
>>> for step in (100, 150, 200, 250, 300):
...     _ = ckpt.save(step, {"w": np.full(2, step)}, metadata={"loss": 1 / step})
>>> ckpt.steps()
[100, 200, 250, 300]
>>> step, tree = ckpt.restore()
>>> step, tree["w"]
(300, array([300, 300]))
"""

from __future__ import annotations

import contextlib
import os
import re
import string
import time
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

from jaxsave._core.atomic import fsync_directory, remove_stale_temporaries
from jaxsave.errors import FileFormatError
from jaxsave.serialization import load_pytree, read_metadata, save_pytree

__all__ = ["Checkpointer"]

T = TypeVar("T")
#: How many times :meth:`Checkpointer.restore` lists the directory when a writer keeps pruning
#: the checkpoint it is about to read.
_LISTINGS = 100
#: ... and how many empty listings in a row mean that there is no checkpoint.
_EMPTY_LISTINGS = 3


#: Steps a template must write and parse back exactly (digit-count changes, large steps).
_ROUND_TRIP_STEPS = (0, 1, 7, 8, 9, 10, 11, 15, 16, 99, 100, 255, 1000, 12345, 99999999, 10**12 + 3)


def _step_pattern(filename: str) -> re.Pattern[str]:
    """A regex matching the names ``filename.format(step=...)`` produces.

    Refuses a template whose names :meth:`Checkpointer.steps` could not read back
    as the steps that wrote them (``{step:x}``, ``{step:,d}``, ``{step:+d}``, padding
    with spaces...): every step of :data:`_ROUND_TRIP_STEPS` must round-trip.
    """
    if os.sep in filename or (os.altsep and os.altsep in filename):
        raise ValueError(f"filename {filename!r} must be a plain file name, without directories")
    parts, fields = [], 0
    try:
        parsed = list(string.Formatter().parse(filename))
    except ValueError as error:
        raise ValueError(f"filename {filename!r} is not a valid format template: {error}") from None
    for literal, field, _spec, conv in parsed:
        parts.append(re.escape(literal))
        if field is None:
            continue
        if field != "step" or conv:
            raise ValueError(f"filename {filename!r} may only use the field {{step}}")
        parts.append(r"(\d+)")
        fields += 1
    if fields != 1:
        raise ValueError(f"filename {filename!r} must contain {{step}} exactly once")
    pattern = re.compile("^" + "".join(parts) + "$")
    for step in _ROUND_TRIP_STEPS:
        try:
            name = filename.format(step=step)
        except (ValueError, TypeError, LookupError, OverflowError) as error:
            raise ValueError(f"filename {filename!r} does not format an integer step: {error}") from None
        m = pattern.match(name)
        if m is None or int(m.group(1)) != step:
            raise ValueError(
                f"filename {filename!r} writes step {step} as {name!r}, which does not read back as "
                f"{step}; use a decimal step format such as {{step}} or {{step:08d}}"
            )
    return pattern


class Checkpointer:
    """Save numbered checkpoints of a pytree into ``directory`` (created if missing, with
    its parents) and restore them.

    * ``keep``: how many of the most recent checkpoints to keep (``None``: all);
    * ``keep_every``: also keep, forever, every checkpoint whose step is a
      multiple of it;
    * ``filename``: a template with one ``{step}`` field; its suffix picks the
      format (``.safetensors``, ``.npz``, ``.h5``; default the jaxsave format);
    * ``fsync``: fsync each checkpoint before it replaces anything (default).

    Each checkpoint is one file written atomically, so a crash leaves either the
    previous set of checkpoints or the new one; temporary files left by a killed
    process are ignored and removed when a Checkpointer opens the directory.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        keep: int | None = 5,
        keep_every: int | None = None,
        *,
        filename: str = "checkpoint_{step:08d}.jaxsave",
        format: str | None = None,
        fsync: bool = True,
    ):
        if keep is not None and keep < 1:
            raise ValueError(f"keep must be at least 1 (or None), got {keep}")
        if keep_every is not None and keep_every < 1:
            raise ValueError(f"keep_every must be at least 1 (or None), got {keep_every}")
        self.directory = os.fspath(directory)
        self.keep, self.keep_every = keep, keep_every
        self.filename, self.format, self.fsync = filename, format, fsync
        self._pattern = _step_pattern(filename)
        os.makedirs(self.directory, exist_ok=True)
        remove_stale_temporaries(self.directory)

    def path(self, step: int) -> str:
        """The file of checkpoint ``step``."""
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"a step must be a non-negative int, got {step!r}")
        return os.path.join(self.directory, self.filename.format(step=step))

    def steps(self) -> list[int]:
        """The steps of the checkpoints in the directory, ascending."""
        found = set()
        for name in os.listdir(self.directory):
            m = self._pattern.match(name)
            # only names this template writes: "ckpt_5" is not step 5 of "ckpt_{step:03d}"
            if m is None or self.filename.format(step=int(m.group(1))) != name:
                continue
            if os.path.isfile(os.path.join(self.directory, name)):
                found.add(int(m.group(1)))
        return sorted(found)

    def latest_step(self) -> int | None:
        """The highest step saved, or ``None`` if there is no checkpoint."""
        steps = self.steps()
        return steps[-1] if steps else None

    def save(self, step: int, tree: Any, metadata: Any = None) -> str:
        """Save ``tree`` as checkpoint ``step`` (replacing one of the same step), then prune.

        Returns the checkpoint's path.
        """
        path = self.path(step)
        save_pytree(path, tree, metadata=metadata, format=self.format, fsync=self.fsync)
        self._prune()
        return path

    def _prune(self) -> None:
        steps = self.steps()
        keep = set(steps if self.keep is None else steps[-self.keep :])
        if self.keep_every is not None:
            keep.update(s for s in steps if s % self.keep_every == 0)
        removed = False
        for s in steps:
            if s not in keep:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path(s))
                    removed = True
        if removed and self.fsync:
            fsync_directory(self.directory)

    def restore(self, step: int | None = None, like: Any = None, *, partial: bool = False) -> tuple[int, Any]:
        """Load checkpoint ``step`` (default: the latest) as ``(step, tree)``.

        ``like`` and ``partial`` are those of :func:`jaxsave.load_pytree`. If the
        latest checkpoint is unreadable and no step was asked for, the one before
        it is tried (with a warning). No checkpoint at all: ``FileNotFoundError``.
        """
        if step is not None:
            return step, load_pytree(self._existing(step), like, partial=partial)
        return self._newest(lambda path: load_pytree(path, like, partial=partial))

    def metadata(self, step: int | None = None) -> Any:
        """The metadata saved with checkpoint ``step`` (default: the latest, as :meth:`restore`)."""
        if step is None:
            return self._newest(read_metadata)[1]
        return read_metadata(self._existing(step))

    def _newest(self, read: Callable[[str], T]) -> tuple[int, T]:
        """``(step, read(path))`` of the newest checkpoint that reads.

        An unreadable one is skipped with a warning (the oldest raises); one that a
        writer pruned after the listing (``keep=``) makes the listing start again.
        """
        empty = 0
        for _ in range(_LISTINGS):
            steps = self.steps()
            if not steps:
                # a listing that races a writer's rename and prune can miss both files
                empty += 1
                if empty == _EMPTY_LISTINGS:
                    raise FileNotFoundError(f"no checkpoints in {self.directory!r}")
                time.sleep(0.001)
                continue
            for i, s in enumerate(reversed(steps)):
                try:
                    return s, read(self.path(s))
                except FileNotFoundError:
                    break  # pruned since the listing: a newer one is there
                except FileFormatError as e:
                    if not os.path.exists(self.path(s)):
                        break  # the same, seen by a format's reader (.h5, .npz, .safetensors)
                    if i == len(steps) - 1:
                        raise
                    warnings.warn(
                        f"checkpoint {s} is unreadable ({e}); trying the previous one",
                        RuntimeWarning,
                        stacklevel=3,
                    )
        raise FileNotFoundError(
            f"the checkpoints in {self.directory!r} were deleted faster than they could be read "
            f"({_LISTINGS} listings, each checkpoint gone when opened)"
        )

    def delete(self, step: int) -> None:
        """Delete checkpoint ``step``."""
        os.unlink(self._existing(step))
        if self.fsync:
            fsync_directory(self.directory)

    def _existing(self, step: int) -> str:
        path = self.path(step)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no checkpoint for step {step} ({path!r})")
        return path

    def __repr__(self) -> str:
        return (
            f"Checkpointer({self.directory!r}, keep={self.keep}, keep_every={self.keep_every}, "
            f"filename={self.filename!r})"
        )
