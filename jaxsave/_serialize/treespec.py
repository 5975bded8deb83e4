"""A JSON, pickle-free encoding of a pytree's structure and of its non-array leaves.

:func:`encode_structure` splits a pytree into a JSON-able description and the list
of its array leaves (in ``jax.tree.leaves`` order); :func:`decode_structure`
rebuilds the tree from the two. Everything JAX can flatten is covered: dicts,
lists, tuples, ``None``, namedtuples, ``OrderedDict``/``defaultdict`` and every
registered custom node (dataclasses, Flax ``FrozenDict`` and NNX ``State``,
Equinox modules with their static fields, optax states, ...). Non-array leaves
and a custom node's auxiliary data are stored as JSON values: Python scalars,
strings, ``None``, tuples, dicts, dtypes, enum members and objects of the
:mod:`jaxsave.registry`, by name.

Classes are written by registered name (structure types are registered
automatically when encoding) and resolved only through the registry when
decoding: a description can never make the decoder import or call anything that
was not registered.

>>> import numpy as np
>>> from collections import namedtuple
>>> Pair = namedtuple("Pair", ["a", "b"])
>>> spec, leaves = encode_structure({"x": Pair(np.zeros(2), "tag"), "n": None})
>>> len(leaves)
1
>>> decode_structure(spec, leaves)
{'x': Pair(a=array([0., 0.]), b='tag'), 'n': None}
"""

from __future__ import annotations

import base64
import enum
import math
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from itertools import islice
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxsave import registry
from jaxsave._core.dtypes import dtype_from_name
from jaxsave._core.tree import flat_name
from jaxsave.errors import FileFormatError, JaxsaveError, RebuildError, UnregisteredNameError

#: How an array leaf appears in a description: the type it is restored as.
ARRAY_KINDS = ("jax", "numpy", "scalar")

__all__ = [
    "encode_structure",
    "decode_structure",
    "is_array_leaf",
    "TREESPEC_VERSION",
]

_ARRAY_KIND_SET = frozenset(ARRAY_KINDS)

#: Version of the JSON layout written by :func:`encode_structure`.
TREESPEC_VERSION = 1

_REGISTRY = jax.tree_util.default_registry
_LEAF_DEF = jax.tree_util.tree_structure(0)
_MAX_ARRAY_VALUE = 10_000  # elements of a numpy array stored inline as a JSON value


def is_array_leaf(x: Any) -> bool:
    """Whether ``x`` is stored as an array (jax/numpy array, numpy scalar, ShapeDtypeStruct)."""
    return isinstance(x, (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct))


def array_kind(x: Any) -> str:
    """``"numpy"``, ``"scalar"`` (numpy scalar) or ``"jax"``: the leaf type to restore."""
    if isinstance(x, np.ndarray):
        return "numpy"
    if isinstance(x, np.generic):
        return "scalar"
    return "jax"


def _is_namedtuple(x: Any) -> bool:
    return isinstance(x, tuple) and hasattr(type(x), "_fields")


# ----------------------------------------------------------------------------- encoding


def _entry_name(entry: Any) -> str:
    """A child's name, as in :mod:`jaxsave._core.tree` (``list_element_{i}`` for positions)."""
    if isinstance(entry, jax.tree_util.GetAttrKey):
        return entry.name
    if isinstance(entry, jax.tree_util.DictKey):
        return str(entry.key)
    if isinstance(entry, jax.tree_util.SequenceKey):
        return f"list_element_{entry.idx}"
    if isinstance(entry, jax.tree_util.FlattenedIndexKey):
        return f"list_element_{entry.key}"
    return str(entry)


#: Types met as array leaves (the registry does not flatten them), and their kind: the fast path.
_LEAF_KIND: dict[type, str] = {}


def _flat_prefix(path: tuple[str, ...]) -> str:
    """What :func:`~jaxsave._core.tree.flat_name` puts before a child's part (``"a.b."``)."""
    return "".join(part.replace("/", "|") + "." for part in path)


