"""One forward-only pass through Megatron's pipeline schedule, for everything that runs the model
without training it: validation (`loop.evaluate`), generation (`megatron_ext.generation`),
reference and behaviour log-probs (DPO, GRPO) and `tools.logits`.

    reports = forward_only(chunks, step, batches, seq_length=s, micro_batch_size=b)
    reports = forward_only(chunks, step, iterators=its, count=n, seq_length=s, micro_batch_size=b)

`step(data_iterator, model) -> (output, loss_func or None)` is Megatron's forward step (a stage's
`forward_step` as it is). The micro-batches are a sequence (every model chunk walks it), or an
iterator per model chunk with their `count` (one iterator without virtual stages). The pass runs
under `torch.no_grad()` at any TP / SP / PP / VPP layout and returns, on the last pipeline
stage, one entry per micro-batch: the loss function's report where `step` returns one, the raw
output where it returns None; other stages get an empty list.

Virtual pipeline stages (several chunks per rank): Megatron's interleaved schedule runs only a
multiple of the pipeline size of micro-batches (`micro_batch_multiple`); the pass fills up by
repeating the last micro-batch and drops what the repeats return.

Also here: `eval_mode(chunks)` (eval mode inside, each chunk's previous mode restored after,
also on an exception) and `share_from_last_stage(value)` (what the last pipeline stage holds,
on every stage of the pipeline group).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, List, Optional, Sequence

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func


def micro_batch_multiple(chunks: Sequence[torch.nn.Module]) -> int:
    """What the number of micro-batches of one pass must be a multiple of: the pipeline size
    under virtual pipeline stages (several chunks per rank), else 1."""
    return parallel_state.get_pipeline_model_parallel_world_size() if len(chunks) > 1 else 1


def _padded(it: Iterator, count: int, extra: int) -> Iterator:
    """`count` items of `it` (never more), then the last of them `extra` more times."""
    last = None
    for _ in range(count):
        last = next(it)
        yield last
    for _ in range(extra):
        yield last


def _chunk_iterators(chunks, batches, iterators, count) -> tuple:
    """(one iterator per chunk, micro-batches read from each) from the caller's form."""
    if (batches is None) == (iterators is None):
        raise ValueError("forward_only: give the micro-batches as `batches` or as `iterators` with `count`")
    if batches is not None:
        return [iter(batches) for _ in chunks], len(batches)
    its = list(iterators) if isinstance(iterators, (list, tuple)) else [iterators]
    if len(its) != len(chunks):
        raise ValueError(f"forward_only: {len(its)} iterator(s) for {len(chunks)} model chunk(s); "
                         "virtual pipeline stages need one iterator per chunk")
    if count is None:
        raise ValueError("forward_only: `iterators` need `count`, the micro-batches to read from each")
    return its, count


def forward_only(chunks: Sequence[torch.nn.Module], step: Callable, batches: Optional[Sequence] = None, *,
                 iterators=None, count: Optional[int] = None, seq_length: int, micro_batch_size: int) -> List[Any]:
    """Run `step` over the micro-batches through the pipeline schedule (see the module doc).

    `seq_length` and `micro_batch_size` are each micro-batch's shape: the schedule sizes the
    activations it sends between pipeline stages from them."""
    chunks = list(chunks)
    its, count = _chunk_iterators(chunks, batches, iterators, count)
    if count < 1:
        raise ValueError(f"forward_only: need at least one micro-batch, got {count}")
    extra = -count % micro_batch_multiple(chunks)
    its = [_padded(it, count, extra) for it in its]
    with torch.no_grad():
        outputs = get_forward_backward_func()(
            forward_step_func=step, data_iterator=its if len(its) > 1 else its[0], model=chunks,
            num_microbatches=count + extra, seq_length=seq_length, micro_batch_size=micro_batch_size,
            forward_only=True)
    return list(outputs)[:count]


@contextlib.contextmanager
def eval_mode(chunks: Sequence[torch.nn.Module]):
    """Chunks in eval mode inside the block; each gets its previous mode back after it."""
    modes = [c.training for c in chunks]
    for c in chunks:
        c.eval()
    try:
        yield
    finally:
        for c, mode in zip(chunks, modes):
            c.train(mode)


def frozen(chunks: Sequence[torch.nn.Module]) -> Sequence[torch.nn.Module]:
    """Chunks of a model that only runs forward (a reference or reward model): eval mode, no
    gradients."""
    for chunk in chunks:
        chunk.eval()
        for p in chunk.parameters():
            p.requires_grad_(False)
    return chunks


def _comm_device(device: Optional[torch.device]) -> Optional[torch.device]:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None


def share_from_last_stage(value, device: Optional[torch.device] = None):
    """`value` as the last pipeline stage of this rank's pipeline group has it, on every stage
    (as given without pipeline parallelism). Collective over the pipeline group.

    A tensor must have the same shape and dtype on every stage (only the last stage's content
    counts); it travels on `device` (default: the current CUDA device where there is one, as
    NCCL needs) and comes back on the device it was given on. Anything else is pickled and
    needs no placeholder's shape (other stages may pass None)."""
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return value
    src = parallel_state.get_pipeline_model_parallel_last_rank()
    group = parallel_state.get_pipeline_model_parallel_group()
    device = _comm_device(device)
    if isinstance(value, torch.Tensor):
        buf = value.detach().to(device or value.device, copy=True).contiguous()
        torch.distributed.broadcast(buf, src=src, group=group)
        return buf.to(value.device)
    box = [value]
    torch.distributed.broadcast_object_list(box, src=src, group=group, device=device)
    return box[0]
