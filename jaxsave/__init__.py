"""jaxsave: get data out of compiled JAX code and onto disk, and back.

>>> import jaxsave
>>> sorted(jaxsave.pytree_to_dict({"b": 1, "a": [2]}).items())
[('a', {'list_element_0': 2}), ('b', 1)]
"""

from jaxsave import (
    errors,
    scheduler,  # jax_sgmc.io's io.scheduler.static_information
)
from jaxsave._core.tree import (
    dict_to_pytree,
    pytree_dict_keys,
    pytree_to_dict,
    register_dictionize_rule,
)
from jaxsave._stream.no_save import no_save
from jaxsave._stream.resume import ChainCheckpoint, Checkpoint, resume
from jaxsave._stream.scan import scan
from jaxsave._stream.sharding import shard_state
from jaxsave._stream.state import Saver, SaveState, static_information
from jaxsave._stream.streamer import save
from jaxsave._version import __version__
from jaxsave.checkpointer import Checkpointer
from jaxsave.collectors import DataCollector, MemoryCollector
from jaxsave.errors import (
    CapacityError,
    FileChangedError,
    FileFormatError,
    FileInUseError,
    JaxsaveError,
    ReadTooLargeError,
    RebuildError,
    SaverStateError,
    StructureMismatchError,
    UnregisteredNameError,
)
from jaxsave.hdf5 import HDF5Collector
from jaxsave.merge import merge
from jaxsave.registry import register_saveable, saveable
from jaxsave.samples import (
    LiveSamples,
    SampleFileInfo,
    file_info,
    load_samples,
    open_live,
    recover,
    to_inference_data,
)
from jaxsave.serialization import (
    PytreeFile,
    load_pytree,
    open_pytree,
    read_metadata,
    save_pytree,
)
from jaxsave.zarrstore import ZarrCollector

__all__ = [
    "__version__",
    # streaming from inside jit
    "save",
    "scan",
    "no_save",
    "static_information",
    "scheduler",
    "SaveState",
    "Saver",
    "DataCollector",
    "MemoryCollector",
    "shard_state",
    # checkpoint and resume
    "Checkpoint",
    "ChainCheckpoint",
    "resume",
    "HDF5Collector",
    "ZarrCollector",
    # reading sample files
    "load_samples",
    "open_live",
    "LiveSamples",
    "to_inference_data",
    "file_info",
    "SampleFileInfo",
    "recover",
    "merge",
    # saving and loading pytrees and models
    "save_pytree",
    "load_pytree",
    "read_metadata",
    "open_pytree",
    "PytreeFile",
    "saveable",
    "register_saveable",
    "Checkpointer",
    # naming pytree leaves
    "register_dictionize_rule",
    "pytree_to_dict",
    "pytree_dict_keys",
    "dict_to_pytree",
    # errors
    *errors.__all__,
]
