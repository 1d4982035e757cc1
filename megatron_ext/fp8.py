"""FP8 GEMMs without Transformer Engine: torchao's float8 tensors in Megatron's own linear path.

With `precision.fp8_backend` resolved to torchao (megatron_ext.precision), the column- and
row-parallel linear layers of the decoder (attention QKV and output projection, the dense MLP,
MoE shared experts) run their three GEMMs in FP8: forward `input @ weight.T`, backward
`grad_output @ weight` and `grad_output.T @ input`, each operand cast with a dynamic scale from
its current amax (torchao's `hp_tensor_and_scale_to_float8`; `torch._scaled_mm` on sm89+ GPUs,
an fp32 emulation where `precision.fp8_emulate` is set). The routed experts' grouped GEMMs, the
MoE router, the embedding and the output layer stay in the parameters' dtype, as with TE.

Recipes (`RECIPES`):
- `fp8_current` (tensorwise): one scale per tensor; E4M3 forward, E5M2 gradients (`hybrid`,
  or E4M3 with precision.fp8_format=e4m3). The weight's FP8 copy serves both of its GEMMs and
  is cast once per optimizer step (micro-batches and the backward pass reuse it); the input is
  kept in FP8 for the weight-gradient GEMM, which halves what a layer saves for the backward.
- `fp8_rowwise` (axiswise): one scale per row of each GEMM operand along its reduction
  dimension, power-of-two scales, E4M3 throughout (torchao's `rowwise` recipe). Each operand is
  cast per GEMM (the weight along both of its dimensions), so nothing is cached.

Tensor and sequence parallelism: the layers' communication is Megatron's own autograd mappings
around the FP8 function (the sequence-parallel all-gather / reduce-scatter, the input-gradient
all-reduce). A scale over a dimension that tensor parallelism splits (the weight of either
layer, the input of a row-parallel layer, the output gradient of a column-parallel one) is
taken from the amax all-reduced over the TP group, so every rank quantizes exactly as one
process holding the whole tensor would, and TP=N trains like TP=1.

The dispatch is installed with the other Megatron-Core patches (megatron_ext.patches.fp8_linear):
a linear call whose weight carries `fp8_recipe` (set by `convert`) takes this path. FP8 weight
all-gather for the distributed optimizer is not implemented (the weights are gathered in their
own dtype).
"""

from __future__ import annotations

import functools
import logging
import weakref
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recipe:
    """How the operands of the three GEMMs are cast."""

    name: str
    rowwise: bool
    """False: one scale per tensor; True: one per row along the GEMM's reduction dimension."""
    grad_dtype: torch.dtype
    power_of_2_scales: bool
    emulate: bool

    @property
    def forward_dtype(self) -> torch.dtype:
        return torch.float8_e4m3fn


RECIPES = {"fp8_current": "tensorwise", "fp8_rowwise": "rowwise"}
"""precision.name -> torchao recipe it follows (the others need Transformer Engine)."""
DEFAULT_FORMATS = {"fp8_current": "hybrid", "fp8_rowwise": "e4m3"}
ALIGNMENT = 16
"""torch._scaled_mm needs both weight dimensions to be multiples of 16."""


def make_recipe(name: str, fp8_format: Optional[str], emulate: bool) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"precision.name={name} has no torchao recipe (torchao runs {tuple(RECIPES)})")
    fmt = fp8_format or DEFAULT_FORMATS[name]
    grad = torch.float8_e5m2 if fmt == "hybrid" else torch.float8_e4m3fn
    rowwise = RECIPES[name] == "rowwise"
    return Recipe(name, rowwise=rowwise, grad_dtype=grad, power_of_2_scales=rowwise, emulate=emulate)


def _mm_config(emulate: bool):
    from torchao.float8.float8_training_tensor import LinearMMConfig, ScaledMMConfig

    # fast accumulation in the forward GEMM only, as torchao's recipes; no inner-dim padding
    return LinearMMConfig(ScaledMMConfig(emulate, True, False, False), ScaledMMConfig(emulate, False, False, False),
                          ScaledMMConfig(emulate, False, False, False))


