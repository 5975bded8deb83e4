"""Lining up a stored tree description with a target tree's (``load_pytree(..., like=)``).

Both sides are descriptions from :func:`jaxsave._serialize.treespec.encode_structure`; nothing
is resolved through the registry, so a target supplies the classes itself.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from jaxsave._serialize.treespec import Decoder, encode_structure  # noqa: F401  (doctest)
from jaxsave.errors import FileFormatError

__all__ = ["match_structure", "decode_plain_value"]


def _label(key: Any) -> str:
    return f"[{key!r}]" if isinstance(key, str) else f"[{json.dumps(key, sort_keys=True)}]"


def _t(n: Any) -> Any:
    return "leaf" if isinstance(n, str) else n.get("t") if isinstance(n, dict) else None


def _children(n: Any) -> list[Any]:
    kids = n.get("children") if isinstance(n, dict) else None
    return kids if isinstance(kids, list) else []


def _child_labels(n: dict[str, Any]) -> list[str]:
    t = n.get("t")
    if t in ("dict", "ordereddict", "defaultdict"):
        return [_label(k) for k in n.get("keys", [])]
    if t == "namedtuple":
        return [f".{f}" for f in n.get("fields", [])]
    if t == "node":
        return [str(k) for k in n.get("keys", [])]
    return [f"[{i}]" for i in range(len(_children(n)))]


def _describe(n: Any, spec: Any = None) -> str:
    t = _t(n)
    if t == "leaf":
        return f"an array {_fmt(spec)}" if spec is not None else "an array"
    if t == "value":
        return f"the value {json.dumps(n.get('v'))[:60]}"
    if t == "none":
        return "None"
    if t in ("namedtuple", "node"):
        return f"a {n.get('type')}"
    return f"a {t} of {len(_children(n))}"


def _fmt(spec: Any) -> str:
    return f"{spec.dtype}{list(spec.shape)}"


def _value_kind(v: Any) -> str | None:
    """The Python type of a plain (registry-free) JSON value, else None."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return type(v).__name__
    if isinstance(v, dict) and v.get("$") in ("float", "complex"):
        return v["$"]
    return None


