"""A Griffe extension for the API reference: doctest examples become ``pycon`` code blocks.

The docstrings of jaxsave carry runnable examples (``>>>`` lines, run by
``pytest --doctest-modules``) outside any "Examples:" section; rendered as
Markdown they would be paragraphs (and ``x["a"][0]`` would look like a link).
This wraps every run of lines from a ``>>>`` line to the next blank line in a
fenced block, and turns reST ``double backticks`` into Markdown code spans.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:func|class|meth|attr|mod|data|exc|obj):`~?([^`]+)`")
_DOUBLE = re.compile(r"``([^`]+)``")


def wrap_doctests(text: str) -> str:
    """``text`` with each doctest block fenced as ``pycon``.

    >>> print(wrap_doctests("Intro.\\n\\n>>> 1 + 1\\n2\\n\\nMore."))
    Intro.
    <BLANKLINE>
    ```pycon
    >>> 1 + 1
    2
    ```
    <BLANKLINE>
    More.
    """
    out: list[str] = []
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.lstrip().startswith(">>>"):
            indent = line[: len(line) - len(line.lstrip())]
            block = []
            while i < len(lines) and lines[i].strip():
                block.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i].lstrip())
                i += 1
            out += [indent + "```pycon", *(indent + b for b in block), indent + "```"]
            continue
        out.append(_DOUBLE.sub(r"`\1`", _ROLE.sub(r"`\1`", line)))
        i += 1
    return "\n".join(out)


class DoctestBlocks(griffe.Extension):
    """Fence doctest examples in every docstring that Griffe loads."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None and ">>>" in obj.docstring.value or (
                obj.docstring is not None and "``" in obj.docstring.value):
            obj.docstring.value = wrap_doctests(obj.docstring.value)
