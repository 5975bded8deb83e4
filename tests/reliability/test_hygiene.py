"""Thread and resource hygiene: after postprocess/close, no writer thread runs and no file stays open.

Each scenario runs against real files in its own directory; afterwards the
process must hold no descriptor to any file in it (checked through
/proc/self/fd, without forcing a garbage collection) and no jaxsave thread.
"""

from __future__ import annotations

import os
import threading

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import files_under, open_fds

import jaxsave

pytestmark = [
    pytest.mark.reliability,
    pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd (Linux)"),
]


def _stream(path, *, fail=False, checkpoint=False, chains=2, steps=40):
    class Failing(jaxsave.HDF5Collector):
        def save_block(self, chain_ids, values):
            if fail:
                raise OSError("injected")
            super().save_block(chain_ids, values)

    saver = jaxsave.save(Failing(path), block_size=8, checkpoint_every=8 if checkpoint else 0)
    solver = {"m": jnp.zeros((chains, 2))} if checkpoint else None
    state = saver.init({"x": jnp.zeros((chains, 3))}, solver, chains=chains)

    def chain(s):
        def step(s, i):
            return saver.save(
                s,
                True,
                {"x": jnp.full(3, i, jnp.float32)},
                solver_state={"m": jnp.full(2, 1.0 * i)} if checkpoint else None,
            )

        return jax.lax.scan(step, s, jnp.arange(steps))[0]

    return saver.postprocess(jax.jit(jax.vmap(chain))(state), None)


def _hdf5_success(d):
    _stream(d / "s.h5", checkpoint=True)
    jaxsave.load_samples(d / "s.h5")
    jaxsave.file_info(d / "s.h5")
    jaxsave.resume(d / "s.h5")
    with jaxsave.open_live(d / "s.h5") as live:
        live.refresh()
    jaxsave.to_inference_data(d / "s.h5")
    jaxsave.recover(d / "s.h5")


def _hdf5_failure(d):
    with pytest.raises(OSError, match="injected"):
        _stream(d / "s.h5", fail=True)
    jaxsave.file_info(d / "s.h5")


def _hdf5_resume(d):
    _stream(d / "r.h5", checkpoint=True)
    ckpt = jaxsave.resume(d / "r.h5")
    saver = jaxsave.save(jaxsave.HDF5Collector(d / "r.h5", mode="a"), block_size=8, checkpoint_every=8)
    state = saver.init({"x": jnp.zeros((2, 3))}, {"m": jnp.zeros((2, 2))}, resume=ckpt)
    saver.postprocess(state, None)


def _user_file_closed(d):
    f = h5py.File(d / "u.h5", "w", libver="latest")
    saver = jaxsave.save(jaxsave.HDF5Collector(f), block_size=4)
    state = saver.init(jnp.zeros(2), None)
    state = jax.lax.scan(lambda s, i: saver.save(s, True, jnp.zeros(2)), state, jnp.arange(8))[0]
    saver.init.__self__.writer.drain()
    f.close()
    state = jax.lax.scan(lambda s, i: saver.save(s, True, jnp.zeros(2)), state, jnp.arange(8))[0]
    with pytest.raises(jaxsave.SaverStateError):
        saver.postprocess(state, None)


def _memory_and_device(d):
    for saver, info in (
        (jaxsave.save(jaxsave.MemoryCollector(save_dir=str(d)), block_size=4), None),
        (jaxsave.no_save(), jaxsave.static_information(8)),
    ):
        state = saver.init(jnp.zeros(2), None, info)
        state = jax.lax.scan(lambda s, i: saver.save(s, True, jnp.zeros(2)), state, jnp.arange(8))[0]
        saver.postprocess(state, None)


def _pytrees(d):
    tree = {"a": np.arange(4.0), "b": [np.ones(2, np.int32)]}
    for fmt in ("jaxsave", "npz", "safetensors", "h5"):
        path = d / f"t.{fmt}"
        jaxsave.save_pytree(path, tree if fmt != "safetensors" else {"a": tree["a"]}, metadata={"k": 1})
        jaxsave.load_pytree(path)
        jaxsave.read_metadata(path)
        with jaxsave.open_pytree(path) as f:
            f.load()


def _checkpointer(d):
    ckpt = jaxsave.Checkpointer(d / "c", keep=2)
    for step in range(4):
        ckpt.save(step, {"w": np.full(3, step)}, metadata={"s": step})
    ckpt.restore()
    ckpt.metadata()
    ckpt.steps()


def _hostile(d):
    (d / "bad.jaxsave").write_bytes(b"\x93JAXSAVE" + b"\xff" * 40)
    (d / "bad.npz").write_bytes(b"PK\x03\x04" + b"\0" * 100)
    (d / "bad.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
    for name in ("bad.jaxsave", "bad.npz", "bad.h5"):
        with pytest.raises(jaxsave.JaxsaveError):
            jaxsave.load_pytree(d / name)
    with pytest.raises(jaxsave.JaxsaveError):
        jaxsave.load_samples(d / "bad.h5")
    _stream(d / "s.h5")
    with pytest.raises(jaxsave.StructureMismatchError):
        jaxsave.load_samples(d / "s.h5", like={"y": jnp.zeros(3)})
    with pytest.raises(IndexError):
        jaxsave.load_samples(d / "s.h5", chain=9)


SCENARIOS = {
    f.__name__.strip("_"): f
    for f in (
        _hdf5_success,
        _hdf5_failure,
        _hdf5_resume,
        _user_file_closed,
        _memory_and_device,
        _pytrees,
        _checkpointer,
        _hostile,
    )
}


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_no_thread_or_file_handle_left(tmp_path, name, figures):
    before = open_fds()
    SCENARIOS[name](tmp_path)
    left = files_under(open_fds(), tmp_path)
    assert left == [], f"{name}: files still open: {left}"
    threads = [t.name for t in threading.enumerate() if t.name.startswith("jaxsave")]
    assert threads == [], f"{name}: threads still running: {threads}"
    leaked = len(open_fds()) - len(before)
    assert leaked <= 2, f"{name}: {leaked} more descriptors open than before"
    figures("hygiene", name, files_left=0, threads_left=0)
