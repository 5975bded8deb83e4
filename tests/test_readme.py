"""The README's example runs as written."""

import re
from pathlib import Path

import pytest

README = Path(__file__).parent.parent / "README.md"


def test_readme_starts_with_the_two_commands():
    first_block = README.read_text().split("```")[1].strip().splitlines()
    assert first_block[1].startswith('pip install ".[demo]" && jaxsave demo')
    assert first_block[2].startswith('pip install -e ".[test]" && python -m pytest')


def test_readme_example_runs(tmp_path, monkeypatch, capsys):
    pytest.importorskip("arviz")
    monkeypatch.chdir(tmp_path)
    code = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)[0]
    exec(compile(code, str(README), "exec"), {})
    out = capsys.readouterr().out
    assert "[360 360 360 360]" in out
    assert "r_hat" in out and (tmp_path / "sgld.h5").exists()
