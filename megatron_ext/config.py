"""Config dataclasses: the schema of every Hydra config, validated before distributed init.

YAML under `conf/` only picks groups and overrides fields. `validate()` checks every
cross-field rule and raises `ConfigError` naming the fields and values; it never uses bare
asserts, so the checks also hold under `python -O`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional

from megatron_ext.eval_config import EvalConfig
from megatron_ext.layout import Layout
from models.config import VALUE_HEADS, ModelConfig


class ConfigError(ValueError):
    """A user-facing configuration error."""


@dataclass
class ParallelConfig:
    """Parallel layout. The sizes it implies at a world size (data parallel, micro-batches per
    step, the smallest world) are `megatron_ext.layout.Layout`'s."""

    tp: int = 1
    """Tensor parallel size."""
    pp: int = 1
    """Pipeline parallel size."""
    vpp: Optional[int] = None
    """Virtual pipeline stages per rank (interleaved 1F1B); None = plain 1F1B."""
    first_stage_layers: Optional[int] = None
    """Layers on the first pipeline stage when it should differ (it also holds the embedding);
    None: an even split."""
    last_stage_layers: Optional[int] = None
    """Layers on the last pipeline stage when it should differ (it also holds the output layer)."""
    ep: int = 1
    """Expert parallel size (MoE)."""
    etp: Optional[int] = None
    """Expert tensor parallel size; None = same as tp."""
    cp: int = 1
    """Context parallel size."""
    sp: bool = False
    """Sequence parallelism (needs tp > 1)."""
    distributed_optimizer: bool = False
    """Shard optimizer state across data-parallel ranks (ZeRO-1)."""
    overlap_grad_reduce: bool = True
    """Reduce (or, with the distributed optimizer, reduce-scatter) each gradient bucket over the
    data-parallel ranks as soon as the last micro-batch's backward pass has filled it, while the
    backward pass goes on; false: one reduction after the backward pass. The same sums either way
    (a collective's order of addition can follow the bucket boundaries: rounding only).
    Only where some gradient is reduced over more than one rank (data or expert-data parallel),
    and not under train.cuda_graph."""
    overlap_param_gather: bool = True
    """With the distributed optimizer and overlap_grad_reduce in effect: the updated parameters
    are all-gathered bucket by bucket during the next forward pass (each module waits for its
    own bucket) instead of all at once after the optimizer step. Checkpoints and the end of
    training gather them first."""
    grad_bucket_size: Optional[int] = None
    """Gradient elements per reduction bucket under overlap_grad_reduce (None: Megatron-Core's
    default, max(40M, 1M x data-parallel size)); smaller buckets start reducing earlier."""


@dataclass
class MoEConfig:
    """Router and dispatch choices for MoE training (the architecture lives in ModelConfig)."""

    dispatcher: str = "alltoall"
    """Token dispatcher: `alltoall` or `allgather`."""
    load_balancing: str = "aux_loss"
    """`aux_loss` (per micro-batch), `seq_aux_loss` (per sequence), `global_aux_loss` or `none`."""
    aux_loss_coeff: float = 1e-3
    """Weight of the load-balancing loss."""
    z_loss_coeff: Optional[float] = None
    """Router z-loss weight (None: off)."""
    expert_bias: bool = False
    """Aux-loss-free balancing: a per-expert routing bias updated from token counts.
    Megatron-Core requires the sigmoid score function for it, which is then used."""
    bias_update_rate: float = 1e-3
    """Step size of the expert-bias update."""
    capacity_factor: Optional[float] = None
    """Expert capacity as a multiple of the even share; tokens over it are dropped. None: dropless."""
    grouped_gemm: Optional[bool] = None
    """Run each expert projection as one grouped GEMM over all local experts instead of one
    matmul per expert (Megatron's SequentialMLP). With Transformer Engine: TE's TEGroupedMLP.
    On the local spec: megatron_ext.grouped_experts over `torch._grouped_mm`, which takes fp32
    or bf16 on CPU and bf16 on CUDA (compute capability 8.0+; 9.0 before torch 2.9), with
    `hidden_size` and the expert FFN size per expert-TP rank of a multiple of 16 bytes.
    null (default): on wherever supported, SequentialMLP elsewhere; true: required (a config
    error says why it cannot run here); false: SequentialMLP. Checkpoints are the same either way."""


