"""Checkpoints that never lose a run: Megatron-Core dist_checkpointing (torch_dist) plus a commit protocol.

Layout under `checkpoint.dir`:

    iter_0000020/          a complete checkpoint (model, optimizer, scheduler, RNG, data position)
      state/               dist_checkpointing directory (reshardable across TP/PP/EP/DP)
      rng/rank_00000.pt    per-rank RNG states (restored only when the layout is unchanged)
      meta.json            step, consumed samples, config, versions, data fingerprint, and a
                           CRC32 + size of every other file (the manifest)
    latest                 text file naming the newest complete checkpoint

Commit protocol: every rank writes into `iter_N.tmp/`; after all ranks finished, the files are
checksummed (spread over ranks), rank 0 writes meta.json (temp + fsync + rename), renames the
directory to `iter_N` (fsync of the parent), and only then replaces `latest`. A directory named
`iter_N` is therefore complete by construction, and its manifest catches later corruption.
With `checkpoint.async_save` the files under `state/` are written by a background process and the
same commit runs when every rank's writer finished (`Saver`).

Converted checkpoints (written by `python -m tools.convert hf-to-mcore`): a dist_checkpointing
directory holding the model's `sharded_state_dict()` at the top level (resharded on load, so it
loads at any TP/PP/EP layout), `qwen_checkpoint.json` (`CONVERTED_META`) with the ModelConfig, the
parameter dtype and the HF config it came from, and `hf_tokenizer/` with the HF tokenizer files
(so converting back restores them).

Reading either kind: `open_checkpoint` identifies a directory (converted, one training checkpoint
`iter_N`, or a training root of `iter_N` directories) and reads its metadata into a `Source`;
`load_weights` fills model chunks (any layout, virtual pipeline stages included) from it. That is
the one weights reader of resume's weights-only starts, the frozen reference model, evaluation
and every tool. Training checkpoints are checked against their CRC manifest first, the same check
(`verify`, spread over the ranks) that a full resume runs, so corrupted weights are never trained
on, converted or evaluated silently; `open_checkpoint(..., verify=False)` (the tools'
`--no-verify`) skips it with a warning.

Reading never runs code from the checkpoint (it may come from anyone): meta.json,
`qwen_checkpoint.json`, `latest` and metadata.json are JSON or text, and manifest entries must
name files inside the checkpoint (`read_meta`); the torch_dist reader is fixed (`_dist_load`) and
reads `.metadata` with a restricted unpickler, `common.pt`, the shards and `rng/rank_*.pt` with
`torch.load(weights_only=True)` (`megatron_ext.safe_pickle`). Anything else in those pickles
stops the load with `UnsafeCheckpointError` (a CheckpointError) naming the file and the global.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import shutil
import sys
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue
from megatron.core.dist_checkpointing.strategies.common import TorchCommonLoadStrategy
from megatron.core.dist_checkpointing.strategies.torch import TorchDistLoadShardedStrategy
from megatron.core.dist_checkpointing.validation import StrictHandling
from torch.distributed.checkpoint.api import CheckpointException

from megatron_ext import cpu_backend, patches
from megatron_ext.build import fuse_torch_adam, gather_params
from megatron_ext.safe_pickle import CheckpointError, UnsafeCheckpointError, torch_load  # noqa: F401 (re-exported)
from models.config import ModelConfig

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
_ITER = re.compile(r"^iter_(\d{7})$")
_OPTIM_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


@dataclass
class TrainState:
    """What the loop needs to continue exactly where it stopped."""

    step: int = 0
    consumed_samples: int = 0
    skipped_steps: int = 0


# ---------------------------------------------------------------- files


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` via temp file + fsync + rename (+ fsync of the directory)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


def _files(root: Path) -> List[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name != "meta.json")


def _spread_over_ranks(items: List[str], fn) -> dict:
    """Apply fn to items round-robin over all ranks; every rank gets the merged {item: result}."""
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    mine = {item: fn(item) for item in items[rank::world]}
    gathered = [None] * world
    torch.distributed.all_gather_object(gathered, mine)
    return {k: v for part in gathered for k, v in part.items()}


def iter_dir(root: Path, step: int) -> Path:
    return root / f"iter_{step:07d}"


# ---------------------------------------------------------------- state dicts


def _unwrap(chunk):
    return getattr(chunk, "module", chunk)  # DDP-wrapped or bare GPTModel


def _model_state(chunks, drop=()) -> dict:
    # Keys inside each chunk are global (layer offsets applied), so any VPP/PP split loads.
    # `drop`: state-dict keys not to read (a freshly initialised head).
    return {f"chunk{i}": _without(_unwrap(chunk).sharded_state_dict(), drop) for i, chunk in enumerate(chunks)}


def _without(sharded: dict, drop) -> dict:
    return {k: v for k, v in sharded.items() if k not in drop}


def _kept(module, state: dict, keep) -> dict:
    """A loaded state dict with the module's own current values for the `keep` keys it has."""
    if not keep:
        return state
    own = module.state_dict()
    return {**state, **{k: own[k] for k in keep if k in own}}


