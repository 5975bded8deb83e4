"""Storage formats for :func:`jaxsave.save_pytree`: one module per format.

Every format stores the same *document*: a JSON header (format version, jaxsave
version, tree structure, the name/dtype/shape of each array leaf, user metadata)
and the array leaves as raw arrays of natively storable dtypes (see
:mod:`jaxsave._core.dtypes`). What a format module provides is the
:class:`~jaxsave._serialize.formats.base.Format` protocol: ``write(target, header,
arrays)`` and ``Reader(target)`` with ``.header`` (``None`` for a foreign file),
``.check_arrays(specs)``, ``.read(indices, specs)``, ``.close()`` and, for formats
other programs write, ``.foreign_specs()``.

Readers bound every size they read from the file before allocating memory.
"""

from __future__ import annotations

import os
from typing import Any, cast

from jaxsave._serialize.formats.base import Format
from jaxsave.errors import FileFormatError

FORMATS = ("jaxsave", "safetensors", "npz", "hdf5")
_SUFFIXES = {".safetensors": "safetensors", ".npz": "npz", ".h5": "hdf5", ".hdf5": "hdf5"}
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


def format_module(name: str) -> Format:
    """The module implementing format ``name``."""
    if name not in FORMATS:
        raise ValueError(f"unknown format {name!r}; choose one of {', '.join(FORMATS)}")
    if name == "jaxsave":
        from jaxsave._serialize.formats import native

        return cast(Format, native)
    if name == "safetensors":
        from jaxsave._serialize.formats import safetensors_format

        return cast(Format, safetensors_format)
    if name == "npz":
        from jaxsave._serialize.formats import npz

        return cast(Format, npz)
    from jaxsave._serialize.formats import hdf5

    return cast(Format, hdf5)


def format_for_path(path: Any, format: str | None) -> str:
    """The format to *write*: ``format`` if given, else from the file suffix (default jaxsave)."""
    if format is not None:
        format_module(format)
        return format
    if isinstance(path, (str, os.PathLike)):
        return _SUFFIXES.get(os.path.splitext(os.fspath(path))[1].lower(), "jaxsave")
    return "jaxsave"


def sniff(head: bytes, path: Any, format: str | None) -> str:
    """The format to *read*, from the file's first bytes (``format`` must agree)."""
    from jaxsave._serialize.formats.native import MAGIC

    if head.startswith(MAGIC):
        found = "jaxsave"
    elif head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        found = "npz"
    elif head.startswith(_HDF5_MAGIC):
        found = "hdf5"
    elif len(head) >= 9 and head[8:9] == b"{":
        found = "safetensors"
    elif head[:8] == b"\x80\x04\x95" or head[:1] == b"\x80":
        raise FileFormatError("the file is a Python pickle; jaxsave never loads pickles")
    else:
        raise FileFormatError(f"not a file jaxsave can read (starts with {head[:8]!r})")
    if format is not None and format != found:
        format_module(format)
        raise FileFormatError(f"the file is in the {found} format, not {format}")
    return found
