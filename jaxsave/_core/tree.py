"""Naming the leaves of a pytree: dictionize rules.

A pytree becomes a nested ``dict`` of named entries. Built-in rules cover dicts
(and every ``Mapping``, e.g. Haiku parameters and Flax ``FrozenDict``), lists and
tuples (``list_element_{i}``), namedtuples (field names), ``None`` (an empty
entry) and every node JAX can flatten with keys (dataclasses, Equinox modules,
...). Custom nodes get their own rule with :func:`register_dictionize_rule`.

>>> import jaxsave
>>> jaxsave.pytree_dict_keys({"w": [1.0, 2.0], "b": 0.0})
[('b',), ('w', 'list_element_0'), ('w', 'list_element_1')]
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import jax

from jaxsave.errors import StructureMismatchError

T = TypeVar("T")
Rule = Callable[[Any], Mapping[str, Any]]

_dictionize_rules: dict[type, Rule] = {}


def register_dictionize_rule(node_type: type) -> Callable[[Rule], Rule]:
    """Register how nodes of ``node_type`` become a dict of named children.

    The decorated function takes a node and returns ``{name: child}`` (or an
    iterable of ``(name, child)`` pairs, as the older ``io`` module expected);
    children are dictionized in turn. The rule also applies to subclasses. Registering
    a second rule for the same type is an error.

    >>> import jaxsave
    >>> class Pair:
    ...     def __init__(self, a, b):
    ...         self.a, self.b = a, b
    >>> @jaxsave.register_dictionize_rule(Pair)
    ... def _pair(p):
    ...     return {"first": p.a, "second": p.b}
    >>> jaxsave.pytree_to_dict(Pair(1, 2))
    {'first': 1, 'second': 2}
    """
    if not isinstance(node_type, type):
        raise TypeError(f"register_dictionize_rule expects a type, got {node_type!r}")

    def register(rule: Rule) -> Rule:
        if node_type in _dictionize_rules:
            raise ValueError(
                f"a dictionize rule for {node_type.__module__}.{node_type.__qualname__} is already registered"
            )
        _dictionize_rules[node_type] = rule
        return rule

    return register


def _entry_name(entry: Any) -> str:
    if isinstance(entry, jax.tree_util.DictKey):
        return str(entry.key)
    if isinstance(entry, jax.tree_util.SequenceKey):
        return f"list_element_{entry.idx}"
    if isinstance(entry, jax.tree_util.GetAttrKey):
        return entry.name
    if isinstance(entry, jax.tree_util.FlattenedIndexKey):
        return f"list_element_{entry.key}"
    return str(entry)


def _named_children(node: Any) -> list[tuple[str, Any]] | None:
    """The named children of ``node``, or ``None`` if it is a leaf."""
    rule = _dictionize_rules.get(type(node))
    if rule is None:
        rule = next((r for t, r in _dictionize_rules.items() if isinstance(node, t)), None)
    if rule is not None:
        named = rule(node)
        pairs = named.items() if isinstance(named, Mapping) else named
        return [(str(k), v) for k, v in pairs]
    if node is None:
        return []
    if isinstance(node, tuple) and hasattr(node, "_fields"):
        return [(f, getattr(node, f)) for f in node._fields]
    if isinstance(node, Mapping):
        return [(str(k), node[k]) for k in sorted(node, key=str)]
    if isinstance(node, (list, tuple)):
        return [(f"list_element_{i}", c) for i, c in enumerate(node)]
    pairs, treedef = jax.tree_util.tree_flatten_with_path(node, is_leaf=lambda x: x is not node)  # type: ignore[assignment]
    if treedef.num_nodes == 1 and treedef.num_leaves == 1:  # type: ignore[attr-defined]
        return None
    return [(_entry_name(path[0]), child) for path, child in pairs]


def pytree_to_dict(tree: Any) -> Any:
    """Turn a pytree into nested dicts of its leaves, named by the dictionize rules.

    >>> import jaxsave
    >>> from collections import namedtuple
    >>> State = namedtuple("State", ["x", "aux"])
    >>> jaxsave.pytree_to_dict(State(x=1.0, aux=(2, None)))
    {'x': 1.0, 'aux': {'list_element_0': 2, 'list_element_1': {}}}
    """
    children = _named_children(tree)
    if children is None:
        return tree
    out: dict[str, Any] = {}
    for name, child in children:
        if name in out:
            raise ValueError(f"two children of a {type(tree).__name__} node are both named {name!r}")
        out[name] = pytree_to_dict(child)
    return out


def _dict_paths(d: Any, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    if not isinstance(d, dict):
        return [(prefix, d)]
    out = []
    for k, v in d.items():
        out.extend(_dict_paths(v, prefix + (k,)))
    return out


def pytree_dict_keys(tree: Any) -> list[tuple[str, ...]]:
    """The key path of every leaf of ``tree``, in ``jax.tree.leaves`` order.

    (The older ``io`` module listed them in the order of the dictionized tree,
    which differs for namedtuples whose fields are not sorted; leaf order is what
    makes ``zip(pytree_dict_keys(t), jax.tree.leaves(t))`` correct.)

    >>> import jaxsave
    >>> jaxsave.pytree_dict_keys([{"a": 1}, (2, 3)])
    [('list_element_0', 'a'), ('list_element_1', 'list_element_0'), ('list_element_1', 'list_element_1')]
    """
    leaves, treedef = jax.tree.flatten(tree)
    marker = [_LeafIndex(i) for i in range(len(leaves))]
    indexed = jax.tree.unflatten(treedef, marker)
    keys: list[tuple[str, ...] | None] = [None] * len(leaves)
    for path, leaf in _dict_paths(pytree_to_dict(indexed)):
        if isinstance(leaf, _LeafIndex):
            keys[leaf.index] = path
    missing = [i for i, k in enumerate(keys) if k is None]
    if missing:
        raise ValueError(
            f"the dictionize rules lose leaves {missing} of a {type(tree).__name__}: "
            "a custom rule must return every child of its node"
        )
    return keys  # type: ignore[return-value]


class _LeafIndex:
    """A stand-in leaf that remembers its position in the flattened tree."""

    __slots__ = ("index",)

    def __init__(self, index: int):
        self.index = index


def dict_to_pytree(pytree_as_dict: Mapping[str, Any], target_structure: T) -> T:
    """Rebuild a pytree shaped like ``target_structure`` from nested dicts.

    The inverse of :func:`pytree_to_dict`: each leaf of ``target_structure`` is
    looked up in ``pytree_as_dict`` under its key path.

    >>> import jaxsave
    >>> jaxsave.dict_to_pytree({"a": 1, "b": {"list_element_0": 2}}, {"a": 0, "b": [0]})
    {'a': 1, 'b': [2]}
    """
    treedef = jax.tree.structure(target_structure)
    leaves = []
    for key in pytree_dict_keys(target_structure):
        node: Any = pytree_as_dict
        for i, part in enumerate(key):
            if not isinstance(node, Mapping) or part not in node:
                raise StructureMismatchError(
                    f"no entry {'/'.join(key[: i + 1])!r} in the dict for leaf {'/'.join(key)!r}"
                )
            node = node[part]
        leaves.append(node)
    return jax.tree.unflatten(treedef, leaves)


def flat_name(key: tuple[str, ...]) -> str:
    """One readable name for a key path, usable as an HDF5/netCDF variable name.

    Parts are joined with ``.``; a ``/`` inside a part (Haiku module names) becomes
    ``|``, as ``/`` would open a group.

    >>> flat_name(("mlp/~/linear_0", "w"))
    'mlp|~|linear_0.w'
    """
    return ".".join(part.replace("/", "|") for part in key) or "sample"


def describe_mismatches(tree: Any, like: Any, what: str = "tree") -> list[str]:
    """Every difference in structure, shape or dtype between ``tree`` and ``like``, by path.

    Leaves are compared by ``shape`` and ``dtype`` (so ``like`` may hold
    ``jax.ShapeDtypeStruct``s); typed PRNG keys compare by implementation.

    >>> import numpy as np
    >>> describe_mismatches({"a": np.zeros(2)}, {"a": np.zeros(3), "b": 1.0})
    ["missing leaf 'b'", "leaf 'a': shape (2,) != expected (3,)"]
    """
    from jaxsave._core.dtypes import leaf_spec

    keys, leaves = pytree_dict_keys(tree), jax.tree.leaves(tree)
    like_keys, like_leaves = pytree_dict_keys(like), jax.tree.leaves(like)
    got = {"/".join(k): v for k, v in zip(keys, leaves)}
    want = {"/".join(k): v for k, v in zip(like_keys, like_leaves)}
    problems = [f"missing leaf {k!r}" for k in want if k not in got]
    problems += [f"unexpected leaf {k!r}" for k in got if k not in want]
    for k in want:
        if k in got:
            a, b = leaf_spec(got[k]), leaf_spec(want[k])
            if a.shape != b.shape:
                problems.append(f"leaf {k!r}: shape {a.shape} != expected {b.shape}")
            if a.dtype != b.dtype:
                problems.append(f"leaf {k!r}: dtype {a.dtype} != expected {b.dtype}")
    if not problems and jax.tree.structure(tree) != jax.tree.structure(like):  # type: ignore[operator]
        problems.append(f"{what} structure {jax.tree.structure(tree)} != expected {jax.tree.structure(like)}")
    return problems


def check_like(tree: Any, like: Any, what: str = "tree") -> None:
    """Raise :class:`StructureMismatchError` listing every mismatch, if there is any."""
    problems = describe_mismatches(tree, like, what)
    if problems:
        raise StructureMismatchError(
            f"{what} does not match the expected structure:\n  " + "\n  ".join(problems)
        )