def _sharded_state(rt, is_loading: bool, with_optimizer: bool = True) -> dict:
    if not is_loading:
        gather_params(rt.model)  # the last step's parameters, not the gathered ones before it
    model = _model_state(rt.model)
    if not with_optimizer:  # asking the optimizer would initialise its state as a side effect
        return {"model": model}
    return {
        "model": model,
        "optimizer": rt.optimizer.sharded_state_dict(model, is_loading=is_loading, metadata=_OPTIM_METADATA),
    }


def _rng_state() -> dict:
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() else cpu_backend.cpu_generator().get_state()
    # Graph-safe trackers (train.cuda_graph) hold generators, not state tensors: save their states.
    tracker = {name: s.get_state() if isinstance(s, torch.Generator) else s
               for name, s in tensor_parallel.get_cuda_rng_tracker().get_states().items()}
    return {"cpu": torch.get_rng_state(), "cuda": cuda, "tracker": tracker}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    torch.cuda.set_rng_state(state["cuda"])  # the CPU backend routes this to its generator
    tracker = tensor_parallel.get_cuda_rng_tracker()
    current = tracker.get_states()
    for name, saved in state["tracker"].items():
        if isinstance(current.get(name), torch.Generator):
            current[name].set_state(saved)  # in place: a CUDA graph may have registered the generator
        else:
            current[name] = saved
    tracker.set_states(current)


def _layout() -> dict:
    ps = parallel_state
    return {"tp": ps.get_tensor_model_parallel_world_size(), "pp": ps.get_pipeline_model_parallel_world_size(),
            "ep": ps.get_expert_model_parallel_world_size(), "cp": ps.get_context_parallel_world_size(),
            "dp": ps.get_data_parallel_world_size(), "world": torch.distributed.get_world_size()}


def data_fingerprint(cfg) -> dict:
    """Everything that fixes which samples each step sees (DP size does not: see data.py)."""
    d, t = cfg.data, cfg.train
    return {"data.paths": list(d.paths), "data.weights": list(d.weights) if d.weights else None,
            "data.split": d.split, "data.seq_length": d.seq_length, "data.tokenizer": d.tokenizer,
            "train.seed": t.seed, "train.global_batch_size": t.global_batch_size}


def _versions() -> dict:
    import megatron.core

    return {"megatron_core": megatron.core.__version__, "torch": torch.__version__, "format": FORMAT_VERSION}


# ---------------------------------------------------------------- save


@dataclass
class _Save:
    """A save in progress: its directories and the metadata of its step (rank 0 only)."""

    root: Path
    tmp: Path
    final: Path
    meta: Optional[dict]
    keep_last: int


def _begin(rt, state: TrainState) -> _Save:
    """Create an empty `iter_N.tmp/` (collective) and capture what meta.json records of this
    step now: with an async save the scheduler moves on before the commit."""
    cfg = rt.config
    root = Path(cfg.checkpoint.dir)
    tmp, meta = root / f"iter_{state.step:07d}.tmp", None
    if torch.distributed.get_rank() == 0:
        from omegaconf import OmegaConf

        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # left by a run killed mid-save
            shutil.rmtree(tmp)
        (tmp / "state").mkdir(parents=True)
        (tmp / "rng").mkdir()
        meta = {"train_state": asdict(state), "scheduler": copy.deepcopy(rt.scheduler.state_dict()),
                "layout": _layout(), "data_fingerprint": data_fingerprint(cfg), "versions": _versions(),
                "config": OmegaConf.to_container(OmegaConf.structured(cfg))}
    torch.distributed.barrier()
    return _Save(root, tmp, iter_dir(root, state.step), meta, cfg.checkpoint.keep_last)


def _write_rng(save: _Save) -> None:
    rank = torch.distributed.get_rank()
    torch.save(_rng_state(), save.tmp / "rng" / f"rank_{rank:05d}.pt")


def _commit(save: _Save) -> Path:
    """Run once every rank's files are written (collective): manifest, meta.json, rename to
    `iter_N`, `latest`, retention."""
    tmp, final, root = save.tmp, save.final, save.root
    manifest = _spread_over_ranks(_files(tmp), lambda rel: [(tmp / rel).stat().st_size, _crc32(tmp / rel)])
    if torch.distributed.get_rank() == 0:
        write_atomic(tmp / "meta.json", json.dumps({**save.meta, "files": manifest}, indent=1))
        if final.exists():  # an older save of the same step is replaced only by a complete one
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        write_atomic(root / "latest", final.name + "\n")
        _apply_retention(root, save.keep_last)
        log.info("saved checkpoint %s (%d files)", final, len(manifest))
    torch.distributed.barrier()
    return final


def save(rt, state: TrainState) -> Path:
    """Save a complete checkpoint of step `state.step` (collective; returns its directory)."""
    pending = _begin(rt, state)
    dist_checkpointing.save(_sharded_state(rt, is_loading=False), str(pending.tmp / "state"))
    _write_rng(pending)
    torch.distributed.barrier()  # every rank's files are written
    return _commit(pending)