@dataclass
class PrecisionConfig:
    """Numeric precision."""

    name: str = "fp32"
    """`fp32` (CPU default), `bf16`, `fp8_delayed`, `fp8_current`, `fp8_rowwise`, `fp8_blockwise`.
    The FP8 recipes keep bf16 weights and run the linear layers' GEMMs in FP8 (see
    precision.fp8_backend): `fp8_delayed` scales by an amax history (TE DelayedScaling; TE only),
    `fp8_current` by each tensor's current amax (TE Float8CurrentScaling, or torchao tensorwise),
    `fp8_rowwise` by each row's amax (torchao rowwise; torchao only), `fp8_blockwise` by
    1x128 / 128x128 blocks (TE Float8BlockScaling; Hopper GPUs, TE only)."""
    fp8_backend: str = "auto"
    """`te` (Transformer Engine's layers), `torchao` (torchao's float8 GEMMs in Megatron's own
    linear layers: megatron_ext.fp8; fp8_current and fp8_rowwise) or `auto` (TE where it
    imports with CUDA, torchao otherwise)."""
    fp8_emulate: bool = False
    """Run the torchao FP8 recipes in an fp32 emulation of the FP8 GEMMs (same casts and scales,
    any device, slow), with fp32 weights so the differences to an fp32 run are FP8's alone: how
    FP8 numerics are tested on CPU."""
    fp8_format: Optional[str] = None
    """`hybrid` (E4M3 forward, E5M2 gradients) or `e4m3` (everywhere); None: the recipe's
    default (hybrid for fp8_delayed/fp8_current, e4m3 for fp8_rowwise and for fp8_blockwise,
    which needs it)."""
    fp8_amax_history_len: int = 1024
    """fp8_delayed: amax history window the scaling factors are computed from."""
    fp8_amax_compute_algo: str = "max"
    """fp8_delayed: `max` (largest amax in the window) or `most_recent`."""


@dataclass
class TrainConfig:
    """Optimisation and schedule."""

    steps: int = 30
    """Optimizer steps to run."""
    micro_batch_size: int = 2
    """Sequences per forward/backward pass on one data-parallel rank."""
    global_batch_size: int = 8
    """Sequences per optimizer step, over all data-parallel ranks and micro-batches."""
    lr: float = 5e-3
    """Peak learning rate, reached at the end of the warmup."""
    min_lr: float = 5e-4
    """Learning rate at the end of the decay (train.steps)."""
    warmup_steps: int = 3
    """Steps of linear warmup from 0 to train.lr."""
    lr_schedule: str = "cosine"
    """`cosine`, `wsd` (warmup-stable-decay), `linear` or `constant`."""
    wsd_decay_steps: Optional[int] = None
    """Length of the WSD decay phase; required with lr_schedule=wsd."""
    weight_decay: float = 0.1
    """AdamW weight decay (constant)."""
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    """Global grad-norm clipping threshold (0 disables)."""
    seed: int = 1234
    """Seed of the weight init, dropout and the data order."""
    nan_policy: str = "stop"
    """On a non-finite loss/grad: `stop` (error naming rank and step) or `skip` the update."""
    max_skipped_steps: int = 3
    """With nan_policy=skip: stop once this many steps were skipped."""
    exit_interval: int = 0
    """Save (if checkpoint.dir is set) and stop cleanly once step % N == 0 (0: never), e.g.
    to fit a job's time limit; the next run resumes with checkpoint.load=auto."""
    eval_interval: int = 0
    """Evaluate on the validation split every N steps and at the end (0: never)."""
    eval_iters: int = 2
    """Global batches per evaluation."""
    init_method_std: float = 0.02
    recompute: str = "none"
    """Activation recomputation: `none`, `selective` (recompute core attention in the backward
    pass) or `full` (keep only each layer's input and rerun the whole layer)."""
    optimizer_cpu_offload: bool = False
    """Keep (a fraction of) the Adam state in host memory and step it there (Megatron-Core's
    HybridDeviceOptimizer). GPU only; needs parallel.distributed_optimizer=true."""
    optimizer_offload_fraction: float = 1.0
    """With optimizer_cpu_offload: the fraction of the optimizer state kept on the host."""
    cuda_graph: bool = False
    """Capture the forward and backward passes of a whole global batch (every micro-batch, the
    gradient reduction and scaling) as one CUDA graph after `cuda_graph_warmup_steps` eager steps
    and replay it in every later step (Megatron-Core's full-iteration graph): the host no longer
    issues each layer's kernels, which limits small micro-batches. GPU only; the step must have
    fixed shapes and no host syncs: parallel.tp/pp/cp/ep=1, a dense model, the pretraining or CPT
    stage without cpt.document_mask (stages declare it: megatron_ext.stages), bf16 or fp32. The
    optimizer step stays eager."""
    cuda_graph_warmup_steps: int = 2
    """Eager steps before the capture (compilation of the fused kernels happens in the first)."""


