"""Round trips of save_pytree/load_pytree: every framework, dtype and format; like=; metadata."""

from __future__ import annotations

import collections
import dataclasses
import enum
import io
import json
import math
import os
import re
import subprocess
import sys
import textwrap
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jaxsave
from jaxsave import registry
from jaxsave.errors import FileFormatError, StructureMismatchError, UnregisteredNameError

FORMATS = {"jaxsave": ".jaxsave", "safetensors": ".safetensors", "npz": ".npz", "hdf5": ".h5"}


def assert_tree_equal(a: Any, b: Any) -> None:
    """Same structure (incl. static data and node types), leaf types, dtypes and values."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert type(x) is type(y), (type(x), type(y))
        if isinstance(x, (np.ndarray, np.generic, jax.Array)):
            assert x.dtype == y.dtype and np.shape(x) == np.shape(y)
            if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
                x, y = jax.random.key_data(x), jax.random.key_data(y)
            xa, ya = np.asarray(x), np.asarray(y)
            if xa.dtype.kind == "f" or xa.dtype.name in ("bfloat16",) or "float8" in xa.dtype.name:
                xa, ya = xa.astype(np.float64), ya.astype(np.float64)
            np.testing.assert_array_equal(xa, ya)
        elif isinstance(x, float) and math.isnan(x):
            assert math.isnan(y)
        else:
            assert x == y


def materialize(shapes: Any, seed: int = 0) -> Any:
    """Fill the ShapeDtypeStructs of a real model's ``eval_shape`` with random values.

    Building models eagerly compiles every initializer op (seconds on 2 cores);
    tracing them once with ``eval_shape`` and filling the leaves is instant.
    """
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda s: (
            jnp.asarray(rng.uniform(0.1, 1.0, size=s.shape).astype(s.dtype))
            if isinstance(s, jax.ShapeDtypeStruct)
            else s
        ),
        shapes,
    )


def roundtrip(tmp_path, tree, fmt="jaxsave", **load_kw):
    path = tmp_path / f"tree{FORMATS[fmt]}"
    jaxsave.save_pytree(path, tree)
    return jaxsave.load_pytree(path, **load_kw)


# ----------------------------------------------------------------------------- dtypes


def dtype_tree() -> dict[str, Any]:
    rng = np.random.default_rng(0)
    floats = rng.normal(size=(3, 4)).astype(np.float32)
    return {
        "f16": jnp.asarray(floats, jnp.float16),
        "f32": jnp.asarray(floats),
        "f64": np.asarray(floats, np.float64),
        "bf16": jnp.asarray(floats, jnp.bfloat16),
        "e4m3": jnp.asarray(floats, jnp.float8_e4m3fn),
        "e5m2": np.asarray(floats).astype(ml_dtypes.float8_e5m2),
        "int4": jnp.arange(-8, 8, dtype=jnp.int4).reshape(4, 4),
        "uint4": np.arange(16, dtype=ml_dtypes.uint4),
        "ints": [np.arange(5, dtype=t) for t in (np.int8, np.int16, np.int32, np.int64)],
        "uints": [jnp.arange(5, dtype=t) for t in (jnp.uint8, jnp.uint16, jnp.uint32)],
        "u64": np.array([2**64 - 1], np.uint64),
        "bool": np.array([True, False]),
        "c64": np.array([1 + 2j, -3j], np.complex64),
        "c128": np.array([[1e300 + 1j]], np.complex128),
        "key": jax.random.key(3),
        "keys_rbg": jax.random.split(jax.random.key(1, impl="rbg"), 3),
        "raw_key": jax.random.PRNGKey(0),
        "scalar0d": jnp.float32(1.5),
        "np0d": np.array(7, np.int16),
        "npscalar": np.float32(2.25),
        "bf16_scalar": ml_dtypes.bfloat16(0.5),
        "empty": np.zeros((0, 3), np.float32),
        "nan": np.array([np.nan, np.inf, -np.inf, -0.0]),
    }


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_dtype_roundtrips_in_every_format(tmp_path, fmt):
    tree = dtype_tree()
    assert_tree_equal(roundtrip(tmp_path, tree, fmt), tree)


@pytest.mark.parametrize("fmt", FORMATS)
def test_big_endian_arrays_load_as_their_values(tmp_path, fmt):
    """A ``>f4`` array (from a FITS or foreign HDF5 file, np.frombuffer) is stored by its values:
    the .jaxsave format read it back byte-swapped, .npz and .h5 refused to load it."""
    tree = {"f": (np.arange(4) - 1.5).astype(">f4"), "i": (np.arange(3) * 2**40).astype(">i8")}
    assert not tree["f"].dtype.isnative and not tree["i"].dtype.isnative
    loaded = roundtrip(tmp_path, tree, fmt)
    for name, value in tree.items():
        np.testing.assert_array_equal(np.asarray(loaded[name]), value)
        assert np.asarray(loaded[name]).dtype == value.dtype.newbyteorder("=")


@pytest.mark.parametrize("fmt", FORMATS)
def test_file_objects_roundtrip(fmt):
    tree = {"w": jnp.arange(6.0).reshape(2, 3), "k": jax.random.key(0), "n": 3}
    buf = io.BytesIO()
    jaxsave.save_pytree(buf, tree, format=fmt, metadata={"fmt": fmt})
    buf.seek(0)
    assert jaxsave.read_metadata(buf) == {"fmt": fmt}
    buf.seek(0)
    assert_tree_equal(jaxsave.load_pytree(buf), tree)


def test_python_values_roundtrip(tmp_path):
    tree = {
        "int": 2**70,
        "neg": -3,
        "float": 0.1,
        "nan": float("nan"),
        "inf": float("-inf"),
        "negzero": -0.0,
        "bool": True,
        "complex": 1 - 2j,
        "str": "ünïcode",
        "none": None,
        "bytes": b"\x00\xff",
        "dtype": np.dtype("bfloat16"),
        "jnp_type": jnp.float32,
        "np_type": np.int8,
        "nested": {"t": (1, [2, (3,)]), "empty": {}, "e": [], "et": ()},
        "int_keys": {5: "five", 1: np.ones(1)},
        "tuple_keys": {(1, "a"): 1, (0, "b"): 2},
    }
    out = roundtrip(tmp_path, tree)
    assert_tree_equal(out, tree)
    assert out["jnp_type"] is jnp.float32 and out["np_type"] is np.int8
    assert out["dtype"] == np.dtype(ml_dtypes.bfloat16)
    assert math.copysign(1, out["negzero"]) == -1


def test_containers_keep_types_and_order(tmp_path):
    Point = collections.namedtuple("Point", ["x", "y"])
    tree = {
        "z": 1,
        "a": 2,  # insertion order differs from sorted order
        "od": collections.OrderedDict([("b", np.ones(1)), ("a", np.zeros(1))]),
        "dd": collections.defaultdict(list, {"k": [np.ones(2)]}),
        "nt": Point(np.ones(2), Point(1, None)),
    }
    out = roundtrip(tmp_path, tree)
    assert_tree_equal(out, tree)
    assert list(out) == ["z", "a", "od", "dd", "nt"]
    assert list(out["od"]) == ["b", "a"] and type(out["od"]) is collections.OrderedDict
    assert out["dd"].default_factory is list and type(out["nt"]) is Point


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Params:
    w: jax.Array
    b: jax.Array
    name: str = dataclasses.field(metadata={"static": True})
    sizes: tuple = dataclasses.field(metadata={"static": True}, default=(1, 2))


class Color(enum.Enum):
    RED = "r"
    BLUE = "b"


def test_dataclass_static_fields_and_enums(tmp_path):
    jaxsave.register_saveable(Color)
    tree = {"p": Params(jnp.ones(2), jnp.zeros(()), "layer", (3, 4)), "c": Color.BLUE}
    out = roundtrip(tmp_path, tree)
    assert_tree_equal(out, tree)
    assert out["p"].name == "layer" and out["c"] is Color.BLUE


# ----------------------------------------------------------------------------- frameworks


def test_haiku_params_and_state(tmp_path):
    import haiku as hk

    def forward(x, is_training):
        x = hk.nets.MLP([8, 4])(x)
        return hk.BatchNorm(True, True, 0.9)(x, is_training)

    f = hk.transform_with_state(forward)
    x = jnp.ones((2, 3))
    params, state = materialize(jax.eval_shape(lambda k: f.init(k, x, True), jax.random.key(0)))
    tree = {"params": params, "state": state}
    out = roundtrip(tmp_path, tree)
    assert_tree_equal(out, tree)
    apply = jax.jit(f.apply, static_argnums=4)
    np.testing.assert_array_equal(
        apply(out["params"], out["state"], None, x, False)[0], apply(params, state, None, x, False)[0]
    )
    with jaxsave.open_pytree(tmp_path / "tree.jaxsave") as f:
        assert "params.mlp|~|linear_0.w" in f.keys()


def test_flax_linen_variables_and_frozendict(tmp_path):
    import flax.linen as nn
    from flax.core import freeze

    class CNN(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool = False):
            x = nn.Conv(4, (3, 3))(x)
            x = nn.BatchNorm(use_running_average=not train)(x)
            return nn.Dense(2, dtype=jnp.bfloat16)(x.reshape(x.shape[0], -1))

    model = CNN()
    x = jnp.ones((1, 5, 5, 1))
    variables = materialize(jax.eval_shape(model.init, jax.random.key(0), x))
    apply = jax.jit(model.apply)
    for tree in (variables, freeze(variables)):
        out = roundtrip(tmp_path, tree)
        assert_tree_equal(out, tree)
        np.testing.assert_array_equal(apply(out, x), apply(variables, x))


def test_flax_nnx_state_and_module(tmp_path):
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.lin = nnx.Linear(3, 4, rngs=rngs)
            self.bn = nnx.BatchNorm(4, rngs=rngs)
            self.drop = nnx.Dropout(0.1, rngs=rngs)

        def __call__(self, x):
            return self.drop(self.bn(self.lin(x)), deterministic=True)

    net = Net(nnx.Rngs(0))
    net.bn.mean[...] = jnp.arange(4.0)  # not the initial value
    graphdef, state = nnx.split(net)
    out = roundtrip(tmp_path, state)
    assert type(out) is nnx.State
    assert_tree_equal(out, state)
    x = jnp.ones((2, 3))
    np.testing.assert_array_equal(nnx.merge(graphdef, out)(x), net(x))
    module = roundtrip(tmp_path, net)  # a whole NNX module is a pytree too
    assert type(module) is Net and module.lin.in_features == 3
    np.testing.assert_array_equal(module(x), net(x))


class Block(eqx.Module):
    linear: Any
    activation: Any
    mode: str = eqx.field(static=True)
    shape: tuple = eqx.field(static=True)

    def __call__(self, x):
        return self.activation(self.linear(x))


def test_equinox_modules_with_static_fields(tmp_path):
    def make(key):
        k1, k2 = jax.random.split(key)
        return {
            "mlp": eqx.nn.MLP(3, 2, 8, 2, activation=jax.nn.gelu, key=k1),
            "conv": eqx.nn.Conv2d(1, 2, 3, padding="SAME", key=k2),
            "norm": eqx.nn.LayerNorm(3),
            "block": Block(eqx.nn.Linear(3, 3, key=k2), jnp.tanh, "fast", (1, 2)),
        }

    model = materialize(eqx.filter_eval_shape(make, jax.random.key(0)))
    out = roundtrip(tmp_path, model)
    assert_tree_equal(out, model)
    assert out["mlp"].activation is jax.nn.gelu and out["block"].mode == "fast"
    call = eqx.filter_jit(lambda m, x: (m["mlp"](x), m["block"](x)))
    assert_tree_equal(call(out, jnp.ones(3)), call(model, jnp.ones(3)))


def test_optax_states(tmp_path):
    import optax

    params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
    optimizers = [
        optax.adam(1e-3),
        optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3, weight_decay=1e-4)),
        optax.sgd(0.1, momentum=0.9, nesterov=True),
        optax.inject_hyperparams(optax.adam)(learning_rate=1e-2),
        optax.masked(optax.lion(1e-4), {"w": True, "b": False}),
        optax.MultiSteps(optax.adafactor(1e-3), every_k_schedule=2),
    ]
    grads = jax.tree.map(jnp.ones_like, params)
    for opt in optimizers:
        update = jax.jit(opt.update)
        _, state = update(grads, materialize(jax.eval_shape(opt.init, params)), params)
        out = roundtrip(tmp_path, state)
        assert_tree_equal(out, state)
        assert_tree_equal(update(grads, out, params), update(grads, state, params))


def test_fresh_process_loads_library_types_without_registration(tmp_path):
    import optax

    model = materialize(eqx.filter_eval_shape(eqx.nn.MLP, 2, 2, 4, 1, key=jax.random.key(0)))
    state = materialize(jax.eval_shape(optax.adamw(1e-3).init, eqx.filter(model, eqx.is_array)))
    jaxsave.save_pytree(tmp_path / "m.jaxsave", {"model": model, "opt": state})
    code = textwrap.dedent(f"""
        import sys, jax, equinox, optax, jaxsave
        before = set(sys.modules)
        tree = jaxsave.load_pytree({str(tmp_path / "m.jaxsave")!r})
        assert type(tree["model"]).__name__ == "MLP", tree
        assert tree["model"].activation is jax.nn.relu
        assert type(tree["opt"][0]).__name__ == "ScaleByAdamState"
        print(sorted(set(sys.modules) - before))
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]


