"""Checkpointer: retention, naming, restore, crash leftovers; atomic writes under SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import jax.numpy as jnp
import numpy as np
import pytest

import jaxsave
from jaxsave._core.atomic import is_temporary, remove_stale_temporaries, temporary_name
from jaxsave.errors import FileFormatError, StructureMismatchError


def tree(step):
    return {"w": np.full((2, 2), step, np.float32), "step": step}


def test_keep_last_k(tmp_path):
    ckpt = jaxsave.Checkpointer(tmp_path, keep=3)
    for step in range(0, 100, 10):
        ckpt.save(step, tree(step))
    assert ckpt.steps() == [70, 80, 90] and ckpt.latest_step() == 90
    assert sorted(os.listdir(tmp_path)) == [f"checkpoint_{s:08d}.jaxsave" for s in (70, 80, 90)]


def test_keep_every_nth_plus_last_k(tmp_path):
    ckpt = jaxsave.Checkpointer(tmp_path, keep=2, keep_every=25)
    for step in range(0, 110, 10):
        ckpt.save(step, tree(step))
    assert ckpt.steps() == [0, 50, 90, 100]
    ckpt = jaxsave.Checkpointer(tmp_path / "all", keep=None)
    for step in range(5):
        ckpt.save(step, tree(step))
    assert ckpt.steps() == [0, 1, 2, 3, 4]


def test_restore_latest_specific_and_like(tmp_path):
    ckpt = jaxsave.Checkpointer(tmp_path)
    with pytest.raises(FileNotFoundError, match="no checkpoints"):
        ckpt.restore()
    assert ckpt.latest_step() is None
    for step in (1, 5, 3):
        ckpt.save(step, tree(step), metadata={"loss": 1.0 / step})
    step, t = ckpt.restore()
    assert step == 5 and t["step"] == 5 and t["w"][0, 0] == 5
    step, t = ckpt.restore(3, like=tree(0))
    assert step == 3 and t["step"] == 3
    assert ckpt.metadata() == {"loss": 0.2} and ckpt.metadata(1) == {"loss": 1.0}
    with pytest.raises(StructureMismatchError):
        ckpt.restore(like={"w": np.zeros((3, 3), np.float32), "step": 0})
    with pytest.raises(FileNotFoundError, match="step 2"):
        ckpt.restore(2)
    ckpt.save(5, tree(50))  # same step again: replaced
    assert ckpt.restore(5)[1]["step"] == 50
    ckpt.delete(5)
    assert ckpt.steps() == [1, 3]


def test_custom_names_and_formats(tmp_path):
    ckpt = jaxsave.Checkpointer(tmp_path, filename="model-{step}.safetensors", keep=2)
    for step in (7, 8, 9, 10):
        ckpt.save(step, {"p": jnp.ones(3) * step})
    assert sorted(os.listdir(tmp_path)) == ["model-10.safetensors", "model-9.safetensors"]
    assert ckpt.steps() == [9, 10]
    assert jaxsave.open_pytree(ckpt.path(10)).format == "safetensors"
    npz = jaxsave.Checkpointer(tmp_path / "z", filename="s{step:05d}.npz")
    npz.save(3, {"a": np.ones(1)})
    assert os.listdir(tmp_path / "z") == ["s00003.npz"] and npz.restore()[0] == 3
    for bad in ("ckpt.jaxsave", "{step}-{step}.x", "{epoch}.x", "sub/{step}.x", "{step:s}.x"):
        with pytest.raises(ValueError):
            jaxsave.Checkpointer(tmp_path / "bad", filename=bad)
    with pytest.raises(ValueError):
        jaxsave.Checkpointer(tmp_path, keep=0)


def test_unrelated_and_temporary_files_are_ignored_and_stale_ones_removed(tmp_path):
    ckpt = jaxsave.Checkpointer(tmp_path, keep=2)
    ckpt.save(1, tree(1))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = temporary_name(ckpt.path(2)).replace(f".{os.getpid()}.", f".{dead.pid}.")
    live = temporary_name(ckpt.path(3))  # this process's: a save in progress
    for name in (stale, live):
        open(name, "wb").write(b"partial")
    open(tmp_path / "notes.txt", "w").write("x")
    open(tmp_path / "checkpoint_00000004.jaxsave.bak", "w").write("x")
    assert is_temporary(stale) and is_temporary(live) and not is_temporary(ckpt.path(1))
    assert ckpt.steps() == [1]
    reopened = jaxsave.Checkpointer(tmp_path, keep=2)
    assert not os.path.exists(stale) and os.path.exists(live)
    assert reopened.steps() == [1] and reopened.restore()[0] == 1
    assert remove_stale_temporaries(tmp_path) == []


def test_restore_falls_back_when_latest_is_corrupt(tmp_path):
    ckpt = jaxsave.Checkpointer(tmp_path)
    ckpt.save(1, tree(1))
    ckpt.save(2, tree(2))
    with open(ckpt.path(2), "r+b") as f:
        f.truncate(100)
    with pytest.warns(RuntimeWarning, match="checkpoint 2 is unreadable"):
        step, t = ckpt.restore()
    assert step == 1 and t["step"] == 1
    with pytest.raises(FileFormatError):
        ckpt.restore(2)


_WRITER = textwrap.dedent("""
    import sys, numpy as np, jaxsave
    path = sys.argv[1]
    big = {f"leaf{i}": np.full(2**21, 1.0, np.float64) for i in range(48)}  # 768 MiB
    print("start", flush=True)
    jaxsave.save_pytree(path, big, metadata={"version": "new"})
    print("done", flush=True)
""")


def test_sigkill_during_save_leaves_the_old_file_intact(tmp_path):
    path = tmp_path / "model.jaxsave"
    old = {"w": np.arange(10.0)}
    jaxsave.save_pytree(path, old, metadata={"version": "old"})
    child = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "start"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # kill as soon as the temporary has data
            temps = [n for n in os.listdir(tmp_path) if is_temporary(n)]
            if temps and os.path.getsize(tmp_path / temps[0]) > 2**20:
                break
            time.sleep(0.001)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == -signal.SIGKILL and temps
    assert jaxsave.read_metadata(path) == {"version": "old"}
    np.testing.assert_array_equal(jaxsave.load_pytree(path)["w"], old["w"])
    assert remove_stale_temporaries(tmp_path) == [str(tmp_path / temps[0])]
    assert os.listdir(tmp_path) == ["model.jaxsave"]
