"""Hostile and broken files: refused with a clear jaxsave error, no code run, bounded memory."""

from __future__ import annotations

import json
import os
import pickle
import struct
import sys
import tracemalloc
import zipfile
import zlib

import numpy as np
import pytest

import jaxsave
from jaxsave._serialize.formats import native
from jaxsave.errors import FileFormatError, JaxsaveError, UnregisteredNameError


class Payload:
    """Unpickling this creates a marker file: proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _split(path):
    """(header, data bytes) of a .jaxsave file."""
    raw = open(path, "rb").read()
    (hlen,) = struct.unpack("<Q", raw[8:16])
    return json.loads(raw[24 : 24 + hlen]), raw[24 + hlen :]


def _assemble(path, header, data, hlen=None):
    """Write a .jaxsave file by hand, with a valid header checksum (as an attacker would)."""
    text = json.dumps(header).encode()
    text += b" " * (-(24 + len(text)) % 64)
    prefix = struct.pack("<QII", len(text) if hlen is None else hlen, zlib.crc32(text), 0)
    with open(path, "wb") as f:
        f.write(native.MAGIC + prefix + text + data)


@pytest.fixture
def good(tmp_path):
    path = tmp_path / "good.jaxsave"
    jaxsave.save_pytree(path, {"a": np.arange(4.0), "b": [np.ones(3, np.int32)]})
    return path


def _edited(tmp_path, good, edit, data_edit=None):
    header, data = _split(good)
    edit(header)
    path = tmp_path / "bad.jaxsave"
    _assemble(path, header, data if data_edit is None else data_edit(data))
    return path


@pytest.mark.parametrize("name", ["x.jaxsave", "x.pkl", "x.npz", "x.safetensors"])
def test_pickle_files_are_refused_without_running_them(tmp_path, name):
    marker = tmp_path / "pwned"
    (tmp_path / name).write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(FileFormatError, match="pickle"):
        jaxsave.load_pytree(tmp_path / name)
    with pytest.raises(FileFormatError):
        jaxsave.read_metadata(tmp_path / name)
    assert not marker.exists()


def test_npz_with_object_array_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.npz"
    np.savez(path, ok=np.ones(2), evil=np.array([Payload(marker)], dtype=object))
    with pytest.raises(FileFormatError, match="object array"):
        jaxsave.load_pytree(path)
    assert not marker.exists()


def test_jaxsave_npz_with_a_member_swapped_for_an_object_array(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "t.npz"
    jaxsave.save_pytree(path, {"w": np.ones(2)})
    with zipfile.ZipFile(path) as z:
        header = z.read("__jaxsave__.json")
    with zipfile.ZipFile(path, "w") as z:
        with z.open("w.npy", "w") as fp:
            np.lib.format.write_array(fp, np.array([Payload(marker)], dtype=object), allow_pickle=True)
        z.writestr("__jaxsave__.json", header)
    with pytest.raises(FileFormatError, match="object array"):
        jaxsave.load_pytree(path)
    assert not marker.exists()


def test_npz_member_claiming_an_impossible_size_is_refused(tmp_path):
    path = tmp_path / "bomb.npz"
    np.savez_compressed(path, a=np.zeros(1000))
    raw = bytearray(path.read_bytes())
    central = raw.index(b"PK\x01\x02")
    raw[central + 24 : central + 28] = struct.pack("<I", 2**32 - 2)  # uncompressed size
    path.write_bytes(bytes(raw))
    with pytest.raises(FileFormatError, match="impossible sizes"):
        jaxsave.load_pytree(path)


def test_huge_and_inconsistent_header_lengths(tmp_path, good):
    header, data = _split(good)
    for hlen in (2**62, 10**9, len(json.dumps(header)) + 10**6):
        path = tmp_path / "h.jaxsave"
        _assemble(path, header, data, hlen=hlen)
        with pytest.raises(FileFormatError, match="header length"):
            jaxsave.read_metadata(path)


def test_header_corruption_is_detected_by_its_checksum(tmp_path, good):
    raw = bytearray(good.read_bytes())
    raw[40] ^= 0x01
    (tmp_path / "c.jaxsave").write_bytes(bytes(raw))
    with pytest.raises(FileFormatError, match="checksum"):
        jaxsave.load_pytree(tmp_path / "c.jaxsave")


@pytest.mark.parametrize("text", [b"{not json", b"[" * 200_000, b"[1, 2]", b'{"a": NaN'])
def test_garbage_headers(tmp_path, text):
    path = tmp_path / "g.jaxsave"
    path.write_bytes(native.MAGIC + struct.pack("<QII", len(text), zlib.crc32(text), 0) + text)
    with pytest.raises(FileFormatError):
        jaxsave.load_pytree(path)


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda h: h.__setitem__("data_size", 10**15), "header says 1000000000000000"),
        (lambda h: h.__setitem__("data_size", "76"), "header says '76'"),
        (lambda h: h["leaves"]["shapes"].__setitem__(0, [9]), "need 140 data bytes"),
        (lambda h: h["leaves"]["shapes"].__setitem__(0, [2**40, 2**40]), "need 967140655691703339"),
        (lambda h: h["leaves"]["shapes"].__setitem__(1, [4]), "need 80 data bytes"),
        (lambda h: h["leaves"]["shapes"].__setitem__(0, [-4]), "invalid shape"),
        (lambda h: h["leaves"]["shapes"].__setitem__(0, [1] * 100), "invalid shape"),
        (lambda h: h["leaves"]["shapes"].__setitem__(0, ["4"]), "invalid shape"),
        (lambda h: h["leaves"]["shapes"].__setitem__(0, [2**70]), "invalid shape"),
        (lambda h: h["leaves"]["dtypes"].__setitem__(0, "object"), "dtype"),
        (lambda h: h["leaves"]["dtypes"].__setitem__(0, "<U8"), "dtype"),
        (lambda h: h["leaves"]["dtypes"].__setitem__(0, "V32"), "dtype"),
        (lambda h: h["leaves"]["dtypes"].__setitem__(0, "key<evil>"), "PRNG key implementation"),
        (lambda h: [column.pop() for column in h["leaves"].values()], "need 32 data bytes"),
        (lambda h: h["leaves"]["dtypes"].pop(), "columns differ in length: 2 names, 1 dtypes, 2 shapes"),
        (lambda h: h["leaves"].pop("shapes"), "needs the lists 'names', 'dtypes' and 'shapes'"),
        (lambda h: h["leaves"].__setitem__("names", "abc"), "needs the lists"),
        (lambda h: h["leaves"]["names"].__setitem__(1, 7), "leaf 1 of the header has no name"),
        (
            lambda h: h.__setitem__("leaves", [{"name": "a", "dtype": "float32", "shape": [3]}]),
            "no leaf table",
        ),
        (lambda h: h.update(format_version=1, leaves=[7, 8, 9]), "format 1. leaf table is not a JSON object"),
        (
            lambda h: h.update(format_version=1, leaves=[{"name": "a", "dtype": "float32", "shape": [-3]}]),
            "invalid shape",
        ),
        (lambda h: h["leaves"]["names"].__setitem__(1, "a"), "same name"),
        (lambda h: h.__setitem__("format_version", "1"), "format version"),
        (lambda h: h.pop("structure"), "structure"),
        (lambda h: h["structure"]["root"].__setitem__("t", "eval"), "structure"),
        (lambda h: h["structure"]["root"]["children"].__setitem__(0, "pickle"), "leaf kind"),
        (
            lambda h: h["structure"]["root"]["children"][1]["children"].append(
                {"t": "value", "v": {"$": "float", "v": "__import__('os')"}}
            ),
            "bad float",
        ),
        (
            lambda h: h["structure"]["root"]["children"][1]["children"].append(
                {"t": "value", "v": {"$": "pickle", "v": "gASV"}}
            ),
            "unknown value tag",
        ),
        (
            lambda h: h["structure"]["root"]["children"][1]["children"].append(
                {"t": "value", "v": {"$": "ndarray", "dtype": "float64", "shape": [10**9, 10**9], "v": [1]}}
            ),
            "bad inline array",
        ),
        *(
            (
                lambda h, v=v: h["structure"]["root"]["children"][1]["children"].append(
                    {"t": "value", "v": v}
                ),
                "invalid tree structure: OverflowError",
            )
            for v in (
                {"$": "npscalar", "dtype": "int8", "v": 10**30},
                {"$": "ndarray", "dtype": "int8", "shape": [1], "v": [10**30]},
                {"$": "npscalar", "dtype": "float32", "v": 10**400},
                {"$": "complex", "v": [10**400, 0]},
            )
        ),
    ],
)
def test_corrupt_native_headers(tmp_path, good, edit, match):
    path = _edited(tmp_path, good, edit)
    tracemalloc.start()
    try:
        with pytest.raises(JaxsaveError, match=match):
            jaxsave.load_pytree(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 * 2**20  # nothing sized by the file's claims was allocated


def test_truncated_or_extended_file(tmp_path, good):
    raw = good.read_bytes()
    (tmp_path / "long.jaxsave").write_bytes(raw + b"\0" * 64)
    with pytest.raises(FileFormatError, match="data bytes"):
        jaxsave.load_pytree(tmp_path / "long.jaxsave")
    for cut in (len(raw) - 1, len(raw) - 40, 20, 5):
        path = tmp_path / "t.jaxsave"
        path.write_bytes(raw[:cut])
        with pytest.raises(FileFormatError):
            jaxsave.load_pytree(path)


def test_empty_and_foreign_files(tmp_path):
    for content in (b"", b"hello world, not a tree", b"\x00" * 64):
        (tmp_path / "f.jaxsave").write_bytes(content)
        with pytest.raises(FileFormatError):
            jaxsave.load_pytree(tmp_path / "f.jaxsave")


def test_names_are_never_imported_or_looked_up_outside_the_registry(tmp_path, good):
    def point_at(name, kind="node", declare=True):
        def edit(h):
            h["structure"]["refs"] = [name] if declare else []
            h["structure"]["root"] = {
                "t": kind,
                "type": name,
                "aux": None,
                "fields": ["x"],
                "keys": [".x"],
                "children": [{"t": "none"}],
            }
            h["leaves"], h["data"], h["data_size"] = {"names": [], "dtypes": [], "shapes": []}, [], 0

        return _edited(tmp_path, good, edit, data_edit=lambda d: b"")

    before = set(sys.modules)
    for name in (
        "os.system",
        "subprocess.Popen",
        "antigravity.fly",
        "jax._src.config.update",
        "jax.numpy.linalg.LinAlgError",
    ):
        with pytest.raises(UnregisteredNameError) as e:
            jaxsave.load_pytree(point_at(name))
        assert name in str(e.value) and "register_saveable" in str(e.value)
    assert "antigravity" not in sys.modules and set(sys.modules) - before == set()
    # a registered *function* named where a class is expected is refused, not called
    with pytest.raises(FileFormatError, match="not a namedtuple type"):
        jaxsave.load_pytree(point_at("jax.nn.relu", kind="namedtuple"))
    with pytest.raises(FileFormatError, match="not in its refs"):
        jaxsave.load_pytree(point_at("jax.nn.relu", declare=False))
    with pytest.raises(FileFormatError, match="cannot rebuild a builtins.dict"):
        jaxsave.load_pytree(point_at("builtins.dict"))
    with pytest.raises(FileFormatError, match="not a registered pytree node"):
        jaxsave.load_pytree(point_at("builtins.str"))


def test_hostile_safetensors_headers(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", 2**40) + b"{" + b" " * 100)
    with pytest.raises(FileFormatError, match="exceeds"):
        jaxsave.load_pytree(path)
    path.write_bytes(struct.pack("<Q", 10) + b"{broken js")
    with pytest.raises(FileFormatError):
        jaxsave.load_pytree(path)
    jaxsave.save_pytree(path, {"a": np.ones(4)})
    raw = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header["a"]["shape"] = [8]  # disagrees with the jaxsave header
    text = json.dumps(header).encode().ljust(n)
    path.write_bytes(raw[:8] + text + raw[8 + n :])
    with pytest.raises(FileFormatError):
        jaxsave.load_pytree(path)


def test_hdf5_without_jaxsave_header(tmp_path):
    import h5py

    with h5py.File(tmp_path / "x.h5", "w") as f:
        f["a"] = np.ones(3)
    with pytest.raises(FileFormatError, match="not written by jaxsave"):
        jaxsave.load_pytree(tmp_path / "x.h5")


def test_wrong_format_argument(tmp_path, good):
    with pytest.raises(FileFormatError, match="jaxsave format, not npz"):
        jaxsave.load_pytree(good, format="npz")
    with pytest.raises(ValueError, match="unknown format"):
        jaxsave.save_pytree(tmp_path / "x", {}, format="pickle")
    assert os.listdir(tmp_path) == ["good.jaxsave"]


def test_a_deeply_nested_structure_loaded_like_a_target_is_a_format_error(tmp_path, good):
    # Python 3.13's json reads 3000 levels; matching them to like= overflowed the stack
    header, data = _split(good)
    for column in header["leaves"].values():
        del column[1:]
    header["data_size"] = 32  # the first leaf's 4 float64 alone
    header["structure"]["root"] = "ROOT"
    text = json.dumps(header).replace(
        '"ROOT"', '{"t": "list", "children": [' * 3000 + '"numpy"' + "]}" * 3000
    )
    text += " " * (-(24 + len(text)) % 64)
    path = tmp_path / "deep.jaxsave"
    prefix = struct.pack("<QII", len(text), zlib.crc32(text.encode()), 0)
    path.write_bytes(native.MAGIC + prefix + text.encode() + data[:32])
    with pytest.raises(JaxsaveError, match="nested too deeply|RecursionError|maximum recursion depth"):
        jaxsave.load_pytree(path, like=[np.zeros(4)])
