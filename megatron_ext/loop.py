"""The one training loop. Stages plug in a dataset and a forward_step; nothing else varies."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_ext import checkpoint, data, fault, moe_stats, stages
from megatron_ext.build import Runtime, build, gather_params
from megatron_ext.checkpoint import TrainState
from megatron_ext.config import Config
from megatron_ext.metrics import Metrics
from megatron_ext.pretrain import Stage

log = logging.getLogger(__name__)


LOSS_KEY = "lm loss"
"""The report every stage's loss_func returns: [loss sum, token (or sample) count]."""


def reduce_reports(reports: List[Dict[str, torch.Tensor]]) -> Dict[str, Optional[float]]:
    """Mean of every reported metric over micro-batches and the DP x CP group, known on every rank.

    A loss_func reports {name: [sum, count]} (the loss under LOSS_KEY, and whatever else the stage
    measures: accuracy, margins, rewards). Only the last pipeline stage has the reports, so the
    means are sent along the pipeline to the other stages (rank 0 logs them). A metric with no
    count in the batch is None.
    """
    means: Dict[str, Optional[float]] = {}
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        keys = sorted({k for report in reports for k in report})
        total = _device(torch.zeros(len(keys), 2, dtype=torch.float32))
        for report in reports:  # summed where they are: one copy to the host below, not one per report
            for i, key in enumerate(keys):
                if key in report:
                    total[i] += report[key].float().to(total.device)
        torch.distributed.all_reduce(total, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
        total = total.cpu()
        means = {k: (total[i, 0] / total[i, 1]).item() if total[i, 1] > 0 else None for i, k in enumerate(keys)}
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        box = [means]
        torch.distributed.broadcast_object_list(
            box, src=parallel_state.get_pipeline_model_parallel_last_rank(),
            group=parallel_state.get_pipeline_model_parallel_group(),
            device=torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None)
        means = box[0]
    return means


def _device(t: torch.Tensor) -> torch.Tensor:
    return t.cuda() if torch.cuda.is_available() else t


def _iterators(rt: Runtime, dataset, consumed_samples: int):
    """One iterator per model chunk: each virtual stage walks the same micro-batch stream."""
    its = [data.loader(dataset, rt.config, consumed_samples) for _ in rt.model]
    return its if len(its) > 1 else its[0]


def _forward_backward(rt: Runtime, forward_only: bool):
    """Megatron's schedule; for training with train.cuda_graph, inside its full-iteration CUDA
    graph wrapper (eager warm-up steps, then one capture, then a replay per step, each micro-batch
    copied into the graph's static input buffers first). Evaluation stays eager."""
    if forward_only or not rt.config.train.cuda_graph:
        return get_forward_backward_func()
    if rt.graphed_forward_backward is None:
        from megatron.core.full_cuda_graph import FullCudaGraphWrapper, StaticBufferLoader

        # The wrapper keeps its graph, step count and input buffers on the class: start afresh
        # for this runtime (a process may build more than one).
        FullCudaGraphWrapper.curr_iteration = {"training": 0, "validation": 0}
        FullCudaGraphWrapper.cuda_graph = {"training": None, "validation": None}
        FullCudaGraphWrapper.result = {"training": None, "validation": None}
        StaticBufferLoader.static_buffers = {"training": [], "validation": []}
        rt.graphed_forward_backward = FullCudaGraphWrapper(
            get_forward_backward_func(), cuda_graph_warmup_steps=rt.config.train.cuda_graph_warmup_steps)
    graphed = rt.graphed_forward_backward
    if graphed.curr_iter("training") == graphed.cuda_graph_warmup_steps and torch.cuda.is_available():
        torch.cuda.empty_cache()  # the capture allocates from a pool of its own: free the eager steps' cache
    return graphed


def _run(rt: Runtime, stage: Stage, iterators, forward_only: bool) -> List[dict]:
    cfg = rt.config
    dp = parallel_state.get_data_parallel_world_size()
    return _forward_backward(rt, forward_only)(
        forward_step_func=stage.forward_step,
        data_iterator=iterators,
        model=rt.model,
        num_microbatches=cfg.train.global_batch_size // (cfg.train.micro_batch_size * dp),
        seq_length=cfg.data.seq_length,
        micro_batch_size=cfg.train.micro_batch_size,
        forward_only=forward_only,
    )


def evaluate(rt: Runtime, stage: Stage, valid_ds, iters: int) -> Dict[str, Optional[float]]:
    """Mean validation metrics (`stage_metrics`) over `iters` global batches from the start of
    the validation split; "loss" is the validation loss."""
    for chunk in rt.model:
        chunk.eval()
    iterators = _iterators(rt, valid_ds, 0)
    reports = []
    with torch.no_grad():
        for _ in range(iters):
            reports += _run(rt, stage, iterators, forward_only=True)
    for chunk in rt.model:
        chunk.train()
    return stage_metrics(stage, reduce_reports(reports))


def stage_metrics(stage: Stage, means: Dict[str, Optional[float]]) -> Dict[str, Optional[float]]:
    """Reduced means -> the step's metrics: the loss as "loss", the stage's own metrics by name,
    plus what the stage's optional `derive_metrics(means)` hook computes from them (e.g. an F1)."""
    means = dict(means)
    out = {"loss": means.pop(LOSS_KEY, None), **means}
    derive = getattr(stage, "derive_metrics", None)
    return derive(out) if derive is not None else out


def _benchmark(cfg: Config):
    """The evaluation of `eval.train_tasks` built by `eval.train_hook`, or None when there are none."""
    if not cfg.eval.train_tasks:
        return None
    return stages.resolve(cfg.eval.train_hook, "eval.train_hook")(cfg)


@dataclass
class TrainResult:
    history: List[Dict[str, float]]
    """Per-step metrics of the steps run by this call, the same on every rank."""
    runtime: Runtime
    state: TrainState


def _train_step(rt: Runtime, stage: Stage, iterators, state: TrainState) -> Optional[dict]:
    """Forward/backward over the global batch and one optimizer update (skipped if non-finite)."""
    t = rt.config.train
    before_step = getattr(stage, "before_step", None)
    if before_step is not None:
        before_step(rt, state)
    for chunk in rt.model:
        chunk.zero_grad_buffer()
    rt.optimizer.zero_grad()
    lr = rt.optimizer.param_groups[0]["lr"]
    reports = _run(rt, stage, iterators, forward_only=False)
    state.consumed_samples += t.global_batch_size
    problem = fault.non_finite(rt.model, reports, state.step + 1)
    if problem:
        if t.nan_policy == "stop" or state.skipped_steps >= t.max_skipped_steps:
            raise fault.NonFiniteError(f"{problem}; no parameter was updated (train.nan_policy={t.nan_policy}, "
                                       f"{state.skipped_steps} step(s) skipped before)")
        state.skipped_steps += 1
        log.warning("%s: step skipped (%d of at most %d)", problem, state.skipped_steps, t.max_skipped_steps)
        return None
    updated, grad_norm, _ = rt.optimizer.step()
    if updated:
        rt.scheduler.step(increment=1)
    return {**stage_metrics(stage, reduce_reports(reports)), "lr": lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan")}


def train(cfg: Config, stage: Stage) -> TrainResult:
    """Run (or resume) training up to cfg.train.steps optimizer steps."""
    watcher = fault.preemption_watcher()
    rt = build(cfg, customize=getattr(stage, "customize_model", None))
    t = cfg.train
    state = checkpoint.resume(rt)
    benchmark = _benchmark(cfg)
    valid_batches = t.eval_iters * (t.steps // t.eval_interval + 1) if t.eval_interval else 0
    train_ds, valid_ds = stage.datasets(cfg, t.steps * t.global_batch_size + t.max_skipped_steps * t.global_batch_size,
                                        valid_batches * t.global_batch_size)
    iterators = _iterators(rt, train_ds, state.consumed_samples)
    metrics, history, router_stats = Metrics(cfg, state.step), [], moe_stats.for_model(cfg, rt.model)
    loss_name = getattr(stage, "loss_name", "lm_loss")
    save_every = cfg.checkpoint.save_interval
    saver = checkpoint.Saver(cfg.checkpoint.async_save)
    try:
        while state.step < t.steps:
            start = time.time()
            record = _train_step(rt, stage, iterators, state)
            stage_fields = {k: v for k, v in (record or {}).items() if k not in ("loss", "lr", "grad_norm")}
            if router_stats is not None:
                stats = router_stats.collect()  # collective; also clears a skipped step's counts
                if record is not None:
                    record.update(stats)
            if record is None:
                continue
            state.step += 1
            record["tokens_per_s"] = t.global_batch_size * cfg.data.seq_length / (time.time() - start)
            history.append(record)
            metrics.log_step(state.step, {loss_name: record["loss"], **stage_fields, "lr": record["lr"],
                                          "grad_norm": record["grad_norm"], "tokens/s": round(record["tokens_per_s"], 1),
                                          **dict(moe_stats.log_fields(record))})
            if t.eval_interval and (state.step % t.eval_interval == 0 or state.step == t.steps):
                if valid_ds is not None:
                    valid = evaluate(rt, stage, valid_ds, t.eval_iters)
                    record.update({f"val_{k}": v for k, v in valid.items()})
                    metrics.log_eval(state.step, {f"val_{k}": v for k, v in valid.items()})
                if benchmark is not None:
                    metrics.log_eval(state.step, benchmark(rt))
            saver.finalize(blocking=False)  # commit an async save once every rank wrote it
            if watcher.requested():
                if cfg.checkpoint.dir:
                    saver.start(rt, state)
                saver.finalize()
                raise fault.Preempted()
            exiting = bool(t.exit_interval) and state.step % t.exit_interval == 0
            if cfg.checkpoint.dir and (exiting or (save_every and state.step % save_every == 0)) \
                    and state.step < t.steps:
                saver.start(rt, state)
            if exiting:
                break
        if cfg.checkpoint.dir and history and state.step == t.steps:
            saver.start(rt, state)
        saver.finalize()
        gather_params(rt.model)  # the caller gets the trained parameters
    finally:
        metrics.close()
    return TrainResult(history, rt, state)