@dataclass(frozen=True)
class _Layer:
    """What one call needs besides its tensors: the recipe, the layer's TP split, the group."""

    recipe: Recipe
    row_parallel: bool
    tp_group: Optional[object]
    tp_size: int


def _amax(t: torch.Tensor, axis: Optional[int]) -> torch.Tensor:
    return t.abs().amax() if axis is None else t.abs().amax(dim=axis, keepdim=True)


def _quantize(t: torch.Tensor, amax: torch.Tensor, dtype: torch.dtype, power_of_2: bool):
    """(FP8 bits, scale) of `t` for its `amax`: torchao's scale and saturated cast."""
    from torchao.float8.float8_utils import amax_to_scale, to_fp8_saturated

    scale = amax_to_scale(amax, dtype, round_scales_to_power_of_2=power_of_2)
    return to_fp8_saturated(t.to(torch.float32) * scale, dtype), scale


_compiled = {}


def _on_device(fn, t: torch.Tensor, *static):
    """`fn` with its non-tensor arguments `static` bound, compiled for CUDA tensors (one kernel,
    no full-size temporaries), as the project's other fusions; eager elsewhere and with
    TORCH_COMPILE_DISABLE=1. One compiled function per `static`, so that only shapes make it
    recompile (TorchDynamo's default: static, then dynamic in a dimension seen to change)."""
    import torch._dynamo

    bound = functools.partial(fn, **dict(static))
    if not t.is_cuda or torch._dynamo.config.disable:
        return bound
    key = (fn, static)
    if key not in _compiled:
        _compiled[key] = torch.compile(bound)
    return _compiled[key]


def _to_float8(t: torch.Tensor, dtype, layer: _Layer, role, axis: Optional[int], split_dim: Optional[int]):
    """`t` cast to a torchao Float8TrainingTensor scaled by its amax (over the whole tensor, or
    along `axis`); all-reduced over the TP group where the amax spans `split_dim`, the dimension
    tensor parallelism splits (None: not split)."""
    from torchao.float8.float8_training_tensor import Float8TrainingTensor

    t = t.detach()
    amax = _on_device(_amax, t, ("axis", axis))(t)
    if split_dim is not None and (axis is None or axis % t.dim() == split_dim % t.dim()) and layer.tp_size > 1:
        amax = amax.float()
        torch.distributed.all_reduce(amax, op=torch.distributed.ReduceOp.MAX, group=layer.tp_group)
    bits, scale = _on_device(_quantize, t, ("dtype", dtype), ("power_of_2", layer.recipe.power_of_2_scales))(t, amax)
    return Float8TrainingTensor(bits, scale, t.dtype, _mm_config(layer.recipe.emulate), role, axis)


def _roles():
    from torchao.float8.float8_training_tensor import GemmInputRole

    return GemmInputRole.INPUT, GemmInputRole.WEIGHT, GemmInputRole.GRAD_OUTPUT


class WeightCasts:
    """The tensorwise FP8 copy of each weight, made once per optimizer step (`new_step` drops
    them) and at any change of the weight's storage or version (a load, an in-place update)."""

    def __init__(self):
        self.generation = 0
        self._casts: Dict[int, tuple] = {}

    def new_step(self) -> None:
        self.generation += 1
        self._casts.clear()

    def get(self, weight: torch.Tensor, layer: _Layer):
        key = (self.generation, weight.data_ptr(), weight._version, weight.dtype)
        hit = self._casts.get(id(weight))
        if hit is not None and hit[0] == key and hit[2]() is weight:
            return hit[1]
        _, weight_role, _ = _roles()
        split = 1 if layer.row_parallel else 0
        w8 = _to_float8(weight, layer.recipe.forward_dtype, layer, weight_role, None, split)
        self._casts[id(weight)] = (key, w8, weakref.ref(weight))  # the id of a freed weight may return
        return w8


