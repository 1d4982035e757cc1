"""The pickles inside checkpoints, read without running code.

A checkpoint may come from anyone, and unpickling runs whatever callables the pickle names. The
files of a checkpoint that are pickles, and how they are read here:

- `.metadata` of every torch_dist directory (torch's distributed-checkpoint metadata: which
  tensor chunk lies where). torch reads it with plain `pickle.load`; `load_metadata` reads it
  with `MetadataUnpickler`, which resolves only the classes that format is made of
  (`METADATA_GLOBALS`, found by reading the metadata of every checkpoint kind and layout this
  stack writes) and torch dtypes. Any other global stops the read with `UnsafeCheckpointError`
  naming the file and the global, before anything is called. Each storage entry must name a
  shard file inside the directory, stored without transforms, as this stack writes them.
- `torch.save` files: Megatron-Core's `common.pt`, the objects stored as bytes inside the
  `*.distcp` shards (layers' `_extra_state`), and `rng/rank_*.pt`. `torch_load` reads them with
  `torch.load(weights_only=True)` whatever the caller asked: tensors, containers and plain
  values (plus the few classes Megatron-Core registers with torch as safe).

`megatron_ext.patches.checkpoint_reads_without_code` hands torch and Megatron-Core the two
stand-in modules below (`PICKLE_FOR_METADATA`, `TORCH_WEIGHTS_ONLY`), so their own reads of
those files go through these functions.
"""

from __future__ import annotations

import io
import pickle
import re
from pathlib import PurePosixPath, PureWindowsPath
from typing import BinaryIO, Optional

import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata


_DCP = "torch.distributed.checkpoint"
METADATA_GLOBALS = frozenset({
    # The metadata object and what describes each saved entry (tensor or bytes) and its chunks.
    (f"{_DCP}.metadata", "Metadata"),
    (f"{_DCP}.metadata", "TensorStorageMetadata"),
    (f"{_DCP}.metadata", "BytesStorageMetadata"),
    (f"{_DCP}.metadata", "ChunkStorageMetadata"),
    (f"{_DCP}.metadata", "TensorProperties"),
    (f"{_DCP}.metadata", "_MEM_FORMAT_ENCODING"),  # an Enum: TensorProperties' memory format
    (f"{_DCP}.metadata", "MetadataIndex"),  # keys of storage_data
    (f"{_DCP}.metadata", "StorageMeta"),  # ids of the save
    (f"{_DCP}.filesystem", "_StorageInfo"),  # shard file, offset, length of each entry
    # Megatron-Core keeps every rank's save plan in the metadata (`all_local_plans`, reused by
    # its cached save plans).
    (f"{_DCP}.planner", "SavePlan"),
    (f"{_DCP}.planner", "WriteItem"),
    (f"{_DCP}.planner", "WriteItemType"),  # an Enum
    (f"{_DCP}.planner", "TensorWriteData"),
    ("torch", "Size"),  # shapes and offsets
    ("torch.serialization", "_get_layout"),  # how torch.layout pickles: a lookup by name
})
"""(module, name) of every class or function `.metadata` may name; torch dtypes (which pickle as
`torch.<dtype>`) are allowed besides. All are plain records, Enums or lookups: calling them with
any arguments only builds data."""


class CheckpointError(ValueError):
    """A checkpoint cannot be used (missing, corrupted, foreign, not matching the model); the
    message names the file or key. The one error of every checkpoint reader (defined in this leaf
    module, which the checkpoint readers and the Megatron-Core patches both stand on;
    `megatron_ext.checkpoint` hands it on)."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file asks to run something (a global outside what its format needs) or
    points outside its directory; nothing of it was executed. Names the file and what it asked."""


_HINT = "the file was not written by this stack or has been tampered with; nothing in it was run"


class MetadataUnpickler(pickle.Unpickler):
    """Unpickles torch distributed-checkpoint metadata: only `METADATA_GLOBALS` and torch dtypes
    resolve; any other global (and any persistent id) raises UnsafeCheckpointError."""

    def __init__(self, file: BinaryIO, source: str):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str):
        if (module, name) in METADATA_GLOBALS or (module == "torch" and isinstance(getattr(torch, name, None),
                                                                                   torch.dtype)):
            return super().find_class(module, name)
        raise UnsafeCheckpointError(f"{self.source}: refusing to unpickle global {module}.{name}, which "
                                    f"torch distributed-checkpoint metadata never holds ({_HINT})")

    def persistent_load(self, pid):
        raise UnsafeCheckpointError(f"{self.source}: refusing a persistent id in checkpoint metadata ({_HINT})")


