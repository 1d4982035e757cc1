"""The one training loop. Stages plug in a dataset and a forward_step; nothing else varies."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_ext import data
from megatron_ext.build import Runtime, build
from megatron_ext.config import Config
from megatron_ext.metrics import Metrics
from megatron_ext.pretrain import Stage


def reduce_report(reports: List[Dict[str, torch.Tensor]], key: str = "lm loss") -> Optional[float]:
    """Token-weighted mean of `key` over micro-batches and the DP x CP group, known on every rank.

    Each report holds [loss sum, token count]; only the last pipeline stage has them, so the
    result is broadcast along the pipeline to the other stages (rank 0 logs it).
    """
    total = torch.zeros(2, dtype=torch.float32)
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        for report in reports:
            total += report[key].float().cpu()
        dp_cp = parallel_state.get_data_parallel_group(with_context_parallel=True)
        total = _device(total)
        torch.distributed.all_reduce(total, group=dp_cp)
    total = _device(total)
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        torch.distributed.broadcast(total, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                                    group=parallel_state.get_pipeline_model_parallel_group())
    total = total.cpu()
    return (total[0] / total[1]).item() if total[1] > 0 else None


def _device(t: torch.Tensor) -> torch.Tensor:
    return t.cuda() if torch.cuda.is_available() else t


def _iterators(rt: Runtime, dataset, consumed_samples: int):
    """One iterator per model chunk: each virtual stage walks the same micro-batch stream."""
    its = [data.loader(dataset, rt.config, consumed_samples) for _ in rt.model]
    return its if len(its) > 1 else its[0]


def _run(rt: Runtime, stage: Stage, iterators, forward_only: bool) -> List[dict]:
    cfg = rt.config
    dp = parallel_state.get_data_parallel_world_size()
    return get_forward_backward_func()(
        forward_step_func=stage.forward_step,
        data_iterator=iterators,
        model=rt.model,
        num_microbatches=cfg.train.global_batch_size // (cfg.train.micro_batch_size * dp),
        seq_length=cfg.data.seq_length,
        micro_batch_size=cfg.train.micro_batch_size,
        forward_only=forward_only,
    )


def evaluate(rt: Runtime, stage: Stage, valid_ds, iters: int) -> Optional[float]:
    """Mean validation loss over `iters` global batches from the start of the validation split."""
    for chunk in rt.model:
        chunk.eval()
    iterators = _iterators(rt, valid_ds, 0)
    reports = []
    with torch.no_grad():
        for _ in range(iters):
            reports += _run(rt, stage, iterators, forward_only=True)
    for chunk in rt.model:
        chunk.train()
    return reduce_report(reports)


@dataclass
class TrainResult:
    history: List[Dict[str, float]]
    """Per-step metrics, the same on every rank."""
    runtime: Runtime


def train(cfg: Config, stage: Stage) -> TrainResult:
    """Run cfg.train.steps optimizer steps."""
    rt = build(cfg)
    t = cfg.train
    valid_batches = t.eval_iters * (t.steps // t.eval_interval + 1) if t.eval_interval else 0
    train_ds, valid_ds = stage.datasets(cfg, t.steps * t.global_batch_size,
                                        valid_batches * t.global_batch_size)
    iterators = _iterators(rt, train_ds, consumed_samples=0)
    metrics = Metrics(cfg)
    history = []
    tokens_per_step = t.global_batch_size * cfg.data.seq_length
    for step in range(1, t.steps + 1):
        start = time.time()
        for chunk in rt.model:
            chunk.zero_grad_buffer()
        rt.optimizer.zero_grad()
        lr = rt.optimizer.param_groups[0]["lr"]
        reports = _run(rt, stage, iterators, forward_only=False)
        updated, grad_norm, _ = rt.optimizer.step()
        if updated:
            rt.scheduler.step(increment=1)
        loss = reduce_report(reports)
        elapsed = time.time() - start
        record = {"loss": loss, "lr": lr,
                  "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                  "tokens_per_s": tokens_per_step / elapsed}
        history.append(record)
        metrics.log_step(step, {"lm_loss": loss, "lr": record["lr"], "grad_norm": record["grad_norm"],
                                "tokens/s": round(record["tokens_per_s"], 1)})
        if t.eval_interval and (step % t.eval_interval == 0 or step == t.steps) and valid_ds is not None:
            record["val_loss"] = evaluate(rt, stage, valid_ds, t.eval_iters)
            metrics.log_eval(step, {"val_loss": record["val_loss"]})
    metrics.close()
    return TrainResult(history, rt)
