"""The pytree file format's versions: the one written, the upgrades that bring an older header to
it (:data:`UPGRADES`, filled by :func:`jaxsave.serialization.register_format_upgrade`) and the
built-in upgrade from version 1."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from jaxsave._serialize.leaf_table import leaf_columns
from jaxsave._version import __version__
from jaxsave.errors import FileFormatError

#: The version of the pytree file layout this jaxsave writes (``jaxsave.serialization.FORMAT_VERSION``).
PYTREE_FILE_FORMAT = 2

#: ``version -> fn(header) -> header`` turning a header of that version into the next.
UPGRADES: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {}


def _callable_name(fn: Any) -> str:
    module, name = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    return f"{module}.{name}" if isinstance(module, str) and isinstance(name, str) else repr(fn)


def upgrade(header: Any) -> dict[str, Any]:
    """``header`` brought to :data:`PYTREE_FILE_FORMAT` by the registered upgrades."""
    if not isinstance(header, dict) or type(header.get("format_version")) is not int:
        raise FileFormatError("the file has no jaxsave header with a format version")
    version = header["format_version"]
    if version > PYTREE_FILE_FORMAT:
        raise FileFormatError(
            f"the file uses jaxsave format version {version} (written by jaxsave "
            f"{header.get('jaxsave_version')}); this jaxsave {__version__} reads versions up to "
            f"{PYTREE_FILE_FORMAT}: upgrade jaxsave"
        )
    while version < PYTREE_FILE_FORMAT:
        if version not in UPGRADES:
            raise FileFormatError(f"no upgrade is registered from jaxsave format version {version}")
        step = UPGRADES[version]
        try:
            header = step(dict(header))
        except Exception as error:  # a bug of the upgrade, or its own verdict: never reported as damage
            if hasattr(error, "add_note"):  # Python 3.11+
                error.add_note(
                    f"raised by the format upgrade {_callable_name(step)} (registered "
                    f"from jaxsave format version {version})"
                )
            raise
        if not isinstance(header, dict):
            raise TypeError(
                f"the format upgrade {_callable_name(step)} (registered from jaxsave "
                f"format version {version}) returned {type(header).__name__}, "
                "not a header dict"
            )
        version += 1
        header["format_version"] = version
    return header


def _columns_of_leaf_table(header: dict[str, Any]) -> dict[str, Any]:
    """Format 1 -> 2: the leaf table, one object per leaf, as three columns.

    A malformed old table is a :class:`~jaxsave.errors.FileFormatError`; a table that is
    not a list is left for the checks of the current format to refuse.
    """
    leaves = header.get("leaves")
    if isinstance(leaves, list):
        if not all(type(leaf) is dict for leaf in leaves):
            raise FileFormatError("a leaf of the (format 1) leaf table is not a JSON object")
        header["leaves"] = leaf_columns(
            [leaf.get("name") for leaf in leaves],
            [leaf.get("dtype") for leaf in leaves],
            [leaf.get("shape") for leaf in leaves],
        )
    return header


UPGRADES[1] = _columns_of_leaf_table
