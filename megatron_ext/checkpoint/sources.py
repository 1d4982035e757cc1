"""Reading model weights from a checkpoint of either kind, and the converted format.

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
(`store.verify`, spread over the ranks) that a full resume runs, so corrupted weights are never
trained on, converted or evaluated silently; `open_checkpoint(..., verify=False)` (the tools'
`--no-verify`) skips it with a warning.

Reading never runs code from the checkpoint (it may come from anyone): `qwen_checkpoint.json`
and metadata.json are JSON; the torch_dist reader is fixed (`_dist_load`) and reads `.metadata`
with a restricted unpickler, `common.pt` and the shards with `torch.load(weights_only=True)`
(`megatron_ext.safe_pickle`). Anything else in those pickles stops the load with
`UnsafeCheckpointError` (a CheckpointError) naming the file and the global.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.strategies.common import TorchCommonLoadStrategy
from megatron.core.dist_checkpointing.strategies.torch import TorchDistLoadShardedStrategy
from megatron.core.dist_checkpointing.validation import StrictHandling
from torch.distributed.checkpoint.api import CheckpointException

from megatron_ext import patches
from megatron_ext.checkpoint.paths import CONVERTED, CONVERTED_META, ROOT, TOKENIZER_DIR, complete_checkpoints, identify
from megatron_ext.checkpoint.store import FORMAT_VERSION, _kept, _model_state, _read_pointer, _unwrap, _without, \
    read_meta, verify
from megatron_ext.safe_pickle import CheckpointError
from models.config import ModelConfig

log = logging.getLogger(__name__)


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
    if kind == CONVERTED:
        src = _converted_source(path)
    else:
        src = _training_source(newest(path) if kind == ROOT else path)
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
        # chunk reads its own layers from it, all in one load (Megatron checks that the ranks'
        # requests together read every layer's shard exactly once).
        state = _dist_load({f"chunk{i}": r for i, r in enumerate(requests)}, src.dist_dir,
                           StrictHandling.RAISE_UNEXPECTED)
        for i, module in enumerate(map(_unwrap, chunks)):
            module.load_state_dict(_kept(module, state[f"chunk{i}"], keep), strict=True)
    except CheckpointError:
        raise  # names its file already (a refused pickle)
    except (Exception, CheckpointException) as e:  # as in _load_state
        raise _load_error(src.dist_dir, "cannot load the model weights into this model", e) from e
    return src


# ---------------------------------------------------------------- reading torch_dist files


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

