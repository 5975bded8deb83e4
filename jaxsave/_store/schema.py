"""The sample file's schema: every name, attribute and rule a sample file is made of.

This module is the one place that says what a jaxsave sample file contains; the
collector (:mod:`jaxsave.hdf5`), the readers (:mod:`jaxsave.samples`),
:func:`jaxsave.merge` and the CLI take paths, attribute names and the fill rule from
here. It is backend-neutral (no h5py): :mod:`jaxsave._store.hdf5.sample_file`
implements it on HDF5.

A file has the root attributes ``jaxsave_format`` (:data:`SAMPLE_FILE_FORMAT`),
``jaxsave_version``, ``jaxsave_layout`` (one of :data:`LAYOUTS`), ``created``,
``sample_counts`` (one count a chain) and, once a chain is registered,
``jaxsave_structure`` (JSON: the leaves' keys, groups, names, dtypes and shapes, the
treedef and the treespec). Layout ``"posterior"`` stores leaf ``group/name`` as one
``(chain, draw, ...)`` dataset with the dimension scales ``chain``, ``draw`` and
``{name}_dim_{k}``; layout ``"chains"`` stores it under :func:`chain_group` as one
``(draw, ...)`` dataset per chain. Draws not written read as :func:`fill_value`.
"""

from __future__ import annotations

import datetime
import json
import operator
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from jaxsave._core import dtypes as _dtypes
from jaxsave._version import __version__
from jaxsave.errors import FileFormatError, StructureMismatchError

#: The version of the sample-file format this jaxsave writes and reads up to.
SAMPLE_FILE_FORMAT = 1

POSTERIOR, CHAINS = "posterior", "chains"
LAYOUTS = (POSTERIOR, CHAINS)
#: The groups of layout "posterior": the samples, and the leaves chosen with ``sample_stats=``.
POSTERIOR_GROUP, STATS_GROUP = "posterior", "sample_stats"

# Root attributes.
FORMAT = "jaxsave_format"
VERSION = "jaxsave_version"
LAYOUT = "jaxsave_layout"
CREATED = "created"
STRUCTURE = "jaxsave_structure"
COUNTS = "sample_counts"
MERGED_FROM = "jaxsave_merged_from"
CHAIN_OFFSETS = "jaxsave_chain_offsets"
#: (Zarr) The id of the run that created a store that several processes write.
RUN = "jaxsave_run"

# Attributes of each leaf's dataset, and of a chain's group (layout "chains").
LEAF_DTYPE = "jaxsave_dtype"
LEAF_KEY = "jaxsave_key"
LEAF_ATTRIBUTES = (LEAF_DTYPE, LEAF_KEY)
CHAIN_COUNT = "sample_count"

# Dimension scales of layout "posterior".
CHAIN_DIM, DRAW_DIM = "chain", "draw"

#: The group of a leaf in layout "chains", before the chain is put in (``.format(chain)``).
CHAIN_GROUP = "chain~{}"
#: How the CLI shows :data:`CHAIN_GROUP` (any chain).
ANY_CHAIN_GROUP = CHAIN_GROUP.format("*")
#: The name of the one leaf of a sample that is a bare array (no key path).
BARE_LEAF = "sample"


class VariableInfo(NamedTuple):
    """One sample leaf as stored: key path, HDF5 group and name, logical dtype, per-draw shape."""

    key: tuple[str, ...]
    group: str
    name: str
    dtype: str
    shape: tuple[int, ...]


def root_attributes(layout: str) -> dict[str, Any]:
    """The root attributes every writer sets (and refreshes when they are stale)."""
    return {VERSION: __version__, FORMAT: SAMPLE_FILE_FORMAT, LAYOUT: layout}


def created_now() -> str:
    """The ``created`` attribute of a file (or store) made now: an ISO 8601 UTC time."""
    return datetime.datetime.now(datetime.UTC).isoformat()


def new_file_attributes() -> dict[str, Any]:
    """The root attributes a new file starts with, besides :func:`root_attributes`."""
    return {CREATED: created_now(), COUNTS: np.zeros(0, np.int64)}