class _Encoder:
    def __init__(self, strict: bool = True, names: bool = False) -> None:
        self.leaves: list[Any] = []
        #: The flat name (:func:`~jaxsave._core.tree.flat_name`) of each array leaf, if asked for.
        self.names: list[str] | None = [] if names else None
        self.problems: list[str] = []
        self.refs: set[str] = set()
        self.strict = strict

    def type_ref(self, cls: type) -> str:
        name = registry.type_name(cls)
        self.refs.add(name)
        return name

    def node(self, x: Any, path: tuple[str, ...]) -> Any:
        flat = _REGISTRY.flatten_one_level_with_keys(x)
        if flat is None:
            if is_array_leaf(x):
                self.leaves.append(x)
                if self.names is not None:
                    self.names.append(flat_name(path))
                kind = _LEAF_KIND[type(x)] = array_kind(x)
                return kind
            return {"t": "value", "v": self.value(x, path)}
        pairs, aux = flat
        cls = type(x)
        if x is None:
            return {"t": "none"}
        children = [c for _, c in pairs]
        if cls is dict:
            keys = list(aux)
            str_keys = set(map(type, keys)) == {str}
            out = {"t": "dict", "keys": keys if str_keys else [self.value(k, path) for k in keys]}
            order = list(x)
            if order != keys:
                position = {k: i for i, k in enumerate(keys)}
                out["order"] = [position[k] for k in order]
            kinds = list(map(_LEAF_KIND.get, map(type, children)))
            if str_keys and kinds and None not in kinds:  # a dict of array leaves: at once
                self.leaves += children
                if self.names is not None:
                    prefix = _flat_prefix(path)
                    self.names += [prefix + k.replace("/", "|") or "sample" for k in keys]
                out["children"] = kinds
                return out
            out["children"] = [self.node(c, path + (str(k),)) for k, c in zip(keys, children)]
            return out
        if cls is list or cls is tuple:
            kids = [self.node(c, path + (f"list_element_{i}",)) for i, c in enumerate(children)]
            return {"t": cls.__name__, "children": kids}
        if _is_namedtuple(x):
            fields = list(cls._fields)
            kids = [self.node(c, path + (f,)) for f, c in zip(fields, children)]
            return {"t": "namedtuple", "type": self.type_ref(cls), "fields": fields, "children": kids}
        if cls is OrderedDict or cls is defaultdict:
            keys = list(aux if cls is OrderedDict else aux[1])
            out = {"t": cls.__name__.lower(), "keys": [self.value(k, path) for k in keys]}
            if cls is defaultdict:
                out["factory"] = self.value(aux[0], path + ("default_factory",))
            out["children"] = [self.node(c, path + (str(k),)) for k, c in zip(keys, children)]
            return out
        return {
            "t": "node",
            "type": self.type_ref(cls),
            "aux": self.value(aux, path + (f"<static data of {cls.__name__}>",)),
            "keys": [str(k) for k, _ in pairs],
            "children": [self.node(c, path + (_entry_name(k),)) for k, c in pairs],
        }

    def value(self, v: Any, path: tuple[str, ...]) -> Any:
        """A JSON value for ``v``: plain JSON for None/bool/int/str/finite float, else tagged."""
        t = type(v)
        if v is None or t is bool or t is str or t is int:
            return v
        if t is float:
            return v if math.isfinite(v) else {"$": "float", "v": repr(v)}
        if isinstance(v, enum.Enum):
            return {"$": "enum", "type": self.type_ref(t), "v": v.name}
        name = registry.saveable_name(v)
        if name is not None:
            self.refs.add(name)
            return {"$": "ref", "v": name}
        if t is complex:
            return {"$": "complex", "v": [self.value(v.real, path), self.value(v.imag, path)]}
        if t is bytes:
            return {"$": "bytes", "v": base64.b64encode(v).decode("ascii")}
        if isinstance(v, np.dtype):
            return {"$": "dtype", "v": dtype_name(v)}
        if isinstance(v, type):
            return self._type_value(v, path)
        if _is_namedtuple(v):
            return {"$": "namedtuple", "type": self.type_ref(t), "v": [self.value(c, path) for c in v]}
        if t is tuple or t is list:
            items = [self.value(c, path + (f"list_element_{i}",)) for i, c in enumerate(v)]
            return items if t is list else {"$": "tuple", "v": items}
        if t is dict:
            return {
                "$": "dict",
                "v": [[self.value(k, path), self.value(c, path + (str(k),))] for k, c in v.items()],
            }
        if isinstance(v, Mapping) and registry.saveable_name(t) is not None:
            return {
                "$": "mapping",
                "type": self.type_ref(t),
                "v": [[self.value(k, path), self.value(c, path + (str(k),))] for k, c in v.items()],
            }
        if t is set or t is frozenset:
            items = sorted((self.value(c, path) for c in v), key=repr)
            return {"$": t.__name__, "v": items}
        if isinstance(v, np.generic) and not isinstance(v, np.void):
            return {"$": "npscalar", "dtype": dtype_name(v.dtype), "v": self.value(v.item(), path)}
        if isinstance(v, np.ndarray) and v.size <= _MAX_ARRAY_VALUE and v.dtype.kind in "biufc":
            items = [self.value(c, path) for c in v.ravel().tolist()]
            return {"$": "ndarray", "dtype": dtype_name(v.dtype), "shape": list(v.shape), "v": items}
        what = f"{type(v).__module__}.{type(v).__qualname__} {v!r:.80}"
        self.problems.append(f"{'.'.join(path) or '<root>'}: {what}")
        return None if self.strict else {"$": "unregistered", "v": what}

    def _type_value(self, v: type, path: Any) -> Any:
        if issubclass(v, np.generic):
            return {"$": "nptype", "v": dtype_name(np.dtype(v))}
        dtype = getattr(v, "dtype", None)
        if isinstance(dtype, np.dtype) and getattr(jnp, dtype.name, None) is v:
            return {"$": "jnptype", "v": dtype.name}
        try:
            return {"$": "ref", "v": self.type_ref(v)}
        except TypeError:
            self.problems.append(f"{'.'.join(path) or '<root>'}: class {v!r} has no importable name")
            return None


