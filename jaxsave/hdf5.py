"""The HDF5 collector: samples stream into a file that ArviZ and xarray open directly.

Layout ``"posterior"`` (the default): one dataset per sample leaf in the group
``posterior/``, shaped ``(chain, draw, ...)``, with HDF5 dimension scales named
``chain``, ``draw`` and ``<var>_dim_k``. Layout ``"chains"``: the older ``io``
module's ``/chain~{id}/<key>/<subkey>``, one ``(draw, ...)`` dataset per chain.

Root attributes: ``jaxsave_version``, ``jaxsave_format``, ``created`` and
``sample_counts`` (kept samples per chain, updated before every flush, so a
reader never trusts draws that were not completely written).
"""

from __future__ import annotations

import datetime
import json
import math
import os
from typing import Any

import h5py
import numpy as np

from jaxsave import _dtypes
from jaxsave._tree import flat_name
from jaxsave._version import __version__
from jaxsave.collectors import DataCollector, SampleLayout, _samples_collected, sample_layout
from jaxsave.errors import StructureMismatchError

__all__ = ["HDF5Collector", "FORMAT_VERSION"]

#: Version of the file layout written by this module.
FORMAT_VERSION = 1
_LAYOUTS = ("posterior", "chains")
#: Target size of one chunk: big enough that reading draws is fast.
_CHUNK_BYTES = 1 * 2**20


