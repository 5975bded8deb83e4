"""Who owns a sample file: one writer per path, a file lost under its writer, readers during swaps.

* A second ``HDF5Collector`` on a path that a collector writes (in this process or
  another) is refused with :class:`jaxsave.FileInUseError` naming the path and the
  holder; a killed holder does not block the next run; readers read throughout.
* A file deleted, truncated or replaced while it is written ends the run with
  :class:`jaxsave.FileChangedError` naming the file, not with samples reported saved.
* A reader in another process polling a file whose writer keeps replacing it
  (rename) and reopening it never sees a transient "cannot be opened" error.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import textwrap
import threading

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _reliability import python

import jaxsave

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(300)]

LOCK_SUFFIX = ".lock"  # the writer's lock file: <file>.lock

STEPS = 50

#: A writer that streams STEPS samples (with checkpoints), says "ready", waits for a line on
#: stdin, streams STEPS more and closes.
HOLDER = textwrap.dedent(f"""
    import sys, jax, jax.numpy as jnp, jaxsave

    path = sys.argv[1]
    collector = jaxsave.HDF5Collector(path, flush_interval=0, checkpoint_interval=0)
    saver = jaxsave.save(collector, checkpoint_every=10, block_size=10)
    state = saver.init({{"x": jnp.zeros(3)}}, {{"n": jnp.int32(0)}})

    def step(carry, i):
        state, solver = carry
        solver = {{"n": solver["n"] + 1}}
        x = {{"x": jnp.full(3, i, jnp.float32)}}
        state, _ = saver.save(state, True, x, solver_state=solver)
        return (state, solver), None

    run = jax.jit(lambda st, sv, s0: jax.lax.scan(step, (st, sv), s0 + jnp.arange({STEPS}))[0])
    state, solver = run(state, {{"n": jnp.int32(0)}}, 0)
    jaxsave.resume(collector)  # drains the writer: the samples and the checkpoint are on disk
    print("ready", flush=True)
    sys.stdin.readline()
    state, solver = run(state, solver, {STEPS})
    saver.postprocess(state, None)
    print("done", flush=True)
""")

#: Polls ``file_info`` until the file ``<path>.stop`` appears; prints what it saw as JSON.
READER = textwrap.dedent("""
    import json, os, sys, time
    import jaxsave

    path = sys.argv[1]
    while not os.path.exists(path):
        time.sleep(0.001)
    print("reading", flush=True)
    reads, errors = 0, []
    while not os.path.exists(path + ".stop"):
        try:
            jaxsave.file_info(path)
            reads += 1
        except Exception as error:
            errors.append(f"{type(error).__name__}: {error}")
    print(json.dumps({"reads": reads, "errors": errors[:5], "n_errors": len(errors)}), flush=True)