class Saver:
    """What the training loop saves through: synchronous `save`, or with `checkpoint.async_save`
    Megatron-Core's own async machinery, as Megatron-LM's training loop drives it.

    `start` plans the save on the training thread and hands the write to a background process;
    `finalize` commits it (the same `_commit` as `save`) after every rank's writer finished. At
    most one save is in flight: `start` finalizes the previous one first.

    Snapshot: the save must hold the tensors of its step, not later ones. On GPU the request's
    preload copies them to host before the writer starts. On CPU that copy is a no-op
    (`.to("cpu")` returns the same tensor; the torch_dist writer clones only views), so the
    snapshot is the fork itself: the non-persistent `AsyncCallsQueue` forks one writer process
    per save, which sees the parameters and optimizer state as they were at the fork
    (copy-on-write), whatever the optimizer does afterwards. Megatron's persistent worker would
    instead receive the CPU tensors through shared memory and see later updates: not used.
    """

    def __init__(self, async_save: bool):
        self.async_save = async_save
        self._calls = AsyncCallsQueue(persistent=False)

    def start(self, rt, state: TrainState) -> None:
        """Save step `state.step`: synchronously, or start an async save (collective)."""
        self.finalize()
        if not self.async_save:
            save(rt, state)
            return
        pending = _begin(rt, state)
        request = dist_checkpointing.save(_sharded_state(rt, is_loading=False), str(pending.tmp / "state"),
                                          async_sharded_save=True)
        _write_rng(pending)
        request.add_finalize_fn(lambda: _commit(pending))  # after Megatron's own metadata finalizers
        self._calls.schedule_async_request(request)  # forks the writer: the snapshot point

    def finalize(self, blocking: bool = True) -> None:
        """Commit the save in flight if every rank's writer finished; with `blocking`, wait for
        them. Collective whenever a save is in flight (all ranks have one or none)."""
        self._calls.maybe_finalize_async_calls(blocking=blocking)