def structure_json(
    keys: Sequence[tuple[str, ...]],
    entries: Sequence[tuple[str, str]],
    specs: Sequence[Any],
    treedef: Any,
    treespec: dict | None,
) -> str:
    """The :data:`STRUCTURE` attribute: each leaf's key, group, name, dtype and shape, the treedef
    (as text) and the pickle-free treespec (``None`` when the tree cannot be described).

    ``entries`` are the leaves' ``(group, name)``; ``specs`` have ``.dtype`` and ``.shape``.

    >>> import json
    >>> spec = VariableInfo((), "", "", "float32", (2,))
    >>> json.loads(structure_json([("x",)], [("posterior", "x")], [spec], "*", None))["leaves"]
    [{'key': ['x'], 'group': 'posterior', 'name': 'x', 'dtype': 'float32', 'shape': [2]}]
    """
    leaves = [
        {"key": list(key), "group": group, "name": name, "dtype": spec.dtype, "shape": list(spec.shape)}
        for key, (group, name), spec in zip(keys, entries, specs)
    ]
    return json.dumps({"leaves": leaves, "treedef": str(treedef), "treespec": treespec})


def parse_structure(raw: str | bytes) -> list[VariableInfo]:
    """The leaves a :data:`STRUCTURE` attribute describes (``ValueError``/``KeyError``/``TypeError``
    if it is malformed; dtype names are the reader's to check)."""
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    return [
        VariableInfo(
            tuple(str(k) for k in v["key"]),
            str(v["group"]),
            str(v["name"]),
            str(v["dtype"]),
            tuple(int(n) for n in v["shape"]),
        )
        for v in json.loads(text)["leaves"]
    ]


def check_same_structure(stored: Any, structure: str, where: str) -> None:
    """Refuse to add samples of ``structure`` (:func:`structure_json`) to ``where``, whose
    :data:`STRUCTURE` attribute ``stored`` (``None``: none yet) describes other leaves.

    >>> spec = VariableInfo((), "", "", "float32", (2,))
    >>> one = structure_json([("x",)], [("posterior", "x")], [spec], "*", None)
    >>> check_same_structure(None, one, "s.h5"), check_same_structure(one, one, "s.h5")
    (None, None)
    """
    if stored is None:
        return
    try:
        have = parse_structure(stored)
    except (ValueError, KeyError, TypeError) as error:
        raise FileFormatError(f"{where}: malformed {STRUCTURE!r} ({error})") from error
    want = parse_structure(structure)
    if have != want:
        raise StructureMismatchError(
            f"{where} holds samples of another structure "
            f"({[(v.name, v.dtype, v.shape) for v in have]}); this sampler's are "
            f"{[(v.name, v.dtype, v.shape) for v in want]}: write to another path"
        )


def checked_format(raw: Any, where: str) -> int:
    """The format number ``raw`` (the root's :data:`FORMAT` attribute); a :class:`FileFormatError`
    naming ``where`` unless it is an integer this jaxsave reads (1 to :data:`SAMPLE_FILE_FORMAT`).

    >>> checked_format(np.int64(1), "run.h5")
    1
    >>> checked_format(2.0, "run.h5")
    Traceback (most recent call last):
    jaxsave.errors.FileFormatError: run.h5 has a malformed 'jaxsave_format' attribute: 2.0
    """
    try:
        version = operator.index(raw)  # an integer scalar: not a float, complex, string or array
    except TypeError:
        raise FileFormatError(f"{where} has a malformed {FORMAT!r} attribute: {raw!r}") from None
    if version > SAMPLE_FILE_FORMAT:
        raise FileFormatError(
            f"{where} has jaxsave format {version}; this jaxsave reads up to "
            f"{SAMPLE_FILE_FORMAT}: upgrade jaxsave"
        )
    if version < 1:
        raise FileFormatError(f"{where} has a malformed {FORMAT!r} attribute: {raw!r}")
    return version


def checked_counts(raw: Any, where: str) -> np.ndarray:
    """The sample counts ``raw`` (as stored) as a 1-d int64 array; a :class:`FileFormatError`
    naming ``where`` unless they are non-negative integers.

    >>> checked_counts([3, 0], "run.h5").tolist()
    [3, 0]
    >>> checked_counts([2.5], "run.h5")
    Traceback (most recent call last):
    jaxsave.errors.FileFormatError: run.h5: its sample counts [2.5] are not integers (float64)
    """
    counts = np.asarray(raw).reshape(-1)
    if counts.dtype.kind not in "iu":
        raise FileFormatError(
            f"{where}: its sample counts {counts.tolist()} are not integers ({counts.dtype})"
        )
    if counts.dtype == np.uint64 and (counts > np.iinfo(np.int64).max).any():
        raise FileFormatError(f"{where}: its sample counts {counts.tolist()} are past int64")
    if (counts < 0).any():
        raise FileFormatError(f"{where}: negative sample counts {counts.tolist()}")
    return counts.astype(np.int64)


