"""Faults in the host path surface as a clear exception from postprocess/close within seconds.

Injected: a collector that raises (while writing a block, while storing a
checkpoint), a file-size limit (EFBIG), a full file system (ENOSPC, a small
tmpfs where this user may mount one), a directory that becomes read-only
during the run, and the user closing the h5py.File mid-run. Each must end in
the original error from ``postprocess``, never a hang or crash, and the
samples written before the fault must stay readable.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _reliability import child_env, small_disk

import jaxsave

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(180)]

#: The error must reach postprocess within this many seconds of the call.
SURFACE_S = 5.0

CHILD = textwrap.dedent("""
    import json, os, resource, signal, sys, time
    path, fault, limit = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if fault == "fsize":
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    import jax, jax.numpy as jnp, jaxsave

    saver = jaxsave.save(jaxsave.HDF5Collector(path, flush_interval=0.0), checkpoint_every=64, block_size=16)
    state = saver.init({"i": jnp.zeros((), jnp.int32), "w": jnp.zeros(1024)}, {"n": jnp.int32(0)})

    def chunk(state, k):
        def step(s, i):
            v = k * 64 + i
            return saver.save(s, True, {"i": v, "w": jnp.full(1024, v, jnp.float32)}, solver_state={"n": v})
        return jax.lax.scan(step, state, jnp.arange(64))[0]

    run = jax.jit(chunk)
    state = run(state, 0)
    jax.block_until_ready(state)
    while jaxsave.file_info(path).sample_counts.sum() < 64:  # the first chunk is on disk
        time.sleep(0.01)
    print("ready", flush=True)
    if fault == "readonly":
        sys.stdin.readline()  # the parent makes the directory read-only, then lets the run go on
    for k in range(1, 120):
        state = run(state, k)
    jax.block_until_ready(state)
    start = time.monotonic()
    try:
        saver.postprocess(state, None)
        print(json.dumps({"raised": None}), flush=True)
    except BaseException as error:
        print(json.dumps({"raised": type(error).__name__, "errno": getattr(error, "errno", None),
                          "message": str(error), "seconds": time.monotonic() - start}), flush=True)
