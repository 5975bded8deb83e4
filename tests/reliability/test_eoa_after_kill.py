"""A writer SIGKILLed in SWMR mode can leave a superblock whose end address lags the file.

HDF5 writes the superblock (with the end-of-file address, EOA) after the data
and the other metadata, so a writer killed in between leaves objects, samples
counted in ``sample_counts`` among them, past the stored EOA. A writer that
takes the file over with only the "open" flags cleared (``h5clear -s``) then
allocates new objects over them, or fails with "addr overflow" when it rewrites
one, and plain readers fail to read them. The state is made deterministically
here: a real killed file whose stored EOA is moved back to its last sample chunk
(a lag seen in a real kill: stored 4295312, file 4295368).
"""

from __future__ import annotations

import os
import signal
import struct
import textwrap

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _reliability import python

import jaxsave
from jaxsave._store.hdf5 import superblock as _superblock

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(300)]

#: Values per draw: 64 KiB rows, so 16 draws a chunk and a new chunk at the file's end often.
WIDTH, KILLED_AT, TOTAL, EVERY = 16384, 72, 120, 8

CHILD = textwrap.dedent(f"""
    import sys, time, jax, jax.numpy as jnp, jaxsave
    saver = jaxsave.save(jaxsave.HDF5Collector(sys.argv[1], checkpoint_interval=0, flush_interval=0),
                         checkpoint_every={EVERY}, block_size=8)
    state = saver.init({{"x": jnp.zeros((2, {WIDTH}))}}, {{"n": jnp.zeros(2)}}, chains=2)
    def step(st, i):
        x = jnp.full({WIDTH}, i, jnp.float32)
        return saver.save(st, True, {{"x": x}}, solver_state={{"n": i.astype(jnp.float32)}})[0], None
    run = jax.jit(jax.vmap(lambda st: jax.lax.scan(step, st, jnp.arange({KILLED_AT}))[0]))
    jax.block_until_ready(run(state))
    jax.effects_barrier()
    saver.init.__self__.writer.drain()  # every block and checkpoint is written and flushed
    print("ready", flush=True)
    time.sleep(120)
""")


def _killed_file(tmp_path) -> str:
    """A file whose SWMR writer was SIGKILLed after writing ``KILLED_AT`` draws per chain."""
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    path = str(tmp_path / "killed.h5")
    proc = python(script, path)
    try:
        line = proc.stdout.readline()
        assert line.startswith("ready"), proc.stderr.read()[-3000:] if proc.poll() is not None else line
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.communicate(timeout=60)
    assert _superblock.open_flags(path) != 0, "the killed writer left no 'open' mark"
    return path


def _set_stored_eoa(path: str, eoa: int) -> None:
    """Write ``eoa`` into a v2/v3 superblock (8-byte addresses, at offset 0), with its checksum."""
    with open(path, "r+b") as fh:
        block = bytearray(fh.read(48))
        assert block[:8] == b"\x89HDF\r\n\x1a\n" and block[8] in (2, 3) and block[9] == 8
        struct.pack_into("<Q", block, 28, eoa)
        struct.pack_into("<I", block, 44, _superblock.lookup3(bytes(block[:44])))
        fh.seek(0)
        fh.write(block)


def _lagging(tmp_path) -> str:
    """The killed file with its stored EOA at the start of its last-written counted sample chunk."""
    path = _killed_file(tmp_path)
    with h5py.File(path, "r", libver="latest", swmr=True) as f:
        assert f.attrs["sample_counts"].tolist() == [KILLED_AT] * 2
        ds = f["posterior/x"]
        last = max(
            (ds.id.get_chunk_info(i) for i in range(ds.id.get_num_chunks())),
            key=lambda info: info.byte_offset,
        )
    assert last.chunk_offset[1] < KILLED_AT  # it holds counted draws
    _set_stored_eoa(path, last.byte_offset)
    assert _superblock.stored_eof(path) < os.path.getsize(path)
    return path


def _assert_exact(path: str, draws: int) -> None:
    with h5py.File(path, "r") as f:  # a plain reader: no SWMR, the stored EOA is trusted
        assert f.attrs["sample_counts"].tolist() == [draws] * 2
        x = f["posterior/x"][:, :draws]
    want = np.broadcast_to(np.arange(draws, dtype=np.float32)[None, :, None], (2, draws, WIDTH))
    assert np.array_equal(x, want), "counted samples changed"


def test_resume_after_a_kill_that_left_the_eoa_behind(tmp_path):
    path = _lagging(tmp_path)
    ckpt = jaxsave.resume(path)
    start = int(np.asarray(ckpt.step).reshape(-1)[0])
    assert 0 < start <= KILLED_AT
    saver = jaxsave.save(
        jaxsave.HDF5Collector(path, mode="a", checkpoint_interval=0, flush_interval=0),
        checkpoint_every=EVERY,
        block_size=8,
    )
    state = saver.init({"x": jnp.zeros((2, WIDTH))}, {"n": jnp.zeros(2)}, resume=ckpt)

    def step(st, i):
        x = jnp.full(WIDTH, i, jnp.float32)
        return saver.save(st, True, {"x": x}, solver_state={"n": i.astype(jnp.float32)})[0], None

    run = jax.jit(jax.vmap(lambda st: jax.lax.scan(step, st, start + jnp.arange(TOTAL - start))[0]))
    state = run(state)
    assert saver.postprocess(state, None)["sample_count"].tolist() == [TOTAL] * 2
    _assert_exact(path, TOTAL)
    assert jaxsave.resume(path).step.tolist() == [TOTAL] * 2


def test_recover_after_a_kill_that_left_the_eoa_behind(tmp_path):
    path = _lagging(tmp_path)
    assert jaxsave.recover(path)
    _assert_exact(path, KILLED_AT)
    assert _superblock.stored_eof(path) == os.path.getsize(path)
    assert not jaxsave.recover(path)  # nothing left to do: the margin is added once
