"""What an HDF5 file jaxsave did not write itself may hold before it is read.

HDF5 lets a dataset take its bytes from outside the file: *external storage*
(raw bytes of any path: a secret, a FIFO that blocks the reader, ``/dev/zero``),
*external links* and *soft links* (objects of other files, or aliases), *virtual
datasets* (datasets of other files), and *filters* (plugins loaded by number,
decompression that expands a few stored bytes into gigabytes). Every jaxsave
reader of HDF5 files (pytree ``.h5`` files, sample files, the sources of a merged
file) calls :func:`check_file` right after opening one, before reading any data:

* every link is a hard link (no soft, external or user-defined links);
* every dataset is stored in the file (compact, contiguous or chunked layout,
  no external storage) with only the filters jaxsave writes (deflate or LZF,
  shuffle, Fletcher-32), at most one of them compressing;
* virtual datasets only in a file that :func:`jaxsave.merge` wrote, each
  mapping the same dataset of a source that ``jaxsave_merged_from`` names by a
  relative path, one mapping per source; each source is a regular file (no FIFO
  or device), a jaxsave sample file, and passes these checks itself with no
  virtual dataset at all (so the check recurses one level, never more).

:func:`stored_bytes` bounds what a read of a checked dataset can produce, for
the size guards of the readers.
"""

from __future__ import annotations

import json
import os
import stat

import h5py

from jaxsave._core.paths import absolute, same_file
from jaxsave._store import schema
from jaxsave._store.hdf5 import superblock as _superblock
from jaxsave.errors import FileFormatError

__all__ = ["check_file", "stored_bytes", "open_source"]

#: Filters jaxsave's writers use, with the most each can expand the bytes it stores
#: (deflate at most about 1032:1, LZF about 90:1; shuffle and the checksum not at all).
FILTER_EXPANSION = {
    h5py.h5z.FILTER_DEFLATE: 1100,
    h5py.h5z.FILTER_LZF: 100,
    h5py.h5z.FILTER_SHUFFLE: 1,
    h5py.h5z.FILTER_FLETCHER32: 1,
}
_MAX_EXPANSION = max(FILTER_EXPANSION.values())
_LAYOUTS = (h5py.h5d.COMPACT, h5py.h5d.CONTIGUOUS, h5py.h5d.CHUNKED)
_LINK_KINDS = {h5py.h5l.TYPE_SOFT: "a soft link", h5py.h5l.TYPE_EXTERNAL: "an external link"}
MERGED_FROM = schema.MERGED_FROM


def expansion(dcpl: h5py.h5p.PropDCID, name: str = "") -> int:
    """How many times its stored size a dataset with these creation properties can read as.

    Raises :class:`FileFormatError` for a filter jaxsave does not write (HDF5
    would load a plugin for an unknown one) or more than one compressing filter
    (a decompression bomb).
    """
    ratio = 1
    for i in range(dcpl.get_nfilters()):
        code, _, _, label = dcpl.get_filter(i)
        if code not in FILTER_EXPANSION:
            raise FileFormatError(
                f"dataset {name!r} uses the HDF5 filter {code} "
                f"({label.decode(errors='replace')!r}), "
                "which jaxsave never writes"
            )
        ratio *= FILTER_EXPANSION[code]
    if ratio > _MAX_EXPANSION:
        raise FileFormatError(f"dataset {name!r} is compressed more than once (a decompression bomb)")
    return ratio


def check_file(f: h5py.File, where: str, *, merged: bool = False) -> None:
    """Refuse ``f`` (opened for reading) if any of its data lives outside it; see the module doc.

    With ``merged``, virtual datasets are allowed if the root attribute
    ``jaxsave_merged_from`` lists their sources, which are then checked too (and
    may hold none).
    """
    links: list[tuple[bytes, int]] = []
    f.id.links.visit(lambda name, info: links.append((name, info.type)), info=True)  # never raise in there
    sources = _merged_from(f, where) if merged and MERGED_FROM in f.attrs else None
    for raw, kind in links:
        name = raw.decode("utf-8", "replace")
        if kind != h5py.h5l.TYPE_HARD:
            what = _LINK_KINDS.get(kind, f"a user-defined link (type {kind})")
            raise FileFormatError(
                f"{where}: {name!r} is {what}; jaxsave reads only objects stored in the file"
            )
        oid = h5py.h5o.open(f.id, raw)
        if h5py.h5i.get_type(oid) == h5py.h5i.DATASET:
            _check_dataset(oid.get_create_plist(), name, where, sources)
    if sources:
        base = _directory(f)
        for source in sources:
            _check_found_from_here(f, source, where)
            with open_source(os.path.join(base, source), where) as s:
                if schema.FORMAT not in s.attrs:
                    raise FileFormatError(f"{where}: its source {source!r} is not a jaxsave sample file")
                schema.checked_format(s.attrs[schema.FORMAT], f"{where}: its source {source!r}")
                if MERGED_FROM in s.attrs:
                    raise FileFormatError(f"{where}: its source {source!r} is itself a merged file")
                check_file(s, f"{where} (source {source!r})")


