"""Hostile HDF5 storage and hostile names, tried on every loader: refused, nothing leaked or imported.

HDF5 can take a dataset's bytes from outside the file: external storage (any
path: a local secret, a FIFO that blocks the reader, ``/dev/zero``), external
links, soft links, virtual datasets, and filters (plugins, decompression). Every
such file, built with real h5py, must be refused with a ``FileFormatError`` by
``load_pytree``/``open_pytree``/``read_metadata`` (``.h5`` format), ``resume``
(a ``.ckpt`` that is such a file), ``load_samples``, ``file_info``,
``open_live``, ``recover``, ``to_inference_data``, ``merge``, ``jaxsave
inspect`` and ``HDF5Collector(mode="a")``, before any data is read and with bounded memory. A merged file's
virtual datasets are allowed only over the sources it names, each a regular
jaxsave sample file checked the same way. Names found in files (every pytree
format, sample files, checkpoints) must never import a module, which is checked
in a fresh child process. Tests that could hang (FIFOs) run in a child process
with a timeout.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pathlib
import subprocess
import sys
import textwrap
import tracemalloc
from collections import namedtuple

import arviz  # noqa: F401  (imported up front: its import is not what a load allocates)
import h5py
import jax
import numpy as np
import pytest
from _reliability import child_env

import jaxsave
from jaxsave import __main__ as cli

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(300)]

SECRET = b"TOP-SECRET-KEY!!"  # 16 bytes: two float64s
SHAPE, DTYPE = (2, 4), np.float64  # the attacked variable: 64 bytes, 4 secrets


# -- the attacks: each creates the dataset `name` of `f`, of `shape`, with its bytes from elsewhere --


def _secrets(d, shape):
    """A raw secret file and an HDF5 file holding it as dataset /secret (outside the attacked file)."""
    raw = d / "secret.bin"
    raw.write_bytes(SECRET * 64)
    h5 = d / "secret.h5"
    with h5py.File(h5, "w") as f:
        f["secret"] = np.frombuffer(SECRET * 4, DTYPE).reshape(shape)
    return raw, h5


def _external(f, name, d, shape):
    raw, _ = _secrets(d, shape)
    f.create_dataset(name, shape=shape, dtype=DTYPE, external=[(str(raw), 0, 64)])


def _external_link(f, name, d, shape):
    _, h5 = _secrets(d, shape)
    f[name] = h5py.ExternalLink(str(h5), "/secret")


def _soft_link(f, name, d, shape):
    f["hidden"] = np.frombuffer(SECRET * 4, DTYPE).reshape(shape)
    f[name] = h5py.SoftLink("/hidden")


def _virtual(f, name, d, shape):
    _, h5 = _secrets(d, shape)
    layout = h5py.VirtualLayout(shape=shape, dtype=DTYPE)
    layout[...] = h5py.VirtualSource(str(h5), "secret", shape=shape)
    f.create_virtual_dataset(name, layout)


def _filtered(*codes):
    def make(f, name, d, shape):
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        dcpl.set_chunk(shape)
        for code in codes:
            if code == h5py.h5z.FILTER_DEFLATE:
                dcpl.set_deflate(9)
            else:  # optional: h5py writes past a filter it does not have; HDF5 still lists it
                dcpl.set_filter(code, h5py.h5z.FLAG_OPTIONAL)
        ds = h5py.h5d.create(
            f.id, name.encode(), h5py.h5t.IEEE_F64LE, h5py.h5s.create_simple(shape), dcpl=dcpl
        )
        ds.write(h5py.h5s.ALL, h5py.h5s.ALL, np.zeros(shape, DTYPE))

    return make


def _scaleoffset(f, name, d, shape):
    f.create_dataset(name, data=np.zeros(shape, DTYPE), scaleoffset=2)  # 0 bits a value: no bound


ATTACKS = {
    "external storage (a secret file)": _external,
    "external link (a secret HDF5 file)": _external_link,
    "soft link": _soft_link,
    "virtual dataset (a secret HDF5 file)": _virtual,
    "unknown filter (a plugin)": _filtered(32015),
    "scale-offset filter": _scaleoffset,
    "deflate twice (a decompression bomb)": _filtered(h5py.h5z.FILTER_DEFLATE, h5py.h5z.FILTER_DEFLATE),
}


# -- hostile files of each kind --------------------------------------------------------------------


def _pytree_h5(path, attack, shape=SHAPE):
    """A jaxsave .h5 pytree file {"a": array of ``shape``} whose dataset ``attack`` makes."""
    jaxsave.save_pytree(path, {"a": np.zeros(shape, DTYPE)}, format="hdf5")
    with h5py.File(path, "r+") as f:
        del f["arrays/a"]
        attack(f, "arrays/a", path.parent, shape)
    return path


def _samples(path, attack=None, counts=(4,), draw_shape=(2,), value=0.0):
    """A posterior-layout sample file, crafted by hand: chains of draws of ``draw_shape`` floats.

    With ``attack``, the dataset ``posterior/x`` (shape ``(chains, draws) + draw_shape``) is the attack's.
    """
    shape = (len(counts), max(counts)) + tuple(draw_shape)
    with h5py.File(path, "w") as f:
        f.attrs["jaxsave_format"] = 1
        f.attrs["jaxsave_layout"] = "posterior"
        f.attrs["jaxsave_version"] = "0"
        f.attrs["sample_counts"] = np.asarray(counts, np.int64)
        f.attrs["jaxsave_structure"] = json.dumps(
            {
                "leaves": [
                    {
                        "key": ["x"],
                        "group": "posterior",
                        "name": "x",
                        "dtype": "float64",
                        "shape": list(draw_shape),
                    }
                ]
            }
        )
        group = f.create_group("posterior")
        if attack is not None:
            attack(f, "posterior/x", path.parent, shape)
        else:
            group["x"] = np.full(shape, value, DTYPE)
    return path


def _inspect(path) -> None:
    with (
        contextlib.redirect_stdout(io.StringIO()),
        contextlib.redirect_stderr(io.StringIO()) as err,
    ):
        code = cli.main(["inspect", str(path)])
    if code == 2:
        raise jaxsave.FileFormatError(f"jaxsave inspect exited with 2: {err.getvalue()}")
    assert code == 0


def _pytree_loaders(path):
    """Every loader of a pytree file at ``path`` (and ``resume``, for a checkpoint that is one)."""
    ckpt = str(path) + ".ckpt"
    if not os.path.exists(ckpt):
        os.link(path, ckpt)
    return {
        "load_pytree": lambda: jaxsave.load_pytree(path, as_numpy=True),
        "load_pytree(like=)": lambda: jaxsave.load_pytree(path, like={"a": np.zeros(SHAPE, DTYPE)}),
        "open_pytree": lambda: jaxsave.open_pytree(path).close(),
        "read_metadata": lambda: jaxsave.read_metadata(path),
        "resume": lambda: jaxsave.resume(path),
    }


def _sample_loaders(path, tmp_path):
    return {
        "load_samples": lambda: jaxsave.load_samples(path),
        "load_samples(chain=0)": lambda: jaxsave.load_samples(path, chain=0, draws=slice(1, 3)),
        "file_info": lambda: jaxsave.file_info(path),
        "open_live": lambda: jaxsave.open_live(path).refresh(),
        "recover": lambda: jaxsave.recover(path),
        "to_inference_data": lambda: jaxsave.to_inference_data(path),
        "merge": lambda: jaxsave.merge([path], tmp_path / "merged-out.h5"),
        "jaxsave inspect": lambda: _inspect(path),
        # A writer continuing the file would follow external storage too (and write there).
        "HDF5Collector(mode='a')": lambda: jaxsave.HDF5Collector(path, mode="a").close(),
    }


def _refused(call, peak_mb=32, match=None, what=""):
    """``call`` raises FileFormatError, allocates under ``peak_mb``, and never returns the secret."""
    tracemalloc.start()
    try:
        got = call()
    except jaxsave.FileFormatError as error:
        assert match is None or match in str(error), error
        return str(error)
    else:
        arrays = [x for x in jax.tree.leaves(got) if isinstance(x, (np.ndarray, jax.Array))]
        leaked = any(SECRET[:8] in np.asarray(x).tobytes() for x in arrays)
        pytest.fail(
            f"{what} not refused{' (the secret was read)' if leaked else ''}: got {type(got).__name__}"
        )
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < peak_mb * 2**20, f"{peak / 2**20:.0f} MiB allocated on a hostile file"


# -- tests: hostile storage -----------------------------------------------------------------------


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_hostile_storage_in_a_pytree_h5_is_refused_by_every_loader(tmp_path, attack, figures):
    path = _pytree_h5(tmp_path / "t.h5", ATTACKS[attack])
    loaders = _pytree_loaders(path)
    for load in loaders.values():
        _refused(load)
    figures("hostile", f"storage: {attack}, .h5 pytree", handled=len(loaders), tried=len(loaders))


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_hostile_storage_in_a_sample_file_is_refused_by_every_loader(tmp_path, attack, figures):
    path = _samples(tmp_path / "s.h5", ATTACKS[attack])
    loaders = _sample_loaders(path, tmp_path)
    for load in loaders.values():
        _refused(load)
    assert not (tmp_path / "merged-out.h5").exists()
    figures("hostile", f"storage: {attack}, sample file", handled=len(loaders), tried=len(loaders))


def test_external_storage_on_dev_zero_allocates_nothing(tmp_path):
    """256 MiB declared as external storage on /dev/zero (the size guard trusted get_storage_size)."""

    def zero(f, name, d, shape):
        f.create_dataset(name, shape=shape, dtype=DTYPE, external=[("/dev/zero", 0, 2**28)])

    path = _pytree_h5(tmp_path / "z.h5", zero, shape=(2**15, 2**10))  # float64: 256 MiB
    assert os.path.getsize(path) < 2**16
    for load in _pytree_loaders(path).values():
        _refused(load, match="external")
    samples = _samples(tmp_path / "zs.h5", zero, counts=(2**15,), draw_shape=(2**10,))
    for load in _sample_loaders(samples, tmp_path).values():
        _refused(load, match="external")


_CHILD = textwrap.dedent("""
    import sys, jaxsave
    kind, path = sys.argv[1:]
    loads = {"pytree": [lambda: jaxsave.load_pytree(path), lambda: jaxsave.read_metadata(path)],
             "samples": [lambda: jaxsave.load_samples(path), lambda: jaxsave.file_info(path),
                         lambda: jaxsave.to_inference_data(path)],
             "writers": [lambda: jaxsave.HDF5Collector(path, mode="a"), lambda: jaxsave.resume(path),
                         lambda: jaxsave.merge([path], path + ".merged.h5")]}[kind]
    for load in loads:
        try:
            load()
            print("loaded")
        except jaxsave.FileFormatError as error:
            print("FileFormatError:", str(error).replace(chr(10), " "))