""")


def _stream(saver, state, solver, start: int):
    """STEPS kept samples from a jit-compiled scan, with a solver state to checkpoint."""

    def step(carry, i):
        state, solver = carry
        solver = {"n": solver["n"] + 1}
        state, _ = saver.save(state, True, {"x": jnp.full(3, i, jnp.float32)}, solver_state=solver)
        return (state, solver), None

    return jax.jit(lambda st, sv: jax.lax.scan(step, (st, sv), start + jnp.arange(STEPS))[0])(state, solver)


def _lines(proc) -> queue.Queue:
    lines: queue.Queue = queue.Queue()

    def pump() -> None:
        for line in proc.stdout:
            lines.put(line.strip())

    threading.Thread(target=pump, daemon=True).start()
    return lines


def _expect(lines: queue.Queue, proc, word: str, timeout: float = 120) -> str:
    try:
        line = lines.get(timeout=timeout)
    except queue.Empty:
        proc.kill()
        raise AssertionError(
            f"the child did not print {word!r} within {timeout} s: {proc.stderr.read()[-3000:]}"
        )
    assert line.startswith(word), (
        line,
        proc.stderr.read()[-3000:] if proc.poll() is not None else "",
    )
    return line


@pytest.fixture
def holder(tmp_path):
    """A child process that holds ``s.h5`` open for writing (STEPS samples on disk)."""
    script = tmp_path / "holder.py"
    script.write_text(HOLDER)
    path = tmp_path / "s.h5"
    proc = python(script, path, stdin=subprocess.PIPE)
    lines = _lines(proc)
    try:
        _expect(lines, proc, "ready")
        yield path, proc, lines
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=60)


def test_two_collectors_in_one_process(tmp_path, monkeypatch):
    path = tmp_path / "s.h5"
    collector = jaxsave.HDF5Collector(path, flush_interval=0)
    saver = jaxsave.save(collector, checkpoint_every=10, block_size=10)
    state, _ = _stream(saver, saver.init({"x": jnp.zeros(3)}, {"n": jnp.int32(0)}), {"n": jnp.int32(0)}, 0)
    os.symlink(path, tmp_path / "link.h5")
    monkeypatch.chdir(tmp_path)
    for other, mode in (
        (path, "w"),
        (path, "a"),
        ("s.h5", "x"),
        (tmp_path / "link.h5", "a"),
        (tmp_path / "." / "s.h5", "w"),
    ):
        with pytest.raises(jaxsave.FileInUseError, match=re.escape(repr(os.fspath(other)))) as e:
            jaxsave.HDF5Collector(other, mode=mode)
        assert "this process" in str(e.value) and str(os.getpid()) in str(e.value)
    # the first collector's run is untouched and completes; then the path is free again
    assert saver.postprocess(state, None)["sample_count"] == STEPS
    assert not os.path.exists(f"{path}{LOCK_SUFFIX}")
    np.testing.assert_array_equal(jaxsave.load_samples(path, chain=0)["x"][:, 0], np.arange(STEPS))
    again = jaxsave.HDF5Collector(path, mode="a")
    with pytest.raises(jaxsave.FileInUseError):
        jaxsave.recover(path)  # a tool that needs the file without a writer refuses too
    again.close()
    assert jaxsave.recover(path) is False and not os.path.exists(f"{path}{LOCK_SUFFIX}")


def test_a_second_process_is_refused_naming_the_holder(holder):
    path, proc, lines = holder
    for mode in ("w", "a"):
        with pytest.raises(jaxsave.FileInUseError) as e:
            jaxsave.HDF5Collector(path, mode=mode)
        message = str(e.value)
        assert repr(os.fspath(path)) in message and f"pid {proc.pid}" in message, message
        assert socket.gethostname() in message, message
    # readers read the live file while the writer holds it; the refused writers changed nothing
    assert jaxsave.file_info(path).sample_counts.tolist() == [STEPS]
    np.testing.assert_array_equal(jaxsave.load_samples(path, chain=0)["x"][:, 0], np.arange(STEPS))
    assert jaxsave.open_live(path).refresh(chain=0)["x"].shape == (STEPS, 3)
    with pytest.raises(jaxsave.FileInUseError, match=f"pid {proc.pid}"):
        jaxsave.recover(path)
    proc.stdin.write("go\n")
    proc.stdin.flush()
    _expect(lines, proc, "done")
    assert proc.wait(timeout=60) == 0
    np.testing.assert_array_equal(jaxsave.load_samples(path, chain=0)["x"][:, 0], np.arange(2 * STEPS))
    assert not os.path.exists(f"{path}{LOCK_SUFFIX}")
    jaxsave.HDF5Collector(path, mode="a").close()  # the holder is done: the path is free


def test_a_killed_holder_does_not_block_the_next_run(holder):
    path, proc, _ = holder
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert os.path.exists(f"{path}{LOCK_SUFFIX}")  # left behind, but no longer locked
    ckpt = jaxsave.resume(path)
    assert int(ckpt.step) == STEPS
    saver = jaxsave.save(jaxsave.HDF5Collector(path, mode="a"), checkpoint_every=10, block_size=10)
    state = saver.init({"x": jnp.zeros(3)}, {"n": jnp.int32(0)}, resume=ckpt)
    state, solver = _stream(saver, state, ckpt.solver_state, STEPS)
    assert saver.postprocess(state, None)["sample_count"] == 2 * STEPS
    assert int(solver["n"]) == 2 * STEPS
    np.testing.assert_array_equal(jaxsave.load_samples(path, chain=0)["x"][:, 0], np.arange(2 * STEPS))
    assert not os.path.exists(f"{path}{LOCK_SUFFIX}")


def _delete(path):
    os.unlink(path)


def _truncate_to_zero(path):
    os.truncate(path, 0)


def _truncate_to_half(path):
    os.truncate(path, os.path.getsize(path) // 2)


def _replace(path):
    shutil.copyfile(path, f"{path}.copy")
    os.replace(f"{path}.copy", path)


@pytest.mark.parametrize(
    "damage",
    [_delete, _truncate_to_zero, _truncate_to_half, _replace],
    ids=lambda f: f.__name__.strip("_"),
)
def test_a_file_lost_mid_run_is_an_error_naming_it(tmp_path, damage):
    path = tmp_path / "s.h5"
    collector = jaxsave.HDF5Collector(path, flush_interval=0, checkpoint_interval=0)
    saver = jaxsave.save(collector, checkpoint_every=10, block_size=10)
    state, solver = _stream(
        saver, saver.init({"x": jnp.zeros(3)}, {"n": jnp.int32(0)}), {"n": jnp.int32(0)}, 0
    )
    jaxsave.resume(collector)  # every sample so far is on disk, and its checkpoint
    damage(path)
    for k in range(1, 10):
        state, solver = _stream(saver, state, solver, k * STEPS)
    with pytest.raises(jaxsave.FileChangedError, match=re.escape(repr(os.fspath(path)))):
        saver.postprocess(state, None)
    if os.path.exists(f"{path}.ckpt"):  # no checkpoint claims a step whose samples are lost
        assert int(jaxsave.resume(f"{path}.ckpt").step) <= STEPS
    assert not os.path.exists(f"{path}{LOCK_SUFFIX}")  # closed: the path is free for a new run
    jaxsave.HDF5Collector(path).close()


def test_a_reader_in_another_process_never_sees_the_writer_swap_the_file(tmp_path):
    path = tmp_path / "s.h5"
    script = tmp_path / "reader.py"
    script.write_text(READER)
    proc = python(script, path)
    lines = _lines(proc)
    try:
        sample = [np.zeros((1, 4, 3), np.float32)]
        # every new run replaces the file (rename) when it is created, when its structure is set and
        # when its datasets are created, and reopens it for SWMR writing after each
        for run in range(40):
            collector = jaxsave.HDF5Collector(path, flush_interval=0)
            collector.register_chain({"x": jnp.zeros(3)})
            collector.save_block([0], [sample[0] + run])
            collector.finalize(0)
            collector.close()
            if run == 0:
                _expect(lines, proc, "reading")
        open(f"{path}.stop", "w").close()
        seen = json.loads(_expect(lines, proc, "{", timeout=60))
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=60)
    assert seen["n_errors"] == 0, seen
    assert seen["reads"] >= 40, seen


CONTINUE = """
import sys, numpy as np, jaxsave
try:
    c = jaxsave.HDF5Collector(sys.argv[1], mode="a")
    ids = [c.register_chain(init_sample={"x": np.zeros(3, np.float32)}) for _ in range(2)]
    c.save_block(ids, [np.ones((2, 5, 3), np.float32)])
    for i in ids:
        c.finalize(i)
    c.close()
    print("continued")
