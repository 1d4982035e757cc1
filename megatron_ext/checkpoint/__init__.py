"""Checkpoints: saving and verifying them, reading weights from them, resuming from them.

    paths     the on-disk names of both kinds; `identify` tells them apart reading no file
    store     training checkpoints: TrainState, the commit protocol (atomic writes, CRC manifest,
              `latest`), `save` / `Saver` (async), retention, `verify`
    sources   any checkpoint's weights: `Source`, `open_checkpoint`, the converted format
              (tools.convert), `load_weights` with its model, shape and value-head checks
    plan      what `checkpoint.load` means, decided once: `parse_load` / `resolve_load` -> LoadPlan
    resuming  the resume policy: `resume`, `find_resumable`, data-order and schedule checks, `load`

Each module imports only those above it. Every public name is also available here
(`checkpoint.load_weights`, `from megatron_ext.checkpoint import TrainState`), imported on first
use: `plan` and `paths` load without Megatron-Core, so config validation and the Slurm launcher
can use them cheaply. Names with a leading underscore are shared between these modules only; no
module here is named like a name it exports (`resuming`, not `resume`).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "paths": ("CONVERTED_META", "TOKENIZER_DIR", "complete_checkpoints", "identify", "iter_dir"),
    "store": ("FORMAT_VERSION", "Saver", "TrainState", "data_fingerprint", "read_meta", "save", "verify",
              "write_atomic"),
    "sources": ("HEADS", "HEAD_KEY", "HEAD_KEYS", "Source", "check_model", "check_shapes", "has_value_head",
                "load_weights", "newest", "open_checkpoint", "read_model_meta", "save_converted_weights",
                "saved_shapes", "verify_manifest", "write_converted_meta"),
    "plan": ("LoadKind", "LoadPlan", "parse_load", "resolve_load"),
    "resuming": ("SCHEDULE_KEYS", "find_resumable", "load", "resume", "schedule_changes"),
    "megatron_ext.safe_pickle": ("CheckpointError", "UnsafeCheckpointError", "torch_load"),
}
_HOME = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_HOME)


def __getattr__(name: str):
    module = _HOME.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module if "." in module else f"{__name__}.{module}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