def dtype_name(dtype: Any) -> str:
    """The whitelisted name of a dtype (raises for object, string and void dtypes)."""
    name = np.dtype(dtype).name
    dtype_from_name(name)  # refuse what the whitelist does not know
    return name


def encode_structure(
    tree: Any, *, strict: bool = True, _encoder: _Encoder | None = None
) -> tuple[dict[str, Any], list[Any]]:
    """Describe ``tree`` as JSON and return ``(description, array_leaves)``.

    ``array_leaves`` are the array leaves (jax/numpy arrays, numpy scalars,
    ``jax.ShapeDtypeStruct``) in ``jax.tree.leaves`` order; every other leaf is
    stored inside the description. Types used as nodes are registered in
    :mod:`jaxsave.registry` automatically; other non-array values must already
    be registered, or :class:`~jaxsave.errors.UnregisteredNameError` lists them
    all with their paths. With ``strict=False`` they are described instead
    (such a description can be matched against, not decoded).

    >>> import jax.numpy as jnp
    >>> spec, leaves = encode_structure([jnp.ones(2), 3, None])
    >>> spec["root"]["t"], spec["root"]["children"]
    ('list', ['jax', {'t': 'value', 'v': 3}, {'t': 'none'}])
    """
    enc = _encoder or _Encoder(strict)
    try:
        root = enc.node(tree, ())
    except RecursionError:
        raise ValueError("the pytree is nested too deeply to be encoded") from None
    if enc.problems and strict:
        listed = "\n".join(f"  - {p}" for p in enc.problems)
        raise UnregisteredNameError(
            f"{len(enc.problems)} leaf/static value(s) can neither be stored as arrays nor "
            f"saved by name:\n{listed}\nMake them arrays, or register each with "
            "jaxsave.register_saveable(obj) / @jaxsave.saveable so it is saved by name."
        )
    spec = {"treespec": TREESPEC_VERSION, "refs": sorted(enc.refs), "root": root}
    return spec, enc.leaves