@dataclass
class DataConfig:
    """Pretraining data: Megatron indexed datasets (`PREFIX.bin/.idx`)."""

    seq_length: int = 128
    """Tokens per training sequence."""
    paths: List[str] = field(default_factory=list)
    """Dataset prefixes; empty = the bundled sample corpus (tokenized on first use)."""
    weights: Optional[List[float]] = None
    """Blend weights, one per path; None = proportional to dataset size (each path's token count,
    read from its `.idx`). Either way the datasets repeat as often as the run needs."""
    blend_file: Optional[str] = None
    """Instead of `paths`/`weights`, for corpora of many shards: a text file of `weight prefix`
    pairs (any number per line, `#` comments; a file of prefixes only is weighted by token
    count), or a directory whose every `*.idx` prefix is used, weighted by token count. Relative
    prefixes are resolved against the file's directory. Read before training starts and replaced
    by the `paths`/`weights` it names (so checkpoints record and compare the blend itself)."""
    split: str = "98,2,0"
    """train,valid,test split of the documents."""
    tokenizer: str = "qwen3"
    """Tokenizer used for the bundled sample corpus and decoding."""
    cache_dir: Optional[str] = None
    """Where tokenized sample data and Megatron's dataset indices are cached. None: `cache/` in
    `checkpoint.dir` (where the run writes; shared by all ranks), else the user's cache directory
    (`$XDG_CACHE_HOME/qwen_megatron/data`, default `~/.cache/...`), never the working directory.
    Cached indices are read without pickle whatever directory this names."""
    num_workers: int = 0
    """DataLoader worker processes."""


@dataclass
class CheckpointConfig:
    """Saving and resuming (Megatron-Core dist_checkpointing, reshardable)."""

    dir: Optional[str] = None
    """Where checkpoints are saved (`iter_NNNNNNN/` + `latest`); None disables saving."""
    save_interval: int = 0
    """Save every N steps (0: only at the end of training)."""
    load: Optional[str] = None
    """None: start fresh; `auto`: newest complete checkpoint in `dir` (fresh if none);
    a path: that checkpoint directory, or a checkpoint root (newest good one in it)."""
    weights_only: bool = False
    """Load only the model weights (fresh optimizer, schedule and data position), e.g. for CPT."""
    keep_last: int = 3
    """Keep the newest N checkpoints (0: keep all)."""
    allow_data_change: bool = False
    """Accept a resume whose data config (paths, split, seq length, seed, global batch) changed."""
    override_schedule: bool = False
    """On a resume whose schedule keys differ from the checkpoint's: false refuses it, naming each
    changed key; true applies the new schedule from the resumed step. The schedule keys are
    train.steps, lr, min_lr, warmup_steps, lr_schedule, wsd_decay_steps and weight_decay. With
    true, the LR of step s is what a fresh run of the new config has at step s (like Megatron-LM's
    --override-opt_param-scheduler). Weights-only loads always start a new schedule."""
    async_save: bool = False
    """Write the tensors of a save in the background while training continues; the checkpoint is
    committed (manifest, rename, `latest`) once every rank finished writing it."""


