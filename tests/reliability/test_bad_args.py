"""Bad arguments at the API surface: each is refused with an error naming the problem and where."""

from __future__ import annotations

import os

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsave

pytestmark = pytest.mark.reliability


def _saver(**kwargs):
    return jaxsave.save(jaxsave.MemoryCollector(), block_size=4, **kwargs)


def _close(saver):
    streamer = saver.init.__self__
    if getattr(streamer, "writer", None) is not None:
        streamer.writer.close()


def _save_with(sample, bad, *, solver=None, bad_solver=None, keep=True):
    saver = jaxsave.save(
        jaxsave.MemoryCollector(), block_size=4, checkpoint_every=4 if solver is not None else 0
    )
    try:
        state = saver.init(sample, solver)
        jax.jit(lambda s: saver.save(s, keep, bad, solver_state=bad_solver))(state)
    finally:
        _close(saver)


def _init_with(*args, **kwargs):
    saver = _saver()
    try:
        saver.init(*args, **kwargs)
    finally:
        _close(saver)


def _postprocess_twice():
    saver = _saver()
    state = saver.init(jnp.zeros(2), None)
    saver.postprocess(state, None)
    saver.postprocess(state, None)


def _save_after_postprocess():
    saver = _saver()
    state = saver.init(jnp.zeros(2), None)
    saver.postprocess(state, None)
    saver.save(state, True, jnp.zeros(2))


def _two_savers():
    collector = jaxsave.HDF5Collector(os.path.join(TMP[0], "two.h5"))
    jaxsave.save(collector)
    try:
        jaxsave.save(collector)
    finally:
        collector.close()


def _duplicate_rule():
    class Node:
        pass

    jaxsave.register_dictionize_rule(Node)(lambda n: {})
    jaxsave.register_dictionize_rule(Node)(lambda n: {})


def _state_garbage(where):
    saver = _saver()
    try:
        saver.init(jnp.zeros(2), None)
        if where == "save":
            saver.save({"not": "a state"}, True, jnp.zeros(2))
        else:
            saver.postprocess(42, None)
    finally:
        _close(saver)


def _hdf5(**kwargs):
    jaxsave.HDF5Collector(os.path.join(TMP[0], "k.h5"), **kwargs).close()


def _foreign_append():
    path = os.path.join(TMP[0], "foreign.h5")
    with h5py.File(path, "w") as f:
        f["data"] = np.ones(3)
    jaxsave.HDF5Collector(path, mode="a")


def _samples(**kwargs):
    path = os.path.join(TMP[0], "s.h5")
    init, save, post = jaxsave.save(jaxsave.HDF5Collector(path))
    post(save(init(jnp.zeros(2)), True, jnp.ones(2))[0], None)
    jaxsave.load_samples(path, **kwargs)


TMP: list[str] = []
S = {"a": {"b": jnp.zeros(2)}, "c": [jnp.zeros(3, jnp.int32)]}