""")


def _run_child(kind, path, timeout=120):
    """The loaders of ``kind`` run on ``path`` in a child process: a hang fails, it does not hang."""
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD, kind, str(path)],
            env=child_env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"a loader hung on {path} (killed after {timeout} s)")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.splitlines()


def test_external_storage_on_a_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)

    def on_fifo(f, name, d, shape):
        f.create_dataset(name, shape=shape, dtype=DTYPE, external=[(str(fifo), 0, 64)])

    pytree = _pytree_h5(tmp_path / "f.h5", on_fifo)
    samples = _samples(tmp_path / "fs.h5", on_fifo)
    for kind, path in (("pytree", pytree), ("samples", samples)):
        lines = _run_child(kind, path)
        assert lines and all(line.startswith("FileFormatError:") and "external" in line for line in lines), (
            lines
        )


# -- merged files: virtual datasets only over the sources merge names ------------------------------


def _sources(d, n=2):
    return [_samples(d / f"run-{i}.h5", value=float(i)) for i in range(n)]


def test_a_merged_file_reads_only_the_sources_it_names(tmp_path, figures):
    runs, out = tmp_path / "runs", tmp_path / "out"
    runs.mkdir()
    out.mkdir()
    merged = jaxsave.merge(_sources(runs), out / "all.h5")  # sources named "../runs/run-i.h5"
    x = jaxsave.load_samples(merged)["x"]
    assert x.shape == (2, 4, 2) and x[1].tolist() == [[1.0, 1.0]] * 4
    assert jaxsave.file_info(merged).chains == 2
    _, secret = _secrets(tmp_path, (1, 4, 2))
    _samples(runs / "ext.h5", _external)
    jaxsave.merge([runs / "run-0.h5"], runs / "nested.h5")

    def edited(name, mappings, named=None, virtual=True):
        """A copy of ``merged`` whose posterior/x maps ``mappings`` [(file, dataset)] (``named``: merged_from)."""
        path = out / name
        path.write_bytes(pathlib.Path(merged).read_bytes())
        with h5py.File(path, "r+") as f:
            if named is not None:
                f.attrs["jaxsave_merged_from"] = json.dumps(named)
            if not virtual:
                del f.attrs["jaxsave_merged_from"]
            if mappings is not None:
                del f["posterior/x"]
                layout = h5py.VirtualLayout(shape=(2, 4, 2), dtype=DTYPE)
                for i, (file_name, dset) in enumerate(mappings):
                    layout[i] = h5py.VirtualSource(file_name, dset, shape=(1, 4, 2))[0]
                f.create_virtual_dataset("posterior/x", layout)
        return path

    first = ("../runs/run-0.h5", "posterior/x")
    cases = {
        "an absolute source": edited("abs.h5", [first, (str(secret), "secret")], [first[0], str(secret)]),
        "a source it does not name": edited("unnamed.h5", [first, ("../secret.h5", "secret")]),
        "another dataset of a source": edited("other.h5", [first, ("../runs/run-1.h5", "secret")]),
        "a source mapped twice": edited("twice.h5", [first, first]),
        "a source with external storage": edited(
            "ext.h5", [first, ("../runs/ext.h5", "posterior/x")], [first[0], "../runs/ext.h5"]
        ),
        "a source that is a merged file": edited(
            "nested.h5",
            [first, ("../runs/nested.h5", "posterior/x")],
            [first[0], "../runs/nested.h5"],
        ),
        "a missing source": edited(
            "missing.h5", [first, ("../runs/gone.h5", "posterior/x")], [first[0], "../runs/gone.h5"]
        ),
        "a source that is not a sample file": edited(
            "foreign.h5", [first, ("../secret.h5", "secret")], [first[0], "../secret.h5"]
        ),
        "a malformed jaxsave_merged_from": edited("bad-attr.h5", None, {"a": 1}),
        "no jaxsave_merged_from": edited("plain.h5", None, virtual=False),
    }
    for case, path in cases.items():
        for name, load in _sample_loaders(path, tmp_path).items():
            _refused(load, what=f"{name} on a merged file with {case}")
    assert jaxsave.load_samples(merged)["x"][1].tolist() == [[1.0, 1.0]] * 4  # the real sources still load
    n = len(cases) * len(_sample_loaders(merged, tmp_path))
    figures("hostile", "storage: merged files mapping other files", handled=n, tried=n)


def test_a_fifo_as_the_path_is_refused_without_blocking(tmp_path):
    """A FIFO where the file should be: open() waited for a writer forever in every loader."""
    os.mkfifo(tmp_path / "p.h5.ckpt")  # the checkpoint resume reads
    for name, kinds in (("p.jaxsave", ("pytree",)), ("p.h5", ("samples", "writers"))):
        os.mkfifo(tmp_path / name)
        for kind in kinds:
            lines = _run_child(kind, tmp_path / name, timeout=60)
            assert lines and all(line.startswith("FileFormatError:") and "FIFO" in line for line in lines), (
                kind,
                lines,
            )


def test_a_merged_source_that_is_a_fifo_is_refused_without_blocking(tmp_path):
    sources = _sources(tmp_path)
    merged = jaxsave.merge(sources, tmp_path / "all.h5")
    os.remove(sources[1])
    os.mkfifo(sources[1])  # HDF5 would open it and wait for a writer forever
    lines = _run_child("samples", merged)
    assert lines and all("not a regular file" in line for line in lines), lines


def test_merged_files_over_64_mib_load(tmp_path):
    """The size guard backs a virtual dataset by its sources' storage (it counted 0 bytes for it)."""
    draws = 2**12
    sources = [
        _samples(tmp_path / f"big-{i}.h5", counts=(draws,), draw_shape=(2**10,), value=i) for i in range(3)
    ]
    merged = jaxsave.merge(sources, tmp_path / "big.h5")  # 3 x 32 MiB
    x = jaxsave.load_samples(merged)["x"]
    assert x.shape == (3, draws, 2**10) and x[2, -1, -1] == 2.0


