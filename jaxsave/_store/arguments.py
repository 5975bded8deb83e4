"""The collectors' shared argument checks: each refusal a ``ValueError`` or ``TypeError`` naming
the argument, before anything is opened.

>>> check_seconds(flush_interval=0.2, checkpoint_interval=True)
Traceback (most recent call last):
ValueError: checkpoint_interval must be a finite number of seconds >= 0, got True
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from typing import Any

import numpy as np

__all__ = ["check_counts", "check_mode", "check_sample_stats", "check_seconds"]


def check_mode(mode: Any) -> None:
    """``mode`` is ``"w"``, ``"x"`` or ``"a"``."""
    if mode not in ("w", "x", "a"):
        raise ValueError(f"mode must be 'w', 'x' or 'a', got {mode!r}")


def check_sample_stats(sample_stats: Any) -> None:
    """``sample_stats`` is ``None``, names or a predicate (a string would be taken for its
    letters)."""
    if isinstance(sample_stats, str):
        raise TypeError("sample_stats must be a sequence of names or a predicate, not a string")
    if sample_stats is None or callable(sample_stats):
        return
    if isinstance(sample_stats, (bytes, Mapping)) or not isinstance(sample_stats, Collection):
        raise TypeError(f"sample_stats must be a sequence of names or a predicate, got {sample_stats!r}")
    if not all(isinstance(name, str) for name in sample_stats):
        raise TypeError(f"sample_stats must be a sequence of names (strings), got {sample_stats!r}")


def check_seconds(**values: Any) -> None:
    """Each value is a finite number of seconds >= 0: a Python or numpy int or float, not a bool."""
    for name, value in values.items():
        number = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
        try:
            number = number and 0 <= float(value) < math.inf
        except OverflowError:  # an int past a float's range
            number = False
        if not number:
            raise ValueError(f"{name} must be a finite number of seconds >= 0, got {value!r}")


#: The largest count an argument may give: room left in int64 (the stores' shapes) to grow by it.
MAX_COUNT = 2**62


def check_counts(*, optional: bool = True, **values: Any) -> None:
    """Each value is an int from 0 to :data:`MAX_COUNT` (not a bool), or ``None`` where ``optional``.

    >>> check_counts(draws=10**27)
    Traceback (most recent call last):
    ValueError: draws must be an int from 0 to 2**62 or None, got 1000000000000000000000000000
    """
    for name, count in values.items():
        if count is None and optional:
            continue
        if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or not 0 <= count <= MAX_COUNT:
            raise ValueError(
                f"{name} must be an int from 0 to 2**62{' or None' if optional else ''}, got {count!r}"
            )