class _Matcher:
    def __init__(self, file_root: Any, file_arrays: Sequence[Any], like_arrays: Sequence[Any], partial: bool):
        self.file_arrays, self.like_arrays, self.partial = file_arrays, like_arrays, partial
        self.plan: list[tuple[str, Any] | None] = []
        self.problems: list[str] = []
        self.like_i = 0
        self.first_leaf: dict[int, list[int]] = {}  # id(node) -> first array index per child
        self._count = 0
        self._number(file_root)

    def _number(self, n: Any) -> None:
        if _t(n) == "leaf":
            self._count += 1
            return
        firsts = []
        for c in _children(n):
            firsts.append(self._count)
            self._number(c)
        self.first_leaf[id(n)] = firsts

    def problem(self, path: str, msg: str) -> None:
        self.problems.append(f"{path or '<root>'}: {msg}")

    def skip(self, like: Any) -> None:
        t = _t(like)
        if t in ("leaf", "value"):
            self.like_i += t == "leaf"
            self.plan.append(None)
        for c in _children(like):
            self.skip(c)

    def walk(self, f: Any, lk: Any, path: str, fi: int) -> None:
        """Match file node ``f`` (whose first array leaf is ``fi``) with target node ``lk``."""
        ft, lt = _t(f), _t(lk)
        if lt == "leaf":
            ls = self.like_arrays[self.like_i]
            self.like_i += 1
            if ft != "leaf":
                self.problem(path, f"the target has an array {_fmt(ls)}, the file has {_describe(f)}")
                self.plan.append(None)
                return
            fs = self.file_arrays[fi]
            if tuple(fs.shape) != tuple(ls.shape) or str(fs.dtype) != str(ls.dtype):
                self.problem(path, f"the file has {_fmt(fs)}, the target has {_fmt(ls)}")
            self.plan.append(("array", fi))
            return
        if lt == "value":
            fv, lv = (f.get("v") if ft == "value" else None), lk.get("v")
            if ft == "value" and fv == lv:
                self.plan.append(("target", None))
            elif ft == "value" and _value_kind(fv) is not None and _value_kind(fv) == _value_kind(lv):
                self.plan.append(("value", fv))
            else:
                self.problem(path, f"the file has {_describe(f)}, the target has {_describe(lk)}")
                self.plan.append(None)
            return
        if ft != lt or (lt in ("namedtuple", "node") and f.get("type") != lk.get("type")):
            fspec = self.file_arrays[fi] if ft == "leaf" else None
            self.problem(path, f"the file has {_describe(f, fspec)}, the target has {_describe(lk)}")
            self.skip(lk)
            return
        fl, ll = _child_labels(f), _child_labels(lk)
        fc, lc = _children(f), _children(lk)
        firsts = self.first_leaf[id(f)]
        same_keys = fl == ll and len(fc) == len(lc)
        if lt == "node" and same_keys and f.get("aux") != lk.get("aux"):
            self.problem(
                path,
                f"static data differ: the file has {json.dumps(f.get('aux'))[:120]}, "
                f"the target has {json.dumps(lk.get('aux'))[:120]}",
            )
        if lt == "defaultdict" and f.get("factory") != lk.get("factory"):
            self.problem(path, "the defaultdict factories differ")
        keyed = lt in ("dict", "ordereddict", "defaultdict") or (
            lt == "node" and all(x.startswith("[") for x in fl + ll) and not same_keys
        )
        if not keyed:
            if not same_keys:
                self.problem(path, f"the file has children {fl[:8]}, the target has {ll[:8]}")
                self.skip(lk)
                return
            for j, (label, b) in enumerate(zip(ll, lc)):
                self.walk(fc[j], b, path + label, firsts[j])
            return
        position = {label: j for j, label in enumerate(fl)}
        for label, b in zip(ll, lc):
            j = position.get(label)  # type: ignore[assignment]
            if j is not None and j < len(fc):
                self.walk(fc[j], b, path + label, firsts[j])
            else:
                self.problem(path + label, "missing from the file")
                self.skip(b)
        if not self.partial:
            wanted = set(ll)
            for label in fl:
                if label not in wanted:
                    self.problem(path + label, "in the file but not in the target (partial=True skips it)")


def match_structure(
    file_spec: dict[str, Any],
    target_spec: dict[str, Any],
    file_arrays: Sequence[Any],
    target_arrays: Sequence[Any],
    *,
    partial: bool = False,
) -> tuple[list[tuple[str, Any] | None], list[str]]:
    """Line a stored description up with a target tree's description.

    ``file_arrays``/``target_arrays`` are the array leaves' specs (anything with
    ``shape`` and ``dtype``). Returns ``(plan, problems)``: ``plan`` has one entry
    per leaf of the target, in ``jax.tree.leaves`` order: ``("array", i)`` (the
    file's array ``i``), ``("value", json)`` (the file's plain value) or
    ``("target", None)`` (the target's own, equal, leaf); ``problems`` lists every
    difference as ``"path: what differs"``. With ``partial``, entries of the
    file's dicts that the target lacks are skipped instead of reported.

    >>> import numpy as np
    >>> f, fl = encode_structure({"w": np.zeros(2), "b": np.zeros(1)})
    >>> t, tl = encode_structure({"w": np.zeros(3)})
    >>> match_structure(f, t, fl, tl)[1]
    ["['w']: the file has float64[2], the target has float64[3]", \
"['b']: in the file but not in the target (partial=True skips it)"]
    """
    try:
        m = _Matcher(file_spec["root"], file_arrays, target_arrays, partial)
        m.walk(file_spec["root"], target_spec["root"], "", 0)
    except (IndexError, KeyError, TypeError, AttributeError, RecursionError) as e:
        raise FileFormatError(f"invalid tree structure: {type(e).__name__}: {e}") from None
    return m.plan, m.problems


def decode_plain_value(v: Any) -> Any:
    """Decode a JSON value that needs no registry (see :func:`match_structure`)."""
    return Decoder({}, iter(()), None).value(v)