CASTS = WeightCasts()


def _meta(t) -> tuple:
    return t._orig_dtype, t._linear_mm_config, t._gemm_input_role, t._axiswise_dim


def _rebuild(data: torch.Tensor, scale: torch.Tensor, meta: tuple):
    from torchao.float8.float8_training_tensor import Float8TrainingTensor

    return Float8TrainingTensor(data, scale, *meta)


class _Float8Linear(torch.autograd.Function):
    """`input @ weight.T` with the three GEMMs in FP8 (input [tokens, K], weight [N, K])."""

    @staticmethod
    def forward(ctx, input, weight, layer: _Layer):
        x_role, w_role, _ = _roles()
        r = layer.recipe
        x_split = 1 if layer.row_parallel else None
        w_split = 1 if layer.row_parallel else 0
        if r.rowwise:
            x8 = _to_float8(input, r.forward_dtype, layer, x_role, -1, x_split)
            w8 = _to_float8(weight, r.forward_dtype, layer, w_role, -1, w_split)
            ctx.save_for_backward(input, weight)
        else:
            x8 = _to_float8(input, r.forward_dtype, layer, x_role, None, x_split)
            w8 = CASTS.get(weight, layer)
            ctx.save_for_backward(x8._data, x8._scale, w8._data, w8._scale)
            ctx.meta = (_meta(x8), _meta(w8))  # rebuilt around the saved data in backward
        ctx.layer = layer
        return torch.mm(x8, w8.t())

    @staticmethod
    def backward(ctx, grad_output):
        layer, r = ctx.layer, ctx.layer.recipe
        x_role, w_role, g_role = _roles()
        g_split = None if layer.row_parallel else 1
        grad_output = grad_output.contiguous()
        if r.rowwise:
            input, weight = ctx.saved_tensors
            w_split = 1 if layer.row_parallel else 0
            g8 = _to_float8(grad_output, r.grad_dtype, layer, g_role, -1, g_split)
            w8 = _to_float8(weight, r.forward_dtype, layer, w_role, 0, w_split)
            grad_input = torch.mm(g8, w8)
            g8 = _to_float8(grad_output, r.grad_dtype, layer, g_role, 0, None)
            x8 = _to_float8(input, r.forward_dtype, layer, x_role, 0, None)
        else:
            x_data, x_scale, w_data, w_scale = ctx.saved_tensors
            x8, w8 = _rebuild(x_data, x_scale, ctx.meta[0]), _rebuild(w_data, w_scale, ctx.meta[1])
            g8 = _to_float8(grad_output, r.grad_dtype, layer, g_role, None, g_split)
            grad_input = torch.mm(g8, w8)
        grad_weight = torch.mm(g8.t(), x8)
        return grad_input, grad_weight, None


def linear(input, weight, bias, gradient_accumulation_fusion, allreduce_dgrad, sequence_parallel,
           grad_output_buffer=None, wgrad_deferral_limit=0, async_grad_allreduce=None, tp_group=None):
    """Megatron's `linear_with_grad_accumulation_and_async_allreduce` with FP8 GEMMs, for a weight
    marked by `convert`. The weight gradient goes to `weight.grad`, which Megatron DDP's hook
    adds to `main_grad` (with or without gradient accumulation fusion)."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import mappings

    if grad_output_buffer is not None:
        raise NotImplementedError("FP8 linear layers do not defer weight gradients (defer_embedding_wgrad_compute)")
    distributed = torch.distributed.is_initialized()
    group = tp_group if tp_group is not None or not distributed else parallel_state.get_tensor_model_parallel_group()
    allreduce_dgrad = allreduce_dgrad if async_grad_allreduce is None else async_grad_allreduce
    if sequence_parallel:
        input = mappings.gather_from_sequence_parallel_region(input, tensor_parallel_output_grad=True, group=group)
    elif allreduce_dgrad:
        input = mappings.copy_to_tensor_model_parallel_region(input, group=group)
    layer = _Layer(weight.fp8_recipe, getattr(weight, "partition_dim", 0) == 1, group,
                   torch.distributed.get_world_size(group) if distributed else 1)
    shape = input.shape
    output = _Float8Linear.apply(input.reshape(-1, shape[-1]), weight, layer).view(*shape[:-1], weight.shape[0])
    return output if bias is None else output + bias


def fp8_layers(chunk: torch.nn.Module) -> List[Tuple[str, torch.nn.Module]]:
    """The linear layers of a model chunk that run in FP8: every column- and row-parallel layer
    of the decoder except the routed experts'."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    linear = (ColumnParallelLinear, RowParallelLinear)
    return [(name, m) for name, m in chunk.named_modules()
            if isinstance(m, linear) and name.startswith(("decoder.", "module.decoder."))
            and ".experts." not in name and getattr(m, "weight", None) is not None]


