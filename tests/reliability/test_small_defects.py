"""Small defects of issue 15: each input is refused with a clear error at the call, or works.

Checkpointer templates that do not read back, MemoryCollector(save_dir=...) on a
full disk, its up-front reservations, sample keys HDF5 cannot hold, empty samples,
bad or over-estimated ``samples_collected``, files of many tiny leaves, old
temporaries, ``jaxsave.scheduler``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsave

from _reliability import child_env

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(180)]


# -- Checkpointer templates: what it writes, it must read back ------------------------------------

BAD_TEMPLATES = ["ckpt_{step:x}.jaxsave", "ckpt_{step:o}.jaxsave", "ckpt_{step:b}.jaxsave",
                 "ckpt_{step:,d}.jaxsave", "ckpt_{step:_d}.npz", "ckpt_{step:+d}.npz", "ckpt_{step:5d}.npz",
                 "ckpt_{step:<08d}.npz", "ckpt_{step:X}.npz", "ckpt_{step:c}.npz", "ckpt_{step:e}.npz",
                 "ckpt_{step:{w}}.npz"]


@pytest.mark.parametrize("template", BAD_TEMPLATES)
def test_checkpointer_refuses_step_formats_it_cannot_parse_back(tmp_path, template):
    with pytest.raises(ValueError, match="filename") as e:
        jaxsave.Checkpointer(tmp_path, filename=template)
    assert repr(template) in str(e.value)


@pytest.mark.parametrize("template", ["ckpt_{step}.jaxsave", "ckpt_{step:08d}.npz", "{step}1.npz",
                                      "ckpt_{step:0=5d}.npz", "{{braces}}_{step:03}.jaxsave"])
def test_checkpointer_decimal_templates_round_trip(tmp_path, template):
    ckpt = jaxsave.Checkpointer(tmp_path, keep=2, filename=template, fsync=False)
    for step in (9, 10, 11, 99, 100, 1001):
        ckpt.save(step, {"w": np.full(2, step)})
    assert ckpt.steps() == [100, 1001]
    step, tree = ckpt.restore()
    assert step == 1001 and tree["w"].tolist() == [1001, 1001]
    assert len(os.listdir(tmp_path)) == 2


def test_checkpointer_ignores_names_its_template_does_not_write(tmp_path):
    ckpt = jaxsave.Checkpointer(tmp_path, keep=1, fsync=False)  # checkpoint_{step:08d}.jaxsave
    ckpt.save(3, {"w": np.zeros(1)})
    foreign = tmp_path / "checkpoint_7.jaxsave"  # matches the digits, but step 7 is not named so
    foreign.write_bytes(b"someone else's file")
    assert ckpt.steps() == [3]
    assert ckpt.restore()[0] == 3
    ckpt.save(4, {"w": np.zeros(1)})
    assert ckpt.steps() == [4] and foreign.exists()