""")


def _drop_root_permissions() -> None:
    """preexec_fn: as root, give up the capabilities that ignore file permissions (for the child)."""
    if os.geteuid() == 0:
        libc = ctypes.CDLL(None, use_errno=True)
        for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
            if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP: gone from the exec'd child
                raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def run_child(tmp_path, path, fault, limit=0, on_ready=None, **popen):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(path), fault, str(limit)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env(),
        **popen,
    )
    try:
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()[-3000:]
        if on_ready is not None:
            on_ready()
        proc.stdin.write("go\n")
        proc.stdin.flush()
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, f"the child crashed ({proc.returncode}): {err[-3000:]}"
    return json.loads(out.strip().splitlines()[-1])


def check_prefix(path) -> int:
    """The file opens and holds draws 0..n-1 of the run; returns n."""
    samples = jaxsave.load_samples(path)
    n = int(jaxsave.file_info(path).sample_counts[0])
    np.testing.assert_array_equal(samples["i"][0, :n], np.arange(n))
    np.testing.assert_array_equal(samples["w"][0, :n, 0], np.arange(n, dtype=np.float32))
    return n


def test_file_size_limit_surfaces_efbig_and_keeps_the_samples(tmp_path, figures):
    path = tmp_path / "s.h5"
    result = run_child(tmp_path, path, "fsize", limit=12 * 2**20)
    assert result["raised"] == "OSError" and result["errno"] == errno.EFBIG, result
    assert "file size limit" in result["message"] and str(path) in result["message"]
    assert result["seconds"] < SURFACE_S
    n = check_prefix(path)
    assert n > 64 and f"the {n} samples" in result["message"]
    assert not jaxsave.file_info(path).open_for_writing
    figures(
        "faults",
        "file-size limit (EFBIG) while streaming",
        surfaced=1,
        injected=1,
        seconds=round(result["seconds"], 3),
        samples_kept=n,
    )


def test_a_full_file_system_behind_link_dotdot_surfaces_enospc(tmp_path):
    # the room was checked on the directory abspath makes of 'link/..' (another file system),
    # so HDF5 met the full disk itself: a RuntimeError, then a segfault at exit
    with small_disk(tmp_path, "12m") as mnt:
        (mnt / "sub").mkdir()
        (tmp_path / "link").symlink_to(mnt / "sub")
        result = run_child(tmp_path, tmp_path / "link" / ".." / "s.h5", "none")
        assert result["raised"] == "OSError" and result["errno"] == errno.ENOSPC, result
        assert check_prefix(mnt / "s.h5") > 64


def test_full_file_system_surfaces_enospc_and_keeps_the_samples(tmp_path, figures):
    with small_disk(tmp_path, "12m") as mnt:  # where it is skipped, the file-size-limit test covers the path
        result = run_child(tmp_path, mnt / "s.h5", "none")
        assert result["raised"] == "OSError" and result["errno"] == errno.ENOSPC, result
        assert "No space left on device" in result["message"] and result["seconds"] < SURFACE_S
        n = check_prefix(mnt / "s.h5")
        assert n > 64
        # an atomic write that does not fit leaves the old file and no temporary behind
        old = mnt / "tree.jaxsave"
        jaxsave.save_pytree(old, {"a": np.zeros(4)})
        with pytest.raises(OSError) as e:
            jaxsave.save_pytree(old, {"a": np.zeros(2**21)})
        assert e.value.errno == errno.ENOSPC
        assert sorted(os.listdir(mnt)) == ["s.h5", "s.h5.ckpt", "tree.jaxsave"]
        np.testing.assert_array_equal(jaxsave.load_pytree(old)["a"], np.zeros(4))
    figures(
        "faults",
        "full file system (ENOSPC, tmpfs)",
        surfaced=2,
        injected=2,
        seconds=round(result["seconds"], 3),
        samples_kept=n,
    )


def test_atomic_writes_under_a_file_size_limit_keep_the_old_file(tmp_path, figures):
    script = textwrap.dedent("""
        import errno, resource, signal, sys, numpy as np, jaxsave
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, 2**20))
        ok = 0
        for fmt in ("jaxsave", "npz", "safetensors", "h5"):
            try:
                jaxsave.save_pytree(sys.argv[1] + "." + fmt, {"a": np.ones(2**18)})
            except OSError as e:
                ok += e.errno == errno.EFBIG or "File too large" in str(e)
        try:
            jaxsave.Checkpointer(sys.argv[1] + "-ckpt").save(2, {"a": np.ones(2**18)})
        except OSError as e:
            ok += e.errno == errno.EFBIG
        print(ok)
    """)
    base = tmp_path / "t"
    for fmt in ("jaxsave", "npz", "safetensors", "h5"):
        jaxsave.save_pytree(f"{base}.{fmt}", {"a": np.zeros(3)})
    jaxsave.Checkpointer(f"{base}-ckpt").save(1, {"a": np.zeros(3)})
    out = subprocess.run(
        [sys.executable, "-c", script, str(base)],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["5"], out.stdout + out.stderr[-3000:]
    for fmt in ("jaxsave", "npz", "safetensors", "h5"):
        np.testing.assert_array_equal(jaxsave.load_pytree(f"{base}.{fmt}")["a"], np.zeros(3))
    assert jaxsave.Checkpointer(f"{base}-ckpt").steps() == [1]
    assert sorted(os.listdir(tmp_path)) == sorted(
        [f"t.{f}" for f in ("jaxsave", "npz", "safetensors", "h5")] + ["t-ckpt"]
    )
    figures("faults", "file-size limit during save_pytree/Checkpointer", surfaced=5, injected=5)


@pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")  # preexec_fn forks; the child execs at once
def test_directory_made_read_only_mid_run(figures):
    # tmp_path lives under a 0700 root-owned directory: use a directory the child can reach.
    directory = tempfile.mkdtemp(prefix="jaxsave-ro-")
    path = os.path.join(directory, "s.h5")
    try:
        result = run_child(
            pathlib_of(directory),
            path,
            "readonly",
            on_ready=lambda: os.chmod(directory, 0o555),
            preexec_fn=_drop_root_permissions,
        )
        assert result["raised"] == "PermissionError", result
        assert "s.h5.ckpt" in result["message"] and result["seconds"] < SURFACE_S
        os.chmod(directory, 0o755)
        n = check_prefix(path)
        assert n >= 64
        if os.path.exists(path + ".ckpt"):  # one written before the directory became read-only
            assert int(jaxsave.resume(path).step) <= n
    finally:
        os.chmod(directory, 0o755)
        shutil.rmtree(directory)
    figures(
        "faults",
        "directory made read-only mid-run",
        surfaced=1,
        injected=1,
        seconds=round(result["seconds"], 3),
        samples_kept=n,
    )


def pathlib_of(directory):
    import pathlib

    return pathlib.Path(directory)


def _scan(saver, state, start, n=32):
    def step(s, i):
        return saver.save(s, True, {"i": i, "w": jnp.full(4, i, jnp.float32)})

    return jax.lax.scan(step, state, start + jnp.arange(n))[0]


def test_h5py_file_closed_by_the_user_mid_run(tmp_path, figures):
    f = h5py.File(tmp_path / "user.h5", "w", libver="latest")
    saver = jaxsave.save(jaxsave.HDF5Collector(f, flush_interval=0.0), block_size=8)
    state = saver.init({"i": jnp.int32(0), "w": jnp.zeros(4)}, None)
    run = jax.jit(lambda s, k: _scan(saver, s, k))
    state = run(state, 0)
    saver.init.__self__.writer.drain()
    f.close()  # the user's mistake
    state = run(state, 32)
    start = time.monotonic()
    with pytest.raises(jaxsave.SaverStateError, match="was closed while the sampler was still saving"):
        saver.postprocess(state, None)
    seconds = time.monotonic() - start
    assert seconds < SURFACE_S
    n = check_prefix(tmp_path / "user.h5")
    assert n == 32
    figures(
        "faults",
        "h5py.File closed by the user mid-run",
        surfaced=1,
        injected=1,
        seconds=round(seconds, 3),
        samples_kept=n,
    )


class Boom(RuntimeError):
    pass


class FailingHDF5(jaxsave.HDF5Collector):
    """An HDF5 collector whose n-th block (or checkpoint) raises."""

    def __init__(self, path, *, fail_block=None, fail_checkpoint=None):
        super().__init__(path, flush_interval=0.0)
        self.blocks = self.checkpoints = 0
        self.fail_block, self.fail_checkpoint = fail_block, fail_checkpoint

    def save_block(self, chain_ids, values):
        self.blocks += 1
        if self.blocks == self.fail_block:
            raise Boom(f"block {self.blocks} refused")
        super().save_block(chain_ids, values)

    def checkpoint(self, records, spec):
        self.checkpoints += 1
        if self.checkpoints == self.fail_checkpoint:
            raise Boom(f"checkpoint {self.checkpoints} refused")
        super().checkpoint(records, spec)


@pytest.mark.parametrize("where", ["block", "checkpoint"])
def test_collector_raising_in_the_writer_under_vmap(tmp_path, where, figures, one_call_per_block):
    path = tmp_path / "s.h5"
    kwargs = {"fail_block": 5} if where == "block" else {"fail_checkpoint": 2}
    # a tiny queue: the sampler would block on a dead writer if producers did not give up
    saver = jaxsave.save(FailingHDF5(path, **kwargs), checkpoint_every=16, block_size=8, max_queue_bytes=1024)
    state = saver.init({"i": jnp.zeros(3, jnp.int32), "w": jnp.zeros((3, 4))}, {"n": jnp.zeros(3)}, chains=3)

    def chain(s, start):
        def step(s, i):
            return saver.save(
                s, True, {"i": i, "w": jnp.full(4, i, jnp.float32)}, solver_state={"n": 1.0 * i}
            )

        return jax.lax.scan(step, s, start + jnp.arange(400))[0]

    start = time.monotonic()
    state = jax.jit(jax.vmap(chain, in_axes=(0, None)))(state, 0)
    jax.block_until_ready(state)
    with pytest.raises(Boom, match=f"{where} [0-9]+ refused"):
        saver.postprocess(state, None)
    seconds = time.monotonic() - start
    assert seconds < 60
    counts = jaxsave.file_info(path).sample_counts
    samples = jaxsave.load_samples(path)
    for c, n in enumerate(counts.tolist()):
        np.testing.assert_array_equal(samples["i"][c, :n], np.arange(n))
    assert (counts == 32).all(), counts  # the blocks before the failing one (or the checkpoint after block 4)
    figures(
        "faults",
        f"collector raises in {where} (3 vmapped chains)",
        surfaced=1,
        injected=1,
        seconds=round(seconds, 3),
        samples_kept=int(counts.sum()),
    )