def encode_structure_with_names(tree: Any) -> tuple[dict[str, Any], list[Any], list[str]]:
    """:func:`encode_structure` plus each array leaf's name: the
    :func:`~jaxsave._core.tree.flat_name` of its key path (dictionize naming).

    >>> import numpy as np
    >>> encode_structure_with_names({"a/b": {"c": np.zeros(1)}, "d": [np.ones(1)]})[2]
    ['a|b.c', 'd.list_element_0']
    """
    enc = _Encoder(True, names=True)
    spec, leaves = encode_structure(tree, _encoder=enc)
    assert enc.names is not None
    return spec, leaves, enc.names


# ----------------------------------------------------------------------------- decoding


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise FileFormatError(f"invalid tree structure: {msg}")


def referenced_names(spec: Any) -> set[str]:
    """Every registry name a description refers to (types and values)."""
    names: set[str] = set()
    stack = [spec]
    while stack:
        x = stack.pop()
        if isinstance(x, dict):
            tag = x.get("$")
            if tag == "ref" or (tag is None and x.get("t") in ("namedtuple", "node")):
                name = x.get("v") if tag == "ref" else x.get("type")
                _check(isinstance(name, str), "a type or reference name is not a string")
                names.add(name)  # type: ignore[arg-type]
            elif tag in ("enum", "namedtuple", "mapping"):
                _check(isinstance(x.get("type"), str), "a type name is not a string")
                names.add(x["type"])
            stack.extend(x.values())
        elif isinstance(x, list):
            stack.extend(x)
    return names


class _Objects(dict):
    def __missing__(self, name: Any) -> Any:
        raise FileFormatError(f"invalid tree structure: the name {name!r:.80} is not in its refs")


