"""Benchmark: save/load of pytrees with jaxsave vs np.savez, safetensors, flax msgpack, orbax.

Two trees, both made of ``jax.Array`` leaves:

* ``large``: about ``--size-gb`` GB in a few hundred leaves of mixed dtypes
  (float32, bfloat16, float16, int32, int8, bool);
* ``small``: ``--small-leaves`` tiny arrays (10k by default) in nested dicts.

Every library gets the same job: *save* the tree to a file in ``--dir`` (page
cache: /dev/shm by default) and *load* it back as the same pytree of
``jax.Array`` leaves ("load → jax"). Libraries that cannot hold a pytree or
ml_dtypes get the usual glue (flatten to named arrays, bfloat16 as uint16 views,
unflatten with the known structure, one batched ``jax.device_put``), and the
glue is timed. "load → numpy" is the same without the device transfer (host
arrays; orbax only restores jax arrays). jaxsave saves with its default fsync.

``--before DIR`` also times the jaxsave package found in DIR (say, an old commit's
``git archive``), in the same rounds. The "floor" row writes and reads the same data bytes
as one raw buffer. Times are best of ``--repeat`` rounds, wall and CPU (the process's, all
threads).

Run ``python benchmarks/serialize.py`` (1 GB, about two minutes on 2 cores and
needing ~6 GB of RAM) or ``--small`` for a quick run. Prints a table and writes
JSON to benchmarks/results/serialize.json.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

import jaxsave

# ----------------------------------------------------------------------------- trees

_MIX = [
    (np.float32, 0.6),
    (ml_dtypes.bfloat16, 0.15),
    (np.float16, 0.1),
    (np.int32, 0.1),
    (np.int8, 0.04),
    (np.bool_, 0.01),
]


def large_tree(size_bytes: int, n_leaves: int, seed: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    tree: dict[str, Any] = {}
    per_leaf = size_bytes / n_leaves
    for i in range(n_leaves):
        dtype = _MIX[i % len(_MIX)][0] if i % 10 else np.float32
        dt = np.dtype(dtype)
        n = max(1, int(per_leaf * rng.uniform(0.5, 1.5) / dt.itemsize) // 256 * 256)
        # Random values (not a tiled pattern): a compressing library (orbax writes zstd-compressed
        # zarr chunks) must not get a 500x smaller file than the others.
        data = rng.standard_normal(n, dtype=np.float32) * (1 if dt.kind == "f" else 60)
        data = data.reshape(-1, 256) if n >= 256 else data
        if dt.kind == "b":
            data = data > 0
        tree.setdefault(f"layer_{i // 8:03d}", {})[f"p{i % 8}"] = jnp.asarray(data.astype(dtype))
    return tree


def small_tree(n_leaves: int, seed: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    tree: dict[str, Any] = {}
    for i in range(n_leaves):
        dtype = (np.float32, np.int32, ml_dtypes.bfloat16, np.float16)[i % 4]
        shape = ((4,), (2, 3), (), (8,))[i % 4]
        leaf = np.asarray(rng.normal(size=shape)).astype(dtype)
        tree.setdefault(f"module_{i // 100:03d}", {})[f"param_{i % 100:03d}"] = leaf
    return dict(zip(tree, jax.device_put(list(tree.values()))))


# ----------------------------------------------------------------------------- glue


def _flat(tree: Any) -> tuple[dict[str, np.ndarray], Any]:
    """Named host arrays (ml_dtypes as uint views) plus what is needed to rebuild."""
    leaves, treedef = jax.tree.flatten(tree)
    arrays, dtypes = {}, []
    for i, leaf in enumerate(leaves):
        a = np.asarray(leaf)
        dtypes.append(a.dtype)
        if a.dtype.name in ("bfloat16",):
            a = a.view(np.uint16)
        arrays[f"leaf_{i}"] = a
    return arrays, (treedef, dtypes)


def _unflat(arrays: dict[str, np.ndarray], info: Any, to_jax: bool) -> Any:
    treedef, dtypes = info
    leaves = [arrays[f"leaf_{i}"].view(dt) for i, dt in enumerate(dtypes)]
    if to_jax:
        leaves = jax.device_put(leaves)
    return jax.tree.unflatten(treedef, leaves)


def _remove(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.remove(path)


class Lib:
    name = ""
    suffix = ""

    def save(self, path: str, tree: Any) -> None: ...
    def load(self, path: str, like: Any, to_jax: bool) -> Any: ...


class Jaxsave(Lib):
    name, suffix = "jaxsave", ".jaxsave"

    def save(self, path, tree):
        jaxsave.save_pytree(path, tree)

    def load(self, path, like, to_jax):
        return jaxsave.load_pytree(path, as_numpy=not to_jax)


class JaxsaveBefore(Jaxsave):
    """jaxsave as another tree has it (``--before DIR``), imported as a second copy of the package."""

    name = "jaxsave before"

    def __init__(self, directory: str):
        self.module = _import_copy(directory)

    def save(self, path, tree):
        self.module.save_pytree(path, tree)

    def load(self, path, like, to_jax):
        return self.module.load_pytree(path, as_numpy=not to_jax)


def _import_copy(directory: str) -> Any:
    """The package ``jaxsave`` found in ``directory``, imported beside the one in use.

    The current ``jaxsave.*`` modules are set aside while the copy is imported and put back
    after, so each copy's functions see their own modules.
    """
    ours = {k: m for k, m in sys.modules.items() if k == "jaxsave" or k.startswith("jaxsave.")}
    for k in ours:
        del sys.modules[k]
    sys.path.insert(0, os.path.abspath(directory))
    try:
        copy = importlib.import_module("jaxsave")
        importlib.import_module("jaxsave.serialization")
        for name in ("native", "npz", "safetensors_format", "hdf5"):
            importlib.import_module(f"jaxsave._serialize.formats.{name}")
        assert os.path.dirname(os.path.dirname(copy.__file__)) == os.path.abspath(directory), copy.__file__
    finally:
        sys.path.remove(os.path.abspath(directory))
        theirs = [k for k in sys.modules if k == "jaxsave" or k.startswith("jaxsave.")]
        for k in theirs:
            del sys.modules[k]
        sys.modules.update(ours)
    return copy


class Floor(Lib):
    """The same data bytes as one buffer, written with one ``write`` (+ fsync) and read with one ``readinto``.

    No tree, no header: what the file system alone costs. "load → jax" adds one ``jax.device_put``
    of the whole buffer.
    """

    name, suffix = "floor (raw I/O)", ".raw"
    _buffers: dict[int, np.ndarray] = {}

    def _buffer(self, tree: Any) -> np.ndarray:
        key = id(tree)
        if key not in self._buffers:
            arrays = _flat(tree)[0].values()
            self._buffers[key] = np.concatenate([a.reshape(-1).view(np.uint8) for a in arrays])
        return self._buffers[key]

    def save(self, path, tree):
        buf = self._buffer(tree)
        with open(path, "wb") as f:
            f.write(buf)
            f.flush()
            os.fsync(f.fileno())

    def load(self, path, like, to_jax):
        n = os.path.getsize(path)
        raw = np.empty(n + 4096, np.uint8)  # page-aligned, so that jax adopts it without a copy
        buf = raw[(-raw.ctypes.data) % 4096 :][:n]
        with open(path, "rb", buffering=0) as f:
            f.readinto(buf)
        return jax.device_put(buf) if to_jax else buf


class Savez(Lib):
    name, suffix = "np.savez", ".npz"

    def save(self, path, tree):
        np.savez(path, **_flat(tree)[0])

    def load(self, path, like, to_jax):
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        return _unflat(arrays, _flat_info(like), to_jax)


class Safetensors(Lib):
    name, suffix = "safetensors", ".safetensors"

    def save(self, path, tree):
        import safetensors.numpy

        safetensors.numpy.save_file(_flat(tree)[0], path)

    def load(self, path, like, to_jax):
        import safetensors.numpy

        return _unflat(safetensors.numpy.load_file(path), _flat_info(like), to_jax)


class FlaxMsgpack(Lib):
    name, suffix = "flax msgpack", ".msgpack"

    def save(self, path, tree):
        import flax.serialization

        with open(path, "wb") as f:
            f.write(flax.serialization.to_bytes(tree))

    def load(self, path, like, to_jax):
        import flax.serialization

        with open(path, "rb") as f:
            out = flax.serialization.from_bytes(like, f.read())
        return (
            jax.tree.unflatten(jax.tree.structure(out), jax.device_put(jax.tree.leaves(out)))
            if to_jax
            else out
        )


class Orbax(Lib):
    name, suffix = "orbax", ".orbax"

    def __init__(self):
        import orbax.checkpoint as ocp

        self.ckpt = ocp.StandardCheckpointer()

    def save(self, path, tree):
        self.ckpt.save(path, tree)
        self.ckpt.wait_until_finished()

    def load(self, path, like, to_jax):
        if not to_jax:
            return None
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like)
        return self.ckpt.restore(path, abstract)


_INFO_CACHE: dict[int, Any] = {}


def _flat_info(like: Any) -> Any:
    """The structure and dtypes of ``like`` (what a user of a flat format keeps around)."""
    key = id(like)
    if key not in _INFO_CACHE:
        leaves, treedef = jax.tree.flatten(like)
        _INFO_CACHE[key] = (treedef, [np.dtype(x.dtype) for x in leaves])
    return _INFO_CACHE[key]


# ----------------------------------------------------------------------------- running


def _check(out: Any, tree: Any) -> None:
    if isinstance(out, (np.ndarray, jax.Array)) and out.ndim == 1:  # the floor: the bytes only
        assert out.nbytes == sum(x.nbytes for x in jax.tree.leaves(tree))
        return
    assert jax.tree.structure(out) == jax.tree.structure(tree)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(tree)):
        assert a.dtype == b.dtype and a.shape == b.shape
    a, b = jax.tree.leaves(out)[-1], jax.tree.leaves(tree)[-1]
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _time(fn: Callable[[], Any], repeat: int) -> list[tuple[float, float]]:
    """(wall, CPU) seconds of ``repeat`` calls; CPU is the process's, all threads."""
    times = []
    for _ in range(repeat):
        gc.collect()
        c = time.process_time()
        t = time.perf_counter()
        out = fn()
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t, time.process_time() - c))
        del out
    return times


