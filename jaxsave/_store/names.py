"""Names of the sample leaves in a sample file or store: one variable per leaf, no collisions.

In the ``posterior`` layout a leaf becomes ``posterior/<name>`` (or
``sample_stats/<name>`` if chosen with ``sample_stats=``), where ``<name>`` is its
key path joined readably; in the ``chains`` layout it becomes
``chain~{id}/<key>/<subkey>``. Names that collide with each other or with a
dimension name (``chain``, ``draw``, ``<var>_dim_k``), and key parts HDF5 cannot
hold as a name (empty, ``.``, a NUL character, which HDF5 would cut the name at)
are refused. Both backends (HDF5 and Zarr) name their arrays this way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from jaxsave._core.tree import flat_name
from jaxsave._store import schema
from jaxsave.errors import StructureMismatchError

#: ``sample_stats=``: top-level names, or a predicate on a leaf's key path.
StatsSpec = Sequence[str] | Callable[[tuple[str, ...]], bool] | None
#: Names that are dimensions in every group.
RESERVED = (schema.CHAIN_DIM, schema.DRAW_DIM)
#: A chain's group in messages (layout "chains").
_ANY_CHAIN = schema.CHAIN_GROUP.format("<id>")
#: The metadata key of every Zarr v3 node (no leaf may be named so).
ZARR_METADATA = "zarr.json"


def _is_stat(stats: StatsSpec, key: tuple[str, ...]) -> bool:
    if stats is None:
        return False
    if callable(stats):
        return bool(stats(key))
    return bool(key) and key[0] in stats


def leaf_entries(keys: list[tuple[str, ...]], stats: StatsSpec, layout: str) -> list[tuple[str, str]]:
    """``(group, variable name)`` of every leaf; refuses names that collide.

    >>> leaf_entries([("x",), ("lp",)], ("lp",), "posterior")
    [('posterior', 'x'), ('sample_stats', 'lp')]
    """
    for key in keys:
        _check_parts(key)
    if layout == schema.CHAINS:
        entries = [(schema.CHAIN_GROUP, schema.leaf_path(k)) for k in keys]
        _check_paths(keys, [name for _, name in entries])
        return entries
    return variable_entries(keys, stats)


def variable_entries(keys: Sequence[tuple[str, ...]], stats: StatsSpec) -> list[tuple[str, str]]:
    """``(group, variable name)`` of every leaf as ArviZ groups take them (layout
    ``"posterior"``); refuses names that collide with another or with a dimension name.

    >>> variable_entries([("a.b",), ("a", "b")], None)
    Traceback (most recent call last):
    jaxsave.errors.StructureMismatchError: leaves 'a.b' and 'a/b' both become posterior/a.b
    """
    entries = [
        (schema.STATS_GROUP if _is_stat(stats, k) else schema.POSTERIOR_GROUP, flat_name(k)) for k in keys
    ]
    if stats is not None and not callable(stats):
        unknown = set(stats) - {k[0] for k in keys if k}
        if unknown:
            raise StructureMismatchError(
                f"sample_stats names {sorted(unknown)} are not top-level keys of the sample"
            )
    seen: dict[tuple[str, str], tuple[str, ...]] = {}
    for key, (group, name) in zip(keys, entries):
        if (group, name) in seen:
            raise StructureMismatchError(
                f"leaves {'/'.join(seen[group, name])!r} and {'/'.join(key)!r} both become {group}/{name}"
            )
        seen[group, name] = key
    for key, (group, name) in zip(keys, entries):
        clash = name in RESERVED or any(
            name.startswith(schema.dim_prefix(other)) for (g, other) in seen if g == group and other != name
        )
        if clash:
            raise StructureMismatchError(
                f"leaf {'/'.join(key)!r} would be named {name!r}, which is a dimension name in {group}/"
            )
    return entries


def check_zarr_names(keys: Sequence[tuple[str, ...]], entries: Sequence[tuple[str, str]]) -> None:
    """Refuse variable names a Zarr v3 node cannot have (``..``, ``zarr.json``, a leading ``__``,
    which Zarr reserves) or that a store would split into a path (a backslash), naming the key.
    """
    for key, (group, name) in zip(keys, entries):
        why = (
            "the name '..'"
            if name == ".."
            else f"the name {name!r}, the key of a node's metadata"
            if name.lower() == ZARR_METADATA
            else "a name starting with '__', which Zarr reserves"
            if name.startswith("__")
            else "a backslash, which Zarr reads as a '/'"
            if "\\" in name
            else None
        )
        if why is not None:
            raise StructureMismatchError(
                f"the sample key {'/'.join(key)!r} ({key!r}) becomes the Zarr node {group}/{name}, which "
                f"Zarr cannot store ({why}); rename that leaf"
            )


def _check_parts(key: tuple[str, ...]) -> None:
    """Refuse a key whose parts HDF5 cannot hold as (part of) a name."""
    for part in key:
        if part == "" or part == "." or "\0" in part:
            what = "an empty part" if part == "" else "the part '.'" if part == "." else "a NUL character"
            raise StructureMismatchError(
                f"the sample key {'/'.join(key)!r} ({key!r}) has {what}, which an HDF5 name cannot hold; "
                "rename that leaf"
            )


def _check_paths(keys: list[tuple[str, ...]], paths: list[str]) -> None:
    """``chains`` layout: no path may repeat another, be a group of another, or have an empty part."""
    seen: dict[str, tuple[str, ...]] = {}
    for key, path in zip(keys, paths):
        parts = path.split("/")
        if "" in parts or "." in parts:  # a "/" inside a key part ("a/", "/a", "a/./b")
            raise StructureMismatchError(
                f"the sample key {key!r} becomes the HDF5 path {path!r}, which has an empty or '.' part"
            )
        if path in seen:
            raise StructureMismatchError(f"leaves {seen[path]!r} and {key!r} both become {_ANY_CHAIN}/{path}")
        seen[path] = key
    for key, path in zip(keys, paths):
        parts = path.split("/")
        for k in range(1, len(parts)):
            group = "/".join(parts[:k])
            if group in seen:
                raise StructureMismatchError(
                    f"leaf {seen[group]!r} ({_ANY_CHAIN}/{group}) would be the group of leaf "
                    f"{key!r} ({_ANY_CHAIN}/{path})"
                )