# -- names in files: resolved through the registry only, never importing a module ------------------

#: Names under jax whose lookup as attributes runs jax's lazy loader (it imported these modules).
LAZY_NAMES = (
    "jax.scipy.signal.X",
    "jax.scipy.stats.norm.X",
    "jax.scipy.cluster.vq.X",
    "jax.scipy.integrate.X",
    "jax.scipy.special.X",
    "jax.experimental.sparse.BCOO",
    "jax.nn.initializers.X",
    "optax.X",
    "jax.scipy.signal",
)


def _named_spec(name, where):
    """A tree description naming ``name`` as ``where`` (a node type, a namedtuple, a value, an enum...)."""
    node = {
        "node": {"t": "node", "type": name, "aux": None, "keys": [], "children": []},
        "namedtuple": {"t": "namedtuple", "type": name, "fields": [], "children": []},
        "ref": {"t": "value", "v": {"$": "ref", "v": name}},
        "enum": {"t": "value", "v": {"$": "enum", "type": name, "v": "A"}},
        "mapping": {"t": "value", "v": {"$": "mapping", "type": name, "v": []}},
        "factory": {
            "t": "defaultdict",
            "keys": [],
            "children": [],
            "factory": {"$": "ref", "v": name},
        },
    }[where]
    return {"treespec": 1, "refs": [name], "root": node}