@dataclass
class LoggerConfig:
    """Where metrics go: the console always; TensorBoard, wandb and a jsonl file on request."""

    log_interval: int = 1
    """Log every N steps."""
    tensorboard_dir: Optional[str] = None
    """Write TensorBoard event files here (None: no TensorBoard)."""
    wandb: bool = False
    """Also log to wandb (see logger.wandb_mode)."""
    wandb_project: str = "qwen-megatron"
    wandb_mode: str = "offline"
    """`offline` unless the user asks for `online`."""
    wandb_dir: str = "runs/wandb"
    metrics_file: Optional[str] = None
    """Append every step's and evaluation's metrics to this jsonl file at full precision (rank 0;
    on resume, records after the resumed step are dropped first). None: no file."""


@dataclass
class PostTrainConfig:
    """Options shared by the post-training stages (`posttrain/`); each stage's own options are its
    own config section (`sft.*`, `dpo.*`, `grpo.*`; see `megatron_ext.stages`)."""

    data_path: Optional[str] = None
    """jsonl input of the stage; None = its bundled sample or synthetic task."""
    num_samples: int = 4096
    """Size of a generated synthetic task (pairs for RM/DPO, problems for PRM/GRPO)."""
    task_seed: int = 0
    """Seed of the synthetic task generator (held-out data uses a different stream)."""
    ref_load: Optional[str] = None
    """Checkpoint holding the frozen reference model (DPO, GRPO). None: checkpoint.load when it
    names a path, else the policy's initial weights (deterministic from train.seed)."""
    chat_template: str = "auto"
    """Chat format of SFT, RM/DPO and GRPO data: auto, chatml or a template path. `auto` = the
    chat template of data.tokenizer when it is an HF directory that carries one
    (`chat_template.jinja` or `tokenizer_config.json`), else plain ChatML (the bundled Qwen
    tokenizers); `chatml` = plain ChatML always; a path = that `.jinja` template or the template
    of that HF tokenizer/checkpoint directory (see data_prep.chat)."""


