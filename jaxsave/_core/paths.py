"""Paths as the kernel resolves them, and the check that a file's directory exists.

``os.path.abspath`` and ``normpath`` collapse ``link/..`` to the directory holding ``link``;
the kernel (and HDF5, which joins names as strings) goes to the parent of the link's target.
Every writer and reader here takes a path's directory as written (:func:`directory_of`),
made absolute without normalising (:func:`absolute`), so that a check looks at the directory
the file really goes to.

>>> directory_of("run.h5"), directory_of("out/run.h5"), directory_of("link/../run.h5")
('.', 'out', 'link/..')
"""

from __future__ import annotations

import os

__all__ = ["absolute", "check_directory", "directory_of", "same_file"]


def absolute(path: str | os.PathLike[str]) -> str:
    """``path`` from the current directory, as written (``nope/..`` exists only if ``nope`` does).

    >>> absolute("/a/link/../b")
    '/a/link/../b'
    """
    path = os.fspath(path)
    return path if os.path.isabs(path) else os.path.join(os.getcwd(), path)


def directory_of(path: str | os.PathLike[str]) -> str:
    """The directory that ``path``'s file is in, as written (``"."`` for a bare name)."""
    return os.path.dirname(os.fspath(path)) or os.curdir


def same_file(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """Whether paths ``a`` and ``b`` name one file (through links, or as one path spelled twice)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)  # hard links
    except OSError:  # one of them does not exist
        return False


def check_directory(path: str | os.PathLike[str], name: str | None = None) -> None:
    """Refuse a ``path`` whose directory does not exist, naming both (``name``: how to call it).

    The directory is the one the path names as written (``nope/../x`` lies in ``nope/..``),
    which is where the file and its temporary siblings are created.

    >>> check_directory("/no/such/dir/run.h5")
    Traceback (most recent call last):
    FileNotFoundError: cannot write '/no/such/dir/run.h5': the directory '/no/such/dir' does not exist
    """
    path = os.fspath(path)
    if not isinstance(path, str):
        raise TypeError(f"a path must be a str or os.PathLike[str], got {type(path).__name__} {path!r}")
    what = name or repr(path)
    if not path:
        raise ValueError(f"cannot write {what}: the path is empty")
    directory = directory_of(path)
    if not os.path.isdir(directory):
        if os.path.exists(directory):
            raise NotADirectoryError(f"cannot write {what}: {directory!r} is not a directory")
        raise FileNotFoundError(f"cannot write {what}: the directory {directory!r} does not exist")
