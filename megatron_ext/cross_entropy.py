"""Vocabulary-parallel cross-entropy that never holds the logits in fp32 all at once.

Megatron-Core's unfused loss (`tensor_parallel.vocab_parallel_cross_entropy`) copies the
[s, b, V/tp] logits to fp32 and keeps the fp32 softmax for the backward pass: for a Qwen
vocabulary (152k) at 4096 tokens that is 2.5 GB written and read several times per
micro-batch, next to the 1.2 GB bf16 logits, and 20 GB at 32k tokens. Here the forward pass
reads the logits in their own dtype, a block of rows at a time in fp32 (max, then the sum of
exponentials), and keeps only the logits and one fp32 log-sum-exp per token for the backward
pass, which recomputes the softmax block by block and writes the gradient in the logits' dtype.
Same math as Megatron's (max-shifted log-sum-exp, the target logit from the rank that holds
it, both reduced over the tensor-parallel group), so fp32 results agree to rounding.

On a GPU the two passes over the logits (sum of exponentials; softmax minus one-hot times the
incoming gradient) are each one compiled kernel over all rows (`torch.compile`): they read the
logits once in their own dtype and never write fp32 copies, instead of the cast, subtract,
exp, sum / scatter, multiply and cast kernels per block that eager PyTorch runs. Elsewhere the
same arithmetic runs eagerly a block of rows at a time, in place in one fp32 buffer per block
(`_sum_exp_eager`, `_logit_grad_eager`: the same operations in the same order, so bit-equal to
the functions compiled on GPUs; about 3x faster on a CPU than the out-of-place expressions,
which write five fresh [rows, V] tensors per block).

`GPTModel` is Megatron's GPTModel with this loss; Transformer Engine's fused loss is used
instead when the config asks for it (`cross_entropy_loss_fusion`).
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel as MegatronGPTModel

BLOCK_ELEMENTS = 1 << 26
"""fp32 elements (256 MiB) of the logits processed at once."""


def _blocks(rows: int, vocab: int):
    step = max(1, BLOCK_ELEMENTS // vocab)
    return ((start, min(start + step, rows)) for start in range(0, rows, step))


def _sum_exp(logits: torch.Tensor, row_max: torch.Tensor) -> torch.Tensor:
    """sum_v exp(logit - row max) per row, in fp32: [n, V], [n] -> [n]."""
    return (logits.float() - row_max[:, None]).exp().sum(dim=-1)


def _logit_grad(logits: torch.Tensor, log_sum_exp: torch.Tensor, index: torch.Tensor, held: torch.Tensor,
                grad_rows: torch.Tensor) -> torch.Tensor:
    """(softmax - one-hot of the target where this rank holds it) * incoming gradient, in the
    logits' dtype: [n, V] -> [n, V]."""
    softmax = (logits.float() - log_sum_exp[:, None]).exp()
    columns = torch.arange(logits.shape[-1], device=logits.device)
    one_hot = ((columns[None, :] == index[:, None]) & held[:, None]).float()
    return ((softmax - one_hot) * grad_rows[:, None]).to(logits.dtype)


def _sum_exp_eager(logits: torch.Tensor, row_max: torch.Tensor) -> torch.Tensor:
    """_sum_exp with one fp32 temporary (the fp32 row max promotes the subtraction), exponentiated
    in place."""
    return logits.sub(row_max[:, None]).exp_().sum(dim=-1)


def _logit_grad_eager(logits: torch.Tensor, log_sum_exp: torch.Tensor, index: torch.Tensor, held: torch.Tensor,
                      grad_rows: torch.Tensor) -> torch.Tensor:
    """_logit_grad in one fp32 buffer: softmax in place, -1 added at the held target (-0 where
    the target is elsewhere: x + -0 == x - 0 == x), times the incoming gradient."""
    grad = logits.sub(log_sum_exp[:, None]).exp_()
    grad.scatter_add_(1, index[:, None], held.float().neg_()[:, None])
    return grad.mul_(grad_rows[:, None]).to(logits.dtype)