def bench(libs: list[Lib], tree: Any, nbytes: int, directory: str, repeat: int) -> list[dict]:
    """Round-robin over the libraries ``repeat`` times (so load noise hits all alike)."""
    times = {lib.name: {"save": [], "jax": [], "numpy": []} for lib in libs}
    sizes = {}
    for r in range(repeat):
        for lib in libs:
            path = os.path.join(directory, f"bench{lib.suffix}")
            _remove(path)
            t = times[lib.name]
            t["save"] += _time(lambda: lib.save(path, tree), 1)
            if r == 0:
                sizes[lib.name] = (
                    sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(path) for f in fs)
                    if os.path.isdir(path)
                    else os.path.getsize(path)
                )
                _check(lib.load(path, tree, True), tree)
            t["jax"] += _time(lambda: lib.load(path, tree, True), 1)
            t["numpy"] += _time(lambda: lib.load(path, tree, False), 1)
            _remove(path)
    rows = []
    for lib in libs:
        t = times[lib.name]
        wall = {op: [w for w, _ in ts] for op, ts in t.items()}
        cpu = {op: [c for _, c in ts] for op, ts in t.items()}
        no_numpy = lib.name == "orbax"
        row = {
            "library": lib.name,
            "file_bytes": sizes[lib.name],
            "save_s": min(wall["save"]),
            "load_jax_s": min(wall["jax"]),
            "load_numpy_s": None if no_numpy else min(wall["numpy"]),
            "save_cpu_s": min(cpu["save"]),
            "load_jax_cpu_s": min(cpu["jax"]),
            "load_numpy_cpu_s": None if no_numpy else min(cpu["numpy"]),
            "save_all_s": wall["save"],
            "load_jax_all_s": wall["jax"],
            "load_numpy_all_s": wall["numpy"],
            "save_cpu_all_s": cpu["save"],
            "load_jax_cpu_all_s": cpu["jax"],
            "load_numpy_cpu_all_s": cpu["numpy"],
        }
        row["save_GBps"] = nbytes / row["save_s"] / 1e9
        row["load_jax_GBps"] = nbytes / row["load_jax_s"] / 1e9
        rows.append(row)
    return rows