class Decoder:
    def __init__(
        self, objects: dict[str, Any], leaves: Iterator[Any], leaf_fn: Callable[[str, Any], Any] | None
    ):
        self.objects = _Objects(objects)
        self.leaves = leaves
        self.leaf_fn = leaf_fn

    def node(self, n: Any) -> Any:
        if type(n) is str:
            _check(n in ARRAY_KINDS, f"unknown array leaf kind {n!r:.40}")
            leaf = next(self.leaves, _END)
            _check(leaf is not _END, "more array leaves in the structure than stored")
            return self.leaf_fn(n, leaf) if self.leaf_fn else leaf
        _check(isinstance(n, dict), "a node is not a JSON object")
        t = n.get("t")
        if t == "value":
            return self.value(n.get("v"))
        if t == "none":
            return None
        kids = n.get("children")
        _check(isinstance(kids, list), f"a {t!r} node has no children list")
        if kids and set(map(type, kids)) == {str} and _ARRAY_KIND_SET.issuperset(kids):
            children = self.array_leaves(kids)  # a node of array leaves only: at once
        else:
            children = [self.node(c) for c in kids]
        if t in ("dict", "ordereddict", "defaultdict"):
            keys = self.keys(n, len(children))
            if t == "dict":
                if "order" not in n:
                    return dict(zip(keys, children))
                order = n["order"]
                _check(sorted(order) == list(range(len(keys))), "bad dict order")
                return {keys[i]: children[i] for i in order}
            if t == "ordereddict":
                return OrderedDict(zip(keys, children))
            factory = self.value(n.get("factory"))
            _check(factory is None or callable(factory), "defaultdict factory is not callable")
            return defaultdict(factory, zip(keys, children))
        if t == "list":
            return children
        if t == "tuple":
            return tuple(children)
        cls = self.objects[n["type"]]
        if t == "namedtuple":
            fields = n.get("fields")
            _check(
                isinstance(cls, type) and issubclass(cls, tuple) and hasattr(cls, "_fields"),
                f"{n['type']} is not a namedtuple type",
            )
            _check(
                list(cls._fields) == fields and len(children) == len(fields),
                f"namedtuple {n['type']} has fields {list(cls._fields)}, the file has {fields}",
            )
            return _rebuilt(n["type"], lambda: cls(*children))
        _check(t == "node", f"unknown node type {t!r}")
        _check(
            isinstance(cls, type) and _REGISTRY.is_node(cls),
            f"{n['type']} is not a registered pytree node type",
        )
        aux = self.value(n.get("aux"))
        try:
            treedef = jax.tree_util.PyTreeDef.from_node_data_and_children(
                _REGISTRY, (cls, aux), [_LEAF_DEF] * len(children)
            )
        except Exception as e:  # jax's own checks of the stored node data
            raise FileFormatError(f"cannot rebuild a {n['type']} node: {e}") from e
        if cls in _JAX_NODES:  # jax's own containers: what their unflatten rejects is the file's fault
            try:
                return treedef.unflatten(children)
            except Exception as e:
                raise FileFormatError(f"cannot rebuild a {n['type']} node: {e}") from e
        return _rebuilt(n["type"], lambda: treedef.unflatten(children))

    def array_leaves(self, kinds: list[str]) -> list[Any]:
        """The next ``len(kinds)`` array leaves (``kinds`` are valid array kinds)."""
        leaves = list(islice(self.leaves, len(kinds)))
        _check(len(leaves) == len(kinds), "more array leaves in the structure than stored")
        return list(map(self.leaf_fn, kinds, leaves)) if self.leaf_fn else leaves

    def keys(self, n: dict[str, Any], count: int) -> list[Any]:
        keys = n.get("keys")
        _check(isinstance(keys, list) and len(keys) == count, "keys do not match children")
        if set(map(type, keys)) == {str}:  # type: ignore[arg-type]
            return keys  # type: ignore[return-value]  # plain strings decode to themselves
        out = [self.value(k) for k in keys]  # type: ignore[union-attr]
        for k in out:
            _check(k.__hash__ is not None, f"unhashable dict key {k!r}")
        return out

    def value(self, v: Any) -> Any:
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        if isinstance(v, list):
            return [self.value(c) for c in v]
        _check(isinstance(v, dict), f"bad value {v!r:.80}")
        tag, raw = v.get("$"), v.get("v")
        if tag == "ref":
            return self.objects[raw]
        if tag == "float":
            _check(raw in ("nan", "inf", "-inf"), f"bad float {raw!r:.40}")
            return float(raw)
        if tag in ("tuple", "set", "frozenset"):
            _check(isinstance(raw, list), f"bad {tag}")
            return {"tuple": tuple, "set": set, "frozenset": frozenset}[tag](self.value(raw))
        if tag in ("dict", "mapping"):
            _check(
                isinstance(raw, list) and all(isinstance(p, list) and len(p) == 2 for p in raw),
                f"bad {tag} value",
            )
            d = {self.value(k): self.value(c) for k, c in raw}
            if tag == "dict":
                return d
            cls = self.objects[v["type"]]
            _check(isinstance(cls, type) and issubclass(cls, Mapping), f"{v['type']} is not a Mapping")
            return _rebuilt(v["type"], lambda: cls(d))
        if tag == "complex":
            _check(isinstance(raw, list) and len(raw) == 2, "bad complex")
            return complex(*self.value(raw))
        if tag == "bytes":
            _check(isinstance(raw, str), "bad bytes")
            return base64.b64decode(raw.encode("ascii"), validate=True)
        if tag == "enum":
            cls = self.objects[v["type"]]
            _check(
                isinstance(cls, type) and issubclass(cls, enum.Enum) and raw in cls.__members__,
                f"{v['type']} has no member {raw!r:.40}",
            )
            return cls[raw]
        if tag == "namedtuple":
            cls = self.objects[v["type"]]
            _check(
                isinstance(cls, type) and issubclass(cls, tuple) and hasattr(cls, "_fields"),
                f"{v['type']} is not a namedtuple type",
            )
            _check(isinstance(raw, list) and len(raw) == len(cls._fields), "bad namedtuple value")
            return cls(*self.value(raw))
        if tag == "dtype":
            return dtype_from_name(raw)
        if tag == "nptype":
            return dtype_from_name(raw).type
        if tag == "jnptype":
            dtype_from_name(raw)
            scalar_type = vars(jnp).get(raw)  # the module's dict: never its __getattr__
            _check(isinstance(scalar_type, type), f"jax.numpy has no scalar type {raw!r:.40}")
            return scalar_type
        if tag == "npscalar":
            return dtype_from_name(v.get("dtype")).type(self.value(raw))
        if tag == "ndarray":
            shape = v.get("shape")
            _check(
                isinstance(shape, list) and isinstance(raw, list) and math.prod(shape) == len(raw),
                "bad inline array",
            )
            return np.array(self.value(raw), dtype=dtype_from_name(v.get("dtype"))).reshape(shape)
        raise FileFormatError(f"invalid tree structure: unknown value tag {tag!r:.40}")