@dataclass
class Config:
    """The whole job."""

    stage: str = "pretrain"
    """The stage whose defaults conf/stage/<stage>.yaml sets (see megatron_ext.stages)."""
    stage_class: str = "megatron_ext.pretrain:PretrainStage"
    """module:Class implementing the stage; set by its conf/stage YAML."""
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    posttrain: PostTrainConfig = field(default_factory=PostTrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


PRECISIONS = ("fp32", "bf16", "fp8_delayed", "fp8_current", "fp8_rowwise", "fp8_blockwise")
RECOMPUTE = ("none", "selective", "full")
SCHEDULES = ("cosine", "wsd", "linear", "constant")


def _check(ok: bool, message: str, errors: List[str]) -> None:
    if not ok:
        errors.append(message)


def _check_load(c: CheckpointConfig, errors: List[str]) -> None:
    """checkpoint.load as its plan reads it from the config alone: no directory is looked at
    here (it may exist only where the job runs; training's resume resolves it)."""
    from megatron_ext.checkpoint.plan import parse_load  # imports no Megatron-Core

    try:
        parse_load(c)
    except ValueError as e:  # CheckpointError
        errors.append(str(e))


def _validate_model(m: ModelConfig, errors: List[str]) -> None:
    from models.registry import FAMILIES  # the family list lives with the families

    _check(m.family in FAMILIES, f"model.family={m.family!r} is not one of {tuple(FAMILIES)}", errors)
    for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                 "num_query_groups", "vocab_size"):
        _check(getattr(m, name) > 0, f"model.{name}={getattr(m, name)} must be positive", errors)
    _check(m.num_query_groups > 0 and m.num_attention_heads % m.num_query_groups == 0,
           f"model.num_attention_heads={m.num_attention_heads} must be a multiple of "
           f"model.num_query_groups={m.num_query_groups}", errors)
    if m.head_dim is None:
        _check(m.num_attention_heads > 0 and m.hidden_size % m.num_attention_heads == 0,
               f"model.hidden_size={m.hidden_size} is not divisible by model.num_attention_heads="
               f"{m.num_attention_heads}; set model.head_dim", errors)
    _check(m.value_head in VALUE_HEADS, f"model.value_head={m.value_head!r} is not one of {VALUE_HEADS}", errors)
    if m.family.endswith("_moe"):
        _check(bool(m.num_experts), f"model.family={m.family} needs model.num_experts", errors)
    if m.is_moe:
        _check(0 < m.moe_router_topk <= m.num_experts,
               f"model.moe_router_topk={m.moe_router_topk} must be in [1, model.num_experts={m.num_experts}]",
               errors)
        if m.moe_layer_freq is not None:
            _check(len(m.moe_layer_freq) == m.num_layers,
                   f"model.moe_layer_freq has {len(m.moe_layer_freq)} entries, model.num_layers="
                   f"{m.num_layers}", errors)


def _validate_parallel(cfg: Config, world_size: int, errors: List[str]) -> None:
    p, m = cfg.parallel, cfg.model
    for name in ("tp", "pp", "ep", "cp"):
        _check(getattr(p, name) >= 1, f"parallel.{name}={getattr(p, name)} must be >= 1", errors)
    _check(p.etp is None or p.etp >= 1, f"parallel.etp={p.etp} must be >= 1 (or null: the same as tp)", errors)
    if errors:
        return
    errors.extend(Layout.of(cfg, world_size).world_errors())
    _check(m.num_attention_heads % p.tp == 0,
           f"model.num_attention_heads={m.num_attention_heads} is not divisible by parallel.tp={p.tp}", errors)
    _check(m.vocab_size % p.tp == 0,
           f"model.vocab_size={m.vocab_size} is not divisible by parallel.tp={p.tp}", errors)
    _check(m.num_query_groups % p.tp == 0,
           f"model.num_query_groups={m.num_query_groups} is not divisible by parallel.tp={p.tp}", errors)
    _check(not p.sp or p.tp > 1, f"parallel.sp=true needs parallel.tp > 1 (got tp={p.tp})", errors)
    if p.sp:
        _check(cfg.data.seq_length % p.tp == 0,
               f"data.seq_length={cfg.data.seq_length} is not divisible by parallel.tp={p.tp} "
               "(required by parallel.sp=true)", errors)
    if p.cp > 1:
        _check(cfg.data.seq_length % (2 * p.cp) == 0,
               f"data.seq_length={cfg.data.seq_length} is not divisible by 2*parallel.cp={2 * p.cp}", errors)
    uneven = p.first_stage_layers is not None or p.last_stage_layers is not None
    if uneven:
        _check(p.pp > 1 and p.vpp is None, "parallel.first_stage_layers/last_stage_layers need "
               "parallel.pp > 1 and no parallel.vpp", errors)
        ends = [n for n in (p.first_stage_layers, p.last_stage_layers) if n is not None]
        rest, stages = m.num_layers - sum(ends), p.pp - len(ends)
        _check(all(n >= 1 for n in ends) and rest >= 0 and (rest == 0 if stages == 0 else rest % stages == 0),
               f"model.num_layers={m.num_layers} minus parallel.first_stage_layers={p.first_stage_layers} "
               f"and last_stage_layers={p.last_stage_layers} leaves {rest} layers for {stages} other "
               "stage(s): not an even split", errors)
    else:
        _check(m.num_layers % (p.pp * (p.vpp or 1)) == 0,
               f"model.num_layers={m.num_layers} is not divisible by parallel.pp*vpp="
               f"{p.pp}*{p.vpp or 1} ({m.num_layers / (p.pp * (p.vpp or 1)):g} layers per stage)", errors)
    if p.vpp is not None:
        _check(p.pp > 1 and p.vpp > 1, f"parallel.vpp={p.vpp} needs parallel.pp > 1 and vpp > 1", errors)
    if p.grad_bucket_size is not None:
        _check(p.overlap_grad_reduce and p.grad_bucket_size > 0,
               f"parallel.grad_bucket_size={p.grad_bucket_size} needs parallel.overlap_grad_reduce=true "
               f"(got {p.overlap_grad_reduce}) and a positive size", errors)
    if p.ep > 1:
        _check(m.is_moe, f"parallel.ep={p.ep} needs a MoE model (model.num_experts is unset)", errors)
        _check(not m.is_moe or m.num_experts % p.ep == 0,
               f"model.num_experts={m.num_experts} is not divisible by parallel.ep={p.ep}", errors)
    if m.is_moe:
        e = cfg.moe
        _check(e.dispatcher in ("alltoall", "allgather"),
               f"moe.dispatcher={e.dispatcher!r} is not 'alltoall' or 'allgather'", errors)
        _check(e.load_balancing in ("aux_loss", "seq_aux_loss", "global_aux_loss", "none"),
               f"moe.load_balancing={e.load_balancing!r} is not aux_loss, seq_aux_loss, global_aux_loss or none",
               errors)
        _check(e.capacity_factor is None or e.capacity_factor > 0,
               f"moe.capacity_factor={e.capacity_factor} must be positive (or null for dropless)", errors)
        _check(e.capacity_factor is None or e.dispatcher == "alltoall",
               "moe.capacity_factor (token dropping) needs moe.dispatcher=alltoall", errors)
    if m.is_moe and p.tp > 1:
        _check(p.sp, f"MoE with parallel.tp={p.tp} needs parallel.sp=true (Megatron-Core requires it)", errors)


