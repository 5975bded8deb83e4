"""``.safetensors`` through the ``safetensors`` library (an optional extra).

Tensors are named by the leaves' readable key paths (``params.dense.kernel``);
the jaxsave header goes into the safetensors ``__metadata__`` under
``"jaxsave"``. safetensors has no complex dtypes and its numpy API no bfloat16,
so complex arrays are stored as a real view with a trailing axis of 2 and
ml_dtypes arrays as unsigned views of equal width; the header records the real
dtype. A safetensors file written by another tool loads as a flat dict.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Sequence
from typing import Any, BinaryIO

import numpy as np

from jaxsave._core.dtypes import storage_dtype
from jaxsave._serialize.formats.base import MAX_HEADER_BYTES, Specs
from jaxsave.errors import FileFormatError

_ST_DTYPES = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "U16": "uint16",
    "I16": "int16",
    "U32": "uint32",
    "I32": "int32",
    "U64": "uint64",
    "I64": "int64",
    "F16": "float16",
    "F32": "float32",
    "F64": "float64",
}


def _library() -> Any:
    try:
        import safetensors.numpy
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the .safetensors format needs `pip install safetensors`") from e
    return safetensors


def _to_tensor(a: np.ndarray) -> np.ndarray:
    if a.dtype.kind == "c":
        return a.reshape(a.shape + (1,)).view(np.float32 if a.dtype.itemsize == 8 else np.float64)
    return a


def write(target: str | BinaryIO, header: dict[str, Any], arrays: Sequence[np.ndarray]) -> None:
    st = _library()
    tensors = {name: _to_tensor(a) for name, a in zip(header["leaves"]["names"], arrays)}
    metadata = {"jaxsave": json.dumps(header, separators=(",", ":"))}
    if isinstance(target, (str, os.PathLike)):
        try:
            st.numpy.save_file(tensors, target, metadata=metadata)
        except Exception as error:  # safetensors raises its own type for I/O errors: make it an OSError
            if type(error).__name__ != "SafetensorError":
                raise
            code = re.search(r"os error (\d+)", str(error))
            raise OSError(int(code.group(1)) if code else None, f"{error}: {os.fspath(target)}") from error
    else:
        target.write(st.numpy.save(tensors, metadata=metadata))


class Reader:
    """Read a safetensors file: header by hand (bounded), tensors through the library."""

    def __init__(self, target: str | BinaryIO):
        st = _library()
        if isinstance(target, (str, os.PathLike)):
            with open(target, "rb") as f:
                raw = self._read_st_header(f)
            try:
                self._file = st.safe_open(os.fspath(target), framework="numpy")
            except Exception as e:
                raise FileFormatError(f"safetensors refused the file: {e}") from None
            self._get = self._file.get_tensor
        else:
            start = target.tell()
            raw = self._read_st_header(target)
            target.seek(start)
            try:
                tensors = st.numpy.load(target.read())
            except Exception as e:
                raise FileFormatError(f"safetensors refused the file: {e}") from None
            self._get = tensors.__getitem__
        self._entries = {k: v for k, v in raw.items() if k != "__metadata__"}
        meta = raw.get("__metadata__") or {}
        self.header = None
        if isinstance(meta, dict) and isinstance(meta.get("jaxsave"), str):
            try:
                self.header = json.loads(meta["jaxsave"])
            except (ValueError, RecursionError) as e:
                raise FileFormatError(f"the jaxsave metadata is not valid JSON: {e}") from None

    @staticmethod
    def _read_st_header(f: BinaryIO) -> dict[str, Any]:
        prefix = f.read(8)
        if len(prefix) != 8:
            raise FileFormatError("not a safetensors file (truncated)")
        (n,) = struct.unpack("<Q", prefix)
        if n > MAX_HEADER_BYTES:
            raise FileFormatError(f"safetensors header of {n} bytes exceeds the limit")
        text = f.read(n)
        try:
            raw = json.loads(text)
        except (ValueError, RecursionError) as e:
            raise FileFormatError(f"the safetensors header is not valid JSON: {e}") from None
        if len(text) != n or not isinstance(raw, dict):
            raise FileFormatError("the safetensors header is truncated or malformed")
        return raw

    def foreign_specs(self) -> list[tuple[str, tuple[int, ...], str]]:
        out = []
        for name, e in self._entries.items():
            if not isinstance(e, dict) or e.get("dtype") not in _ST_DTYPES:
                raise FileFormatError(f"tensor {name!r} has an unsupported dtype")
            out.append((name, tuple(e.get("shape", ())), _ST_DTYPES[e["dtype"]]))
        return out

    def check_arrays(self, specs: Specs, names: Sequence[str]) -> None:
        for name, (shape, dtype) in zip(names, specs):
            e = self._entries.get(name)
            store = storage_dtype(dtype)
            want_dtype, want_shape = store.name, list(shape)
            if store.kind == "c":
                want_dtype, want_shape = f"float{store.itemsize * 4}", want_shape + [2]
            if (
                not isinstance(e, dict)
                or _ST_DTYPES.get(str(e.get("dtype"))) != want_dtype
                or e.get("shape") != want_shape
            ):
                raise FileFormatError(f"tensor {name!r} is missing or differs from the header")

    def read(self, indices: Sequence[int], specs: Specs, names: Sequence[str]) -> list[np.ndarray]:
        out = []
        for i in indices:
            shape, dtype = specs[i]
            arr = np.asarray(self._get(names[i]))
            if storage_dtype(dtype).kind == "c":
                arr = np.ascontiguousarray(arr).view(storage_dtype(dtype)).reshape(shape)
            out.append(arr)
        return out

    def close(self) -> None:
        self._get = None
        self._file = None