def _merged_from(f: h5py.File, where: str) -> list[str]:
    """The source paths a merged file names (each checked to be a plain relative path)."""
    raw = f.attrs[MERGED_FROM]
    try:
        names = json.loads(raw.decode() if isinstance(raw, bytes) else str(raw))
    except (ValueError, UnicodeDecodeError, RecursionError):
        names = None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise FileFormatError(f"{where}: the attribute {MERGED_FROM!r} is not a list of file names")
    for n in names:
        if not n or os.path.isabs(n) or "%" in n or "\0" in n or n in (".", os.curdir):
            raise FileFormatError(
                f"{where}: the merged file names the source {n!r}; merge writes only plain paths "
                "relative to the merged file"
            )
    return names


def _check_dataset(dcpl: h5py.h5p.PropDCID, name: str, where: str, sources: list[str] | None) -> None:
    if dcpl.get_external_count():
        raise FileFormatError(
            f"{where}: dataset {name!r} keeps its bytes in external files "
            "(HDF5 external storage); jaxsave reads only data stored in the file"
        )
    layout = dcpl.get_layout()
    if layout == h5py.h5d.VIRTUAL:
        if sources is None:
            raise FileFormatError(
                f"{where}: dataset {name!r} is a virtual dataset (data of other files) in a file "
                "that jaxsave.merge did not write"
            )
        seen = set()
        for i in range(dcpl.get_virtual_count()):
            file_name, dset = dcpl.get_virtual_filename(i), dcpl.get_virtual_dsetname(i)
            if file_name not in sources or dset.lstrip("/") != name.lstrip("/") or file_name in seen:
                raise FileFormatError(
                    f"{where}: the virtual dataset {name!r} maps {dset!r} of {file_name!r}; a "
                    f"merged file maps its own variable once from each of {sources}"
                )
            seen.add(file_name)
    elif layout not in _LAYOUTS:
        raise FileFormatError(f"{where}: dataset {name!r} has an unknown storage layout {layout}")
    expansion(dcpl, name)


def _directory(f: h5py.File) -> str:
    """Where HDF5 looks first for the relative sources of ``f``'s virtual datasets: the
    directory of its name as opened, joined as strings (``link/..`` is the link target's parent)."""
    return os.path.dirname(absolute(f.filename))


def _check_found_from_here(f: h5py.File, source: str, where: str) -> None:
    """Refuse a merged file opened through a link from another directory, where ``source``
    (named from the file's own directory, as merge names it) is another file or none."""
    seen, own = (
        os.path.join(_directory(f), source),
        os.path.join(os.path.dirname(os.path.realpath(f.filename)), source),
    )
    if same_file(seen, own):
        return
    raise FileFormatError(
        f"{where}: a merged file opened through a link from another directory: its source "
        f"{source!r} is {own!r}, but HDF5 would read {seen!r}; open it at "
        f"{os.path.realpath(f.filename)!r}"
    )


def open_source(path: str, where: str) -> h5py.File:
    """Open a merged file's source ``path`` for reading if it is a regular file (no FIFO)."""
    try:
        mode = os.stat(path).st_mode
    except OSError as error:
        raise FileFormatError(f"{where}: its source {path!r} cannot be found ({error.strerror})") from None
    if not stat.S_ISREG(mode):
        raise FileFormatError(f"{where}: its source {path!r} is not a regular file")
    try:
        swmr = _superblock.open_flags(path) != 0
        return h5py.File(path, "r", **({"libver": "latest", "swmr": True} if swmr else {}))
    except (OSError, ValueError, RuntimeError) as error:
        raise FileFormatError(
            f"{where}: its source {path!r} cannot be opened as an HDF5 file: {error}"
        ) from None


def stored_bytes(ds: h5py.Dataset) -> int:
    """The most bytes a read of ``ds`` (checked by :func:`check_file`) can produce from stored data.

    Its stored size times its filters' expansion; for a virtual dataset of a merged
    file, the sum of that over its sources' datasets.
    """
    dcpl = ds.id.get_create_plist()
    if dcpl.get_layout() != h5py.h5d.VIRTUAL:
        return ds.id.get_storage_size() * expansion(dcpl, ds.name)
    total, base = 0, _directory(ds.file)
    for i in range(dcpl.get_virtual_count()):
        path = os.path.join(base, dcpl.get_virtual_filename(i))
        with open_source(path, repr(ds.file.filename)) as source:
            sds = source.get(dcpl.get_virtual_dsetname(i))
            if isinstance(sds, h5py.Dataset) and not sds.is_virtual:
                total += stored_bytes(sds)
    return total