def _apply_retention(root: Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    for old in complete_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------- find + verify


def complete_checkpoints(root: Path) -> List[Path]:
    """Committed checkpoint directories, oldest first (not yet verified)."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and _ITER.match(p.name))


def read_meta(ckpt: Path) -> dict:
    path = ckpt / "meta.json"
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (not a checkpoint directory of this stack?)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable or truncated metadata ({e})") from None
    for key in ("train_state", "scheduler", "layout", "data_fingerprint", "files"):
        if key not in meta:
            raise CheckpointError(f"{path}: metadata lacks '{key}' (truncated or foreign file)")
    _check_manifest(path, meta["files"])
    return meta


def _check_manifest(path: Path, files) -> None:
    """Every manifest entry must be [size, crc] of a file inside the checkpoint: `verify` stats
    and reads each entry, so `../x` or an absolute path would probe files anywhere (their sizes
    showing through the size check)."""
    if not isinstance(files, dict):
        raise CheckpointError(f"{path}: 'files' is not a mapping of file -> [size, crc32]")
    root = path.parent.resolve()
    for rel, value in files.items():
        entry = PurePosixPath(rel)
        if entry.is_absolute() or ".." in entry.parts or not (root / rel).resolve().is_relative_to(root):
            raise CheckpointError(f"{path}: manifest entry {rel!r} points outside the checkpoint {path.parent}")
        if not (isinstance(value, list) and len(value) == 2 and all(type(v) is int for v in value)):
            raise CheckpointError(f"{path}: manifest entry {rel!r} is {value!r}, not [size, crc32]")


def verify(ckpt: Path) -> dict:
    """Check every file of the manifest (size + CRC32, spread over ranks); return the metadata."""
    meta = read_meta(ckpt)
    expected = meta["files"]

    def check(rel: str) -> Optional[str]:
        path = ckpt / rel
        if not path.is_file():
            return f"{path}: missing"
        size, crc = expected[rel]
        if path.stat().st_size != size:
            return f"{path}: size {path.stat().st_size}, expected {size}"
        if _crc32(path) != crc:
            return f"{path}: checksum mismatch (corrupted)"
        return None

    problems = [p for p in _spread_over_ranks(sorted(expected), check).values() if p]
    extra = sorted(set(_files(ckpt)) - set(expected))
    problems += [f"{ckpt / rel}: not in the manifest" for rel in extra]
    if problems:
        raise CheckpointError("corrupted checkpoint:\n  " + "\n  ".join(problems))
    return meta


def _read_pointer(root: Path) -> Optional[Path]:
    """The checkpoint `latest` names, or None (with a warning) if it is unreadable."""
    pointer = root / "latest"
    if not pointer.exists():
        return None
    try:
        name = pointer.read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        log.warning("%s: unreadable (%s); scanning %s instead", pointer, e, root)
        return None
    if not _ITER.match(name) or not (root / name).is_dir():
        log.warning("%s: names %r, which is not a checkpoint here; scanning %s instead", pointer, name[:80], root)
        return None
    return root / name


def find_resumable(root: Path) -> Optional[tuple]:
    """Newest checkpoint under `root` that verifies, as (path, meta); corrupted ones are skipped.

    A committed `iter_N` directory may be newer than `latest` (a crash between the rename and
    the pointer update), so the pointer is only checked, never trusted over the directories.
    """
    pointed = _read_pointer(root)
    candidates = complete_checkpoints(root)
    if pointed is not None and candidates and pointed != candidates[-1]:
        log.warning("%s names %s but %s is newer; trying the newest first", root / "latest", pointed.name,
                    candidates[-1].name)
    for ckpt in reversed(candidates):
        try:
            return ckpt, verify(ckpt)
        except CheckpointError as e:
            if torch.distributed.get_rank() == 0:
                log.warning("skipping %s: %s", ckpt, e)
    return None


# ---------------------------------------------------------------- load


def _check_fingerprint(cfg, meta: dict, ckpt: Path) -> None:
    saved, now = meta["data_fingerprint"], data_fingerprint(cfg)
    changed = [f"{k}: checkpoint {saved.get(k)!r}, config {v!r}" for k, v in now.items() if saved.get(k) != v]
    if changed and not cfg.checkpoint.allow_data_change:
        raise CheckpointError(
            f"{ckpt}: the data order would change on resume:\n  " + "\n  ".join(changed)
            + "\nset checkpoint.allow_data_change=true to accept that")


# The keys that decide the LR / weight-decay schedule (megatron_ext.build.lr_scheduler).
SCHEDULE_KEYS = ("steps", "lr", "min_lr", "warmup_steps", "lr_schedule", "wsd_decay_steps", "weight_decay")
# Per-parameter-group copies of schedule values that the optimizer's state dict carries along.
_GROUP_SCHEDULE_FIELDS = ("max_lr", "min_lr", "start_wd", "end_wd")


def schedule_changes(cfg, meta: dict) -> List[tuple]:
    """(key, checkpoint value, config value) for every schedule key that differs between the
    checkpoint's saved config and `cfg` (wsd_decay_steps only when either side uses WSD)."""
    t = cfg.train
    saved = (meta.get("config") or {}).get("train") or {}
    changes = [(f"train.{k}", saved.get(k), getattr(t, k)) for k in SCHEDULE_KEYS if saved.get(k) != getattr(t, k)]
    if "wsd" not in (saved.get("lr_schedule"), t.lr_schedule):
        changes = [c for c in changes if c[0] != "train.wsd_decay_steps"]
    return changes


def _apply_schedule_policy(rt, ckpt: Path, meta: dict) -> bool:
    """The resume policy for the schedule keys: refuse a changed schedule (CheckpointError naming
    each key, old -> new) unless checkpoint.override_schedule=true. True: override it."""
    cfg = rt.config
    changes = schedule_changes(cfg, meta)
    step = meta["train_state"]["step"]
    listed = "\n  ".join(f"{key}: checkpoint {old!r}, config {new!r}" for key, old, new in changes)
    if changes and not cfg.checkpoint.override_schedule:
        raise CheckpointError(
            f"{ckpt}: resuming at step {step} would change the LR schedule:\n  {listed}\n"
            f"set checkpoint.override_schedule=true to apply the new schedule from step {step + 1} on, or "
            "restore these values to continue the saved one (checkpoint.weights_only=true instead starts "
            "a new schedule and optimizer from the weights)")
    if changes:
        log.warning("checkpoint.override_schedule=true: the new schedule applies from step %d on "
                    "(each step's LR is that of a fresh run of this config):\n  %s", step + 1, listed)
    elif cfg.checkpoint.override_schedule:
        log.info("checkpoint.override_schedule=true, but the schedule is unchanged: continuing it")
    else:
        log.info("resuming the saved schedule (%s)", ", ".join(f"train.{k}={getattr(cfg.train, k)}"
                                                               for k in SCHEDULE_KEYS[:5]))
    return bool(changes)


def load(rt, ckpt: Path, meta: dict, load_optimizer: bool = True) -> TrainState:
    """Load model (+ optimizer, scheduler, RNG, data position) from a verified checkpoint.

    A full load applies the resume policy for the schedule keys (`_apply_schedule_policy`)
    before any state is read."""
    if load_optimizer:
        _check_fingerprint(rt.config, meta, ckpt)
    if not load_optimizer:
        load_weights(rt.model, ckpt, rt.config.model, verified=True)
        _reload_main_params(rt)
        log.info("loaded weights from %s (fresh optimizer and schedule)", ckpt)
        return TrainState()
    override = _apply_schedule_policy(rt, ckpt, meta)
    fresh_groups = [{k: g[k] for k in _GROUP_SCHEDULE_FIELDS if k in g} for g in rt.optimizer.param_groups]
    state = _load_state(rt.model, _sharded_state(rt, is_loading=True), ckpt, StrictHandling.RAISE_ALL)
    rt.optimizer.load_state_dict(state["optimizer"])
    fuse_torch_adam(rt.optimizer)
    rt.scheduler.num_steps = 0  # load_state_dict and step *add* the saved step count
    if override:
        # The config's schedule from the saved step on: the checkpoint's step count, nothing else
        # (the optimizer's param groups also carry the old peak/min LR: put the new ones back).
        for group, fresh in zip(rt.optimizer.param_groups, fresh_groups):
            group.update(fresh)
        rt.scheduler.step(increment=meta["scheduler"]["num_steps"])
    else:
        rt.scheduler.load_state_dict(meta["scheduler"])
    if meta["layout"] == _layout():
        _restore_rng(ckpt / "rng" / f"rank_{torch.distributed.get_rank():05d}.pt")
    else:
        log.warning("layout changed %s -> %s: RNG states not restored", meta["layout"], _layout())
    state = TrainState(**meta["train_state"])
    log.info("resumed from %s at step %d (%d samples consumed)", ckpt, state.step, state.consumed_samples)
    return state


def _restore_rng(path: Path) -> None:
    state = torch_load(path)  # weights_only: tensors in dicts, as _rng_state saves them
    try:
        _set_rng_state(state)
    except (KeyError, TypeError, AttributeError, RuntimeError) as e:
        raise CheckpointError(f"{path}: not the RNG states of this stack ({type(e).__name__}: {e})") from None


def _dist_load(sharded: dict, dist_dir: Path, strict: StrictHandling) -> dict:
    """dist_checkpointing.load of a torch_dist directory without running code from it: the
    patch `checkpoint_reads_without_code` is in place, and the strategies are fixed (left to
    Megatron, the directory's metadata.json would choose the reader)."""
    patches.apply()
    return dist_checkpointing.load(sharded, str(dist_dir), sharded_strategy=TorchDistLoadShardedStrategy(),
                                   common_strategy=TorchCommonLoadStrategy(), strict=strict)


def _load_error(dist_dir: Path, doing: str, e: BaseException) -> CheckpointError:
    """The CheckpointError of a failed load. A refusal (megatron_ext.safe_pickle) raised inside
    torch's distributed reader arrives wrapped in its CheckpointException (one failure per rank):
    it is raised as itself, with the directory named."""
    for failure, _ in getattr(e, "failures", {}).values():
        if isinstance(failure, CheckpointError):
            return type(failure)(f"{dist_dir}: {failure}")
    return CheckpointError(f"{dist_dir}: {doing}: {e}")


def _load_state(chunks, sharded: dict, ckpt: Path, strict: StrictHandling, keep=()) -> dict:
    check_shapes(sharded["model"], ckpt / "state", ckpt)
    try:
        state = _dist_load(sharded, ckpt / "state", strict)
        for i, chunk in enumerate(chunks):
            module = _unwrap(chunk)
            module.load_state_dict(_kept(module, state["model"][f"chunk{i}"], keep), strict=True)
    except CheckpointError:
        raise  # names its file already (a refused pickle)
    except (Exception, CheckpointException) as e:  # several types (torch's is no Exception): all "unusable here"
        raise _load_error(ckpt / "state", "cannot load into this model", e) from e
    return state


# ---------------------------------------------------------------- converted checkpoints + any-kind reading


# Written by tools.convert (hf-to-mcore): the model's sharded state dict at the top level of a
# dist_checkpointing directory, plus this metadata file with the ModelConfig it holds.
CONVERTED_META = "qwen_checkpoint.json"
TOKENIZER_DIR = "hf_tokenizer"
# ModelConfig fields that decide parameter shapes; the others (name, RoPE base and scaling,
# max positions, norm eps) may change between the saved model and the job, e.g. for
# long-context training.
_SHAPE_FIELDS = ("family", "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                 "head_dim", "vocab_size", "qkv_bias", "qk_norm", "tie_word_embeddings", "num_experts",
                 "moe_ffn_hidden_size", "moe_shared_expert_intermediate_size", "moe_shared_expert_gate",
                 "moe_layer_freq")
# The value head's layout: shape-deciding where the checkpoint holds a value head (a language
# model's checkpoint gives a reward model a fresh head of any layout).
_HEAD_FIELDS = ("value_head", "value_head_bias")


# What a checkpoint's output layer is: the language-model head, or the one-output value head of
# a reward model (python -m posttrain.rm) or a process reward model (python -m posttrain.prm).
HEADS = ("lm", "rm", "prm")
HEAD_KEY = "output_layer.weight"
"""The sharded-state key of the output layer (LM head [vocab, hidden], value head [1, hidden])."""
HEAD_KEYS = (HEAD_KEY, "output_layer.bias", "output_layer.hidden_weight", "output_layer.hidden_bias")
"""Every sharded-state key a value head may have (posttrain.rm.ValueHead: its bias, its MLP layer)."""
_HEAD_NAMES = {"lm": "language model", "rm": "reward model", "prm": "process reward model"}


def write_converted_meta(ckpt: Path, m: ModelConfig, dtype: torch.dtype, hf_config: Optional[Dict[str, Any]],
                         head: str = "lm") -> None:
    """Write `CONVERTED_META` of a converted checkpoint (model, parameter dtype, source HF config,
    output head: one of `HEADS`)."""
    if head not in HEADS:
        raise ValueError(f"head={head!r} is not one of {HEADS}")
    meta = {"format_version": FORMAT_VERSION, "model": asdict(m),
            "dtype": str(dtype).replace("torch.", ""), "hf_config": hf_config, "head": head}
    (Path(ckpt) / CONVERTED_META).write_text(json.dumps(meta, indent=2) + "\n")


def save_converted_weights(chunks, ckpt_dir: Path) -> None:
    """Collective: write this rank's part of the model into `ckpt_dir` as a converted checkpoint's
    weights (one chunk's sharded state dict at the top level; torch_dist format)."""
    if len(chunks) != 1:
        raise ValueError(f"{ckpt_dir}: a converted checkpoint holds one model chunk per rank, got {len(chunks)} "
                         "(build without virtual pipeline stages)")
    dist_checkpointing.save(_unwrap(chunks[0]).sharded_state_dict(), str(ckpt_dir))


@dataclass
class Source:
    """A readable checkpoint of either kind: where its dist_checkpointing files are and what model they hold."""

    dist_dir: Path
    model: ModelConfig
    dtype: torch.dtype
    hf_config: Optional[Dict[str, Any]] = None
    """The HF config the checkpoint was converted from (None for training checkpoints)."""
    tokenizer_dir: Optional[Path] = None
    tokenizer_name: Optional[str] = None
    """The training job's `data.tokenizer` (a Qwen family name or an HF tokenizer directory)."""
    manifest_dir: Optional[Path] = None
    """A training checkpoint's `iter_N` directory, whose meta.json lists a CRC32 + size of every
    file and whose state/ holds `model/chunk{i}`; None for a converted checkpoint (the model's
    state dict at the top level of `dist_dir`, no manifest)."""
    verify: bool = True
    """Check the manifest in `load_weights` (False: the user accepted the risk, e.g. --no-verify)."""
    head: str = "lm"
    """The output layer the weights hold (`HEADS`): a converted checkpoint's metadata says; a
    training checkpoint's is its stage's (rm, prm; every other stage trains a language model)."""

    @property
    def is_training(self) -> bool:
        return self.manifest_dir is not None

    @property
    def path(self) -> Path:
        """The checkpoint directory (what error messages name)."""
        return self.manifest_dir if self.manifest_dir is not None else self.dist_dir


def identify(path: Union[str, Path]) -> str:
    """What a checkpoint directory is: "converted" (tools.convert output), "root" (a training
    `checkpoint.dir`: `iter_N` directories and/or `latest`) or "training" (one `iter_N`, or any
    directory with a meta.json). Reads no file; CheckpointError names a path that is none of these."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if (path / CONVERTED_META).is_file():
        return "converted"
    if complete_checkpoints(path) or (path / "latest").exists():
        return "root"
    if (path / "meta.json").is_file():
        return "training"
    raise CheckpointError(f"{path} is not a checkpoint: no {CONVERTED_META} (tools.convert), no meta.json "
                          "(training checkpoint iter_N) and no iter_N directories or `latest` (training root)")


def newest(root: Path) -> Path:
    """The newest committed checkpoint under a training root (not yet verified). A committed
    `iter_N` may be newer than `latest` (a crash between the rename and the pointer update): the
    pointer is only checked, as in `find_resumable`."""
    candidates = complete_checkpoints(root)
    if not candidates:
        raise CheckpointError(f"{root}: no complete checkpoint (iter_N directory) there")
    pointed = _read_pointer(root)
    if pointed is not None and pointed != candidates[-1]:
        log.warning("%s names %s but %s is newer; using the newest", root / "latest", pointed.name,
                    candidates[-1].name)
    return candidates[-1]


def _converted_source(path: Path) -> Source:
    meta_path = path / CONVERTED_META
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(f"{meta_path}: format_version {meta.get('format_version')} != {FORMAT_VERSION}")
        model, dtype = ModelConfig(**meta["model"]), getattr(torch, meta["dtype"])
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{meta_path}: unreadable or foreign metadata ({type(e).__name__}: {e})") from None
    head = meta.get("head", "lm")
    if head not in HEADS:
        raise CheckpointError(f"{meta_path}: head={head!r} is not one of {HEADS}")
    tok = path / TOKENIZER_DIR
    return Source(path, model, dtype, meta.get("hf_config"), tok if tok.is_dir() else None, head=head)


def _training_source(path: Path) -> Source:
    meta = read_meta(path)  # names meta.json when it is truncated or foreign
    config = meta.get("config") or {}
    if "model" not in config:
        raise CheckpointError(f"{path / 'meta.json'} has no config.model")
    try:
        model = ModelConfig(**config["model"])
    except TypeError as e:
        raise CheckpointError(f"{path / 'meta.json'}: config.model is not a ModelConfig of this stack ({e})") from None
    precision = (config.get("precision") or {}).get("name", "fp32")
    # Model weights are kept in bf16 by every non-fp32 recipe (FP8 casts happen inside the GEMMs).
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    tokenizer = (config.get("data") or {}).get("tokenizer")
    head = config.get("stage") if config.get("stage") in ("rm", "prm") else "lm"
    return Source(path / "state", model, dtype, tokenizer_name=tokenizer, manifest_dir=path, head=head)


def open_checkpoint(ckpt: Union[str, Path, Source], verify: bool = True) -> Source:
    """A checkpoint written by tools.convert, a training checkpoint `iter_N/`, or a training
    checkpoint root (its newest committed checkpoint, which `latest` names). Reads metadata only:
    `load_weights` reads the weights and, with `verify` (the default), first checks every file
    against the checkpoint's CRC manifest.

    An already opened Source is returned as it is, so a tool can open (and choose `verify`)
    once and hand the Source to its ranks."""
    if isinstance(ckpt, Source):
        return ckpt
    path = Path(ckpt)
    kind = identify(path)
    if kind == "converted":
        src = _converted_source(path)
    else:
        src = _training_source(newest(path) if kind == "root" else path)
    src.verify = verify
    return src


def read_model_meta(ckpt: Union[str, Path, Source]) -> Tuple[ModelConfig, torch.dtype, Optional[Dict[str, Any]]]:
    """(ModelConfig, parameter dtype, source HF config or None) of any checkpoint `open_checkpoint` reads."""
    src = open_checkpoint(ckpt)
    return src.model, src.dtype, src.hf_config


def verify_manifest(src: Source) -> None:
    """Collective: check a training checkpoint's files against its CRC manifest, as training's
    resume does (spread over the ranks); CheckpointError names every bad file. Without a manifest
    (converted checkpoints), or with `src.verify` off (a warning is printed), nothing is checked."""
    if src.manifest_dir is None:
        return
    rank0 = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    if not src.verify:
        if rank0:
            print(f"warning: not checking {src.manifest_dir} against its checksum manifest (--no-verify): "
                  "corrupted files would go unnoticed", file=sys.stderr)
        return
    try:
        verify(src.manifest_dir)
    except CheckpointError as e:
        raise CheckpointError(f"{e}\n(pass --no-verify to read it anyway)") from None


def _plain(value):
    return json.loads(json.dumps(value))  # tuples and lists (JSON vs dataclass) compare equal


def check_model(src: Source, model: ModelConfig) -> None:
    """CheckpointError unless the checkpoint's model equals `model` in every shape-deciding field
    (`_SHAPE_FIELDS`, and the value head's layout `_HEAD_FIELDS` for a reward model's checkpoint;
    the others, e.g. RoPE scaling or max positions, may differ)."""
    saved, job = _plain(asdict(src.model)), _plain(asdict(model))
    fields = _SHAPE_FIELDS + (_HEAD_FIELDS if src.head != "lm" else ())
    diffs = [f"{k}: checkpoint {saved.get(k)!r} vs job {job.get(k)!r}" for k in fields
             if saved.get(k) != job.get(k)]
    if diffs:
        what = "training checkpoint's" if src.is_training else "converted"
        raise CheckpointError(f"{src.path}: the {what} model does not match model={model.name}:\n  "
                              + "\n  ".join(diffs))


def _any_rank(flag: bool) -> bool:
    """Collective: whether `flag` holds on any rank."""
    if not torch.distributed.is_initialized():
        return flag
    t = torch.tensor([int(flag)])
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def has_value_head(chunks) -> bool:
    """Collective: whether the model's output layer is a value head (a reward model's one score
    per position) rather than the LM head; only the last pipeline stage holds it."""
    local = any(getattr(getattr(_unwrap(c), "output_layer", None), "is_value_head", False) for c in chunks)
    return _any_rank(local)


def _head_policy(chunks, src: Source) -> bool:
    """Collective: check the checkpoint's head against the model's; True when the model's value
    head is to keep its fresh initialisation (a reward model started from a language model).
    A reward-model checkpoint loaded into a language model is refused, naming both kinds."""
    value = has_value_head(chunks)
    if not value and src.head != "lm":
        raise CheckpointError(f"{src.path} is a {_HEAD_NAMES[src.head]} ({src.head}) checkpoint: its output layer "
                              f"is a one-score value head, and the model loading it is a language model (lm), "
                              f"e.g. a policy or the DPO/GRPO reference (posttrain.ref_load); refusing to load it")
    if value and src.head == "lm":
        if _rank0_or_single():
            log.info("%s is a language model (lm) checkpoint: the value head (%s) is freshly initialised, "
                     "the LM head is not used", src.path, "output_layer.*")
        return True
    return False


def _rank0_or_single() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def saved_shapes(dist_dir: Path) -> Dict[str, Tuple[int, ...]]:
    """Every tensor's global shape, by sharded key, from a dist_checkpointing directory's metadata
    (no tensor data read; read as `_dist_load` reads, without running code from the file)."""
    patches.apply()
    try:
        md = TorchDistLoadShardedStrategy().load_tensors_metadata(Path(dist_dir))
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 (any failure: the directory is unusable)
        raise CheckpointError(f"{dist_dir}: unreadable checkpoint metadata ({type(e).__name__}: {e})") from None
    return {k: tuple(v.global_shape) for k, v in md.items()}


def _requested_shapes(sharded: dict) -> Dict[str, Tuple[int, ...]]:
    """The global shape of every plain sharded tensor a model's sharded state dict asks for
    (tensor factories, e.g. a fused SwiGLU weight, are skipped: their parts' shapes follow from
    the sizes the other tensors check)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    return {t.key: tuple(t.global_shape) for t in nested_values(sharded) if isinstance(t, ShardedTensor)}