class HDF5Collector(DataCollector):
    """Write samples to an HDF5 file, in blocks, from a writer thread.

    Args:
      file: a path, or an open, writable ``h5py.File`` (which you then close yourself).
      layout: ``"posterior"`` (ArviZ/xarray layout, default) or ``"chains"``
        (the older ``/chain~{id}/...`` layout).
      mode: how a path is opened: ``"w"`` (create or truncate, default), ``"x"``
        (fail if it exists) or ``"a"``.
      compression: ``None`` (default), ``"gzip"`` or ``"lzf"``.
      flush_every: flush the file after every n-th written block (default 1);
        0 flushes only at the end.

    >>> import tempfile, os, jax, jax.numpy as jnp, jaxsave, h5py
    >>> path = os.path.join(tempfile.mkdtemp(), "chains.h5")
    >>> init, save, postprocess = jaxsave.save(jaxsave.HDF5Collector(path))
    >>> state = init({"x": jnp.zeros((2, 3))}, None, chains=2)
    >>> step = lambda s, i: save(s, i % 2 == 0, {"x": jnp.full(3, i, jnp.float32)})
    >>> state = jax.vmap(lambda s: jax.lax.scan(step, s, jnp.arange(10))[0])(state)
    >>> postprocess(state, None)["sample_count"].tolist()
    [5, 5]
    >>> with h5py.File(path) as f:
    ...     f["posterior/x"].shape
    (2, 5, 3)
    """

    def __init__(
        self,
        file: str | os.PathLike | h5py.File,
        *,
        layout: str = "posterior",
        mode: str = "w",
        compression: str | None = None,
        flush_every: int = 1,
    ):
        if layout not in _LAYOUTS:
            raise ValueError(f"layout must be one of {_LAYOUTS}, got {layout!r}")
        if compression not in (None, "gzip", "lzf"):
            raise ValueError(f"compression must be None, 'gzip' or 'lzf', got {compression!r}")
        if mode not in ("w", "x", "a"):
            raise ValueError(f"mode must be 'w', 'x' or 'a', got {mode!r}")
        if isinstance(file, h5py.File):
            if not file.id.valid:
                raise ValueError("the h5py.File is closed")
            if file.mode != "r+":
                raise ValueError("the h5py.File must be open for writing")
            self._file, self._owned, self._path = file, False, None
        else:
            self._path = os.fspath(file)
            self._file = h5py.File(self._path, mode)
            self._owned = True
        self.layout = layout
        self.compression = compression
        self.flush_every = int(flush_every)
        self._sample: SampleLayout | None = None
        self._capacity: list[int | None] = []
        self._counts: list[int] = []
        self._finalized: set[int] = set()
        self._datasets: list[h5py.Dataset] = []  # posterior layout: one per leaf
        self._chain_datasets: dict[int, list[h5py.Dataset]] = {}  # chains layout
        self._blocks = 0
        self._write_root_attrs()

    @property
    def file(self) -> h5py.File:
        """The open ``h5py.File``."""
        return self._file

    # -- registration ----------------------------------------------------------------

    def register_chain(self, init_sample=None, init_checkpoint=None, static_information=None, **unused) -> int:
        layout = sample_layout(init_sample)
        if self._sample is None:
            self._sample = layout
        elif layout.keys != self._sample.keys or layout.specs != self._sample.specs:
            raise StructureMismatchError("all chains in one HDF5Collector must have samples of the same structure")
        if not self._file.id.valid:
            if not self._owned:
                raise ValueError("the h5py.File given to HDF5Collector was closed")
            self._file = h5py.File(self._path, "a")
            self._datasets = []
        self._capacity.append(_samples_collected(static_information))
        self._counts.append(0)
        return len(self._counts) - 1

    def _write_root_attrs(self) -> None:
        attrs = self._file.attrs
        attrs["jaxsave_version"] = __version__
        attrs["jaxsave_format"] = FORMAT_VERSION
        attrs["jaxsave_layout"] = self.layout
        if "created" not in attrs:
            attrs["created"] = datetime.datetime.now(datetime.timezone.utc).isoformat()

    # -- dataset creation --------------------------------------------------------------

    def _chunk_rows(self, j: int) -> int:
        row = math.prod(self._sample.storage_shape(j)) * self._sample.row_dtype(j).itemsize
        rows = max(1, _CHUNK_BYTES // max(1, row))
        known = [c for c in self._capacity if c]
        return min(rows, max(known)) if known else rows

    def _create(self, group: h5py.Group, name: str, j: int, lead: tuple[int, ...]) -> h5py.Dataset:
        spec = self._sample.specs[j]
        shape = self._sample.storage_shape(j)
        dtype = _dtypes.storage_dtype(spec.dtype)
        chunk_lead = (1,) * (len(lead) - 1) + (self._chunk_rows(j),)
        ds = group.create_dataset(
            name,
            shape=lead + shape,
            maxshape=(None,) * len(lead) + shape,
            dtype=dtype,
            chunks=chunk_lead + shape if math.prod(shape) else None,
            compression=self.compression,
            shuffle=self.compression is not None,
            fillvalue=np.nan if dtype.kind in "fc" else None,
        )
        ds.attrs["jaxsave_dtype"] = spec.dtype
        ds.attrs["jaxsave_key"] = json.dumps(list(self._sample.keys[j]))
        return ds

    def _draw_extent(self, chains: list[int], needed: int) -> int:
        caps = [self._capacity[c] for c in chains]
        if all(c is not None for c in caps):
            return max(needed, max(caps))
        return needed

    def _posterior(self, needed_draws: int) -> list[h5py.Dataset]:
        n_chains = len(self._counts)
        if not self._datasets:
            group = self._file.require_group("posterior")
            draws = self._draw_extent(list(range(n_chains)), needed_draws)
            for name, size in (("chain", n_chains), ("draw", draws)):
                if name not in group:
                    scale = group.create_dataset(name, data=np.arange(size, dtype=np.int64), maxshape=(None,),
                                                 chunks=(max(1, min(size, 4096)),) if size else (1,))
                    scale.make_scale(name)
            for j, key in enumerate(self._sample.keys):
                var = flat_name(key)
                ds = self._create(group, var, j, (n_chains, draws))
                ds.dims[0].attach_scale(group["chain"])
                ds.dims[1].attach_scale(group["draw"])
                for k, size in enumerate(ds.shape[2:]):
                    dim = f"{var}_dim_{k}"
                    scale = group.create_dataset(dim, data=np.arange(size, dtype=np.int64))
                    scale.make_scale(dim)
                    ds.dims[k + 2].attach_scale(scale)
                self._datasets.append(ds)
        ds0 = self._datasets[0] if self._datasets else None
        if ds0 is not None and (ds0.shape[0] < n_chains or ds0.shape[1] < needed_draws):
            self._resize(max(ds0.shape[0], n_chains), max(ds0.shape[1], needed_draws))
        return self._datasets

    def _resize(self, chains: int, draws: int) -> None:
        group = self._file["posterior"]
        for ds in self._datasets:
            ds.resize((chains, draws) + ds.shape[2:])
        for name, size in (("chain", chains), ("draw", draws)):
            scale = group[name]
            old = scale.shape[0]
            if old != size:
                scale.resize((size,))
                if size > old:
                    scale[old:] = np.arange(old, size)

    def _chain_group(self, chain: int, needed: int) -> list[h5py.Dataset]:
        if chain not in self._chain_datasets:
            group = self._file.require_group(f"chain~{chain}")
            draws = self._draw_extent([chain], needed)
            dsets = []
            for j, key in enumerate(self._sample.keys):
                parent = group
                for part in key[:-1]:
                    parent = parent.require_group(part)
                dsets.append(self._create(parent, key[-1] if key else "sample", j, (draws,)))
            self._chain_datasets[chain] = dsets
        dsets = self._chain_datasets[chain]
        if dsets and dsets[0].shape[0] < needed:
            for ds in dsets:
                ds.resize((needed,) + ds.shape[1:])
        return dsets

    # -- writing (writer thread) ---------------------------------------------------------

    def save(self, chain_id: int, values: list[np.ndarray]) -> None:
        self._write_rows(chain_id, values)
        self._after_block()

    def save_block(self, chain_ids: list[int], values: list[np.ndarray]) -> None:
        first, starts = chain_ids[0], {self._counts[c] for c in chain_ids}
        contiguous = chain_ids == list(range(first, first + len(chain_ids)))
        if self.layout != "posterior" or not contiguous or len(starts) != 1:
            for i, chain in enumerate(chain_ids):
                self._write_rows(chain, [leaf[i] for leaf in values])
            self._after_block()
            return
        start, n = starts.pop(), values[0].shape[1] if values else 0
        stop = first + len(chain_ids)
        for ds, rows in zip(self._posterior(start + n), values):
            ds[first:stop, start:start + n] = _dtypes.to_storable(rows)
        for chain in chain_ids:
            self._counts[chain] += n
        self._after_block()

    def _write_rows(self, chain: int, values: list[np.ndarray]) -> None:
        start, n = self._counts[chain], len(values[0]) if values else 0
        dsets = self._posterior(start + n) if self.layout == "posterior" else self._chain_group(chain, start + n)
        for ds, rows in zip(dsets, values):
            if self.layout == "posterior":
                ds[chain, start:start + n] = _dtypes.to_storable(rows)
            else:
                ds[start:start + n] = _dtypes.to_storable(rows)
        self._counts[chain] += n

    def _after_block(self) -> None:
        self._blocks += 1
        self._file.attrs["sample_counts"] = np.asarray(self._counts, dtype=np.int64)
        if self.flush_every and self._blocks % self.flush_every == 0:
            self._file.flush()

    def finalize(self, chain_id: int) -> None:
        self._finalized.add(chain_id)
        if self.layout == "chains":
            self._chain_group(chain_id, self._counts[chain_id])
        if len(self._finalized) == len(self._counts):
            self._trim()

    def _trim(self) -> None:
        """Cut preallocated draws down to what was kept, and record the final counts."""
        if self.layout == "posterior":
            if self._sample is not None and self._counts:
                self._posterior(0)
                self._resize(len(self._counts), max(self._counts))
        else:
            for chain, dsets in self._chain_datasets.items():
                for ds in dsets:
                    ds.resize((self._counts[chain],) + ds.shape[1:])
                self._file[f"chain~{chain}"].attrs["sample_count"] = self._counts[chain]
        self._file.attrs["sample_counts"] = np.asarray(self._counts, dtype=np.int64)
        self._file.flush()

    def close(self) -> None:
        """Trim, flush and (if this collector opened it) close the file."""
        if not self._file.id.valid:
            return
        self._trim()
        if self._owned:
            self._file.close()