CASES = [
    # (name, call, exception type, message regex: the problem and where)
    (
        "sample: missing leaf",
        lambda: _save_with(S, {"a": {"x": jnp.zeros(2)}, "c": [jnp.zeros(3, jnp.int32)]}),
        jaxsave.StructureMismatchError,
        r"(?s)sample passed to save\(\).*missing leaf 'a/b'",
    ),
    (
        "sample: wrong shape",
        lambda: _save_with(S, {"a": {"b": jnp.zeros(5)}, "c": [jnp.zeros(3, jnp.int32)]}),
        jaxsave.StructureMismatchError,
        r"leaf 'a/b': shape \(5,\) != expected \(2,\)",
    ),
    (
        "sample: wrong dtype",
        lambda: _save_with(S, {"a": {"b": jnp.zeros(2)}, "c": [jnp.zeros(3)]}),
        jaxsave.StructureMismatchError,
        r"leaf 'c/list_element_0': dtype float32 != expected int32",
    ),
    (
        "solver_state: wrong shape",
        lambda: _save_with(
            jnp.zeros(2), jnp.zeros(2), solver={"m": jnp.zeros(2)}, bad_solver={"m": jnp.zeros(3)}
        ),
        jaxsave.StructureMismatchError,
        r"(?s)solver_state.*leaf 'solver_state/m': shape \(3,\) != expected \(2,\)",
    ),
    (
        "keep: int",
        lambda: _save_with(jnp.zeros(2), jnp.zeros(2), keep=1),
        TypeError,
        "keep must be a boolean scalar",
    ),
    (
        "keep: string",
        lambda: _save_with(jnp.zeros(2), jnp.zeros(2), keep="yes"),
        TypeError,
        "keep must be a boolean scalar.*'yes'",
    ),
    (
        "keep: None",
        lambda: _save_with(jnp.zeros(2), jnp.zeros(2), keep=None),
        TypeError,
        "keep must be a boolean scalar.*None",
    ),
    (
        "keep: vector",
        lambda: _save_with(jnp.zeros(2), jnp.zeros(2), keep=jnp.array([True, False])),
        TypeError,
        "keep must be a boolean scalar",
    ),
    (
        "init_sample: object leaf",
        lambda: _init_with({"w": jnp.zeros(2), "bad": [object()]}, None),
        TypeError,
        r"init_sample.*\['bad'\]\[0\] \(object\)",
    ),
    (
        "chains: negative",
        lambda: _init_with(jnp.zeros((2, 2)), None, chains=-2),
        ValueError,
        "chains must be a positive int, got -2",
    ),
    (
        "chains: no leading axis",
        lambda: _init_with(jnp.zeros(2), None, chains=4),
        jaxsave.StructureMismatchError,
        "leading axis of size 4",
    ),
    (
        "samples_collected: negative",
        lambda: _init_with(jnp.zeros(2), None, jaxsave.static_information(-1)),
        ValueError,
        "samples_collected must be >= 0, got -1",
    ),
    (
        "samples_collected: float",
        lambda: _init_with(jnp.zeros(2), None, jaxsave.static_information(2.5)),
        TypeError,
        "samples_collected must be an integer, got 2.5",
    ),
    (
        "block_size: negative",
        lambda: jaxsave.save(jaxsave.MemoryCollector(), block_size=-1),
        ValueError,
        "block_size must be a positive int, got -1",
    ),
    (
        "checkpoint_every: negative",
        lambda: jaxsave.save(jaxsave.MemoryCollector(), checkpoint_every=-5),
        ValueError,
        "checkpoint_every must be an int >= 0, got -5",
    ),
    (
        "max_queue_bytes: negative",
        lambda: jaxsave.save(jaxsave.MemoryCollector(), max_queue_bytes=-1),
        ValueError,
        "max_queue_bytes must be a positive int, got -1",
    ),
    (
        "state: not a SaveState (save)",
        lambda: _state_garbage("save"),
        TypeError,
        r"save\(\): state must be the SaveState.*got dict",
    ),
    (
        "state: not a SaveState (postprocess)",
        lambda: _state_garbage("postprocess"),
        TypeError,
        r"postprocess\(\): state must be the SaveState.*got int",
    ),
    (
        "postprocess twice",
        _postprocess_twice,
        jaxsave.SaverStateError,
        r"already called for chain\(s\) \[0\]",
    ),
    ("save after postprocess", _save_after_postprocess, jaxsave.SaverStateError, "finished by postprocess"),
    ("two savers on one collector", _two_savers, jaxsave.SaverStateError, "already belongs to another saver"),
    ("duplicate dictionize rule", _duplicate_rule, ValueError, "Node.*already registered"),
    (
        "HDF5Collector: flush_every negative",
        lambda: _hdf5(flush_every=-1),
        ValueError,
        r"flush_every must be an int from 0 to 2\*\*62, got -1",
    ),
    (
        "HDF5Collector: flush_interval NaN",
        lambda: _hdf5(flush_interval=float("nan")),
        ValueError,
        "flush_interval must be a finite number of seconds >= 0, got nan",
    ),
    (  # a bool was taken for 1 or 0 (the Zarr collector refused it)
        "HDF5Collector: flush_interval a bool",
        lambda: _hdf5(flush_interval=True),
        ValueError,
        "flush_interval must be a finite number of seconds >= 0, got True",
    ),
    (  # math.isinf(10**400) raised a raw OverflowError
        "HDF5Collector: flush_interval past a float",
        lambda: _hdf5(flush_interval=10**400),
        ValueError,
        "flush_interval must be a finite number of seconds >= 0",
    ),
    (
        "HDF5Collector: sample_stats a number",
        lambda: _hdf5(sample_stats=5),
        TypeError,
        "sample_stats must be a sequence of names or a predicate, got 5",
    ),
    (
        "HDF5Collector: sample_stats bytes",
        lambda: _hdf5(sample_stats=b"lp"),
        TypeError,
        "sample_stats must be a sequence of names or a predicate",
    ),
    (
        "HDF5Collector: flush_every a bool",
        lambda: _hdf5(flush_every=False),
        ValueError,
        r"flush_every must be an int from 0 to 2\*\*62, got False",
    ),
    (
        "HDF5Collector: checkpoint_interval negative",
        lambda: _hdf5(checkpoint_interval=-1),
        ValueError,
        "checkpoint_interval must be a finite number",
    ),
    (
        "HDF5Collector: missing directory",
        lambda: jaxsave.HDF5Collector("/no/such/dir/x.h5"),
        FileNotFoundError,
        "the directory '/no/such/dir' does not exist",
    ),
    *(
        (
            f"save_pytree ({ext}): missing directory",
            lambda ext=ext: jaxsave.save_pytree(f"/no/such/dir/p.{ext}", {"a": np.zeros(2)}),
            FileNotFoundError,
            rf"cannot write '/no/such/dir/p\.{ext}': the directory '/no/such/dir' does not exist",
        )
        for ext in ("npz", "h5", "safetensors", "jaxsave")
    ),
    (
        "HDF5Collector: path is a directory",
        lambda: jaxsave.HDF5Collector(TMP[0]),
        IsADirectoryError,
        "is a directory; HDF5Collector needs a file path",
    ),
    (
        "HDF5Collector: mode='a' on a foreign HDF5 file",
        _foreign_append,
        jaxsave.FileFormatError,
        "not written by jaxsave; mode='a'",
    ),
    ("HDF5Collector: bad mode", lambda: _hdf5(mode="r"), ValueError, "mode must be 'w', 'x' or 'a', got 'r'"),
    (
        "save_pytree: unsavable leaf",
        lambda: jaxsave.save_pytree(os.path.join(TMP[0], "t.jaxsave"), {"a": {"f": lambda x: x}}),
        jaxsave.UnregisteredNameError,
        r"a\.f: builtins\.function",
    ),
    (
        "save_pytree: path is a directory",
        lambda: jaxsave.save_pytree(TMP[0], {"a": 1}),
        IsADirectoryError,
        "is a directory; save_pytree needs a file path",
    ),
    (
        "save_pytree: unknown format",
        lambda: jaxsave.save_pytree(os.path.join(TMP[0], "t.x"), {}, format="pickle"),
        ValueError,
        "unknown format 'pickle'",
    ),
    ("load_samples: chain out of range", lambda: _samples(chain=5), IndexError, "chain 5 is not in the file"),
    (
        "load_samples: draws not a slice",
        lambda: _samples(draws=3),
        TypeError,
        "draws must be a slice, got int",
    ),
    ("load_samples: zero step", lambda: _samples(draws=slice(0, 4, 0)), ValueError, "step cannot be zero"),
    (
        "load_samples: like mismatch",
        lambda: _samples(like=jnp.zeros(3)),
        jaxsave.StructureMismatchError,
        r"file has shape \(2,\).*`like` has shape \(3,\)",
    ),
    (
        "Checkpointer: keep negative",
        lambda: jaxsave.Checkpointer(TMP[0], keep=-1),
        ValueError,
        "keep must be at least 1",
    ),
    (
        "Checkpointer: negative step",
        lambda: jaxsave.Checkpointer(os.path.join(TMP[0], "c")).save(-1, {"a": 1}),
        ValueError,
        "a step must be a non-negative int, got -1",
    ),
]