def _validate_train(cfg: Config, world_size: int, errors: List[str]) -> None:
    t = cfg.train
    _check(t.steps >= 1, f"train.steps={t.steps} must be >= 1", errors)
    _check(t.micro_batch_size >= 1, f"train.micro_batch_size={t.micro_batch_size} must be >= 1", errors)
    _check(t.lr > 0 and 0 <= t.min_lr <= t.lr,
           f"need 0 <= train.min_lr <= train.lr, got min_lr={t.min_lr}, lr={t.lr}", errors)
    _check(t.lr_schedule in SCHEDULES, f"train.lr_schedule={t.lr_schedule!r} is not one of {SCHEDULES}", errors)
    _check(t.warmup_steps >= 0, f"train.warmup_steps={t.warmup_steps} must be >= 0", errors)
    _check(t.nan_policy in ("stop", "skip"), f"train.nan_policy={t.nan_policy!r} is not 'stop' or 'skip'", errors)
    _check(t.recompute in RECOMPUTE, f"train.recompute={t.recompute!r} is not one of {RECOMPUTE}", errors)
    if t.optimizer_cpu_offload:
        _check(cfg.parallel.distributed_optimizer and 0 < t.optimizer_offload_fraction <= 1,
               "train.optimizer_cpu_offload=true needs parallel.distributed_optimizer=true and "
               f"0 < train.optimizer_offload_fraction <= 1 (got {cfg.parallel.distributed_optimizer}, "
               f"{t.optimizer_offload_fraction})", errors)
    if t.cuda_graph:
        p = cfg.parallel
        _check(p.tp == p.pp == p.cp == p.ep == 1 and not cfg.model.is_moe
               and not cfg.precision.name.startswith("fp8"),
               "train.cuda_graph=true needs fixed shapes and no host syncs in the step: parallel.tp/pp/cp/ep=1 "
               f"(got {p.tp}/{p.pp}/{p.cp}/{p.ep}), a dense model (model.num_experts={cfg.model.num_experts}) "
               "and bf16 or fp32 "
               f"(precision.name={cfg.precision.name}); the stage must allow it too", errors)
        _check(t.cuda_graph_warmup_steps >= 1,
               f"train.cuda_graph_warmup_steps={t.cuda_graph_warmup_steps} must be >= 1", errors)
    if t.lr_schedule == "wsd":
        _check(t.wsd_decay_steps is not None and 0 < t.wsd_decay_steps <= t.steps - t.warmup_steps,
               f"train.lr_schedule=wsd needs 0 < train.wsd_decay_steps <= steps - warmup_steps "
               f"(got wsd_decay_steps={t.wsd_decay_steps}, steps={t.steps}, warmup_steps={t.warmup_steps})",
               errors)
    errors.extend(Layout.of(cfg, world_size).batch_errors())