_EAGER = {_sum_exp: _sum_exp_eager, _logit_grad: _logit_grad_eager}
_compiled = {}


def _rowwise(fn, logits: torch.Tensor, *row_args: torch.Tensor) -> torch.Tensor:
    """fn over all rows of `logits`: compiled, in one call, on a GPU; eager elsewhere (or with
    TORCH_COMPILE_DISABLE=1), its in-place form a block of rows at a time (row_args: per-row
    tensors, sliced along; a single block is returned as it is, not copied)."""
    import torch._dynamo

    if logits.is_cuda and not torch._dynamo.config.disable:
        if fn not in _compiled:
            # Shapes static at first (TorchDynamo's default), so the vocabulary size is a constant
            # in the kernel's index arithmetic; only a dimension seen to change (rows) becomes
            # dynamic. (With dynamic=True every element's column index is a division by a runtime
            # vocabulary size; the gradient kernel then took 2.1 ms per 4096 x 152k micro-batch on
            # an H200, where its memory traffic needs about 0.5 ms.)
            _compiled[fn] = torch.compile(fn)
        return _compiled[fn](logits, *row_args)
    fn, rows, out = _EAGER[fn], logits.shape[0], None
    for a, b in _blocks(rows, logits.shape[-1]):
        block = fn(logits[a:b], *(t[a:b] for t in row_args))
        if b - a == rows:
            return block
        if out is None:
            out = block.new_empty((logits.shape[0], *block.shape[1:]))
        out[a:b] = block
    return out


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, group):
        vocab = logits.shape[-1]
        flat, tgt = logits.reshape(-1, vocab), target.reshape(-1)
        first = group.rank() * vocab if group is not None else 0
        held = (tgt >= first) & (tgt < first + vocab)
        index = (tgt - first).clamp(0, vocab - 1)
        target_logit = flat.gather(1, index[:, None]).squeeze(1).float() * held
        row_max = flat.amax(dim=-1).float()  # values only: max(dim) also finds the indices (4x the time on CPU)
        if group is not None and group.size() > 1:
            torch.distributed.all_reduce(row_max, op=torch.distributed.ReduceOp.MAX, group=group)
        sum_exp = _rowwise(_sum_exp, flat, row_max)
        reduced = torch.stack([target_logit, sum_exp])
        if group is not None and group.size() > 1:
            torch.distributed.all_reduce(reduced, group=group)
        log_sum_exp = reduced[1].log_() + row_max
        ctx.save_for_backward(logits, index, held, log_sum_exp)
        return (log_sum_exp - reduced[0]).view(target.shape)

    @staticmethod
    def backward(ctx, grad_loss):
        logits, index, held, log_sum_exp = ctx.saved_tensors
        flat = logits.reshape(-1, logits.shape[-1])
        grad = _rowwise(_logit_grad, flat, log_sum_exp, index, held, grad_loss.reshape(-1).float())
        return grad.view_as(logits), None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, group=None) -> torch.Tensor:
    """Per-token loss [s, b] of logits [s, b, V/tp] split over `group` (default: the TP group)."""
    if group is None and parallel_state.model_parallel_is_initialized():
        group = parallel_state.get_tensor_model_parallel_group()
    return _VocabParallelCrossEntropy.apply(logits, target, group)


class GPTModel(MegatronGPTModel):
    """Megatron-Core's GPTModel whose language-model loss is the blockwise cross-entropy above."""

    def compute_language_model_loss(self, labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if self.config.cross_entropy_loss_fusion:
            return super().compute_language_model_loss(labels, logits)
        loss = vocab_parallel_cross_entropy(logits, labels.transpose(0, 1).contiguous(), self.pg_collection.tp)
        return loss.transpose(0, 1).contiguous()
