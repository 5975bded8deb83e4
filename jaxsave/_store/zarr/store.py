"""Opening a Zarr store (a path, a URL, a store or group object) and its raw keys.

``zarr`` is imported here, lazily: ``import jaxsave`` works without it, and the first
use of a Zarr store without it raises an ``ImportError`` that says how to install it.
zarr-python writes every key of a local store atomically (a temporary file, then a
rename) from 3.1.3 on, which the crash safety of :class:`jaxsave.ZarrCollector`
relies on (a chunk not yet full is written whole at each commit:
a torn chunk file after SIGKILL would lose counted draws); older versions are refused.

A local directory is opened through a confined store (:func:`confined_store`): it reads
and writes only regular files below its root, by paths without symbolic links
(:mod:`jaxsave._store.zarr.confined`), so a hostile store (a chunk or ``zarr.json`` that is
a symlink out of it, a FIFO, ``/dev/zero``) raises a :class:`jaxsave.FileFormatError`
instead of reading outside the store or hanging.
"""

from __future__ import annotations

import asyncio
import os
import re
import stat
from collections.abc import Sequence
from typing import Any, NamedTuple

from jaxsave._core.paths import absolute
from jaxsave._store.location import ZARR_JSON, describe, is_url, is_zarr_object
from jaxsave._store.zarr.confined import (
    PROC_FD,
    check_confined_parents,
    list_confined,
    read_confined,
    stat_confined,
    write_confined,
)

#: How to get zarr.
INSTALL_HINT = "pip install 'jaxsave[zarr]'"
#: The first zarr-python whose LocalStore writes keys atomically (zarr-python PR 3412).
MIN_ZARR = (3, 1, 3)
#: The class names of zarr's local store and of :func:`confined_store`'s.
LOCAL_STORES = ("LocalStore", "ConfinedLocalStore")


def require_zarr() -> Any:
    """The ``zarr`` module, or an ``ImportError`` naming the fix."""
    try:
        import zarr
    except ImportError as error:
        raise ImportError(
            f"Zarr stores need the zarr package (zarr>={'.'.join(map(str, MIN_ZARR))}): {INSTALL_HINT}"
        ) from error
    numbers = [int(n) for n in re.findall(r"\d+", str(zarr.__version__))[:3]]
    if tuple(numbers) < MIN_ZARR:
        raise ImportError(
            f"zarr {zarr.__version__} is installed; jaxsave needs zarr>={'.'.join(map(str, MIN_ZARR))}, "
            f"whose local stores write each key atomically: {INSTALL_HINT}"
        )
    return zarr


class Location(NamedTuple):
    """An opened store: the store object, the key prefix of the root group, a local directory
    (``None`` for object storage and memory) and how messages name it."""

    store: Any
    prefix: str
    local: str | None
    name: str

    def key(self, key: str) -> str:
        return self.prefix + key


def local_directory(source: Any) -> str | None:
    """The local directory of ``source`` (a path, a ``file://`` URL, a ``LocalStore``), else ``None``."""
    if isinstance(source, (str, os.PathLike)) and not is_url(source):
        return _absolute(os.fspath(source))
    if isinstance(source, str) and source.startswith("file://"):
        return _absolute(source[len("file://") :])
    root = getattr(source, "root", None)
    if is_zarr_object(source) and type(source).__name__ in LOCAL_STORES and root is not None:
        return _absolute(os.fspath(root))
    return None


def _absolute(path: str) -> str:
    """``path`` from the current directory, as written (:func:`~jaxsave._core.paths.absolute`)."""
    if not path:
        raise ValueError("a Zarr store's path is empty")
    return absolute(path)


def identity(source: Any) -> str:
    """What names the store of ``source`` in this process (for one writer per store): a local
    directory's real path, a URL, or the object (a memory store's dictionary) and the group path."""
    local = local_directory(source)
    if local is not None:
        return os.path.realpath(local)
    if isinstance(source, str):
        return source.rstrip("/")
    store, path = source, ""
    if hasattr(source, "store") and hasattr(source, "path") and hasattr(source, "attrs"):  # a Group
        store, path = source.store, source.path
    root = local_directory(store)
    if root is not None:
        return os.path.realpath(os.path.join(root, path))
    fs = getattr(store, "fs", None)
    if fs is not None and hasattr(store, "path"):
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        where = f"{protocol}://{str(store.path).strip('/')}"
    else:
        where = f"object-{id(getattr(store, '_store_dict', store))}"
    return f"{where}/{path}".rstrip("/")