except jaxsave.FileFormatError as error:
    print("refused", error)
"""

#: Signatures of the metadata blocks HDF5 checksums: object headers, chunk indices (extensible
#: array, B-tree v2), the global heap of the attributes.
_METADATA = re.compile(rb"OHDR|OCHK|EAHD|EAIB|BTHD|BTLF|GCOL")


def _damaged(data: bytes) -> dict[str, bytes]:
    """Copies of ``data`` with one bit flipped inside each metadata block, and three truncations."""
    copies = {}
    for m in _METADATA.finditer(data):
        for at in (m.start() + 9, m.start() + 21):
            damaged = bytearray(data)
            damaged[at] ^= 0x10
            copies[f"{m.group().decode()}@{m.start()}+{at - m.start()}"] = bytes(damaged)
    for fraction in (4, 2):
        copies[f"truncated to 1/{fraction}"] = data[: len(data) // fraction]
    copies["truncated by 1000 bytes"] = data[:-1000]
    return copies


def _two_chains(path):
    """A finished sample file of 2 chains of 9 draws of 3 floats, at ``path``."""
    c = jaxsave.HDF5Collector(path)
    ids = [c.register_chain(init_sample={"x": np.zeros(3, np.float32)}) for _ in range(2)]
    c.save_block(ids, [np.arange(54, dtype=np.float32).reshape(2, 9, 3)])
    for i in ids:
        c.finalize(i)
    c.close()
    return path


def test_mode_a_on_a_damaged_file_is_refused_before_it_writes(tmp_path):
    """mode="a" on a file with a flipped metadata bit raised h5py's errors (KeyError, OSError,
    RuntimeError) from inside its writes, crashed the process at exit or hung in HDF5; a
    truncated file gave raw OSErrors. Now each is a FileFormatError naming the file, before any
    write (the file unchanged), or, where the damage is in nothing the writer touches, the run
    continues the file."""
    path = _two_chains(tmp_path / "s.h5")
    script = tmp_path / "continue.py"
    script.write_text(CONTINUE)
    copies = _damaged(path.read_bytes())
    procs = {}
    for k, (name, data) in enumerate(copies.items()):
        target = tmp_path / f"damaged-{k}.h5"
        target.write_bytes(data)
        procs[name] = target
    outcomes = {}
    names = list(procs)
    started = {name: python(script, procs[name]) for name in names[:4]}
    for k, name in enumerate(names):
        if k + 4 < len(names):  # four at a time
            started[names[k + 4]] = python(script, procs[names[k + 4]])
        target, proc = procs[name], started.pop(name)
        try:
            out, err = proc.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            pytest.fail(f"{name}: mode='a' hung")
        assert proc.returncode == 0, f"{name}: exit status {proc.returncode}\n{err[-2000:]}"
        assert out.startswith(("continued", "refused")), f"{name}: {out}\n{err[-2000:]}"
        outcomes[name] = out.split()[0]
        if outcomes[name] == "refused":
            assert str(target) in out, out
            assert target.read_bytes() == copies[name], f"{name}: refused, but the file changed"
    refused = [name for name, outcome in outcomes.items() if outcome == "refused"]
    assert {n.split("@")[0] for n in refused} >= {"EAIB", "BTHD", "OHDR", "GCOL", "truncated to 1/2"}, (
        outcomes
    )


def _marked_open(data: bytes) -> bytes:
    """``data`` (a v3 superblock at 0) marked open for writing, as a killed writer leaves it."""
    from jaxsave._store.hdf5.superblock import lookup3

    size = 12 + 4 * data[9]
    block = bytearray(data[:size])
    block[11] = 1
    return bytes(block) + lookup3(bytes(block)).to_bytes(4, "little") + data[size + 4 :]


def test_mode_a_leaves_a_file_it_refuses_as_it_was(tmp_path):
    """mode="a" cleared a killed writer's marks and grew the file by 1 MiB before its checks, so
    a damaged file, a foreign one or one whose counts exceed its datasets was changed, though
    refused; a file open in this process was called damaged."""
    path = _two_chains(tmp_path / "s.h5")
    data = path.read_bytes()
    index = data.index(b"EAHD")
    damaged = bytearray(data)
    damaged[index + 9] ^= 0x10
    too_many = tmp_path / "counts.h5"
    shutil.copy(path, too_many)
    with h5py.File(too_many, "r+") as f:
        f.attrs["sample_counts"] = np.array([10**6, 9])
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w", libver="latest") as f:
        f["x"] = np.zeros(3)
    cases = {
        "damaged": (_marked_open(bytes(damaged)), "is damaged"),
        "counts": (
            _marked_open(too_many.read_bytes()),
            r"sample counts \[1000000, 9\] need at least \(2, 1000000, 3\)",
        ),
        "foreign": (_marked_open(foreign.read_bytes() + b"\0" * 100), "not written by jaxsave"),
    }
    for name, (content, problem) in cases.items():
        target = tmp_path / f"{name}-open.h5"
        target.write_bytes(content)
        with pytest.raises(jaxsave.FileFormatError, match=problem):
            jaxsave.HDF5Collector(target, mode="a")
        assert target.read_bytes() == content, f"{name}: refused, but changed"
    with h5py.File(path, "r"):
        with pytest.raises(jaxsave.FileInUseError, match="is open in this process"):
            jaxsave.HDF5Collector(path, mode="a")
    assert path.read_bytes() == data
    c = jaxsave.HDF5Collector(path, mode="a")  # closed: continued
    c.close()