def weight_shapes(cfg) -> Dict[str, Tuple[int, int]]:
    """Per-rank [out, in] shapes of the FP8 layers' weights a config builds (tensor parallelism
    splits column-parallel outputs and row-parallel inputs), by layer name."""
    m, tp = cfg.model, cfg.parallel.tp
    q = m.num_attention_heads * m.kv_channels
    shapes = {"linear_qkv": ((q + 2 * m.num_query_groups * m.kv_channels) // tp, m.hidden_size),
              "linear_proj": (m.hidden_size, q // tp)}
    mlps = {}
    if not m.is_moe or (m.moe_layer_freq is not None and 0 in m.moe_layer_freq):
        mlps["mlp"] = m.ffn_hidden_size
    if m.is_moe and m.moe_shared_expert_intermediate_size:
        mlps["shared_experts"] = m.moe_shared_expert_intermediate_size
    for name, ffn in mlps.items():  # gated: fc1 holds the gate and the up projection
        shapes[f"{name}.linear_fc1"] = (2 * ffn // tp, m.hidden_size)
        shapes[f"{name}.linear_fc2"] = (m.hidden_size, ffn // tp)
    return shapes


def unaligned_weights(cfg) -> List[str]:
    """The FP8 layers whose weights the FP8 kernels cannot take (they stay in BF16)."""
    return [f"{name} {shape}" for name, shape in weight_shapes(cfg).items() if any(d % ALIGNMENT for d in shape)]


def convert(chunks: List[torch.nn.Module], recipe: Recipe) -> int:
    """Mark the FP8 layers' weights with `recipe` (the linear path reads it); layers whose
    weight dimensions the FP8 kernels cannot take stay in the parameters' dtype. Returns the
    number of FP8 layers."""
    n, kept = 0, []
    for chunk in chunks:
        for name, module in fp8_layers(chunk):
            if convert_weight(module.weight, recipe):
                n += 1
            else:
                kept.append(f"{name} {tuple(module.weight.shape)}")
    if kept:
        log.warning("FP8: %d layers keep their dtype (weight dimensions not multiples of %d): %s",
                    len(kept), ALIGNMENT, ", ".join(kept))
    log.info("FP8 (torchao, %s%s): %d linear layers", recipe.name, ", emulated" if recipe.emulate else "", n)
    return n


def convert_weight(weight: torch.Tensor, recipe: Recipe) -> bool:
    """Mark one linear layer's weight [out, in] for FP8 GEMMs; False where the FP8 kernels cannot
    take its shape (emulation takes any)."""
    if not (recipe.emulate or all(d % ALIGNMENT == 0 for d in weight.shape)):
        return False
    weight.fp8_recipe = recipe
    return True


def new_step_after(optimizer) -> None:
    """Drop the cached weight casts whenever `optimizer` steps (the weights change)."""
    step = optimizer.step

    def step_and_drop_casts(*args, **kwargs):
        try:
            return step(*args, **kwargs)
        finally:
            CASTS.new_step()

    optimizer.step = step_and_drop_casts