def _validate_data(d: DataConfig, errors: List[str]) -> None:
    if d.weights is not None:
        _check(len(d.weights) == len(d.paths),
               f"data.weights has {len(d.weights)} entries but data.paths has {len(d.paths)}", errors)
        _check(all(math.isfinite(w) and w > 0 for w in d.weights),
               f"data.weights={list(d.weights)}: every weight must be a positive number", errors)
    if d.blend_file:
        _check(not d.paths and d.weights is None,
               f"data.blend_file={d.blend_file} and data.paths/data.weights both name the data; give one", errors)


def _validate_rope(cfg: Config, errors: List[str]) -> None:
    m = cfg.model
    _check(m.rope_scaling_type in (None, "yarn"),
           f"model.rope_scaling_type={m.rope_scaling_type!r} is not null or 'yarn'", errors)
    if m.rope_scaling_type == "yarn":
        _check(m.rope_scaling_factor >= 1.0 and bool(m.rope_original_max_position_embeddings),
               f"model.rope_scaling_type=yarn needs model.rope_scaling_factor >= 1 (got {m.rope_scaling_factor}) "
               f"and model.rope_original_max_position_embeddings (got {m.rope_original_max_position_embeddings})",
               errors)


def _validate_precision(cfg: Config, check_device: bool, errors: List[str]) -> None:
    p = cfg.precision
    _check(p.name in PRECISIONS, f"precision.name={p.name!r} is not one of {PRECISIONS}", errors)
    _check(p.fp8_format in (None, "hybrid", "e4m3"),
           f"precision.fp8_format={p.fp8_format!r} is not null, 'hybrid' or 'e4m3'", errors)
    _check(p.name != "fp8_blockwise" or p.fp8_format in (None, "e4m3"),
           f"precision.name=fp8_blockwise needs precision.fp8_format=e4m3 (got {p.fp8_format})", errors)
    _check(p.fp8_amax_compute_algo in ("max", "most_recent") and p.fp8_amax_history_len >= 1,
           f"precision.fp8_amax_compute_algo={p.fp8_amax_compute_algo!r} must be 'max' or 'most_recent' and "
           f"precision.fp8_amax_history_len={p.fp8_amax_history_len} >= 1", errors)
    _validate_fp8_backend(p, errors)
    if not check_device:
        return
    if p.name.startswith("fp8_") and not errors:
        from megatron_ext.precision import fp8_backend, fp8_support

        backend = fp8_backend(p)
        ok, why = fp8_support(p.name, backend, p.fp8_emulate)
        _check(ok, f"precision.name={p.name} {why}", errors)
    import torch

    _check(not cfg.train.cuda_graph or torch.cuda.is_available(),
           "train.cuda_graph=true captures CUDA graphs, but no CUDA GPU is visible", errors)
    _check(not cfg.train.optimizer_cpu_offload or torch.cuda.is_available(),
           "train.optimizer_cpu_offload=true moves optimizer state off the GPU, but no CUDA GPU is "
           "visible: on CPU the optimizer already runs in host memory; unset it", errors)
    if cfg.model.is_moe and cfg.moe.grouped_gemm:
        why = grouped_gemm_unsupported(cfg)
        _check(why is None, f"moe.grouped_gemm=true, but the experts cannot run as grouped GEMMs here: {why}; "
               "set moe.grouped_gemm=null (grouped where supported) or false", errors)


