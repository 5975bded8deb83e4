"""Exceptions raised by jaxsave.

Every error that jaxsave raises on purpose derives from :class:`JaxsaveError`,
so ``except jaxsave.JaxsaveError`` catches all of them. Each one also derives
from the built-in exception that best describes it (``ValueError``,
``RuntimeError``, ...), so code that already catches those keeps working.
"""

from __future__ import annotations

__all__ = [
    "JaxsaveError",
    "FileFormatError",
    "StructureMismatchError",
    "UnregisteredNameError",
    "SaverStateError",
    "CapacityError",
    "ReadTooLargeError",
    "RebuildError",
    "FileInUseError",
    "FileChangedError",
]


class JaxsaveError(Exception):
    """Base class of every error raised by jaxsave."""


class FileFormatError(JaxsaveError, ValueError):
    """A file is not a jaxsave file, is corrupt or truncated, or uses a newer format."""


class StructureMismatchError(JaxsaveError, ValueError):
    """A pytree's structure, shapes or dtypes differ from what was expected."""


class UnregisteredNameError(JaxsaveError, LookupError):
    """A file or call names an object that is not in a jaxsave registry."""

    def __str__(self) -> str:  # LookupError would repr() a single argument
        return str(self.args[0]) if self.args else ""


class SaverStateError(JaxsaveError, RuntimeError):
    """A saver was used out of order (e.g. saving after ``postprocess``)."""


class CapacityError(JaxsaveError, ValueError):
    """More samples were kept than ``samples_collected`` allows."""


class ReadTooLargeError(JaxsaveError, MemoryError):
    """A read of an intact file would need far more memory than the data it reads.

    Raised, before allocating anything, by :func:`jaxsave.load_samples` with all
    chains when chains of very different lengths would be padded to the longest;
    read them one at a time (``chain=``, ``draws=``) instead.
    """


class RebuildError(JaxsaveError, RuntimeError):
    """A registered class raised while a loaded tree was rebuilt (not a damaged file).

    Its own checks rejected the stored values, or its unflatten/constructor has a
    bug; the message names the class and the error, which is chained as
    ``__cause__``. Load with ``like=`` to take the classes from a target tree.
    """


class FileInUseError(JaxsaveError, RuntimeError):
    """Another writer (in this or another process) holds the sample file a collector would write.

    One sample file takes one writer at a time: ``HDF5Collector`` holds an OS
    lock on ``<file>.lock`` from its creation until it is closed (a killed
    process releases it). The message names the holder (pid, host, start time).
    """


class FileChangedError(JaxsaveError, OSError):
    """The file a collector writes was deleted, replaced or truncated under it.

    The samples the collector wrote are not (all) in the file on disk any more;
    the message names the file and what happened to it.
    """
