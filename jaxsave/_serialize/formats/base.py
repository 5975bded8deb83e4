"""What every storage format module provides (checked by the type checker), and its limits."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, BinaryIO, Protocol

import numpy as np

#: Largest JSON header any reader accepts (the same bound as safetensors).
MAX_HEADER_BYTES = 100 * 2**20

#: ``(per-array shape, dtype name)`` of each stored array, in storage order.
Specs = Sequence[tuple[tuple[int, ...], str]]


class Reader(Protocol):
    """An open file of one format. ``header`` is ``None`` for a foreign file."""

    header: dict[str, Any] | None

    def check_arrays(self, specs: Specs, names: Sequence[str] = ()) -> None:
        """Check that the file holds arrays of these shapes and dtypes (raises otherwise)."""

    def read(self, indices: Sequence[int], specs: Specs, names: Sequence[str] = ()) -> list[np.ndarray]:
        """The storable arrays ``indices``, shaped and typed as ``specs`` say."""

    def close(self) -> None:
        """Release the file."""


class ForeignReader(Reader, Protocol):
    """A reader of a format other programs write too (safetensors, npz)."""

    def foreign_specs(self) -> list[tuple[str, tuple[int, ...], str]]:
        """``(name, shape, dtype)`` of each array of a file without a jaxsave header."""


class Format(Protocol):
    """A format module: ``write`` and ``Reader``."""

    def write(self, target: str | BinaryIO, header: dict[str, Any], arrays: Sequence[np.ndarray]) -> None:
        """Write the document; ``target`` is a temporary path (atomicity is the caller's)
        or a binary file object."""

    def Reader(self, target: Any) -> Reader:  # noqa: N802  (a class in each module)
        """Open ``target`` for reading."""


def check_names_storable(names: Sequence[str], format_name: str) -> None:
    """Refuse a leaf name with a NUL character, which ``format_name`` (zip members, HDF5 links)
    cuts short: the file would be written, and hold another name or none."""
    bad = next((name for name in names if "\0" in name), None)
    if bad is not None:
        raise ValueError(
            f"leaf {bad!r}: {format_name} cannot store a name with a NUL character; rename its key, "
            "or save in the jaxsave format"
        )
