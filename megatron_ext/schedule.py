"""One global batch through Megatron-Core's pipeline schedule, for training or validation.

The loop (`megatron_ext.loop`) and the validation callback share these: the micro-batch
iterators (one per virtual-pipeline chunk), the schedule call (in a CUDA graph under
train.cuda_graph), and the reduction of the stage's reports to the step's metrics.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_ext import data
from megatron_ext.build import Runtime
from megatron_ext.forward import eval_mode, forward_only, share_from_last_stage
from megatron_ext.layout import Layout
from megatron_ext.stages import LOSS, Stage


def report(pairs: Dict[str, tuple]) -> Dict[str, torch.Tensor]:
    """A loss_func report: {name: tensor([sum, count])} from {name: (sum, count)}.

    Kept on the device of the sum: a host copy here would stall the GPU after every micro-batch;
    the loop copies the summed reports to the host once per step (`reduce_reports`). A count
    is a tensor or a Python number (filled on the device, not copied there)."""
    out = {}
    for k, (s, c) in pairs.items():
        s = s.detach().float().reshape(())
        c = c.detach().to(s.device, torch.float32).reshape(()) if torch.is_tensor(c) else \
            torch.full((), float(c), device=s.device)
        out[k] = torch.stack([s, c])
    return out


def reduce_reports(reports: List[Dict[str, torch.Tensor]]) -> Dict[str, Optional[float]]:
    """Mean of every reported metric over micro-batches and the DP x CP group, known on every rank.

    A loss_func reports {name: [sum, count]} (the loss under stages.LOSS, and whatever else the stage
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
    return share_from_last_stage(means)


def _device(t: torch.Tensor) -> torch.Tensor:
    return t.cuda() if torch.cuda.is_available() else t


def iterators(rt: Runtime, dataset, consumed_samples: int):
    """One iterator per model chunk: each virtual stage walks the same micro-batch stream."""
    its = [data.loader(dataset, rt.config, consumed_samples) for _ in rt.model]
    return its if len(its) > 1 else its[0]


def forward_backward_func(rt: Runtime, forward_only: bool):
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


def run_global_batch(rt: Runtime, stage: Stage, iterators, forward_only: bool) -> List[dict]:
    cfg = rt.config
    return forward_backward_func(rt, forward_only)(
        forward_step_func=stage.forward_step,
        data_iterator=iterators,
        model=rt.model,
        num_microbatches=Layout.of(cfg, torch.distributed.get_world_size()).microbatches,
        seq_length=cfg.data.seq_length,
        micro_batch_size=cfg.train.micro_batch_size,
        forward_only=forward_only,
    )


def evaluate(rt: Runtime, stage: Stage, valid_ds, iters: int) -> Dict[str, Optional[float]]:
    """Mean validation metrics (`stage_metrics`) over `iters` global batches from the start of
    the validation split; "loss" is the validation loss. The one forward-only pass, in eval mode."""
    cfg = rt.config
    its = iterators(rt, valid_ds, 0)
    count = Layout.of(cfg, torch.distributed.get_world_size()).microbatches
    reports = []
    with eval_mode(rt.model):
        for _ in range(iters):
            reports += forward_only(rt.model, stage.forward_step, iterators=its, count=count,
                                    seq_length=cfg.data.seq_length, micro_batch_size=cfg.train.micro_batch_size)
    return stage_metrics(stage, reduce_reports(reports))


def stage_metrics(stage: Stage, means: Dict[str, Optional[float]]) -> Dict[str, Optional[float]]:
    """Reduced means -> the step's metrics: the loss first (under stages.LOSS), the stage's own
    metrics by name, plus what the stage's `derive_metrics(means)` hook computes from them."""
    means = dict(means)
    return stage.derive_metrics({LOSS: means.pop(LOSS, None), **means})