_END = object()

#: Node types whose unflatten is jax's own (a failure there is a damaged description).
_JAX_NODES = (dict, list, tuple, type(None), OrderedDict, defaultdict)


def _rebuilt(name: str, build: Callable[[], Any]) -> Any:
    """``build()``, which runs a registered class's code: what it raises is a :class:`RebuildError`.

    Its own validation rejecting the stored values, or a bug in it, is not a
    damaged file (and is not reported as one), but it is still a jaxsave error.
    """
    try:
        return build()
    except Exception as e:
        raise RebuildError(
            f"rebuilding a {name} from the stored tree: the class raised {type(e).__name__}: {e}"
        ) from e


def decode_structure(
    spec: Any,
    leaves: Sequence[Any],
    *,
    leaf_fn: Callable[[str, Any], Any] | None = None,
) -> Any:
    """Rebuild the tree that :func:`encode_structure` described.

    ``leaves`` are the array leaves in order (they may differ from the encoded
    ones, e.g. stacked samples). ``leaf_fn(kind, leaf)``, if given, converts each
    one (``kind`` is ``"jax"``, ``"numpy"`` or ``"scalar"``, the type it had).
    Names are resolved through :mod:`jaxsave.registry` only; if some are not
    registered, :class:`~jaxsave.errors.UnregisteredNameError` lists all of them.
    A malformed description raises :class:`~jaxsave.errors.FileFormatError`.

    >>> spec, leaves = encode_structure((1.5, {"k": None}))
    >>> decode_structure(spec, leaves)
    (1.5, {'k': None})
    """
    _check(isinstance(spec, dict), "the description is not a JSON object")
    version = spec.get("treespec")
    _check(isinstance(version, int), "no treespec version")
    if version > TREESPEC_VERSION:
        raise FileFormatError(
            f"tree structure uses treespec version {version}; this jaxsave reads up to "
            f"{TREESPEC_VERSION}: upgrade jaxsave"
        )
    refs = spec.get("refs")
    if refs is None:  # descriptions without a refs list: find the names by walking
        refs = referenced_names(spec)
    _check(isinstance(refs, (list, set)) and all(isinstance(r, str) for r in refs), "bad refs")
    objects, missing = registry.resolve_all(refs)
    if missing:
        raise UnregisteredNameError(registry.missing_names_message(missing))
    it = iter(leaves)
    try:
        tree = Decoder(objects, it, leaf_fn).node(spec.get("root"))
    except RecursionError:
        raise FileFormatError("invalid tree structure: nested too deeply") from None
    except (TypeError, ValueError, KeyError, OverflowError) as e:
        if isinstance(e, JaxsaveError):
            raise
        raise FileFormatError(f"invalid tree structure: {type(e).__name__}: {e}") from e
    _check(next(it, _END) is _END, "fewer array leaves in the structure than stored")
    return tree