def _fmt(x: float | None, unit: str = "") -> str:
    return "n/a" if x is None else (f"{x:.3f}{unit}" if x < 100 else f"{x:.0f}{unit}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-gb", type=float, default=1.0, help="size of the large tree (GB)")
    p.add_argument("--leaves", type=int, default=300, help="leaves of the large tree")
    p.add_argument("--small-leaves", type=int, default=10_000, help="leaves of the small tree")
    p.add_argument("--small", action="store_true", help="quick run: 0.1 GB and 2000 small leaves")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--dir", default="/dev/shm" if os.path.isdir("/dev/shm") else "/tmp")
    p.add_argument("--libs", default="jaxsave,np.savez,safetensors,flax msgpack,orbax,floor (raw I/O)")
    p.add_argument(
        "--before", metavar="DIR", help="also time the jaxsave package in DIR (e.g. an old commit's tree)"
    )
    p.add_argument("--trees", default="large,small", help="which trees to run")
    p.add_argument("--output", default=os.path.join(os.path.dirname(__file__), "results", "serialize.json"))
    args = p.parse_args(argv)
    if args.small:
        args.size_gb, args.small_leaves = min(args.size_gb, 0.1), min(args.small_leaves, 2000)
    libs = {c.name: c for c in (Jaxsave, Savez, Safetensors, FlaxMsgpack, Orbax, Floor)}
    chosen = [libs[n.strip()]() for n in args.libs.split(",")]
    if args.before:
        chosen.insert(0, JaxsaveBefore(args.before))
    directory = os.path.join(args.dir, f"jaxsave_bench_{os.getpid()}")
    os.makedirs(directory)
    makers = {
        "large": lambda: large_tree(int(args.size_gb * 1e9), args.leaves),
        "small": lambda: small_tree(args.small_leaves),
    }
    trees = {name: makers[name.strip()]() for name in args.trees.split(",")}
    results: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "jax": jax.__version__,
            "numpy": np.__version__,
            "dir": args.dir,
            "python": platform.python_version(),
        },
        "args": vars(args),
        "trees": {},
    }
    try:
        for tname, tree in trees.items():
            leaves = jax.tree.leaves(tree)
            nbytes = sum(x.nbytes for x in leaves)
            rows = bench(chosen, tree, nbytes, directory, args.repeat)
            results["trees"][tname] = {"bytes": nbytes, "leaves": len(leaves), "rows": rows}
            print(
                f"\n{tname} tree: {len(leaves)} leaves, {nbytes / 1e9:.3f} GB "
                f"(best of {args.repeat}, seconds: wall / CPU)"
            )
            print(f"| {'library':15s} | {'save':>15s} | {'load → jax':>15s} | {'load → numpy':>15s} |")
            print(f"|{'-' * 17}|{'-' * 17}|{'-' * 17}|{'-' * 17}|")
            for r in rows:
                cells = [
                    f"{_fmt(r[op + '_s'])} / {_fmt(r[op + '_cpu_s'])}"
                    for op in ("save", "load_jax", "load_numpy")
                ]
                print(f"| {r['library']:15s} | " + " | ".join(f"{c:>15s}" for c in cells) + " |")
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(results, f, indent=1)
    print(f"\nwrote {args.output}")
    return results


if __name__ == "__main__":
    main()