# ----------------------------------------------------------------------------- registry


def test_a_built_in_name_cannot_be_taken_in_a_fresh_process():
    """Before the built-ins were first looked up, register_saveable(f, name="jax.nn.relu") was
    accepted: files storing jax.nn.relu then loaded as f, and jax.nn.relu no longer saved."""
    code = textwrap.dedent("""
        import jax, jaxsave
        try:
            jaxsave.register_saveable(lambda x: x, name="jax.nn.relu")
        except ValueError as error:
            assert "already registered" in str(error), error
        else:
            raise SystemExit("a built-in's name was taken")
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr[-2000:]


def test_unregistered_values_are_listed_at_save(tmp_path):
    def my_act(x):
        return x

    with pytest.raises(UnregisteredNameError) as e:
        jaxsave.save_pytree(tmp_path / "x.jaxsave", {"a": my_act, "b": [object()]})
    msg = str(e.value)
    assert "  - a: " in msg and "  - b.list_element_0: " in msg and "register_saveable" in msg
    assert not os.listdir(tmp_path)  # nothing written, no temporary left


def test_registered_function_roundtrips_and_missing_names_are_listed(tmp_path):
    State = collections.namedtuple("State", ["x"])

    def act(x):
        return x

    jaxsave.register_saveable(act, name="tests.act")
    path = tmp_path / "x.jaxsave"
    jaxsave.save_pytree(path, {"f": act, "s": State(np.ones(1))})
    assert jaxsave.load_pytree(path)["f"] is act
    type_name = registry.saveable_name(State)
    registry.unregister_saveable("tests.act")
    registry.unregister_saveable(type_name)
    with pytest.raises(UnregisteredNameError) as e:
        jaxsave.load_pytree(path)
    assert "tests.act" in str(e.value) and type_name in str(e.value)
    assert "jaxsave.register_saveable" in str(e.value)
    # like= supplies the classes; the function is taken from the target when names agree
    jaxsave.register_saveable(act, name="tests.act")
    out = jaxsave.load_pytree(path, like={"f": act, "s": State(np.zeros(1))})
    assert type(out["s"]) is State and out["s"].x[0] == 1
    registry.unregister_saveable("tests.act")


def test_registry_conflicts_and_aliases():
    def f():
        pass

    def g():
        pass

    jaxsave.register_saveable(f, name="tests.conflict")
    with pytest.raises(ValueError, match="already registered"):
        jaxsave.register_saveable(g, name="tests.conflict")
    jaxsave.register_saveable(f, name="tests.alias")
    assert registry.saveable_name(f) == "tests.conflict"
    assert registry.resolve_saveable("tests.alias") is f
    registry.unregister_saveable("tests.conflict")
    assert registry.saveable_name(f) == "tests.alias"
    registry.unregister_saveable("tests.alias")
    assert registry.saveable_name(f) is None


# ----------------------------------------------------------------------------- like=


def test_like_reports_every_mismatch_by_path(tmp_path):
    path = tmp_path / "x.jaxsave"
    jaxsave.save_pytree(
        path, {"w": jnp.ones((2, 3)), "b": jnp.zeros(3), "extra": jnp.ones(1), "opt": (jnp.ones(2), 3)}
    )
    like = {
        "w": jnp.ones((3, 2)),
        "b": jnp.zeros(3, jnp.bfloat16),
        "missing": jnp.ones(1),
        "opt": [jnp.ones(2), 3],
    }
    with pytest.raises(StructureMismatchError) as e:
        jaxsave.load_pytree(path, like=like)
    msg = str(e.value)
    for fragment in (
        "['w']: the file has float32[2, 3], the target has float32[3, 2]",
        "['b']: the file has float32[3], the target has bfloat16[3]",
        "['missing']: missing from the file",
        "['extra']: in the file but not in the target",
        "['opt']: the file has a tuple of 2, the target has a list of 2",
    ):
        assert fragment in msg, msg
    assert "5 difference(s)" in msg


def test_like_static_field_mismatch_is_an_error(tmp_path):
    model = eqx.nn.MLP(2, 2, 4, 1, activation=jax.nn.relu, key=jax.random.key(0))
    jaxsave.save_pytree(tmp_path / "m.jaxsave", model)
    other = eqx.nn.MLP(2, 2, 4, 1, activation=jax.nn.tanh, key=jax.random.key(0))
    with pytest.raises(StructureMismatchError, match=r"\.activation: the file has the value"):
        jaxsave.load_pytree(tmp_path / "m.jaxsave", like=other)
    wide = eqx.nn.LayerNorm(3, eps=1e-3)
    jaxsave.save_pytree(tmp_path / "n.jaxsave", eqx.nn.LayerNorm(3))
    with pytest.raises(StructureMismatchError, match="static data differ"):
        jaxsave.load_pytree(tmp_path / "n.jaxsave", like=wide)


def test_like_with_shape_dtype_structs_and_types(tmp_path):
    tree = {"a": jnp.arange(4.0), "k": jax.random.key(0), "n": 5, "np": np.ones(2, np.int8)}
    path = tmp_path / "x.jaxsave"
    jaxsave.save_pytree(path, tree)
    like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype) if hasattr(x, "shape") else x, tree)
    like["n"] = 0
    out = jaxsave.load_pytree(path, like=like)
    assert isinstance(out["np"], jax.Array) and out["n"] == 5  # types follow like=, values the file
    assert_tree_equal(out["k"], tree["k"])
    as_np = jaxsave.load_pytree(path, like={**tree, "a": np.zeros(4, np.float32)})
    assert type(as_np["a"]) is np.ndarray
    with jaxsave.open_pytree(path) as f:
        skeleton = f.shape_dtype_tree()
    assert_tree_equal(jaxsave.load_pytree(path, like=skeleton)["a"], tree["a"])


def test_partial_restore_reads_only_the_subset(tmp_path):
    import optax

    params = {"w": jnp.ones((4, 4)), "b": jnp.zeros(4)}
    tree = {"params": params, "opt_state": optax.adam(1e-3).init(params), "step": 7}
    path = tmp_path / "ckpt.jaxsave"
    jaxsave.save_pytree(path, tree)
    with pytest.raises(StructureMismatchError, match="opt_state"):
        jaxsave.load_pytree(path, like={"params": params})
    out = jaxsave.load_pytree(path, like={"params": params, "step": 0}, partial=True)
    assert set(out) == {"params", "step"} and out["step"] == 7
    assert_tree_equal(out["params"], params)
    with pytest.raises(ValueError, match="partial=True needs like"):
        jaxsave.load_pytree(path, partial=True)


# ----------------------------------------------------------------------------- metadata, lazy


def test_metadata_and_lazy_access(tmp_path):
    tree = {"big": np.arange(1000.0), "small": {"x": jnp.ones(3, jnp.bfloat16)}}
    meta = {"step": np.int64(12), "lr": jnp.float32(0.5), "metrics": {"loss": float("nan")}, "name": "run"}
    path = tmp_path / "x.jaxsave"
    jaxsave.save_pytree(path, tree, metadata=meta)
    got = jaxsave.read_metadata(path)
    assert got["step"] == 12 and got["lr"] == 0.5 and math.isnan(got["metrics"]["loss"])
    with jaxsave.open_pytree(path) as f:
        assert f.keys() == ["big", "small.x"]
        assert f.specs["small.x"] == ((3,), "bfloat16")
        assert f.format == "jaxsave" and f.format_version == jaxsave.serialization.FORMAT_VERSION
        assert f.jaxsave_version == jaxsave.__version__
        x = f["small.x"]
        assert isinstance(x, jax.Array) and x.dtype == jnp.bfloat16
        with pytest.raises(KeyError):
            f["nope"]
    with pytest.raises(TypeError, match="JSON"):
        jaxsave.save_pytree(path, tree, metadata={"bad": object()})


def test_loaded_jax_arrays_are_aligned_and_independent(tmp_path):
    tree = {"a": jnp.arange(10.0), "b": np.arange(3)}
    out = roundtrip(tmp_path, tree)
    out["b"][0] = 100  # numpy leaves are writable and do not affect others
    np.testing.assert_array_equal(out["a"], np.arange(10.0))


# ----------------------------------------------------------------------------- versions


def test_format_versions(tmp_path):
    from jaxsave._serialize.formats import native
    from jaxsave._serialize.versions import UPGRADES
    from jaxsave.serialization import FORMAT_VERSION, register_format_upgrade

    path = tmp_path / "x.jaxsave"
    jaxsave.save_pytree(path, {"a": np.arange(3)}, metadata={"v": 1})
    reader = native.Reader(str(path))
    header = {k: v for k, v in reader.header.items() if k != "data_size"}
    reader.check_arrays([((3,), "int64")])
    arrays = reader.read([0], [((3,), "int64")])
    reader.close()
    assert header["format_version"] == FORMAT_VERSION and header["jaxsave_version"]

    native.write(
        str(path), {**header, "format_version": FORMAT_VERSION + 1, "jaxsave_version": "9.0"}, arrays
    )
    with pytest.raises(FileFormatError, match="upgrade jaxsave") as e:
        jaxsave.load_pytree(path)
    assert "9.0" in str(e.value)

    native.write(str(path), {**header, "format_version": 0, "metadata": {"old": True}}, arrays)
    with pytest.raises(FileFormatError, match="no upgrade is registered from jaxsave format version 0"):
        jaxsave.read_metadata(path)

    @register_format_upgrade(0)
    def _v0_to_v1(h):
        h["metadata"] = {"upgraded_from": h["metadata"]}
        return h

    try:
        assert jaxsave.read_metadata(path) == {"upgraded_from": {"old": True}}
        np.testing.assert_array_equal(jaxsave.load_pytree(path)["a"], np.arange(3))
    finally:
        del UPGRADES[0]


def test_format_1_files_load(tmp_path):
    """A file of format 1 (one leaf-table object per leaf) loads as it did, through the built-in upgrade."""
    from jaxsave._serialize.formats import native

    tree = {"w": np.arange(6.0).reshape(2, 3), "b": [np.ones(3, ml_dtypes.bfloat16), np.int32(4)], "s": "x"}
    path = tmp_path / "new.jaxsave"
    jaxsave.save_pytree(path, tree, metadata={"m": 1})
    with jaxsave.open_pytree(path) as f:
        specs = list(f._storage)
    reader = native.Reader(str(path))
    header = {k: v for k, v in reader.header.items() if k != "data_size"}
    reader.check_arrays(specs)
    arrays = reader.read(list(range(len(specs))), specs)
    reader.close()
    assert header["format_version"] == 2 and set(header["leaves"]) == {"names", "dtypes", "shapes"}
    table = header["leaves"]
    old = [
        {"name": n, "dtype": d, "shape": s}
        for n, d, s in zip(table["names"], table["dtypes"], table["shapes"])
    ]
    native.write(str(tmp_path / "v1.jaxsave"), {**header, "format_version": 1, "leaves": old}, arrays)
    with jaxsave.open_pytree(tmp_path / "v1.jaxsave") as f:
        assert f.format_version == 2 and f.metadata == {"m": 1}
        out = f.load()
    assert_tree_equal(out, tree)
    assert out["b"][0].dtype == ml_dtypes.bfloat16 and type(out["b"][1]) is np.int32


def test_errors_of_a_format_upgrade_are_not_file_damage(tmp_path):
    from jaxsave._serialize.formats import native
    from jaxsave._serialize.versions import UPGRADES
    from jaxsave.serialization import register_format_upgrade

    path = tmp_path / "x.jaxsave"
    jaxsave.save_pytree(path, {"a": np.arange(3)})
    reader = native.Reader(str(path))
    header = {k: v for k, v in reader.header.items() if k != "data_size"}
    reader.check_arrays([((3,), "int64")])
    arrays = reader.read([0], [((3,), "int64")])
    reader.close()
    native.write(str(path), {**header, "format_version": 0}, arrays)
    calls = []

    @register_format_upgrade(0)
    def buggy_upgrade(h):
        calls.append(h["format_version"])
        return h["no such field"]  # a KeyError, which jaxsave's own reading would call damage

    try:
        with pytest.raises(KeyError, match="no such field") as e:
            jaxsave.load_pytree(path)
        assert not isinstance(e.value, FileFormatError) and calls == [0]
        if sys.version_info >= (3, 11):
            assert any("buggy_upgrade" in note and "version 0" in note for note in e.value.__notes__)
        register_format_upgrade(0)(lambda h: None)
        with pytest.raises(TypeError, match="returned NoneType, not a header dict"):
            jaxsave.read_metadata(path)
        register_format_upgrade(0)(lambda h: h)
        assert jaxsave.load_pytree(path)["a"].tolist() == [0, 1, 2]
        raw = path.read_bytes()  # real damage stays a FileFormatError, with the upgrade registered
        for damaged in (raw[:-8], raw[:40]):
            path.write_bytes(damaged)
            with pytest.raises(FileFormatError, match="damaged|truncated|size"):
                jaxsave.load_pytree(path)
    finally:
        del UPGRADES[0]


def test_plain_npz_and_safetensors_load_as_flat_dicts(tmp_path):
    import safetensors.numpy

    np.savez(tmp_path / "plain.npz", a=np.arange(3), b=np.ones((2, 2), np.float32))
    out = jaxsave.load_pytree(tmp_path / "plain.npz")
    assert set(out) == {"a", "b"} and type(out["a"]) is np.ndarray
    safetensors.numpy.save_file({"x": np.ones(2, np.float16)}, str(tmp_path / "p.safetensors"))
    assert jaxsave.load_pytree(tmp_path / "p.safetensors")["x"].dtype == np.float16


def test_files_are_readable_by_their_own_libraries(tmp_path):
    import h5py
    import safetensors.numpy

    tree = {"params": {"w": jnp.arange(6.0).reshape(2, 3), "bf": jnp.ones(2, jnp.bfloat16)}}
    jaxsave.save_pytree(tmp_path / "t.safetensors", tree, metadata={"m": 1})
    st = safetensors.numpy.load_file(str(tmp_path / "t.safetensors"))
    np.testing.assert_array_equal(st["params.w"], np.arange(6.0).reshape(2, 3))
    assert st["params.bf"].dtype == np.uint16  # bfloat16 bits, dtype recorded in the header
    jaxsave.save_pytree(tmp_path / "t.npz", tree)
    with np.load(tmp_path / "t.npz", allow_pickle=False) as z:
        np.testing.assert_array_equal(z["params.w"], np.arange(6.0).reshape(2, 3))
        header = json.loads(z["__jaxsave__.json"])
    table = header["leaves"]
    assert (table["names"][1], table["dtypes"][1], table["shapes"][1]) == ("params.w", "float32", [2, 3])
    jaxsave.save_pytree(tmp_path / "t.h5", tree)
    with h5py.File(tmp_path / "t.h5", "r") as f:
        np.testing.assert_array_equal(f["arrays/params.w"][()], np.arange(6.0).reshape(2, 3))


def test_treespec_is_reusable_for_stacked_samples():
    from jaxsave._serialize.treespec import decode_structure, encode_structure

    class Sample(NamedTuple):
        pos: Any
        aux: Any

    sample = Sample({"x": jnp.zeros(3)}, (jnp.zeros(()), "label"))
    spec, leaves = encode_structure(sample)
    spec = json.loads(json.dumps(spec))  # survives a trip through a JSON attribute
    stacked = [np.zeros((10,) + np.shape(x)) for x in leaves]
    out = decode_structure(spec, stacked)
    assert type(out) is Sample and out.pos["x"].shape == (10, 3) and out.aux[1] == "label"
    with pytest.raises(FileFormatError, match="fewer array leaves"):
        decode_structure(spec, stacked + [np.zeros(1)])


# ----------------------------------------------------------------------------- cost guards (not timed)


def many_leaves(n: int) -> dict[str, Any]:
    """``n`` tiny leaves of four dtypes and shapes in nested dicts (benchmarks/serialize.py's small tree)."""
    rng = np.random.default_rng(0)
    tree: dict[str, Any] = {}
    for i in range(n):
        dtype = (np.float32, np.int32, ml_dtypes.bfloat16, np.float16)[i % 4]
        shape = ((4,), (2, 3), (), (8,))[i % 4]
        leaf = jnp.asarray(rng.normal(size=shape).astype(dtype))
        tree.setdefault(f"module_{i // 100:03d}", {})[f"param/{i % 100:03d}"] = leaf
    return tree


class CountingFile(io.BytesIO):
    """A real in-memory file that counts the calls that move bytes."""

    def __init__(self, data: bytes = b"") -> None:
        super().__init__(data)
        self.calls = collections.Counter()

    def read(self, *args: Any) -> bytes:
        self.calls["read"] += 1
        return super().read(*args)

    def readinto(self, buffer: Any) -> int:
        self.calls["readinto"] += 1
        return super().readinto(buffer)

    def write(self, data: Any) -> int:
        self.calls["write"] += 1
        return super().write(data)


def test_a_10k_leaf_tree_is_written_and_read_in_a_few_calls():
    tree = many_leaves(10_000)
    out = CountingFile()
    jaxsave.save_pytree(out, tree)
    assert out.calls["write"] <= 4, out.calls  # header + the gathered small arrays, not one per leaf
    f = CountingFile(out.getvalue())
    loaded = jaxsave.load_pytree(f)
    assert f.calls["read"] + f.calls["readinto"] <= 6, f.calls  # sniff, prefix, header, one for the data
    assert_tree_equal(loaded, tree)
    assert loaded["module_042"]["param/017"].dtype == jnp.int32


def test_loading_10k_jax_leaves_is_not_one_device_put_each(tmp_path, monkeypatch):
    from jaxsave._core import transfer

    tree = many_leaves(10_000)
    path = tmp_path / "many.jaxsave"
    jaxsave.save_pytree(path, tree)
    calls = collections.Counter()
    real = jax.device_put

    def counting_device_put(x: Any, *args: Any, **kwargs: Any) -> Any:
        calls["device_put"] += 1
        calls["arrays"] += len(x) if isinstance(x, list) else 1
        return real(x, *args, **kwargs)

    monkeypatch.setattr(jax, "device_put", counting_device_put)
    loaded = jaxsave.load_pytree(path)
    assert transfer.fast_path_available()
    assert calls["device_put"] <= 2 and calls["arrays"] <= 2, calls  # the reference array only
    assert_tree_equal(loaded, tree)
    leaf = loaded["module_099"]["param/098"]
    assert not leaf.committed and leaf.sharding == real(np.zeros(1)).sharding
    assert jax.typeof(leaf) == jax.typeof(real(np.asarray(leaf)))


def test_device_put_many_gives_what_jax_device_put_gives(monkeypatch):
    from jaxsave._core import transfer

    rng = np.random.default_rng(1)
    base = rng.normal(size=(6, 8))
    arrays = [
        base.astype(np.float32),
        base,  # float64: jax makes it float32 unless x64 is on
        base.astype(ml_dtypes.bfloat16),
        base > 0,
        base.astype(np.int8)[:, ::2],  # not contiguous
        np.zeros((0, 3), np.float16),
        np.array(3, np.int32),
        np.arange(5, dtype=np.uint64),
        base.astype(np.complex64),
        base.astype(ml_dtypes.float8_e4m3fn),
    ] * 4
    for fast in (True, False):
        monkeypatch.setattr(transfer, "_FAST_OK", [fast])
        got, want = transfer.device_put_many(arrays), jax.device_put(arrays)
        for g, w in zip(got, want):
            assert type(g) is type(w) and jax.typeof(g) == jax.typeof(w)
            assert g.sharding == w.sharding and g.committed == w.committed
            assert np.asarray(g).tobytes() == np.asarray(w).tobytes()
        assert transfer.fast_path_available() is fast
    with jax.default_device(jax.devices()[-1]):
        got = transfer.device_put_many(arrays)
        assert got[0].sharding == jax.device_put(arrays[0]).sharding


def test_host_array_matches_numpy_for_ml_dtypes():
    from jaxsave._core.transfer import host_array

    for dtype in (jnp.bfloat16, jnp.float8_e5m2, jnp.float16):
        x = jnp.arange(12, dtype=dtype).reshape(3, 4)
        got = host_array(x)
        assert type(got) is np.ndarray and got.dtype == x.dtype and got.shape == x.shape
        np.testing.assert_array_equal(got.view(np.uint8), np.asarray(x).view(np.uint8))


def test_saving_and_loading_pause_the_cyclic_gc_and_restore_it(tmp_path):
    import gc

    tree = many_leaves(2_000)
    path = tmp_path / "t.jaxsave"
    seen = []
    gc.callbacks.append(lambda phase, info: seen.append(phase) if phase == "start" else None)
    try:
        jaxsave.save_pytree(path, tree)
        jaxsave.load_pytree(path)
        # At most the one collection due once the gc is back on, after each call (about ten
        # per call without the pause, one per 700 new containers).
        assert len(seen) <= 2, seen
        assert gc.isenabled()
        gc.disable()  # a program that turned it off keeps it off
        jaxsave.load_pytree(path, as_numpy=True)
        assert not gc.isenabled()
        gc.enable()
        with pytest.raises(FileFormatError):
            jaxsave.load_pytree(io.BytesIO(b"\x93JAXSAVE" + b"\0" * 40))
        assert gc.isenabled()  # restored after an error too
    finally:
        gc.enable()
        gc.callbacks.pop()


@pytest.mark.parametrize("ext", ["jaxsave", "npz", "safetensors", "h5"])
def test_leaves_whose_names_collide_with_a_repeats_suffix_save_and_load(tmp_path, ext):
    # 'a/b' is named 'a|b' like the first leaf, and its '~1' suffix was the second leaf's name:
    # the save succeeded and the file could never be loaded (h5: h5py's 'name already exists')
    from collections import OrderedDict

    tree = OrderedDict([("a|b", np.zeros(1)), ("a|b~1", np.ones(1)), ("a/b", np.full(1, 2.0))])
    jaxsave.save_pytree(tmp_path / f"t.{ext}", tree)
    back = jaxsave.load_pytree(tmp_path / f"t.{ext}")
    assert [(k, v.tolist()) for k, v in back.items()] == [("a|b", [0.0]), ("a|b~1", [1.0]), ("a/b", [2.0])]


def test_hdf5_stand_in_names_avoid_the_leaves_names(tmp_path):
    # '..' is stored as 'leaf_0', which another leaf was called
    tree = {"..": np.zeros(1), "leaf_0": np.ones(1), "leaf_1": np.full(1, 2.0)}
    jaxsave.save_pytree(tmp_path / "t.h5", tree)
    assert {k: v.tolist() for k, v in jaxsave.load_pytree(tmp_path / "t.h5").items()} == {
        "..": [0.0],
        "leaf_0": [1.0],
        "leaf_1": [2.0],
    }


@pytest.mark.parametrize("ext, name", [("npz", ".npz"), ("h5", "HDF5")])
def test_a_nul_in_a_key_is_refused_where_the_format_cuts_it(tmp_path, ext, name):
    # .npz saved 'a\0b' and could not load it; .h5 raised h5py's 'name already exists'
    with pytest.raises(
        ValueError, match=rf"leaf 'a\\x00b': {re.escape(name)} cannot store a name with a NUL"
    ):
        jaxsave.save_pytree(tmp_path / f"t.{ext}", {"a\0b": np.ones(1), "a": np.zeros(1)})
    assert os.listdir(tmp_path) == []
    jaxsave.save_pytree(tmp_path / "t.jaxsave", {"a\0b": np.ones(1), "a": np.zeros(1)})
    assert jaxsave.load_pytree(tmp_path / "t.jaxsave")["a\0b"].tolist() == [1.0]
