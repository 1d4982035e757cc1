"""The one place that builds the distributed model, in a fixed, logged order:

  process groups -> model-parallel groups + RNG -> GPT stage(s) from the layer spec ->
  precision -> Megatron DDP -> Megatron optimizer -> LR/WD scheduler.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer import TransformerConfig

from megatron_ext import cpu_backend, dist, fp8, init, patches
from megatron_ext.cross_entropy import GPTModel
from megatron_ext.config import Config, TrainConfig
from megatron_ext.precision import fp8_backend
from megatron_ext.spec import decoder_block_spec, use_transformer_engine
from megatron_ext.transformer import transformer_config
from models.rope import apply_rope_scaling

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    """What the training loop needs: model chunks (one per virtual stage), optimizer, scheduler."""

    config: Config
    transformer_config: TransformerConfig
    model: List[DistributedDataParallel]
    optimizer: object
    scheduler: OptimizerParamScheduler
    graphed_forward_backward: Optional[Callable] = None
    """train.cuda_graph: the schedule inside Megatron's full-iteration CUDA graph (made by the loop)."""


def init_parallel(cfg: Config) -> None:
    """Process groups, Megatron's model-parallel groups and the model-parallel RNG."""
    cpu_backend.apply()
    patches.apply()
    dist.init_process_group()
    p = cfg.parallel
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=p.tp,
            pipeline_model_parallel_size=p.pp,
            virtual_pipeline_model_parallel_size=p.vpp,
            context_parallel_size=p.cp,
            expert_model_parallel_size=p.ep,
            expert_tensor_parallel_size=p.etp or p.tp,
        )
    torch.manual_seed(cfg.train.seed)
    # A CUDA graph replays its random draws only from graph-safe generators (a new tracker: the
    # process may hold one made without them).
    tensor_parallel.model_parallel_cuda_manual_seed(cfg.train.seed, use_cudagraphable_rng=cfg.train.cuda_graph,
                                                    force_reset_rng=cfg.train.cuda_graph)
    log.info("parallel layout: tp=%d pp=%d vpp=%s cp=%d ep=%d etp=%d dp=%d sp=%s", p.tp, p.pp, p.vpp,
             p.cp, p.ep, p.etp or p.tp, parallel_state.get_data_parallel_world_size(), p.sp)


def build_model(cfg: Config, tcfg: TransformerConfig, customize: Optional[Callable] = None) -> List[torch.nn.Module]:
    """One GPTModel per virtual pipeline stage held by this rank (unwrapped).

    Initial weights depend on train.seed and the architecture only (megatron_ext.init).
    `customize(chunk, cfg)` may replace heads or freeze parts (e.g. a reward model's value
    head) before the chunk is moved to the GPU and wrapped. Set
    `tcfg.perform_initialization=False` to skip random init when weights will be loaded.
    """
    m = cfg.model
    chunks = []
    for vp_stage in range(cfg.parallel.vpp or 1):
        vp = vp_stage if cfg.parallel.vpp else None
        chunk = GPTModel(
            config=tcfg,
            transformer_layer_spec=decoder_block_spec(tcfg, vp_stage=vp),
            vocab_size=m.vocab_size,
            max_sequence_length=m.max_position_embeddings,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp),
            share_embeddings_and_output_weights=m.tie_word_embeddings,
            position_embedding_type="rope",
            rotary_base=int(m.rope_theta),
            vp_stage=vp,
        )
        apply_rope_scaling(chunk, m)  # YaRN when model.rope_scaling_type says so; else nothing
        if tcfg.perform_initialization:
            init.initialize([chunk], cfg, tcfg)  # the same initial model under every layout
        if customize is not None:
            customize(chunk, cfg)
        fp8_recipe = torchao_fp8_recipe(cfg)
        if fp8_recipe is not None:
            fp8.convert([chunk], fp8_recipe)  # the decoder's linear layers run their GEMMs in FP8
        if torch.cuda.is_available():
            chunk.cuda(torch.cuda.current_device())
        chunks.append(chunk)
    n_params = sum(p.numel() for c in chunks for p in c.parameters())
    log.info("model: %s (%s spec), %d parameters on this rank", m.name,
             "transformer-engine" if use_transformer_engine() else "local", n_params)
    return chunks