def store_argument(source: Any, mode: str = "r") -> Any:
    """What to hand ``zarr.open_group`` for ``source``: a local directory (a path, a ``file://``
    URL, a plain ``LocalStore``) as a :func:`confined_store`, others as given."""
    local = local_directory(source)
    if local is not None and (not is_zarr_object(source) or type(source).__name__ == "LocalStore"):
        read_only = mode == "r" or bool(getattr(source, "read_only", False))
        return confined_store(local, read_only=read_only)
    return source


def put_keys(store: Any, items: Sequence[tuple[str, Any]]) -> None:
    """Write raw keys ``(key, bytes-like)`` of ``store`` (full keys, with the group's prefix): a
    confined local store's by :func:`write_confined`, one after the other in this thread (no
    event loop, no thread hop: less than half the CPU of zarr's ``set`` a small key); any
    other's through zarr, all at once."""
    put = getattr(store, "put_confined", None)
    if put is not None:
        for key, data in items:
            put(key, data)
        return
    if not items:
        return
    from zarr.core.buffer import default_buffer_prototype

    buffer = default_buffer_prototype().buffer

    async def every() -> None:
        await asyncio.gather(*(store.set(key, buffer.from_array_like(data)) for key, data in items))

    _sync(every())


_CONFINED: Any = None


def confined_store(root: str, read_only: bool = False) -> Any:
    """A ``zarr.storage.LocalStore`` of ``root`` that reads, sizes and writes keys only as
    regular files below ``root`` reached without symbolic links (:func:`read_confined`)."""
    global _CONFINED
    if _CONFINED is None:
        _CONFINED = _confined_class(require_zarr())
    return _CONFINED(root, read_only=read_only)


def _confined_class(zarr: Any) -> Any:
    from zarr.core.buffer import default_buffer_prototype

    class ConfinedLocalStore(zarr.storage.LocalStore):  # type: ignore[misc, name-defined]
        """A ``LocalStore`` that never follows a symbolic link nor reads a FIFO or a device."""

        def _root(self) -> str:
            return os.fspath(self.root)

        def _real_root(self) -> str | None:
            real = self.__dict__.get("_jaxsave_real_root")
            if real is None and os.path.isdir(PROC_FD):
                real = self.__dict__["_jaxsave_real_root"] = os.path.realpath(self._root())
            return real

        async def _opened(self) -> None:
            ensure = getattr(self, "_ensure_open", None)
            if ensure is not None:
                await ensure()
            elif not self._is_open:
                await self._open()

        def _buffer(self, data: bytes | None, prototype: Any) -> Any:
            if data is None:
                return None
            return (prototype or default_buffer_prototype()).buffer.from_bytes(data)

        async def get(self, key: str, prototype: Any = None, byte_range: Any = None) -> Any:
            await self._opened()
            data = await asyncio.to_thread(read_confined, self._root(), key, byte_range, self._real_root())
            return self._buffer(data, prototype)

        def get_sync(self, key: str, *, prototype: Any = None, byte_range: Any = None) -> Any:
            self._ensure_open_sync()
            data = read_confined(self._root(), key, byte_range, self._real_root())
            return self._buffer(data, prototype)

        async def get_partial_values(self, prototype: Any, key_ranges: Any) -> list[Any]:
            await self._opened()
            root, real = self._root(), self._real_root()
            reads = [asyncio.to_thread(read_confined, root, k, r, real) for k, r in key_ranges]
            return [self._buffer(data, prototype) for data in await asyncio.gather(*reads)]

        async def exists(self, key: str) -> bool:
            found = stat_confined(self._root(), key)
            return found is not None and stat.S_ISREG(found.st_mode)

        async def list_prefix(self, prefix: str) -> Any:
            for key in await asyncio.to_thread(list_confined, self._root(), prefix):
                yield key

        async def list(self) -> Any:
            for key in await asyncio.to_thread(list_confined, self._root(), ""):
                yield key

        async def getsize(self, key: str) -> int:
            found = stat_confined(self._root(), key)
            if found is None:
                raise FileNotFoundError(os.path.join(self._root(), key))
            return int(found.st_size)

        async def _set(self, key: str, value: Any, exclusive: bool = False) -> None:
            if exclusive:  # zarr's "if not exists" (a link, refused if the key exists)
                check_confined_parents(self._root(), key, self._real_root())
                await super()._set(key, value, exclusive=exclusive)
                return
            await self._opened()
            self._check_writable()
            await asyncio.to_thread(self.put_confined, key, value.as_buffer_like())

        def set_sync(self, key: str, value: Any) -> None:
            self.put_confined(key, value.as_buffer_like())

        def put_confined(self, key: str, data: Any) -> None:
            """Write ``key`` in this thread (:func:`write_confined`)."""
            self._ensure_open_sync()
            self._check_writable()
            write_confined(self._root(), key, data, self._real_root())

    ConfinedLocalStore.__name__ = ConfinedLocalStore.__qualname__ = "ConfinedLocalStore"
    return ConfinedLocalStore


