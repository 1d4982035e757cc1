"""Routed experts as grouped GEMMs on Megatron's local (non-Transformer-Engine) spec.

Megatron's local `SequentialMLP` runs the experts one after another: two matmuls per expert
and layer, each with its own kernel launches and host work, so a 128-expert model is bound by
the host on a GPU. `GroupedExperts` keeps each projection of all local experts in one stacked
weight and runs it as one `torch._grouped_mm` over the tokens the dispatcher grouped by
expert: two GEMMs per layer in the forward pass (four in the backward), whatever the number
of experts, and no copy of the weights per step.

It is a drop-in for SequentialMLP:
- the same forward contract (tokens sorted by local expert, `tokens_per_expert` counts, the
  router's probabilities applied after the activation, or on the input with
  `moe_apply_probs_on_input`), returning (output, None);
- each expert's slice of a stacked weight is exactly that expert's SequentialMLP weight:
  fc1 [2F/etp, H] holding this expert-TP rank's gate rows then its up rows, fc2 [H, F/etp]
  (expert tensor parallelism: fc1 column-parallel, fc2 row-parallel, the dispatcher does the
  communication); random init draws the same numbers in the same order;
- `sharded_state_dict` writes SequentialMLP's checkpoint entries (per-expert shards of
  `...experts.experts.linear_fc1.weight` along the global-expert axis, the SwiGLU halves
  split as Megatron's MLP splits them, the `_extra_state` objects), so checkpoints, the
  optimizer state, resharding and the converters work with either implementation;
- `sequential_named_parameters(model)` lists a model's parameters under SequentialMLP's names
  (`...experts.local_experts.{i}.linear_fc1.weight`, views into the stacked weights) for code
  that maps weights by name.

The kernel needs rows of a multiple of 16 bytes and, on CUDA, bfloat16 on compute capability
8.0+ (9.0 before torch 2.9); `unsupported_reason` says when it cannot run, and
`moe.grouped_gemm` (megatron_ext/config.py) falls back to SequentialMLP or reports it.
"""

from __future__ import annotations

import functools
from typing import Iterator, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from megatron.core.dist_checkpointing import ShardedTensor
from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory
from megatron.core.fusions.fused_bias_swiglu import weighted_bias_swiglu_impl
from megatron.core.tensor_parallel.layers import (
    _initialize_affine_weight_cpu,
    _initialize_affine_weight_gpu,
    set_tensor_model_parallel_attributes,
)
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import make_sharded_object_for_checkpoint


def unsupported_reason(dtype: torch.dtype, device, row_lengths: Sequence[int]) -> Optional[str]:
    """Why `torch._grouped_mm` cannot run experts with these weight rows here (None: it can)."""
    if not hasattr(torch, "_grouped_mm"):
        return f"torch {torch.__version__} has no torch._grouped_mm"
    device = torch.device(device)
    if device.type == "cuda":
        if dtype != torch.bfloat16:
            return f"torch._grouped_mm takes bfloat16 only on CUDA (parameters are {dtype}; use precision=bf16)"
        need = (8, 0) if tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 9) else (9, 0)
        if torch.cuda.get_device_capability(device) < need:
            return f"torch {torch.__version__}'s grouped GEMM needs compute capability {need[0]}.{need[1]}+"
    elif device.type != "cpu":
        return f"torch._grouped_mm is not available on {device.type}"
    size = torch.empty((), dtype=dtype).element_size()
    odd = sorted({n for n in row_lengths if n * size % 16})
    if odd:
        return f"its operands need rows of a multiple of 16 bytes; {odd} {dtype} elements are not"
    return _cpu_kernel_error(dtype) if device.type == "cpu" else None