def check_shapes(sharded: dict, src_dir: Path, what: Path) -> None:
    """Collective: CheckpointError unless every tensor the sharded state dict requests has the
    same global shape in the checkpoint at `src_dir` (from its metadata, before anything is
    loaded); the error names the tensor and both shapes. Keys absent from the checkpoint are
    left to the load's own missing-key error."""
    saved = saved_shapes(src_dir)
    bad = [f"tensor {k}: checkpoint shape {list(saved[k])}, model shape {list(want)}"
           for k, want in sorted(_requested_shapes(sharded).items())
           if k in saved and saved[k] != want]
    everyone = [bad]
    if torch.distributed.is_initialized():
        everyone = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(everyone, bad)
    found = sorted(set().union(*map(set, everyone)))
    if found:
        raise CheckpointError(f"{what}: the checkpoint's tensors do not fit this model:\n  " + "\n  ".join(found))


def load_weights(chunks, ckpt: Union[str, Path, Source], model: Optional[ModelConfig] = None,
                 verified: bool = False) -> Source:
    """Collective: fill model chunks (DDP-wrapped or bare, any TP/PP/EP layout, several virtual
    pipeline stages included) with the model weights of a checkpoint of either kind; returns its
    Source. The one reader of model weights (weights-only resume, reference model, tools, eval).

    `ckpt`: a path (`open_checkpoint` identifies it, verifying by default) or an opened Source.
    `model`: the job's ModelConfig, checked field by field first (`check_model`) where a job
    config exists. A training checkpoint's files are checked against its CRC manifest
    (`verify_manifest`) unless `verified` (the caller already ran `verify`). A key the model
    requests but the checkpoint lacks is an error; the checkpoint's optimizer state is ignored.
    Every tensor's shape is checked against the checkpoint's metadata before any is read
    (`check_shapes`). Output heads (`Source.head`): a reward model (value head) loading a
    language model keeps its freshly initialised head (logged); a reward-model checkpoint is
    refused by a language model. Every failure is a CheckpointError naming the checkpoint."""
    src = open_checkpoint(ckpt)
    if model is not None:
        check_model(src, model)
    if not verified:
        verify_manifest(src)
    keep = HEAD_KEYS if _head_policy(chunks, src) else ()
    if src.is_training:
        # The model's entries of the saved state, as a full resume reads them (the optimizer's
        # state beside them is left behind).
        _load_state(chunks, {"model": _model_state(chunks, drop=keep)}, src.manifest_dir,
                    StrictHandling.RAISE_UNEXPECTED, keep=keep)
        return src
    requests = [_without(_unwrap(c).sharded_state_dict(), keep) for c in chunks]
    check_shapes(requests, src.dist_dir, src.path)
    try:
        # One chunk's state dict at the top level, with global keys: each (virtual pipeline)
        # chunk reads its own layers from it.
        for module, request in zip(map(_unwrap, chunks), requests):
            state = _dist_load(request, src.dist_dir, StrictHandling.RAISE_UNEXPECTED)
            module.load_state_dict(_kept(module, state, keep), strict=True)
    except CheckpointError:
        raise  # names its file already (a refused pickle)
    except (Exception, CheckpointException) as e:  # as in _load_state
        raise _load_error(src.dist_dir, "cannot load the model weights into this model", e) from e
    return src


