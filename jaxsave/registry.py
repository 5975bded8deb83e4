"""The saveable registry: Python objects that files may name.

jaxsave never pickles. A value that is not an array (an activation function, a
module class, a namedtuple type, an enum) is written to a file by *name*, and a
file's names are turned back into objects only through this registry: loading a
file never imports a module and never looks up an attribute the file chose.

Register your own objects with :func:`register_saveable` or the :func:`saveable`
decorator (the default name is ``module.qualname``):

>>> import jaxsave
>>> @jaxsave.saveable
... def swish(x):
...     return x / (1 + 2.718281828 ** -x)
>>> jaxsave.registry.saveable_name(swish)
'jaxsave.registry.swish'
>>> jaxsave.registry.resolve_saveable("jaxsave.registry.swish") is swish
True

Built in, without registration:

* the activation functions of ``jax.nn`` (``"jax.nn.relu"``, ...), a few
  element-wise ``jax.numpy`` functions, ``jax.lax.dot_general`` and a few helpers
  of equinox and flax that their modules store as fields;
* *types* (classes, never functions) defined in ``jax``, ``flax``, ``optax``,
  ``equinox``, ``haiku`` and ``chex``, resolved only if the module that defines
  them is already imported, and only if the type is a namedtuple, an enum or a
  registered pytree node (so optax states, Equinox modules and Flax containers
  load in a fresh process).

Types that define a saved tree's structure (namedtuples, dataclasses, modules)
are registered automatically when a tree is saved, so a file always loads in the
process that wrote it; another process must register them (or load with
``like=``, which takes the classes from the target).
"""

from __future__ import annotations

import enum
import sys
import threading
from collections.abc import Callable, Mapping
from typing import Any, TypeVar, overload

import jax

from jaxsave.errors import UnregisteredNameError

__all__ = [
    "register_saveable",
    "saveable",
    "saveable_name",
    "resolve_saveable",
    "unregister_saveable",
]

T = TypeVar("T")

#: Packages whose already-imported pytree/namedtuple/enum types resolve by name.
TRUSTED_PACKAGES = ("jax", "flax", "optax", "equinox", "haiku", "chex")

_lock = threading.RLock()
_by_name: dict[str, Any] = {}
_name_by_id: dict[int, str] = {}
_auto_names: set[str] = set()
_builtins_done: set[str] = set()


def canonical_name(obj: Any) -> str:
    """``module.qualname`` of a function or class (the default registered name)."""
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    if not isinstance(module, str) or not isinstance(qualname, str):
        raise TypeError(f"{obj!r} has no __module__/__qualname__: register it with an explicit name")
    return f"{module}.{qualname}"


def _same_definition(a: Any, b: Any) -> bool:
    """Whether ``b`` looks like a re-definition of ``a`` (module reload, notebook cell)."""
    try:
        return canonical_name(a) == canonical_name(b)
    except TypeError:
        return False


def _register(obj: Any, name: str, *, auto: bool) -> None:
    with _lock:
        old = _by_name.get(name, _MISSING)
        if old is not _MISSING and old is not obj:
            replaceable = name in _auto_names or _same_definition(old, obj)
            if auto and name not in _auto_names:
                return  # never let an automatic registration shadow an explicit one
            if not replaceable:
                raise ValueError(
                    f"the saveable name {name!r} is already registered for {old!r}; "
                    "pick another name= or unregister_saveable() it first"
                )
            if _name_by_id.get(id(old)) == name:
                del _name_by_id[id(old)]
        _by_name[name] = obj
        _name_by_id.setdefault(id(obj), name)
        if auto:
            _auto_names.add(name)
        else:
            _auto_names.discard(name)


def register_saveable(obj: T, name: str | None = None) -> T:
    """Allow ``obj`` (function, class, enum, sentinel) to be saved and loaded by name.

    ``name`` defaults to ``module.qualname``. An object saves under the first
    name it was registered with; later names are aliases that also load (useful
    after renaming a class). Registering a re-definition of an object under the
    same name (a reloaded module, a re-run notebook cell) replaces it; any other
    clash is a ``ValueError``. Returns ``obj``.

    >>> import jaxsave, enum
    >>> class Mode(enum.Enum):
    ...     TRAIN = 1
    >>> jaxsave.register_saveable(Mode, name="doc.Mode") is Mode
    True
    >>> jaxsave.registry.resolve_saveable("doc.Mode") is Mode
    True
    """
    if name is None:
        name = canonical_name(obj)
    if not isinstance(name, str) or not name:
        raise ValueError(f"a saveable name must be a non-empty string, got {name!r}")
    _load_builtins()  # a built-in's name is taken even before its group was first looked up
    _register(obj, name, auto=False)
    return obj