@functools.lru_cache(maxsize=None)
def _cpu_kernel_error(dtype: torch.dtype) -> Optional[str]:
    """Older torch releases have the op but no CPU kernel: try one tiny forward and backward."""
    try:
        x = torch.ones(3, 8, dtype=dtype, requires_grad=True)
        w = torch.ones(2, 8, 8, dtype=dtype, requires_grad=True)
        _GroupedMM.apply(x, w, torch.tensor([1, 3], dtype=torch.int32)).sum().backward()
    except (RuntimeError, NotImplementedError) as e:
        return f"torch._grouped_mm fails on CPU for {dtype}: {e}"
    return None


class _GroupedMM(torch.autograd.Function):
    """out[rows of expert e] = x[rows of e] @ weight[e].T for all experts at once.

    weight is [E, out, in] (each expert's slice laid out like a Linear weight); `offs` are the
    int32 cumulative row counts. Written out rather than left to autograd so that the weight
    gradient comes out as [E, out, in] directly (no transposed copy), an incoming gradient
    with broadcast strides is made contiguous (the kernels need 16-byte aligned strides), and
    a rank whose local experts got no token at all skips the kernels (a zero-length
    contraction is rejected on CUDA) while its weights still receive their (zero) gradient.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight, offs)
        if x.shape[0] == 0:
            return x.new_empty(0, weight.shape[1])
        return torch._grouped_mm(x, weight.transpose(1, 2), offs=offs)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, offs = ctx.saved_tensors
        if x.shape[0] == 0:
            return torch.zeros_like(x), torch.zeros_like(weight), None
        grad = grad.contiguous()
        grad_x = torch._grouped_mm(grad, weight, offs=offs) if ctx.needs_input_grad[0] else None
        grad_weight = torch._grouped_mm(grad.t(), x, offs=offs)
        return grad_x, grad_weight, None


class GroupedLinear(torch.nn.Module):
    """One projection of every local expert: a stacked [experts, out, in] weight."""

    def __init__(self, num_experts: int, input_size: int, output_size: int, config: TransformerConfig):
        super().__init__()
        device = None if config.use_cpu_initialization else torch.cuda.current_device()
        self.weight = torch.nn.Parameter(torch.empty(num_experts, output_size, input_size,
                                                     dtype=config.params_dtype, device=device))

    def forward(self, x: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        return _GroupedMM.apply(x, self.weight, offs)


class GroupedExperts(MegatronModule):
    """The local experts of one MoE layer, each projection one grouped GEMM (see module doc)."""

    def __init__(self, num_local_experts: int, config: TransformerConfig, pg_collection=None):
        super().__init__(config=config)
        if config.add_bias_linear or config.moe_latent_size is not None:
            raise ValueError("GroupedExperts (moe.grouped_gemm) supports neither linear biases nor MoE latent "
                             "projections; set moe.grouped_gemm=false")
        self.num_local_experts = num_local_experts
        self.ep_group, self.tp_group, self.dp_group = pg_collection.ep, pg_collection.expt_tp, pg_collection.expt_dp
        etp = self.tp_group.size()
        hidden, ffn = config.hidden_size, config.moe_ffn_hidden_size // etp
        fc1_rows = 2 * ffn if config.gated_linear_unit else ffn
        device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        why = unsupported_reason(config.params_dtype, device, (hidden, ffn))
        if why:
            raise RuntimeError(f"moe.grouped_gemm: the experts cannot run as grouped GEMMs here: {why}; "
                               "set moe.grouped_gemm=false (one matmul per expert)")
        self.linear_fc1 = GroupedLinear(num_local_experts, hidden, fc1_rows, config)
        self.linear_fc2 = GroupedLinear(num_local_experts, ffn, hidden, config)
        self._mark_parallel(config)
        if config.perform_initialization:
            self._initialize(config)
        # Checkpoints carry SequentialMLP's per-expert `_extra_state` objects (see
        # sharded_state_dict); they are not state of this module.
        self.register_load_state_dict_post_hook(_ignore_extra_state)

    def _mark_parallel(self, config: TransformerConfig) -> None:
        """The attributes Megatron's expert Linear layers carry: DDP reduces expert-parallel
        weights over the expert-data-parallel group only, and the grad norm counts each
        expert-TP shard once."""
        glu_stride = 2 if config.gated_linear_unit else 1
        for linear, dim, stride in ((self.linear_fc1, 1, glu_stride), (self.linear_fc2, 2, 1)):
            set_tensor_model_parallel_attributes(linear.weight, is_parallel=True, dim=dim, stride=stride)
            linear.weight.allreduce = config.expert_model_parallel_size == 1

    @torch.no_grad()
    def _initialize(self, config: TransformerConfig) -> None:
        """Draw each expert's weights as SequentialMLP does (expert by expert, fc1 then fc2), so
        the same seed gives the same model with either implementation."""
        etp, rank = self.tp_group.size(), self.tp_group.rank()
        hidden, ffn = config.hidden_size, config.moe_ffn_hidden_size
        fc1_out, stride = (2 * ffn, 2) if config.gated_linear_unit else (ffn, 1)
        for w1, w2 in zip(self.linear_fc1.weight, self.linear_fc2.weight):
            if config.use_cpu_initialization:
                _initialize_affine_weight_cpu(w1, fc1_out, hidden, fc1_out // etp, 0, config.init_method,
                                              stride=stride, params_dtype=config.params_dtype, rank=rank,
                                              world_size=etp, skip_set_tensor_parallel_attributes=True)
                _initialize_affine_weight_cpu(w2, hidden, ffn, ffn // etp, 1, config.output_layer_init_method,
                                              params_dtype=config.params_dtype, rank=rank, world_size=etp,
                                              skip_set_tensor_parallel_attributes=True)
            else:
                _initialize_affine_weight_gpu(w1, config.init_method, partition_dim=0, stride=stride, is_expert=True)
                _initialize_affine_weight_gpu(w2, config.output_layer_init_method, partition_dim=1, is_expert=True)

    def forward(self, permuted_local_hidden_states: torch.Tensor, tokens_per_expert: torch.Tensor,
                permuted_probs: torch.Tensor) -> Tuple[torch.Tensor, None]:
        """Tokens arrive sorted by local expert, `tokens_per_expert[e]` rows each (SequentialMLP's contract)."""
        x, probs = permuted_local_hidden_states, permuted_probs
        if self.config.moe_apply_probs_on_input:  # top-1 routing: scale the input, not the activation
            x = (probs.unsqueeze(-1) * x).to(x.dtype)
            probs = torch.ones_like(probs)
        ends = tokens_per_expert.cumsum(0)
        if not ends.is_cuda and ends.numel() and int(ends[-1]) != x.shape[0]:
            raise ValueError(f"tokens_per_expert sums to {int(ends[-1])} but {x.shape[0]} tokens arrived")
        offs = ends.to(device=x.device, dtype=torch.int32, non_blocking=True)
        hidden = self._activation(self.linear_fc1(x, offs), probs)
        return self.linear_fc2(hidden, offs), None

    def _activation(self, h: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """Megatron MLP's activation with per-token routing weights (its fused SwiGLU on GPU)."""
        c = self.config
        if c.bias_activation_fusion and c.gated_linear_unit and c.activation_func is F.silu:
            return weighted_bias_swiglu_impl(h, None, probs.unsqueeze(-1), c.activation_func_fp8_input_store)
        if c.gated_linear_unit:
            gate, up = torch.chunk(h, 2, dim=-1)
            if c.activation_func_clamp_value is not None:
                gate = gate.clamp(max=c.activation_func_clamp_value)
                up = up.clamp(min=-c.activation_func_clamp_value, max=c.activation_func_clamp_value)
            act = c.activation_func(gate) * (up + c.glu_linear_offset)
        else:
            act = c.activation_func(h)
        return (act * probs.unsqueeze(-1)).to(h.dtype)

    def backward_dw(self) -> None:
        """Weight gradients are computed in the backward pass (nothing is deferred)."""

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        """SequentialMLP's checkpoint entries, built from views of the stacked weights.

        Each stacked weight is one ShardedTensorFactory (its data is the parameter itself, so
        Megatron's optimizers find their state's layout through it) that expands into the
        per-expert shards SequentialMLP writes, and stacks them back on load."""
        if (metadata or {}).get("singleton_local_shards"):
            raise NotImplementedError("GroupedExperts writes the default (non-singleton) expert layout only")
        first = self.ep_group.rank() * self.num_local_experts
        num_experts = self.ep_group.size() * self.num_local_experts
        etp_rank, edp_rank = self.tp_group.rank(), self.dp_group.rank()
        out = {}
        for name, linear in (("linear_fc1", self.linear_fc1), ("linear_fc2", self.linear_fc2)):
            build = functools.partial(self._expert_shards, name=name, offsets=sharded_offsets)
            merge = functools.partial(_stack, shape=linear.weight.shape)
            out[f"{prefix}{name}.weight"] = ShardedTensorFactory(
                f"{prefix}experts.{name}.weight", linear.weight, build, merge, (0, 0, edp_rank))
            for i in range(self.num_local_experts):
                expert_axis = (len(sharded_offsets), first + i, num_experts)
                out[f"{prefix}local_experts.{i}.{name}._extra_state"] = make_sharded_object_for_checkpoint(
                    None, f"{prefix}experts.{name}._extra_state", (*sharded_offsets, expert_axis),
                    replica_id=(0, etp_rank, edp_rank))
        return out

    def _expert_shards(self, key, stacked, replica_id, flattened_range, *, name, offsets):
        """Per-expert ShardedTensors over [global expert, out, in] as SequentialMLP's MLPs write
        them; fc1 under SwiGLU splits into its gate and up halves, which the checkpoint keeps as
        [all gate rows; all up rows] so that it reshards across expert-TP sizes."""
        if flattened_range is not None:
            raise NotImplementedError("GroupedExperts: flattened (legacy distributed-optimizer) checkpoints")
        axis, etp, etp_rank = len(offsets), self.tp_group.size(), self.tp_group.rank()
        first = self.ep_group.rank() * self.num_local_experts
        num_experts = self.ep_group.size() * self.num_local_experts
        glu = name == "linear_fc1" and self.config.gated_linear_unit
        shards = []
        for i, weight in enumerate(stacked):
            expert = (*offsets, (axis, first + i, num_experts))
            if glu:
                pieces = [(part, (axis + 1, half * etp + etp_rank, 2 * etp))
                          for half, part in enumerate(torch.chunk(weight, 2))]
            else:
                tp_axis = axis + 1 if name == "linear_fc1" else axis + 2
                pieces = [(weight, (tp_axis, etp_rank, etp))]
            shards += [ShardedTensor.from_rank_offsets(key, piece, *expert, tp_offset, replica_id=replica_id,
                                                       prepend_axis_num=axis + 1) for piece, tp_offset in pieces]
        return shards


def _stack(shards, shape):
    """Loaded per-expert pieces (in `_expert_shards` order) -> the stacked weight."""
    return torch.cat(list(shards)).view(shape)


def _ignore_extra_state(module, incompatible_keys) -> None:
    for key in [k for k in incompatible_keys.unexpected_keys if k.endswith("._extra_state")]:
        incompatible_keys.unexpected_keys.remove(key)


def sequential_named_parameters(model: torch.nn.Module) -> Iterator[Tuple[str, torch.Tensor]]:
    """`model.named_parameters()` under SequentialMLP's names: each stacked expert weight as
    per-expert views named `...local_experts.{i}.linear_fc1.weight` (writing a view writes the
    weight). For the weight-name mappings of the converters and exporters."""
    grouped = [f"{name}." for name, m in model.named_modules() if isinstance(m, GroupedExperts)]
    for name, param in model.named_parameters():
        owner = next((p for p in grouped if name.startswith(p)), None)
        if owner is None:
            yield name, param
            continue
        for i, view in enumerate(param):
            yield f"{owner}local_experts.{i}.{name[len(owner):]}", view