_NAMES_CHILD = textwrap.dedent("""
    import json, sys
    import jaxsave
    from jaxsave._serialize.formats import format_module
    specs, d = json.loads(sys.argv[1]), sys.argv[2]
    header = lambda spec, meta=None: {"format": "jaxsave", "format_version": 2, "jaxsave_version": "0",
                                      "metadata": meta, "structure": spec,
                                      "leaves": {"names": [], "dtypes": [], "shapes": []}}
    paths = []
    for fmt, suffix in (("jaxsave", "jaxsave"), ("npz", "npz"), ("safetensors", "safetensors"), ("hdf5", "h5")):
        good = f"{d}/good.{suffix}"
        jaxsave.save_pytree(good, {"a": [1, None]}, format=fmt)
        jaxsave.load_pytree(good)  # what loading a format imports, imported before the snapshot
        for i, spec in enumerate(specs):
            path = f"{d}/n{i}.{suffix}"
            format_module(fmt).write(path, header(spec), [])
            paths.append(path)
    before = set(sys.modules)
    outcomes = []
    for path in paths:
        for load in (lambda: jaxsave.load_pytree(path), lambda: jaxsave.open_pytree(path).shape_dtype_tree()):
            try:
                load()
                outcomes.append("loaded " + path)
            except (jaxsave.UnregisteredNameError, jaxsave.FileFormatError) as error:
                outcomes.append(type(error).__name__ + ": " + str(error).replace(chr(10), " "))
    for i, spec in enumerate(specs):  # a checkpoint naming it
        ckpt = f"{d}/r{i}.h5.ckpt"
        jaxsave.save_pytree(ckpt, {"0": {"step": 1, "sample_count": 1, "leaves": []}},
                            metadata={"kind": "jaxsave-checkpoint", "structure": spec, "leaves": []}, format="jaxsave")
        try:
            jaxsave.resume(f"{d}/r{i}.h5")
            outcomes.append("resumed")
        except jaxsave.JaxsaveError as error:
            outcomes.append("resume: " + type(error).__name__)
    print(json.dumps({"new": sorted(set(sys.modules) - before), "outcomes": outcomes}))
""")