def _reload_main_params(rt) -> None:
    """Optimizers that keep their own fp32 copy of the weights (bf16, distributed optimizer)
    made it at build time, from the random init: refresh it from the loaded weights."""
    reload = getattr(rt.optimizer, "reload_model_params", None)
    if reload is not None:
        reload()


def resume(rt) -> TrainState:
    """Apply `checkpoint.load`: None -> fresh; `auto` -> newest good one in checkpoint.dir (fresh if
    none); a path -> exactly that checkpoint (a corrupted one is an error)."""
    c = rt.config.checkpoint
    if not c.load:
        return TrainState()
    if c.load == "auto":
        if not c.dir:
            raise CheckpointError("checkpoint.load=auto needs checkpoint.dir")
        found = find_resumable(Path(c.dir))
        if found is None and complete_checkpoints(Path(c.dir)):
            # Restarting from scratch would silently throw the run away: fail instead.
            raise CheckpointError(f"checkpoint.load=auto: every checkpoint in {c.dir} is corrupted "
                                  "(see the warnings above); remove them to start fresh")
        if found is None:
            log.info("no checkpoint in %s: starting fresh", c.dir)
            return TrainState()
        return load(rt, *found, load_optimizer=not c.weights_only)
    ckpt = Path(c.load)
    if not ckpt.is_dir():
        raise CheckpointError(f"checkpoint.load={c.load}: no such directory")
    kind = identify(ckpt)
    if kind == "converted":  # `python -m tools.convert hf-to-mcore` output
        if not c.weights_only:
            raise CheckpointError(f"checkpoint.load={c.load} is a converted model (weights only): "
                                  "set checkpoint.weights_only=true")
        load_weights(rt.model, ckpt, rt.config.model)
        _reload_main_params(rt)
        log.info("loaded converted weights from %s (fresh optimizer and schedule)", ckpt)
        return TrainState()
    if kind == "root":  # a root of iter_* directories
        found = find_resumable(ckpt)
        if found is None:
            raise CheckpointError(f"checkpoint.load={c.load}: no complete, uncorrupted checkpoint there")
        return load(rt, *found, load_optimizer=not c.weights_only)
    return load(rt, ckpt, verify(ckpt), load_optimizer=not c.weights_only)