@overload
def saveable(obj: T) -> T: ...
@overload
def saveable(*, name: str | None = None) -> Callable[[T], T]: ...
def saveable(obj: Any = None, *, name: str | None = None) -> Any:
    """Decorator form of :func:`register_saveable`: ``@saveable`` or ``@saveable(name=...)``.

    >>> import jaxsave
    >>> @jaxsave.saveable(name="doc.gelu_approx")
    ... def gelu_approx(x):
    ...     return x
    >>> jaxsave.registry.saveable_name(gelu_approx)
    'doc.gelu_approx'
    """
    if obj is None:
        return lambda o: register_saveable(o, name)
    return register_saveable(obj, name)


def unregister_saveable(name: str) -> None:
    """Forget a registered name (mainly for tests). Unknown names are ignored."""
    with _lock:
        obj = _by_name.pop(name, _MISSING)
        _auto_names.discard(name)
        if obj is not _MISSING and _name_by_id.get(id(obj)) == name:
            del _name_by_id[id(obj)]
            for other, o in _by_name.items():  # fall back to an alias
                if o is obj:
                    _name_by_id[id(obj)] = other
                    break


def saveable_name(obj: Any) -> str | None:
    """The name ``obj`` is saved under, or ``None`` if it is not registered."""
    name = _name_by_id.get(id(obj))
    if name is None:
        _load_builtins()
        name = _name_by_id.get(id(obj))
    return name


def type_name(cls: type) -> str:
    """The name a *structure* type is saved under; registers it automatically if needed."""
    name = saveable_name(cls)
    if name is None:
        name = canonical_name(cls)
        _register(cls, name, auto=True)
        name = _name_by_id.get(id(cls), name)
    return name


def resolve_saveable(name: str) -> Any:
    """The object registered as ``name``; :class:`UnregisteredNameError` if none is."""
    found, missing = resolve_all([name])
    if missing:
        raise UnregisteredNameError(missing_names_message(missing))
    return found[name]


def resolve_all(names: Any) -> tuple[dict[str, Any], list[str]]:
    """Resolve many names at once: ``(found, missing)``."""
    found: dict[str, Any] = {}
    missing: list[str] = []
    for name in names:
        obj = _by_name.get(name, _MISSING)
        if obj is _MISSING:
            _load_builtins()
            obj = _by_name.get(name, _MISSING)
        if obj is _MISSING:
            obj = _library_type(name)
        if obj is _MISSING:
            missing.append(name)
        else:
            found[name] = obj
    return found, sorted(set(missing))


def missing_names_message(missing: list[str]) -> str:
    """The error text for names that a file uses but this process has not registered."""
    listed = "\n".join(f"  - {n}" for n in missing)
    return (
        f"the file names {len(missing)} object(s) that are not registered in this process:\n"
        f"{listed}\n"
        "Register each with jaxsave.register_saveable(obj, name=...) or decorate its "
        "definition with @jaxsave.saveable (import the module that defines it first), "
        "or load with like=<a tree of the expected structure>."
    )


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


_MISSING = _Missing()


def _library_type(name: str) -> Any:
    """A namedtuple/enum/pytree-node type defined in an imported trusted package, or missing.

    Only dictionaries are read: ``sys.modules``, then the ``__dict__`` of the
    module and of the classes the name walks through. No attribute of a module
    is ever looked up (a module's ``__getattr__``, such as jax's lazy loader of
    ``jax.scipy.*``, would import a module the file chose).
    """
    if "<" in name or name.split(".", 1)[0] not in TRUSTED_PACKAGES:
        return _MISSING
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        module = sys.modules.get(".".join(parts[:i]))
        if module is None:
            continue
        obj: Any = module
        for k, attr in enumerate(parts[i:]):
            if k and not isinstance(obj, type):
                return _MISSING  # below the module, the name walks through classes only
            namespace = object.__getattribute__(obj, "__dict__")  # the object's own dict: no __getattr__
            obj = namespace.get(attr, _MISSING) if isinstance(namespace, Mapping) else _MISSING
            if obj is _MISSING:
                return _MISSING
        ok_type = isinstance(obj, type) and (
            (issubclass(obj, tuple) and "_fields" in _class_attrs(obj))
            or issubclass(obj, enum.Enum)
            or jax.tree_util.default_registry.is_node(obj)
        )
        if ok_type and _defined_name(obj) == name:
            _register(obj, name, auto=True)
            return obj
        return _MISSING
    return _MISSING