def test_names_in_files_never_import_a_module(tmp_path, figures):
    """In a fresh process: loading files that name lazily-loaded jax modules imports nothing."""
    wheres = ["node", "namedtuple", "ref", "enum", "mapping", "factory"]
    cases = [(name, wheres[i % len(wheres)]) for i, name in enumerate(LAZY_NAMES)]
    cases += [(LAZY_NAMES[0], w) for w in wheres]
    specs = [_named_spec(name, where) for name, where in cases]
    proc = subprocess.run(
        [sys.executable, "-c", _NAMES_CHILD, json.dumps(specs), str(tmp_path)],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.splitlines()[-1])
    assert got["new"] == [], f"loading imported {got['new']}"
    outcomes = got["outcomes"]
    assert len(outcomes) == 4 * 2 * len(cases) + len(cases)
    loads = outcomes[: -len(cases)]
    for k, outcome in enumerate(loads):
        name = cases[(k // 2) % len(cases)][0]
        assert outcome.startswith("UnregisteredNameError") and name in outcome, outcome
    figures(
        "hostile",
        "names of lazily imported modules, every format",
        handled=len(outcomes),
        tried=len(outcomes),
    )


def test_names_in_a_sample_file_never_import_a_module(tmp_path):
    """A sample file's stored structure naming lazy modules: nested dicts and a warning naming them."""
    path = _samples(tmp_path / "s.h5")
    with h5py.File(path, "r+") as f:
        structure = json.loads(f.attrs["jaxsave_structure"])
        structure["treespec"] = {
            "treespec": 1,
            "refs": list(LAZY_NAMES),
            "root": {
                "t": "node",
                "type": LAZY_NAMES[0],
                "aux": None,
                "keys": [],
                "children": ["numpy"],
            },
        }
        f.attrs["jaxsave_structure"] = json.dumps(structure)
    script = textwrap.dedent(f"""
        import json, sys, warnings, jaxsave, arviz
        jaxsave.load_samples({str(tmp_path / "good.h5")!r})
        before = set(sys.modules)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            x = jaxsave.load_samples({str(path)!r})["x"]
        print(json.dumps({{"new": sorted(set(sys.modules) - before), "shape": list(x.shape),
                          "warnings": [str(w.message) for w in caught]}}))
    """)
    _samples(tmp_path / "good.h5")
    proc = subprocess.run(
        [sys.executable, "-c", script], env=child_env(), capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.splitlines()[-1])
    assert got["new"] == [] and got["shape"] == [1, 4, 2], got
    assert any(all(n in w for n in LAZY_NAMES) for w in got["warnings"]), got["warnings"]


# -- a registered class that raises while it is rebuilt: not a damaged file ------------------------


class Positive:
    """A pytree node whose unflatten validates (as a user's class may); ``REJECT`` makes it refuse."""

    REJECT = False

    def __init__(self, x):
        if Positive.REJECT:
            raise ValueError("Positive needs x > 0")
        self.x = x


jax.tree_util.register_pytree_node(Positive, lambda p: ((p.x,), None), lambda aux, kids: Positive(*kids))
jaxsave.register_saveable(Positive, name="tests.hostile_storage.Positive")
Pair = namedtuple("Pair", ["a", "b"])


class StrictPair(Pair):
    REJECT = False

    def __new__(cls, a, b):
        if StrictPair.REJECT:
            raise TypeError("StrictPair refuses")
        return super().__new__(cls, a, b)


jaxsave.register_saveable(StrictPair, name="tests.hostile_storage.StrictPair")


@pytest.mark.parametrize("fmt", ["jaxsave", "hdf5"])
@pytest.mark.parametrize("cls", [Positive, StrictPair])
def test_a_class_that_raises_on_rebuild_is_a_rebuild_error_naming_it(tmp_path, fmt, cls):
    tree = {"p": Positive(np.ones(2)) if cls is Positive else StrictPair(np.ones(2), np.zeros(1))}
    path = tmp_path / "t"
    jaxsave.save_pytree(path, tree, format=fmt)
    cls.REJECT = True
    try:
        with pytest.raises(jaxsave.RebuildError, match=cls.__name__) as caught:
            jaxsave.load_pytree(path, as_numpy=True)
    finally:
        cls.REJECT = False
    assert not isinstance(caught.value, jaxsave.FileFormatError)
    assert isinstance(caught.value.__cause__, (ValueError, TypeError))
    assert isinstance(jaxsave.load_pytree(path, as_numpy=True)["p"], cls)
