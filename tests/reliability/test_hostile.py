"""Hostile and damaged files, fuzzed: every loader ends in a correct load or a jaxsave error.

Loaders: ``load_pytree``/``read_metadata`` for each format, ``load_samples``,
``file_info``, ``resume`` and the ``jaxsave inspect`` command. Inputs: truncated,
bit-flipped and spliced copies of real files (hypothesis, derandomized), plus
hand-crafted attacks (pickles, giant declared shapes, header-length overflows,
path traversal in names, deep nesting, sparse HDF5 datasets). A "correct load"
has the original structure, shapes and dtypes (data bytes are not checksummed
by every format, so a flipped data bit may change a value, never the structure).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import struct
import tracemalloc
import zipfile

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _reliability import FUZZ
from hypothesis import given
from hypothesis import strategies as st

import jaxsave
from jaxsave import __main__ as cli

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(600)]

TREE = {
    "a": np.arange(6.0).reshape(2, 3),
    "b": [np.ones(3, np.int32), (np.float32(2), None)],
    "s": "text",
    "n": 3,
}
FLAT = {"a": np.arange(6.0).reshape(2, 3), "b": np.ones(3, np.int32)}
FORMATS = ("jaxsave", "npz", "safetensors", "h5")
TRIED: dict[str, int] = {}


def _shape_of(tree):
    return jax.tree.structure(tree), [(np.shape(x), np.asarray(x).dtype) for x in jax.tree.leaves(tree)]


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    """Bytes of one real file per loader, and a loader that runs on a path."""
    d = tmp_path_factory.mktemp("orig")
    out = {}
    for fmt in FORMATS:
        p = d / f"src.{fmt}"
        jaxsave.save_pytree(p, TREE if fmt != "safetensors" else FLAT, metadata={"m": [1, 2]})
        out[fmt] = p.read_bytes()
    sp = d / "samples.h5"
    saver = jaxsave.save(jaxsave.HDF5Collector(sp), checkpoint_every=8, block_size=4)
    state = saver.init({"x": jnp.zeros((2, 3)), "lp": jnp.zeros(2)}, {"z": jnp.zeros((2, 2))}, chains=2)
    step = lambda s, i: saver.save(
        s, True, {"x": jnp.full(3, i, jnp.float32), "lp": -1.0 * i}, solver_state={"z": jnp.full(2, 1.0 * i)}
    )
    state = jax.vmap(lambda s: jax.lax.scan(step, s, jnp.arange(16))[0])(state)
    saver.postprocess(state, None)
    out["samples"], out["ckpt"] = sp.read_bytes(), (d / "samples.h5.ckpt").read_bytes()
    out["_samples_path"] = sp
    return out


def _inspect(path) -> None:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert cli.main(["inspect", str(path)]) in (0, 2)


def _load_all(kind: str, path, original) -> None:
    """Run every loader of ``kind`` on ``path``: each must load correctly or raise a JaxsaveError."""
    if kind in FORMATS:
        loads = [lambda: jaxsave.load_pytree(path, as_numpy=True), lambda: jaxsave.read_metadata(path)]
        want = _shape_of(TREE if kind != "safetensors" else FLAT)
    elif kind == "samples":
        loads = [
            lambda: jaxsave.load_samples(path),
            lambda: jaxsave.load_samples(path, chain=1, draws=slice(2, 5)),
            lambda: jaxsave.file_info(path),
            lambda: _inspect(path),
        ]
    else:
        loads = [lambda: jaxsave.resume(str(path)[: -len(".ckpt")])]
    for k, load in enumerate(loads):
        try:
            got = load()
        except jaxsave.JaxsaveError:
            continue
        if kind in FORMATS and k == 0:
            assert _shape_of(got) == want  # a load that succeeds has the original structure
        if kind in FORMATS and k == 1:
            assert got == {"m": [1, 2]} or isinstance(got, (dict, list, str, int, float, type(None)))
    TRIED[kind] = TRIED.get(kind, 0) + 1


def _mutated(raw: bytes, data) -> bytes:
    how = data.draw(st.sampled_from(["truncate", "flip", "splice"]))
    b = bytearray(raw)
    if how == "truncate":
        return bytes(b[: data.draw(st.integers(0, len(b) - 1))])
    if how == "flip":
        for pos in data.draw(st.lists(st.integers(0, len(b) - 1), min_size=1, max_size=8)):
            b[pos] ^= 1 << data.draw(st.integers(0, 7))
        return bytes(b)
    pos = data.draw(st.integers(0, len(b) - 1))
    b[pos : pos + 16] = data.draw(st.binary(min_size=1, max_size=16))
    return bytes(b)


@pytest.mark.parametrize("kind", [*FORMATS, "samples", "ckpt"])
def test_fuzzed_files_load_correctly_or_raise_a_jaxsave_error(tmp_path, originals, kind):
    name = {"samples": "t.h5", "ckpt": "t.h5.ckpt"}.get(kind, f"t.{kind}")
    path = tmp_path / name

    @FUZZ
    @given(data=st.data())
    def run(data):
        path.write_bytes(_mutated(originals[kind], data))
        _load_all(kind, path, originals[kind])

    run()


def test_fuzz_figures(figures):
    """Runs after the fuzz tests (module order): records how many damaged files each loader handled."""
    for kind, n in sorted(TRIED.items()):
        figures("hostile", f"fuzzed {kind} files (truncated/flipped/spliced)", handled=n, tried=n)


# -- hand-crafted attacks ------------------------------------------------------------------------


class Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _expect_refusal(call, marker=None, peak_mb=64, error=jaxsave.JaxsaveError, match=None):
    tracemalloc.start()
    try:
        with pytest.raises(error, match=match):
            call()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < peak_mb * 2**20, f"{peak / 2**20:.0f} MiB allocated on a hostile file"
    if marker is not None:
        assert not os.path.exists(marker), "the payload ran"


def _samples_file(path, counts=(4,), draws=4, shape=(3,), structure_edit=None, chunks=True, extent=None):
    """A sample file crafted by hand (as an attacker would), posterior layout."""
    with h5py.File(path, "w") as f:
        f.attrs["jaxsave_format"] = 1
        f.attrs["jaxsave_layout"] = "posterior"
        f.attrs["jaxsave_version"] = "0"
        f.attrs["sample_counts"] = np.asarray(counts, np.int64)
        structure = {
            "leaves": [
                {"key": ["x"], "group": "posterior", "name": "x", "dtype": "float32", "shape": list(shape)}
            ],
            "treedef": "",
            "treespec": None,
        }
        if structure_edit:
            structure_edit(structure)
        f.attrs["jaxsave_structure"] = json.dumps(structure)
        full = (len(counts), extent or draws) + tuple(shape)
        f.create_dataset(
            "posterior/x",
            shape=full,
            dtype=np.float32,
            chunks=(1, 1) + tuple(shape) if chunks else None,
            maxshape=(None, None) + tuple(shape) if chunks else None,
        )
    return path


HOSTILE = {}


def hostile(name):
    def register(fn):
        HOSTILE[name] = fn
        return fn

    return register


@hostile("pickle payload in each format")
def _pickles(tmp_path):
    marker = tmp_path / "pwned"
    for name in ("p.jaxsave", "p.npz", "p.safetensors", "p.h5", "p.h5.ckpt"):
        (tmp_path / name).write_bytes(pickle.dumps(Payload(marker)))
        _expect_refusal(lambda: jaxsave.load_pytree(tmp_path / name), marker)
    _expect_refusal(lambda: jaxsave.resume(tmp_path / "p.h5"), marker)
    return 6


@hostile("pickle inside an h5 dataset (object/void dtype)")
def _h5_object(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "o.h5"
    jaxsave.save_pytree(path, {"a": np.zeros(4)})
    with h5py.File(path, "r+") as f:
        del f["arrays/a"]
        f["arrays/a"] = np.void(pickle.dumps(Payload(marker)))
    _expect_refusal(lambda: jaxsave.load_pytree(path), marker)
    return 1


@hostile("safetensors header length overflow (2**64-1, 2**63, > file)")
def _st_overflow(tmp_path):
    path = tmp_path / "o.safetensors"
    for n in (2**64 - 1, 2**63, 2**40, 10**6):
        path.write_bytes(
            struct.pack("<Q", n) + b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}' + b"\0" * 4
        )
        _expect_refusal(lambda: jaxsave.load_pytree(path))
    return 4


@hostile("jaxsave header length overflow (2**64-1)")
def _native_overflow(tmp_path):
    from jaxsave._serialize.formats import native

    path = tmp_path / "o.jaxsave"
    for n in (2**64 - 1, 2**63 + 8):
        path.write_bytes(native.MAGIC + struct.pack("<QII", n, 0, 0) + b"{}")
        _expect_refusal(lambda: jaxsave.load_pytree(path))
    return 2


@hostile("giant declared shapes: safetensors, npz, h5")
def _giant(tmp_path):
    p = tmp_path / "g.safetensors"
    header = json.dumps({"a": {"dtype": "F64", "shape": [2**31, 2**31], "data_offsets": [0, 8]}}).encode()
    p.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
    _expect_refusal(lambda: jaxsave.load_pytree(p))
    p = tmp_path / "g.npz"
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f8", "fortran_order": False, "shape": (2**40,)})
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("a.npy", buf.getvalue() + b"\0" * 64)
    _expect_refusal(lambda: jaxsave.load_pytree(p))
    p = tmp_path / "g.h5"  # a sparse dataset: 8 TB declared, nothing stored
    jaxsave.save_pytree(p, {"a": np.zeros(4)})
    with h5py.File(p, "r+") as f:
        header = json.loads(f.attrs["jaxsave"])
        header["leaves"]["shapes"][0] = [2**20, 2**20]
        f.attrs["jaxsave"] = json.dumps(header)
        del f["arrays/a"]
        f.create_dataset("arrays/a", shape=(2**20, 2**20), dtype=np.float64, chunks=(1, 1024))
    _expect_refusal(lambda: jaxsave.load_pytree(p))
    return 3


@hostile("sample files: giant counts, sparse datasets, counts past the data")
def _giant_samples(tmp_path):
    cases = [
        _samples_file(tmp_path / "c1.h5", counts=(2**40,)),  # counts past the dataset
        _samples_file(tmp_path / "c2.h5", counts=(2**33,), extent=2**33),  # sparse: 100 GB declared
        _samples_file(tmp_path / "c3.h5", counts=(-5,)),
        _samples_file(tmp_path / "c4.h5", shape=(2**20, 2**20), counts=(1,), draws=1),
        _samples_file(
            tmp_path / "c5.h5", structure_edit=lambda s: s["leaves"][0].__setitem__("dtype", "object")
        ),
        _samples_file(tmp_path / "c6.h5", structure_edit=lambda s: s["leaves"][0].__setitem__("shape", [-1])),
        _samples_file(tmp_path / "c7.h5", structure_edit=lambda s: s.__setitem__("leaves", "x" * 10)),
    ]
    for path in cases:
        _expect_refusal(lambda: jaxsave.load_samples(path))
        _inspect(path)
    return len(cases)


@hostile("sample files: many chains padded to one long chain (sparse, or stored)")
def _padded_samples(tmp_path):
    chains, long = 100, 2**16
    counts = (long,) + (1,) * (chains - 1)  # 100 chains padded to 65536 draws of 3 floats: 79 MB
    sparse = _samples_file(tmp_path / "p1.h5", counts=counts, extent=long)  # declares 0.8 MB, stores none
    _expect_refusal(lambda: jaxsave.load_samples(sparse), error=jaxsave.FileFormatError, match="stores only")
    stored = _samples_file(tmp_path / "p2.h5", counts=counts, extent=long)
    with h5py.File(stored, "r+") as f:  # the draws it counts are there: intact, only too unequal
        f["posterior/x"][0] = np.ones((long, 3), np.float32)
        f["posterior/x"][1:, 0] = np.ones((chains - 1, 3), np.float32)
    _expect_refusal(lambda: jaxsave.load_samples(stored), error=jaxsave.ReadTooLargeError, match="chain=i")
    assert jaxsave.load_samples(stored, chain=0)["x"].shape == (long, 3)
    # Under 64 MiB declared and stored as nothing, but padded over 10 chains to 200 MB:
    # a read that large must be backed byte for byte.
    blown = _samples_file(tmp_path / "p3.h5", counts=(20_000,) + (1,) * 9, extent=20_000, shape=(256,))
    _expect_refusal(lambda: jaxsave.load_samples(blown), error=jaxsave.FileFormatError, match="stores only")
    for path in (sparse, stored, blown):
        _inspect(path)
    return 3


@hostile("path traversal in names (every format, samples)")
def _traversal(tmp_path):
    evil = {"../../evil": np.ones(2), "/etc/passwd": np.zeros(1), "a/../../b": np.arange(3)}
    n = 0
    for fmt in FORMATS:
        path = tmp_path / f"t.{fmt}"
        jaxsave.save_pytree(path, evil)
        got = jaxsave.load_pytree(path, as_numpy=True)  # names are keys, never paths
        assert set(got) == set(evil) and all((got[k] == v).all() for k, v in evil.items())
        n += 1
    # an npz whose member names climb out, written by hand
    with zipfile.ZipFile(tmp_path / "z.npz", "w") as z:
        with z.open("../../../tmp/evil.npy", "w") as fp:
            np.lib.format.write_array(fp, np.ones(2))
    got = jaxsave.load_pytree(tmp_path / "z.npz", as_numpy=True)
    assert list(got) == ["../../../tmp/evil"] and not os.path.exists("/tmp/evil.npy")
    # sample files whose structure names groups outside posterior/
    path = _samples_file(
        tmp_path / "s.h5",
        structure_edit=lambda s: s["leaves"][0].update(group="/../../posterior", name="../x"),
    )
    with contextlib.suppress(jaxsave.JaxsaveError):
        jaxsave.load_samples(path)
    assert sorted(os.listdir(tmp_path)) == sorted([f"t.{f}" for f in FORMATS] + ["z.npz", "s.h5"])
    return n + 2


@hostile("deeply nested structures (JSON, tree, python)")
def _nesting(tmp_path):
    import zlib

    from jaxsave._serialize.formats import native

    n = 0
    for depth in (400, 100_000):
        node = {"t": "none"}
        for _ in range(depth):
            node = {"t": "list", "children": [node]}
        text = (
            json.dumps(
                {
                    "format_version": 1,
                    "structure": {"root": node, "refs": []},
                    "leaves": [],
                    "data": [],
                    "data_size": 0,
                    "metadata": None,
                }
            ).encode()
            if depth < 50_000
            else b"[" * depth
        )
        path = tmp_path / "d.jaxsave"
        path.write_bytes(native.MAGIC + struct.pack("<QII", len(text), zlib.crc32(text), 0) + text)
        try:
            got = jaxsave.load_pytree(path)
            assert depth < 50_000 and jax.tree.leaves(got) == []
        except jaxsave.JaxsaveError:
            pass
        n += 1
    deep = []
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises((jaxsave.JaxsaveError, RecursionError, ValueError)):
        jaxsave.save_pytree(tmp_path / "deep.jaxsave", deep)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".deep")]
    return n + 1


@hostile("checkpoint files: wrong kind, foreign tree, damaged leaves")
def _checkpoints(tmp_path):
    base = tmp_path / "r.h5"
    jaxsave.save_pytree(str(base) + ".ckpt", {"a": np.zeros(2)})  # not a checkpoint
    _expect_refusal(lambda: jaxsave.resume(base))
    jaxsave.save_pytree(str(base) + ".ckpt", {"0": {"step": "x"}}, metadata={"kind": "jaxsave-checkpoint"})
    _expect_refusal(lambda: jaxsave.resume(base))
    jaxsave.save_pytree(
        str(base) + ".ckpt",
        {"0": {"step": np.int64(1), "sample_count": np.int64(1), "leaves": [np.zeros(2)]}},
        metadata={
            "kind": "jaxsave-checkpoint",
            "structure": {"root": {"t": "eval"}},
            "leaves": [[[2**40, 2**40], "float64"]],
        },
    )
    _expect_refusal(lambda: jaxsave.resume(base))
    return 3


@hostile("damaged zip internals (compression method, member names, offsets)")
def _zip_internals(tmp_path):
    path = tmp_path / "z.npz"
    jaxsave.save_pytree(path, {"a": np.arange(8.0), "b": np.ones(2)})
    raw = path.read_bytes()
    cases = []
    local = raw.index(b"PK\x03\x04")
    central = raw.index(b"PK\x01\x02")
    b = bytearray(raw)
    b[local + 8 : local + 10] = struct.pack("<H", 99)  # a compression method zipfile does not know
    b[central + 10 : central + 12] = struct.pack("<H", 99)
    cases.append(bytes(b))
    b = bytearray(raw)
    b[local + 30] ^= 0x20  # the local member name disagrees with the directory's
    cases.append(bytes(b))
    b = bytearray(raw)
    b[central + 42 : central + 46] = struct.pack("<I", 2**31)  # a member offset past the end
    cases.append(bytes(b))
    for data in cases:
        path.write_bytes(data)
        _expect_refusal(lambda: jaxsave.load_pytree(path))
    return len(cases)


@hostile("damaged HDF5 data and heaps under a valid superblock")
def _h5_internals(tmp_path):
    path = tmp_path / "d.h5"
    jaxsave.save_pytree(path, {"a": np.arange(64.0), "s": "a string kept in the header"})
    raw = path.read_bytes()
    n = 0
    for pos in range(96, len(raw), max(1, len(raw) // 40)):  # flip a byte every 1/40th of the file
        b = bytearray(raw)
        b[pos] ^= 0xFF
        path.write_bytes(bytes(b))
        try:
            got = jaxsave.load_pytree(path, as_numpy=True)
            assert got["a"].shape == (64,) and got["a"].dtype == np.float64
        except jaxsave.JaxsaveError:
            pass
        n += 1
    return n


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_crafted_hostile_files(tmp_path, case, figures):
    n = HOSTILE[case](tmp_path)
    figures("hostile", f"crafted: {case}", handled=n, tried=n)
