"""Training checkpoints that never lose a run: Megatron-Core dist_checkpointing (torch_dist) plus a commit protocol.

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
`iter_N` is therefore complete by construction, and its manifest catches later corruption
(`verify`). With `checkpoint.async_save` the files under `state/` are written by a background
process and the same commit runs when every rank's writer finished (`Saver`).

Reading never runs code from the checkpoint (it may come from anyone): meta.json and `latest`
are JSON or text, and manifest entries must name files inside the checkpoint (`read_meta`).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import List, Optional

import torch
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

from megatron_ext import cpu_backend
from megatron_ext.build import gather_params
from megatron_ext.checkpoint.paths import ITER, complete_checkpoints, iter_dir
from megatron_ext.safe_pickle import CheckpointError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
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


# ---------------------------------------------------------------- manifest + verify


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
    if not ITER.match(name) or not (root / name).is_dir():
        log.warning("%s: names %r, which is not a checkpoint here; scanning %s instead", pointer, name[:80], root)
        return None
    return root / name