def torchao_fp8_recipe(cfg: Config) -> Optional[fp8.Recipe]:
    """The FP8 recipe megatron_ext.fp8 runs (None: no FP8, or FP8 inside Transformer Engine)."""
    p = cfg.precision
    return fp8.make_recipe(p.name, p.fp8_format, p.fp8_emulate) if fp8_backend(p) == "torchao" else None


def overlaps_grad_reduce(cfg: Config, dp_cp: int, expert_dp: int) -> bool:
    """parallel.overlap_grad_reduce where some gradient is reduced over more than one rank (data
    parallel x CP size `dp_cp`, expert-data-parallel size `expert_dp`; with one rank there is
    nothing to overlap), except under train.cuda_graph: its captured step keeps the one
    reduction after the backward pass (asynchronous collectives inside a capture have not run
    yet)."""
    return cfg.parallel.overlap_grad_reduce and not cfg.train.cuda_graph and (dp_cp > 1 or expert_dp > 1)


def gather_params(model: List[DistributedDataParallel]) -> None:
    """Complete the parameter all-gathers that parallel.overlap_param_gather leaves to the next
    forward pass, for readers of the parameters that are not a forward pass (a checkpoint, the
    caller of training). A no-op otherwise."""
    for chunk in model:
        if chunk.ddp_config.overlap_param_gather:
            chunk.start_param_sync(force_sync=True)


def wrap_ddp(cfg: Config, tcfg: TransformerConfig, chunks: List[torch.nn.Module]) -> List[DistributedDataParallel]:
    overlap = overlaps_grad_reduce(cfg, parallel_state.get_data_parallel_world_size(with_context_parallel=True),
                                   parallel_state.get_expert_data_parallel_world_size())
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        use_distributed_optimizer=cfg.parallel.distributed_optimizer,
        overlap_grad_reduce=overlap,
        overlap_param_gather=overlap and cfg.parallel.distributed_optimizer and cfg.parallel.overlap_param_gather,
        bucket_size=cfg.parallel.grad_bucket_size,
        check_for_nan_in_grad=False,
    )
    return [
        # As Megatron-LM: virtual stages after the first get one bucket, reduced in one pass.
        DistributedDataParallel(tcfg, ddp_config, chunk, disable_bucketing=i > 0)
        for i, chunk in enumerate(chunks)
    ]


def build_optimizer(cfg: Config, tcfg: TransformerConfig, model: List[DistributedDataParallel]):
    t = cfg.train
    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=t.lr,
        min_lr=t.min_lr,
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        adam_eps=t.adam_eps,
        clip_grad=t.clip_grad,
        bf16=tcfg.bf16,
        params_dtype=tcfg.params_dtype,
        use_distributed_optimizer=cfg.parallel.distributed_optimizer,
        # Host-side Adam (HybridDeviceOptimizer) goes through the precision-aware code path.
        optimizer_cpu_offload=t.optimizer_cpu_offload,
        optimizer_offload_fraction=t.optimizer_offload_fraction,
        use_precision_aware_optimizer=t.optimizer_cpu_offload,
    )
    optimizer = get_megatron_optimizer(opt_config, model)
    fuse_torch_adam(optimizer)
    return optimizer, lr_scheduler(optimizer, cfg.train)