def _validate_fp8_backend(p: PrecisionConfig, errors: List[str]) -> None:
    from megatron_ext.precision import TE_ONLY, TORCHAO_ONLY

    _check(p.fp8_backend in ("te", "torchao", "auto"),
           f"precision.fp8_backend={p.fp8_backend!r} is not 'te', 'torchao' or 'auto'", errors)
    _check(not p.fp8_emulate or (p.name in ("fp8_current", *TORCHAO_ONLY) and p.fp8_backend != "te"),
           f"precision.fp8_emulate=true emulates torchao's FP8 recipes (fp8_current, fp8_rowwise), not "
           f"precision.name={p.name} with precision.fp8_backend={p.fp8_backend}", errors)
    _check(p.name not in TE_ONLY or p.fp8_backend != "torchao",
           f"precision.name={p.name} needs Transformer Engine (precision.fp8_backend=te or auto); torchao runs "
           "fp8_current and fp8_rowwise", errors)
    _check(p.name not in TORCHAO_ONLY or p.fp8_backend != "te",
           f"precision.name={p.name} runs through torchao only (precision.fp8_backend=torchao or auto); "
           "Transformer Engine runs fp8_delayed, fp8_current and fp8_blockwise", errors)


def grouped_gemm_unsupported(cfg: Config) -> Optional[str]:
    """Why the experts cannot run as grouped GEMMs on this machine (None: they can)."""
    import torch

    from megatron_ext.spec import use_transformer_engine

    if use_transformer_engine():
        return None  # TE's TEGroupedMLP
    from megatron_ext.grouped_experts import unsupported_reason

    m, p = cfg.model, cfg.parallel
    ffn_per_rank = (m.moe_ffn_hidden_size or m.ffn_hidden_size) // (p.etp or p.tp)
    dtype = torch.float32 if cfg.precision.name == "fp32" or cfg.precision.fp8_emulate else torch.bfloat16
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return unsupported_reason(dtype, device, (m.hidden_size, ffn_per_rank))


def grouped_gemm_enabled(cfg: Config) -> bool:
    """`moe.grouped_gemm` resolved for this machine (null: wherever supported)."""
    if cfg.moe.grouped_gemm is not None:
        return cfg.moe.grouped_gemm
    return cfg.model.is_moe and grouped_gemm_unsupported(cfg) is None


def validate(cfg: Config, world_size: int, check_device: bool = True) -> None:
    """Check every cross-field rule; raise ConfigError listing all violations.

    `check_device=False` skips the checks that this machine can run the config (FP8 needs CUDA
    + Transformer Engine, optimizer offload needs CUDA), e.g. to plan a GPU job on a laptop."""
    errors: List[str] = []
    _validate_precision(cfg, check_device, errors)
    _check(cfg.data.seq_length > 0, f"data.seq_length={cfg.data.seq_length} must be positive", errors)
    _validate_data(cfg.data, errors)
    c = cfg.checkpoint
    _check(c.save_interval >= 0, f"checkpoint.save_interval={c.save_interval} must be >= 0", errors)
    _check(not (c.save_interval and not c.dir), "checkpoint.save_interval needs checkpoint.dir", errors)
    _check_load(c, errors)
    _check(not (c.async_save and not c.dir), "checkpoint.async_save needs checkpoint.dir", errors)
    _validate_model(cfg.model, errors)
    _validate_rope(cfg, errors)
    if not errors:
        _validate_parallel(cfg, world_size, errors)
    if not errors:
        _validate_train(cfg, world_size, errors)
    if errors:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(errors))