def _source(file) -> str:
    return str(getattr(file, "name", None) or "checkpoint metadata")


def load_metadata(file: BinaryIO, source: Optional[str] = None) -> Metadata:
    """Read a torch_dist `.metadata` stream without running code; CheckpointError (or
    UnsafeCheckpointError) names the file when it is unreadable, unsafe or not metadata."""
    source = source or _source(file)
    try:
        metadata = MetadataUnpickler(file, source).load()
    except CheckpointError:
        raise
    except Exception as e:  # truncated or corrupted: pickle raises many types
        raise CheckpointError(f"{source}: unreadable checkpoint metadata ({type(e).__name__}: {e})") from None
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{source}: holds a {type(metadata).__name__}, not checkpoint metadata")
    for index, info in (metadata.storage_data or {}).items():
        _check_storage(source, getattr(index, "fqn", index), info)
    return metadata


def _check_storage(source: str, key, info) -> None:
    """A storage entry must name a shard file of the directory itself (torch joins the name to
    the directory: `../x` or an absolute path would read any file as tensor data) and carry no
    stream transforms (this stack writes none; they would decompress attacker-sized data)."""
    if not isinstance(info, _StorageInfo):
        raise CheckpointError(f"{source}: storage entry {key} is a {type(info).__name__}, not a _StorageInfo")
    name = info.relative_path
    if (not isinstance(name, str) or name in ("", ".", "..") or len(PurePosixPath(name).parts) != 1
            or len(PureWindowsPath(name).parts) != 1):
        raise UnsafeCheckpointError(f"{source}: storage entry {key} points at {name!r}, not at a shard file "
                                    f"of the checkpoint directory ({_HINT})")
    if info.transform_descriptors:
        raise UnsafeCheckpointError(f"{source}: storage entry {key} asks for stream transforms "
                                    f"{list(info.transform_descriptors)!r}, which this stack never writes")


def _weights_only_reason(e: Exception) -> str:
    """The line of torch's weights_only failure that says what was refused (it names the global)."""
    found = re.search(r"WeightsUnpickler error: (.*?)(?: Please use|\n|$)", str(e))
    return found.group(1).strip() if found else str(e).strip().splitlines()[-1]


def torch_load(f, *args, source: Optional[str] = None, **kwargs):
    """`torch.load(f, weights_only=True)`; UnsafeCheckpointError names the file and what was
    refused when the file holds anything but tensors and plain data."""
    kwargs["weights_only"] = True
    try:
        return torch.load(f, *args, **kwargs)
    except pickle.UnpicklingError as e:
        where = source or ("an object stored in a checkpoint shard" if isinstance(f, io.BytesIO) else str(f))
        raise UnsafeCheckpointError(f"{where}: refusing to unpickle it: {_weights_only_reason(e)} "
                                    f"(only tensors and plain data are read; {_HINT})") from None


class StandIn:
    """A module as a patched caller sees it: the names given replaced, every other name the
    module's own (installed as that caller's module global, e.g. `filesystem.pickle`)."""

    def __init__(self, module, **names):
        self.__dict__.update(names, _module=module)

    def __getattr__(self, name):
        return getattr(self.__dict__["_module"], name)


def _load_metadata_file(file, **kwargs):
    """`pickle.load` for torch's `distributed.checkpoint.filesystem`: its one use reads `.metadata`."""
    del kwargs  # encoding options, which matter only for Python 2 pickles
    return load_metadata(file)


def _torch_load_weights_only(f, *args, weights_only=None, **kwargs):
    """`torch.load` for torch's default load planner and Megatron-Core's common strategy."""
    del weights_only  # never honoured (even where the caller passed False): the checkpoint may come from anyone
    return torch_load(f, *args, **kwargs)


PICKLE_FOR_METADATA = StandIn(pickle, load=_load_metadata_file)
TORCH_WEIGHTS_ONLY = StandIn(torch, load=_torch_load_weights_only)