def fuse_torch_adam(optimizer) -> None:
    """Where Megatron-Core wraps torch's Adam (no Apex or Transformer Engine), step it with torch's
    fused kernel (`fused=True`: one pass over parameters, gradients and both moments) instead of
    the default multi-tensor path (about ten passes on GPUs, a Python loop over parameters on
    CPU). Megatron-Core 0.16.1 builds the optimizer without the flag, so it is set on the param
    groups, which torch reads at each step; its "step" tensors then live on the parameters'
    device. Called again after loading a checkpoint, whose param groups replace these (and may
    come from an unfused run)."""
    for megatron_optimizer in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(megatron_optimizer, "optimizer", None)
        if type(inner) not in (torch.optim.Adam, torch.optim.AdamW):
            continue  # TE/Apex FusedAdam, or the CPU-offload optimizer
        inner.defaults.update(fused=True, foreach=False)
        for group in inner.param_groups:
            group.update(fused=True, foreach=False)
            for p in group["params"]:
                step = inner.state.get(p, {}).get("step")
                if step is not None and (step.device != p.device or step.dtype != torch.float32):
                    inner.state[p]["step"] = step.to(p.device, torch.float32)


def lr_scheduler(optimizer, t: TrainConfig) -> OptimizerParamScheduler:
    """Linear warmup to train.lr, then cosine / linear / WSD decay to train.min_lr at train.steps.

    Step s (1-based) trains with the schedule's value at s: the scheduler starts one step in,
    so the first step does not waste a batch at lr=0.
    """
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=t.lr,
        min_lr=t.min_lr,
        lr_warmup_steps=t.warmup_steps,
        # Megatron needs decay to end after warmup; runs shorter than warmup never decay.
        lr_decay_steps=max(t.steps, t.warmup_steps + 1),
        lr_decay_style={"wsd": "WSD"}.get(t.lr_schedule, t.lr_schedule),
        start_wd=t.weight_decay,
        end_wd=t.weight_decay,
        wd_incr_steps=t.steps,
        wd_incr_style="constant",
        wsd_decay_steps=t.wsd_decay_steps,
        lr_wsd_decay_style="cosine" if t.lr_schedule == "wsd" else None,
    )
    scheduler.step(increment=1)
    return scheduler


def build(cfg: Config, customize: Optional[Callable] = None) -> Runtime:
    """Build everything for training, in order. Assumes `validate(cfg)` already passed."""
    init_parallel(cfg)
    tcfg = transformer_config(cfg)
    chunks = build_model(cfg, tcfg, customize)
    model = wrap_ddp(cfg, tcfg, chunks)
    optimizer, scheduler = build_optimizer(cfg, tcfg, model)
    if torchao_fp8_recipe(cfg) is not None:
        fp8.new_step_after(optimizer)  # the FP8 weight casts are made once per step
    # Hooks the pipeline schedules call: grad all-reduce + per-token normalisation at the end
    # of the step, and loss scaling (identity in fp32/bf16).
    tcfg.finalize_model_grads_func = importlib.import_module(  # as patched (megatron_ext.patches)
        "megatron.core.distributed.finalize_model_grads").finalize_model_grads
    tcfg.grad_scale_func = optimizer.scale_loss
    ddp_config = model[0].ddp_config
    if ddp_config.overlap_grad_reduce:
        # The schedules run all micro-batches but the last under no_sync, so a bucket's reduction
        # starts once the last backward pass has filled it; under pipeline parallelism they also
        # start each model chunk's remaining reductions when its last backward pass ends (as
        # Megatron-LM's align_grad_reduce). finalize_model_grads waits for them.
        no_sync, start = [c.no_sync for c in model], [c.start_grad_sync for c in model]
        tcfg.no_sync_func = no_sync if len(model) > 1 else no_sync[0]
        tcfg.grad_sync_func = start if len(model) > 1 else start[0]
    overlap = ("during the backward pass" + (", parameter all-gather during the forward pass"
                                              if ddp_config.overlap_param_gather else "")
               if ddp_config.overlap_grad_reduce else "after the backward pass")
    log.info("optimizer: adam (distributed=%s), schedule=%s, gradient reduction %s",
             cfg.parallel.distributed_optimizer, cfg.train.lr_schedule, overlap)
    return Runtime(cfg, tcfg, model, optimizer, scheduler)