@pytest.fixture(autouse=True)
def _tmp(tmp_path):
    TMP[:] = [str(tmp_path)]


@pytest.mark.parametrize("name, call, error, message", CASES, ids=[c[0] for c in CASES])
def test_bad_argument_is_named(name, call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_bad_arguments_figure(figures):
    figures("arguments", "bad arguments refused with a named error", handled=len(CASES), tried=len(CASES))


WRITERS = {
    "save_pytree": lambda p: jaxsave.save_pytree(p, {"a": np.zeros(2)}),
    "HDF5Collector": jaxsave.HDF5Collector,
    "ZarrCollector": jaxsave.ZarrCollector,
    "merge": lambda p: jaxsave.merge(["in.h5"], p),
}
BAD_PATHS = [  # (path, error, message): the directory is the one the path names, as written
    ("nope/../x", FileNotFoundError, "the directory '(.*/)?nope/..' does not exist"),
    ("afile/../x", FileNotFoundError, "the directory '(.*/)?afile/..' does not exist"),
    ("afile/x", NotADirectoryError, "'(.*/)?afile' is not a directory"),
    ("", ValueError, "empty"),
]


@pytest.mark.parametrize("writer", list(WRITERS))
@pytest.mark.parametrize("path, error, message", BAD_PATHS, ids=[p[0] or "empty" for p in BAD_PATHS])
def test_bad_path_is_named_and_nothing_is_created(writer, path, error, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_bytes(b"")
    with pytest.raises(error, match=message):
        WRITERS[writer](path)
    assert sorted(os.listdir(tmp_path)) == ["afile"]


@pytest.mark.parametrize("file", [b"x.jaxsave", 3, None])
def test_not_a_file_is_a_type_error(file):
    with pytest.raises(TypeError, match="file must be a path .* or a binary file object, got"):
        jaxsave.save_pytree(file, {"a": 1})
    with pytest.raises(TypeError, match="file must be a path .* or a binary file object, got"):
        jaxsave.load_pytree(file)