def counted_lead(counts: np.ndarray) -> tuple[int, int]:
    """The ``(chains, draws)`` a leaf's dataset needs (layout ``"posterior"``) to hold what
    ``counts`` say.

    >>> counted_lead(np.array([3, 5])), counted_lead(np.zeros(0, np.int64))
    ((2, 5), (0, 0))
    """
    return (int(counts.size), int(counts.max()) if counts.size else 0)


def stored_row(var: VariableInfo) -> tuple[tuple[int, ...], np.dtype]:
    """Per-draw shape and dtype of a leaf as stored (key data for PRNG keys)."""
    spec = _dtypes.LeafSpec(var.shape, var.dtype)
    return (_dtypes.key_data_shape(spec) if spec.is_key else var.shape), _dtypes.storage_dtype(var.dtype)


def fits(shape: tuple[int, ...], lead: tuple[int, ...], row: tuple[int, ...]) -> bool:
    """Whether a dataset of ``shape`` is the leading axes ``lead`` (at least) and then exactly
    the per-draw ``row``.

    >>> fits((2, 9, 3), (2, 9), (3,)), fits((2, 9), (2, 9), (3,)), fits((2, 9, 4), (2, 5), (3,))
    (True, False, False)
    """
    return len(shape) == len(lead) + len(row) and tuple(shape[len(lead) :]) == row and holds(shape, lead)


def holds(shape: tuple[int, ...], lead: tuple[int, ...]) -> bool:
    """Whether a dataset of ``shape`` has the leading axes ``lead`` at least.

    >>> holds((2, 9, 3), (2, 9)), holds((2, 8, 3), (2, 9)), holds((), (1,))
    (True, False, False)
    """
    return len(shape) >= len(lead) and all(have >= need for have, need in zip(shape, lead))


def chain_group(chain: int) -> str:
    """The group holding chain ``chain``'s datasets (layout ``"chains"``)."""
    return CHAIN_GROUP.format(chain)


def leaf_path(key: Sequence[str]) -> str:
    """A leaf's path below its chain's group (layout ``"chains"``)."""
    return "/".join(key) if key else BARE_LEAF


def chain_dataset(chain: int, key: Sequence[str]) -> str:
    """The dataset of leaf ``key`` of chain ``chain`` (layout ``"chains"``)."""
    return f"{chain_group(chain)}/{leaf_path(key)}"


def posterior_dataset(group: str, name: str) -> str:
    """The dataset of leaf ``group/name`` (layout ``"posterior"``)."""
    return f"{group}/{name}"


def dataset_path(layout: str, var: VariableInfo, chain: int | None = None) -> str:
    """Where leaf ``var`` (of chain ``chain``, layout ``"chains"``) is stored."""
    if layout == POSTERIOR:
        return posterior_dataset(var.group, var.name)
    if chain is None:
        raise ValueError("layout 'chains' stores one dataset per chain: name the chain")
    return chain_dataset(chain, var.key)


def dim_prefix(name: str) -> str:
    """What the names of leaf ``name``'s per-draw dimension scales start with."""
    return f"{name}_dim_"


def dim_name(name: str, k: int) -> str:
    """The dimension scale of axis ``k`` of a draw of leaf ``name`` (layout ``"posterior"``)."""
    return f"{dim_prefix(name)}{k}"


def fill_value(dtype: np.dtype) -> Any:
    """What a draw that was not written reads as: NaN for float and complex leaves, else 0."""
    return np.nan if np.dtype(dtype).kind in "fc" else 0


def stored_fill_value(dtype: np.dtype) -> np.ndarray | None:
    """:func:`fill_value` as a backend's dataset fill value (``None``: the backend's 0)."""
    dtype = np.dtype(dtype)
    return np.full((), np.nan, dtype) if dtype.kind in "fc" else None