def _class_attrs(cls: type) -> set[str]:
    """Names defined in the class dicts of ``cls``'s MRO (read without attribute access)."""
    return {k for c in type.__getattribute__(cls, "__mro__") for k in vars(c)}


def _defined_name(cls: type) -> str | None:
    """``module.qualname`` of a class, read from the class itself (no metaclass ``__getattr__``)."""
    module = vars(cls).get("__module__")
    qualname = type.__getattribute__(cls, "__qualname__")
    return f"{module}.{qualname}" if isinstance(module, str) and isinstance(qualname, str) else None


_JNP_FUNCTIONS = (
    "abs",
    "arctan",
    "arcsinh",
    "cos",
    "cosh",
    "exp",
    "expm1",
    "log",
    "log1p",
    "maximum",
    "minimum",
    "negative",
    "reciprocal",
    "sign",
    "sin",
    "sinh",
    "sqrt",
    "square",
    "tanh",
)


def _builtin_objects() -> dict[str, dict[str, Any]]:
    """Per trigger module: ``{name: object}`` to pre-register, if it is imported."""
    out: dict[str, dict[str, Any]] = {}
    if "jax" in sys.modules:
        import jax.nn
        import jax.numpy as jnp

        # Module dicts, not getattr: a module's __getattr__ may import (see _library_type).
        objs = {
            f"jax.nn.{n}": v
            for n, v in sorted(vars(jax.nn).items())
            if not n.startswith("_") and callable(v) and not isinstance(v, type)
        }
        objs.update({f"jax.numpy.{n}": vars(jnp)[n] for n in _JNP_FUNCTIONS if n in vars(jnp)})
        objs["jax.lax.dot_general"] = jax.lax.dot_general
        objs["jax.lax.Precision"] = jax.lax.Precision
        out["jax"] = objs
    mlp = sys.modules.get("equinox.nn._mlp")
    flat = sys.modules.get("equinox._module._flatten")
    if mlp is not None and flat is not None:
        objs = {}
        if hasattr(mlp, "_identity"):
            objs["equinox.nn.MLP.identity"] = mlp._identity
        if hasattr(flat, "MISSING"):
            objs["equinox.MISSING"] = flat.MISSING
        out["equinox._module._flatten"] = objs
    dtypes = sys.modules.get("flax.nnx.nn.dtypes")
    if dtypes is not None and hasattr(dtypes, "promote_dtype"):
        out["flax.nnx.nn.dtypes"] = {"flax.nnx.nn.dtypes.promote_dtype": dtypes.promote_dtype}
    typing_ = sys.modules.get("flax.typing")
    if typing_ is not None and hasattr(typing_, "HashableMapping"):
        out["flax.typing"] = {"flax.typing.HashableMapping": typing_.HashableMapping}
    return out


#: Modules whose import makes a group of built-in saveables available.
_BUILTIN_TRIGGERS = ("jax", "equinox._module._flatten", "flax.nnx.nn.dtypes", "flax.typing")


def _load_builtins() -> None:
    if not _builtins_done:
        with _lock:
            for cls in (bool, int, float, complex, str, bytes, list, tuple, dict, set, frozenset):
                _by_name.setdefault(f"builtins.{cls.__name__}", cls)
                _name_by_id.setdefault(id(cls), f"builtins.{cls.__name__}")
            _builtins_done.add("builtins")
    pending = [p for p in _BUILTIN_TRIGGERS if p in sys.modules and p not in _builtins_done]
    if not pending:
        return
    with _lock:
        for group, objs in _builtin_objects().items():
            if group in _builtins_done:
                continue
            for name, obj in objs.items():
                if name not in _by_name:
                    _register(obj, name, auto=False)
        _builtins_done.update(pending)