def open_group(source: Any, mode: str, storage_options: dict | None = None) -> tuple[Any, Location]:
    """``zarr.open_group`` of ``source`` (a group object is used as it is), and its :class:`Location`.

    ``mode`` is zarr's: ``"r"``, ``"r+"``, ``"a"`` or ``"w"`` (which deletes what is there).
    """
    zarr = require_zarr()
    if isinstance(source, zarr.Group):
        group = source
    else:
        local = local_directory(source)
        if mode == "w" and local is not None and os.path.islink(local):  # zarr cannot delete a link
            raise FileExistsError(
                f"{describe(source)} is a symbolic link (to {os.readlink(local)!r}); creating a store "
                "there would first delete what the link is: give the directory it points to instead"
            )
        options: dict[str, Any] = {}
        if storage_options and is_url(source):
            options["storage_options"] = storage_options
        if mode != "w":  # the arrays' own metadata, never the root's copy (stale while shapes change)
            options["use_consolidated"] = False
        group = zarr.open_group(store=store_argument(source, mode), mode=mode, zarr_format=3, **options)
    prefix = f"{group.path}/" if group.path else ""
    local = local_directory(source)
    if local is None and type(group.store).__name__ in LOCAL_STORES:
        local = local_directory(group.store)
    if local is not None and prefix:
        local = os.path.join(local, group.path)
    return group, Location(group.store, prefix, local, describe(source))


#: The temporary files zarr-python's LocalStore writes a key to before renaming it into place.
_PARTIAL = re.compile(r"\.[0-9a-f]{32}\.partial$")


def remove_stale_temporaries(directory: str) -> int:
    """Delete the temporaries that writers killed mid-write left in a local store; returns how many.

    Only for a writer that holds the store alone (its lock): another live writer's
    temporary would be deleted under it.
    """
    removed = 0
    for root, _, files in os.walk(directory):
        for name in files:
            if _PARTIAL.search(name):
                try:
                    os.unlink(os.path.join(root, name))
                    removed += 1
                except FileNotFoundError:
                    pass
    return removed


def consolidate(location: Location) -> None:
    """Copy every node's metadata into the root's ``zarr.json``, so that xarray opens the store
    in one read and without a warning. Only once the shapes no longer change (a reader of the
    copy would not see a resize); :func:`drop_consolidated` removes it before they change again."""
    import warnings

    zarr = require_zarr()
    with warnings.catch_warnings():  # "not part of the Zarr format 3 specification" (yet): known
        warnings.simplefilter("ignore", UserWarning)
        zarr.consolidate_metadata(location.store, path=location.prefix.rstrip("/") or None, zarr_format=3)


def drop_consolidated(location: Location) -> None:
    """Remove the copy of :func:`consolidate` from the root's ``zarr.json`` (one atomic put)."""
    import json

    raw = get_bytes(location, ZARR_JSON)
    if raw is None:
        return
    meta = json.loads(raw)
    if isinstance(meta, dict) and meta.pop("consolidated_metadata", None) is not None:
        set_bytes(location, ZARR_JSON, json.dumps(meta, indent=2).encode())


def _sync(coroutine: Any) -> Any:
    from zarr.core.sync import sync

    return sync(coroutine)


def get_bytes(location: Location, key: str) -> bytes | None:
    """The bytes of raw key ``key`` (below the root group), ``None`` if there is none."""
    from zarr.core.buffer import default_buffer_prototype

    buffer = _sync(location.store.get(location.key(key), prototype=default_buffer_prototype()))
    return None if buffer is None else buffer.to_bytes()


def set_bytes(location: Location, key: str, data: bytes) -> None:
    """Write raw key ``key``: one put (atomic on local stores from zarr 3.1.3, on object storage)."""
    from zarr.core.buffer import default_buffer_prototype

    _sync(location.store.set(location.key(key), default_buffer_prototype().buffer.from_bytes(data)))


def has_key(location: Location, key: str) -> bool:
    return bool(_sync(location.store.exists(location.key(key))))


def list_keys(location: Location, prefix: str) -> list[str]:
    """The raw keys below ``prefix`` (relative to the root group), sorted."""

    async def collect() -> list[str]:
        return [k async for k in location.store.list_prefix(location.key(prefix))]

    return sorted(k[len(location.prefix) :] for k in _sync(collect()))


def list_root(location: Location) -> list[str]:
    """The names directly below the root group (keys and prefixes)."""

    async def collect() -> list[str]:
        return [k async for k in location.store.list_dir(location.prefix.rstrip("/"))]

    return sorted(_sync(collect()))
