"""Patches to Megatron-Core (correctness, then speed), pinned to its version, applied on every machine.

(The CUDA-absence interceptions are separate: megatron_ext/cpu_backend.py.)

- moe_aux_loss_token_scale: with `calculate_per_token_loss`, Megatron-Core multiplies each
  rank's load-balancing-loss gradient by its *local* token count so that the global
  1/total_tokens division in finalize_model_grads cancels. Under sequence or context
  parallelism each of the TP x CP ranks holds 1/(tp*cp) of the micro-batch while its aux-loss
  share is already normalised by the whole micro-batch, so the aux-loss gradient ends up
  1/(tp*cp) of what one process computes. The sequence-level variant also passes the sequence
  length instead of the micro-batch token count (its gradient shrinks with micro-batch size;
  fixed upstream after 0.16.1). The patch scales by the micro-batch's tokens across the
  TP x CP group. tests/test_parallel.py's MoE TP+SP layouts fail without it.
- te_general_gemm: the MoE router's gating GEMM (`moe_utils.RouterGatingLinearFunction`)
  tests the module global `te_general_gemm`, which `moe_utils` binds only when its Transformer
  Engine import succeeds, so every MoE forward without TE, on GPUs as on CPU, stops with
  `NameError: name 'te_general_gemm' is not defined`. The patch binds it to None, which selects
  the function's own torch.mm path.
- wgrad_accumulation_fusion: Megatron's `gradient_accumulation_fusion` (on for GPUs, see
  megatron_ext/transformer.py) accumulates each linear layer's weight gradient straight into its fp32
  `main_grad` with Apex's `fused_weight_gradient_mlp_cuda` (one GEMM, instead of a bf16 gradient
  and a separate `add_` per weight and micro-batch). Apex is not on PyPI, and without it the
  local layers refuse the option; torch's `addmm(out_dtype=float32)` (cuBLAS: bf16 inputs, fp32
  output and accumulation) stands in for the kernel. Where that overload is missing, the stand-in
  falls back to a GEMM and an add, as unfused. Apex's kernel is used when installed.
- torch_adam_distributed_optimizer: without Apex or Transformer Engine the DistributedOptimizer
  wraps torch's Adam, whose per-parameter state carries a "step" tensor, and 0.16.1 cannot load
  into it: building the sharded state dict reads the step from that state, which a fresh
  optimizer does not have yet (`assert len(steps) == 1`), and loading copies every state key
  from the checkpoint's tensors, which never carry "step" (KeyError; the step is restored
  separately from the param groups, as one tensor that every parameter then shares and Adam
  advances once per parameter). The patch starts a fresh optimizer from the zero state torch's
  Adam creates at its first step before loading, keeps "step" out of the copy, and gives each
  parameter its own step.
  tests/test_checkpoint.py's distributed-optimizer resume fails without it.
- rope_tables (speed): Megatron's unfused RoPE (`_apply_rotary_pos_emb_bshd`) computes cos and
  sin of the frequencies, casts them, rotates half and multiplies, about ten small kernels each
  way, for queries and keys in every layer and micro-batch, although every call of a forward pass
  gets the same frequencies tensor (its rotary embedding even caches it across micro-batches).
  For packed documents (`_apply_rotary_pos_emb_thd`) each call also rebuilds the per-document
  frequencies, with a device-to-host copy of the document lengths (`.tolist()`, and an `.item()`
  per document when the frequencies cover every position): 2 x layers host syncs per
  micro-batch. The patch computes the (packed) frequencies' cos and sin once per frequencies
  tensor (and cu_seqlens, read from their host copy: `host_copy`) and reuses them in every
  layer; the rotation itself is the same
  arithmetic, compiled into one kernel each way on GPUs (`torch.compile`, static shapes; eager
  on CPU, where it is bit-identical to Megatron's). Interleaved and multi-latent
  RoPE keep Megatron's function. Tables read during a CUDA graph capture stay referenced as
  long as the process lives (the graph's replays read their memory).
- foreach_optimizer_ops (speed): without Apex or Transformer Engine, Megatron-Core falls back to
  Python loops for its multi-tensor kernels: the gradient norm is one `torch.norm` per parameter,
  gathered with `torch.tensor(list)` (a device-to-host copy per parameter on GPUs) and sent back
  to the device; clipping is a multiply into a new tensor and a copy per gradient; copying the
  fp32 main weights into the bf16 model weights is a copy per parameter. The optimizer phase of
  each step then issues about a thousand kernels and hundreds of host syncs. The patch puts
  torch's multi-tensor (`torch._foreach_*`) kernels in their place: same results, a few kernels
  per step, one sync (Megatron's own `.item()` of the norm).
- single_rank_tp_mappings (speed): the tensor-parallel linear layers and the vocabulary embedding
  pass their input and output through Megatron's copy / all-reduce autograd functions even when
  the tensor-parallel group has one rank, where both are the identity: four autograd nodes
  (Python forward and backward) per transformer layer and micro-batch that do nothing. The
  patch returns the tensor itself for a one-rank group; larger groups are unchanged.
- linear_without_communication (speed): every linear layer's forward and backward goes through
  Megatron's `LinearWithGradAccumulationAndAsyncCommunication`, whose Python handles the
  tensor-parallel all-reduce / sequence-parallel gather, deferred embedding gradients and
  autocast (a decorator that saves and restores the autocast state around forward and backward),
  and looks up the tensor-parallel group (a deprecation warning per call where the layer passes
  none) even when none of that applies, as at TP=1 and in every row-parallel layer without
  sequence parallelism. Where none applies, the patch runs the same arithmetic (GEMM, input
  gradient, weight gradient accumulated into `main_grad` with the same kernel and the same dummy
  gradient for the DDP hook) in a lean autograd function: less host time per layer, results
  bit-identical. Anything else takes Megatron's function.
- fp8_linear: FP8 GEMMs without Transformer Engine (megatron_ext.fp8). Both parallel linear
  layers call `linear_with_grad_accumulation_and_async_allreduce` through the module global;
  the patch sends a call whose weight carries `fp8_recipe` (the decoder's linear layers under a
  torchao FP8 precision) to `megatron_ext.fp8.linear`, which keeps Megatron's TP/SP
  communication and runs the GEMMs in FP8. Every other call is unchanged.
- token_scaling_without_sync (speed): with a per-token loss, Megatron-Core's
  `finalize_model_grads` divides the gradients by the global token count under
  `if num_tokens > 0`, a device-to-host sync at the end of every backward pass (and an error
  inside a CUDA graph capture). The patch does the same division on the device: the count
  clamped to at least 1 (Megatron leaves the gradients unscaled at 0 tokens: the same as / 1).
- dataset_indices_without_pickle (safety): Megatron-Core's datasets read their cached indices
  (`path_to_cache/*-{document,sample,shuffle}_index.npy`, the blend's `*-dataset_index.npy`) with
  `numpy.load(allow_pickle=True)`, and numpy unpickles any file that is not an `.npy` array: a
  planted "index" runs code in every rank that opens the cache. The patch gives those modules a
  `numpy` whose `load` never unpickles and accepts only integer arrays; anything else stops the
  run with `IndexCacheError` naming the file (delete it and the run rebuilds it).
- checkpoint_reads_without_code (safety): reading a torch_dist checkpoint unpickles three kinds
  of file, and a checkpoint may come from anyone: torch's `FileSystemReader.read_metadata`
  reads `.metadata` with plain `pickle.load`, its `DefaultLoadPlanner.load_bytes` reads the
  objects stored in the shards with `torch.load(weights_only=False)`, and Megatron-Core's
  `TorchCommonLoadStrategy` reads `common.pt` with `torch.load` (weights_only only by torch's
  default, which an environment variable turns off). A planted file ran code in every process
  that loaded the checkpoint. The patch gives torch's filesystem module a `pickle` whose `load`
  is the restricted metadata unpickler, and the planner's and Megatron's modules a `torch`
  whose `load` always passes weights_only=True (`megatron_ext.safe_pickle`); anything else stops
  the load with `UnsafeCheckpointError` naming the file and the global. GPUs included.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import re

import numpy
import torch

log = logging.getLogger(__name__)
PINNED_MEGATRON_CORE = "0.16.1"
_applied = False


def moe_aux_loss_token_scale() -> None:
    from megatron.core.transformer.moe.router import TopKRouter

    original = TopKRouter.attach_and_log_load_balancing_loss

    def attach_and_log_load_balancing_loss(self, activation, aux_loss_coeff, aux_loss, aux_loss_name,
                                           reduce_group, reduce_group_has_dp=False, valid_token_count=None):
        if self.calculate_per_token_loss and not reduce_group_has_dp:
            if aux_loss_name == "seq_load_balancing_loss" or valid_token_count is None:
                valid_token_count = activation.shape[0]  # tokens of this rank's micro-batch share
            valid_token_count = valid_token_count * reduce_group.size()
        return original(self, activation, aux_loss_coeff, aux_loss, aux_loss_name, reduce_group,
                        reduce_group_has_dp=reduce_group_has_dp, valid_token_count=valid_token_count)

    attach_and_log_load_balancing_loss.__wrapped__ = original
    TopKRouter.attach_and_log_load_balancing_loss = attach_and_log_load_balancing_loss


def te_general_gemm() -> None:
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


class _WgradAccumulation:
    """Stand-in for Apex's `fused_weight_gradient_mlp_cuda`: main_grad += grad_output^T @ input as
    one GEMM that accumulates into the fp32 buffer (cuBLAS: bf16 inputs, fp32 output), instead of
    a bf16 weight gradient followed by a separate `main_grad.add_` per weight and micro-batch."""

    mixed_dtype_gemm = True
    """False where torch.addmm(out_dtype=...) is missing: then a GEMM and an add, as unfused."""

    @classmethod
    def wgrad_gemm_accum_fp32(cls, total_input, grad_output, main_grad):
        if total_input.dtype == main_grad.dtype:
            main_grad.addmm_(grad_output.t(), total_input)
        elif cls.mixed_dtype_gemm:
            torch.addmm(main_grad, grad_output.t(), total_input, out_dtype=main_grad.dtype, out=main_grad)
        else:
            main_grad.add_(grad_output.t() @ total_input)

    wgrad_gemm_accum_fp16 = wgrad_gemm_accum_fp32


def wgrad_accumulation_fusion() -> None:
    """Megatron's `gradient_accumulation_fusion` (set on GPUs, megatron_ext/transformer.py) needs Apex's
    `fused_weight_gradient_mlp_cuda` for its local linear layers (all of the local spec, and the
    output layer under TE); Apex is not on PyPI, so torch's own GEMM stands in for it."""
    from megatron.core.tensor_parallel import layers

    if layers._grad_accum_fusion_available:
        return  # Apex's kernel is installed
    if torch.cuda.is_available():
        try:
            probe = torch.zeros(2, 2, device="cuda")
            half = torch.ones(2, 2, device="cuda", dtype=torch.bfloat16)
            torch.addmm(probe, half, half, out_dtype=torch.float32, out=probe)
        except (RuntimeError, TypeError) as e:
            log.warning("torch.addmm(out_dtype=float32) unavailable (%s): weight gradients are a bf16 GEMM "
                        "plus an fp32 add", e)
            _WgradAccumulation.mixed_dtype_gemm = False
    layers.fused_weight_gradient_mlp_cuda = _WgradAccumulation
    layers._grad_accum_fusion_available = True


def torch_adam_distributed_optimizer() -> None:
    from megatron.core.optimizer import distrib_optimizer
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    if distrib_optimizer.HAVE_APEX_OR_TE:
        return  # their fused Adam keeps no per-parameter step
    sharded_state_dict = DistributedOptimizer.sharded_state_dict
    set_states = DistributedOptimizer._set_main_param_and_optimizer_states

    def sharded_state_dict_starting_empty_state(self, model_sharded_state_dict=None, is_loading=False,
                                                *args, **kwargs):
        if is_loading and isinstance(self.optimizer, torch.optim.Adam):  # AdamW too
            for group in self.optimizer.param_groups:
                for p in group["params"]:
                    if not self.optimizer.state[p]:  # (fused Adam keeps its step on the device)
                        step = torch.zeros((), device=p.device) if group.get("fused") else torch.tensor(0.0)
                        self.optimizer.state[p] = {"step": step, "exp_avg": torch.zeros_like(p),
                                                   "exp_avg_sq": torch.zeros_like(p)}
        return sharded_state_dict(self, model_sharded_state_dict or {}, is_loading, *args, **kwargs)

    def set_states_without_step(self, model_param, tensors):
        if "step" not in tensors and not self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            group_index, group_order = self.model_param_group_index_map[model_param]
            state = self.optimizer.state[self.optimizer.param_groups[group_index]["params"][group_order]]
            if "step" in state:  # restored from the param groups as one tensor shared by every
                # parameter, which Adam would then advance once per parameter and step
                state["step"] = state["step"].clone()
                tensors = {**tensors, "step": state["step"]}
        return set_states(self, model_param, tensors)

    sharded_state_dict_starting_empty_state.__wrapped__ = sharded_state_dict
    set_states_without_step.__wrapped__ = set_states
    DistributedOptimizer.sharded_state_dict = sharded_state_dict_starting_empty_state
    DistributedOptimizer._set_main_param_and_optimizer_states = set_states_without_step


def _rotate(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Megatron's non-interleaved rotation of the first cos.shape[-1] channels, cos/sin given."""
    rot_dim = cos.shape[-1]
    t, t_pass = t[..., :rot_dim], t[..., rot_dim:]
    x1, x2 = torch.chunk(t, 2, dim=-1)
    return torch.cat(((t * cos) + (torch.cat((-x2, x1), dim=-1) * sin), t_pass), dim=-1)


class _RopeTables:
    """cos / sin tables of the last frequencies tensor seen (and, for packed documents, of the
    last cu_seqlens), in the dtype of the tensors rotated. The cache holds the keys themselves,
    so a hit means the very same tensors, unchanged since (their version counters)."""

    def __init__(self):
        self.keys, self.state, self.cos, self.sin = (), None, None, None
        self.captured = []
        """Tables a CUDA graph capture read (train.cuda_graph): kept for the graph's lifetime,
        since its replays read their memory whatever the cache holds by then."""

    def get(self, keys, state, frequencies, dtype, mscale):
        """(cos, sin); `frequencies()` builds the frequencies on a miss."""
        state = (tuple(k._version for k in keys), dtype, mscale, *state)
        if len(keys) != len(self.keys) or any(a is not b for a, b in zip(keys, self.keys)) or state != self.state:
            with torch.no_grad():
                freqs = frequencies()
                self.cos, self.sin = (torch.cos(freqs) * mscale).to(dtype), (torch.sin(freqs) * mscale).to(dtype)
            self.keys, self.state = keys, state
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing() and not any(
                cos is self.cos for cos, _ in self.captured):
            self.captured.append((self.cos, self.sin))
        return self.cos, self.sin


def host_copy(t: torch.Tensor) -> torch.Tensor:
    """The host values of a small device index tensor: the copy kept on it as `t.host_copy`
    (packed sequences' cu_seqlens, `megatron_ext.data.packed_seq_params`), else `t.cpu()`
    (which, for a device tensor, waits for all queued work)."""
    host = getattr(t, "host_copy", None)
    return host if host is not None else t.cpu()


def rope_tables() -> None:
    from megatron.core.models.common.embeddings import rope_utils

    bshd, thd = rope_utils._apply_rotary_pos_emb_bshd, rope_utils._apply_rotary_pos_emb_thd
    if hasattr(bshd, "__wrapped__"):
        return
    # Compiled on GPUs (CPU runs keep TorchDynamo off: megatron_ext/cpu_backend.py) with static
    # shapes: constant sizes make the broadcast's index arithmetic multiplications, where dynamic
    # sizes cost every element integer divisions by runtime values. Training sees a few shapes
    # (queries, keys); generation's varying prompt lengths compile up to TorchDynamo's
    # recompile limit, then run eagerly.
    rotate = torch.compile(_rotate, dynamic=False) if torch.cuda.is_available() else _rotate
    sequences, packed = _RopeTables(), _RopeTables()

    def apply_rotary_pos_emb_bshd(t, freqs, rotary_interleaved=False, multi_latent_attention=False, mscale=1.0):
        if rotary_interleaved or multi_latent_attention or freqs.requires_grad:
            return bshd(t, freqs, rotary_interleaved, multi_latent_attention, mscale)
        cos, sin = sequences.get((freqs,), (), lambda: freqs, t.dtype, mscale)
        return rotate(t, cos, sin)

    def apply_rotary_pos_emb_thd(t, cu_seqlens, freqs, rotary_interleaved=False, multi_latent_attention=False,
                                 mscale=1.0, cp_group=None):
        if rotary_interleaved or multi_latent_attention or freqs.requires_grad or cp_group is None:
            return thd(t, cu_seqlens, freqs, rotary_interleaved, multi_latent_attention, mscale, cp_group)
        cp_size, cp_rank = cp_group.size(), cp_group.rank()

        def packed_frequencies():  # as Megatron's _apply_rotary_pos_emb_thd builds them
            cu = host_copy(cu_seqlens)
            seqlens = ((cu[1:] - cu[:-1]) // cp_size).tolist()
            every_position = freqs.dim() >= 1 and freqs.size(0) == cu[-1]
            starts = cu[:-1].tolist() if every_position else [0] * len(seqlens)
            return torch.cat([rope_utils._get_thd_freqs_on_this_cp_rank(cp_rank, cp_size, x, freqs, start)
                              for x, start in zip(torch.split(t, seqlens), starts)], dim=0)

        cos, sin = packed.get((cu_seqlens, freqs), (cp_size, cp_rank, t.shape[0]), packed_frequencies, t.dtype, mscale)
        return rotate(t.unsqueeze(1), cos, sin).squeeze(1)

    apply_rotary_pos_emb_bshd.__wrapped__, apply_rotary_pos_emb_thd.__wrapped__ = bshd, thd
    rope_utils._apply_rotary_pos_emb_bshd = apply_rotary_pos_emb_bshd
    rope_utils._apply_rotary_pos_emb_thd = apply_rotary_pos_emb_thd


def _foreach_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """`amp_C.multi_tensor_l2norm`'s contract: the L2 norm of all tensors together as a 1-element
    fp32 tensor on their device (and, with per_tensor, each tensor's norm), without a host sync."""
    tensors = tensor_lists[0]
    device = tensors[0].device
    norms = torch.stack([n.to(device) for n in torch._foreach_norm(tensors, 2, dtype=torch.float32)])
    return torch.linalg.vector_norm(norms).reshape(1), (norms if per_tensor else None)


def _foreach_scale(chunk_size, noop_flag, tensor_lists, scale):
    """`amp_C.multi_tensor_scale`'s contract: out[i] = in[i] * scale, in place where in is out."""
    src, dst = tensor_lists[0], tensor_lists[1]
    if all(s is d for s, d in zip(src, dst)):
        torch._foreach_mul_(dst, scale)
    else:
        _foreach_copy(src, dst, scale)


def _foreach_copy(src, dst, scale=1.0) -> None:
    """dst[i] = src[i] * scale, one multi-tensor copy per (source, destination) dtype pair."""
    groups = {}
    for s, d in zip(src, dst):
        sources, targets = groups.setdefault((s.device, s.dtype, d.dtype), ([], []))
        sources.append(s)
        targets.append(d)
    for sources, targets in groups.values():
        torch._foreach_copy_(targets, sources if scale == 1.0 else torch._foreach_mul(sources, scale))


def _copy_this_to_that(this, that, overflow_buf=None) -> None:
    """Megatron's `_multi_tensor_copy_this_to_that` (main <-> model weights) as multi-tensor copies."""
    _foreach_copy(this, that)


def foreach_optimizer_ops() -> None:
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads, optimizer

    if clip_grads.l2_norm_impl is not utils.local_multi_tensor_l2_norm:
        return  # Apex's or Transformer Engine's kernels
    clip_grads.l2_norm_impl = _foreach_l2_norm
    clip_grads.multi_tensor_scale_impl = optimizer.multi_tensor_scale_impl = _foreach_scale
    _copy_this_to_that.__wrapped__ = optimizer._multi_tensor_copy_this_to_that
    optimizer._multi_tensor_copy_this_to_that = _copy_this_to_that


def _identity_on_one_rank(mapping):
    def mapping_or_identity(input_, group=None):
        if group is not None and group.size() == 1:
            return input_
        return mapping(input_, group=group)

    mapping_or_identity.__wrapped__ = mapping
    return mapping_or_identity


def single_rank_tp_mappings() -> None:
    from megatron.core.tensor_parallel import layers

    for name in ("copy_to_tensor_model_parallel_region", "reduce_from_tensor_model_parallel_region"):
        if not hasattr(getattr(layers, name), "__wrapped__"):
            setattr(layers, name, _identity_on_one_rank(getattr(layers, name)))


class _LinearWithoutCommunication(torch.autograd.Function):
    """Megatron's `LinearWithGradAccumulationAndAsyncCommunication` without tensor-parallel
    communication, deferred weight gradients or autocast: the same GEMMs and weight-gradient
    accumulation in fewer Python steps. `main_grad` is the weight's fp32 gradient buffer when
    gradient accumulation fusion is on (None otherwise)."""

    @staticmethod
    def forward(ctx, input, weight, bias, main_grad):
        ctx.save_for_backward(input, weight)
        # held on ctx, not saved: the buffer is written in place by other layers' backward
        ctx.main_grad, ctx.use_bias = main_grad, bias is not None
        output = torch.matmul(input, weight.t())
        return output if bias is None else output + bias

    @staticmethod
    def backward(ctx, grad_output):
        input, weight = ctx.saved_tensors
        grad_input = grad_output.matmul(weight)
        grad_output, input = grad_output.contiguous(), input.contiguous()
        if grad_output.dim() == 3:
            grad_output = grad_output.view(-1, grad_output.shape[2])
            input = input.view(-1, input.shape[2])
        main_grad = ctx.main_grad
        if main_grad is None:
            grad_weight = grad_output.t().matmul(input)
        else:
            from megatron.core.tensor_parallel import layers

            weight.main_grad = main_grad
            if main_grad.dtype == torch.float32:
                layers.fused_weight_gradient_mlp_cuda.wgrad_gemm_accum_fp32(input, grad_output, main_grad)
            else:  # fp16 / bf16 buffers (checked when the function is chosen)
                layers.fused_weight_gradient_mlp_cuda.wgrad_gemm_accum_fp16(input, grad_output, main_grad)
            grad_weight = None
            if hasattr(weight, "grad_added_to_main_grad"):
                # a dummy gradient, as Megatron's: the DDP hook must run on this thread
                zero = getattr(weight, "zero_out_wgrad", False)
                if layers.HAVE_TE:
                    grad_weight = layers.get_dummy_wgrad(list(main_grad.shape), input.dtype, zero=zero)
                else:
                    grad_weight = (torch.zeros if zero else torch.empty)(
                        main_grad.shape, dtype=input.dtype, device=main_grad.device)
                weight.grad_added_to_main_grad = True
        grad_bias = grad_output.sum(dim=0) if ctx.use_bias else None
        return grad_input, grad_weight, grad_bias, None


_MAIN_GRAD_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def linear_without_communication() -> None:
    from megatron.core.tensor_parallel import layers

    original = layers.linear_with_grad_accumulation_and_async_allreduce
    if hasattr(original, "__wrapped__"):
        return

    def linear(input, weight, bias, gradient_accumulation_fusion, allreduce_dgrad, sequence_parallel,
               grad_output_buffer=None, wgrad_deferral_limit=0, async_grad_allreduce=None, tp_group=None):
        main_grad = getattr(weight, "main_grad", None) if gradient_accumulation_fusion else None
        if (allreduce_dgrad or sequence_parallel or grad_output_buffer is not None
                or async_grad_allreduce is not None or torch.is_autocast_enabled("cuda")
                or (gradient_accumulation_fusion and (main_grad is None or main_grad.dtype not in _MAIN_GRAD_DTYPES
                                                      or hasattr(weight, "__fsdp_param__")))):
            return original(input, weight, bias, gradient_accumulation_fusion, allreduce_dgrad, sequence_parallel,
                            grad_output_buffer, wgrad_deferral_limit, async_grad_allreduce, tp_group)
        return _LinearWithoutCommunication.apply(input, weight, bias, main_grad)

    linear.__wrapped__ = original
    linear.warned = original.warned  # the original reads and sets it through the module global
    layers.linear_with_grad_accumulation_and_async_allreduce = linear


def fp8_linear() -> None:
    from megatron.core.tensor_parallel import layers

    original = layers.linear_with_grad_accumulation_and_async_allreduce
    if getattr(original, "fp8_dispatch", False):
        return

    def linear(input, weight, *args, **kwargs):
        if getattr(weight, "fp8_recipe", None) is not None:
            from megatron_ext import fp8

            return fp8.linear(input, weight, *args, **kwargs)
        return original(input, weight, *args, **kwargs)

    linear.__wrapped__, linear.fp8_dispatch = original, True
    linear.warned = getattr(original, "warned", False)
    layers.linear_with_grad_accumulation_and_async_allreduce = linear


def token_scaling_without_sync() -> None:
    module = importlib.import_module("megatron.core.distributed.finalize_model_grads")
    original = module.finalize_model_grads
    if hasattr(original, "__wrapped__"):
        return

    def finalize_model_grads(model, num_tokens=None, pg_collection=None, force_all_reduce=False):
        original(model, None, pg_collection, force_all_reduce)  # all but the per-token scaling, last
        if num_tokens is None:
            return
        if pg_collection is not None:
            pp_group, dp_cp_group = pg_collection.pp, pg_collection.dp_cp
        else:
            pp_group = module.parallel_state.get_pipeline_model_parallel_group()
            dp_cp_group = module.parallel_state.get_data_parallel_group(with_context_parallel=True)
        torch.distributed.broadcast(num_tokens, src=module.get_pp_last_rank(pp_group), group=pp_group)
        torch.distributed.all_reduce(num_tokens, group=dp_cp_group)
        scaling = 1.0 / num_tokens.clamp(min=1)
        for model_chunk in model:
            model_chunk.scale_gradients(scaling)

    finalize_model_grads.__wrapped__ = original
    module.finalize_model_grads = finalize_model_grads


class IndexCacheError(ValueError):
    """A dataset index cache file holds something other than a plain integer array."""


def _load_index(file, mmap_mode=None, allow_pickle=False, **kwargs):
    """`numpy.load` for Megatron's dataset modules: never unpickles (they pass allow_pickle=True)
    and returns integer arrays only."""
    del allow_pickle  # never honoured: the cache may come from anyone who can write to it
    hint = "it was not written by Megatron-Core; delete it and the run rebuilds the index"
    try:
        array = numpy.load(file, mmap_mode=mmap_mode, allow_pickle=False, **kwargs)
    except (ValueError, OSError, EOFError) as e:
        raise IndexCacheError(f"dataset index cache {file}: refused ({e}); {hint}") from None
    if not isinstance(array, numpy.ndarray) or array.dtype.kind not in "iu":
        kind = getattr(array, "dtype", type(array).__name__)
        raise IndexCacheError(f"dataset index cache {file}: holds {kind}, not an integer index; {hint}")
    return array


DATASET_MODULES = ("megatron.core.datasets.gpt_dataset", "megatron.core.datasets.blended_dataset",
                   "megatron.core.datasets.masked_dataset")


def dataset_indices_without_pickle() -> None:
    from megatron_ext.safe_pickle import StandIn

    for name in DATASET_MODULES:
        importlib.import_module(name).numpy = StandIn(numpy, load=_load_index)


def checkpoint_reads_without_code() -> None:
    from megatron.core.dist_checkpointing.strategies import common
    from torch.distributed.checkpoint import default_planner, filesystem

    from megatron_ext import safe_pickle

    filesystem.pickle = safe_pickle.PICKLE_FOR_METADATA
    default_planner.torch = common.torch = safe_pickle.TORCH_WEIGHTS_ONLY


def _checkpoint_unpickling_sites() -> bool:
    """Every unpickling on torch_dist's load path goes through the module globals the patch replaces."""
    from megatron.core.dist_checkpointing.strategies import common
    from torch.distributed.checkpoint import default_planner, filesystem

    planner, fs, mcore = (inspect.getsource(m) for m in (default_planner, filesystem, common))
    # (the multi-storage-client branches, `msc.torch.load`, run only once that feature is enabled)
    mcore_loads = re.findall(r"(?<![\w.])(?:msc\.)?torch\.load\(", mcore)
    return ("metadata = pickle.load(metadata_file)" in inspect.getsource(filesystem.FileSystemReader.read_metadata)
            and fs.count("pickle.load") == 1 and "import pickle\n" in fs
            and planner.count("torch.load(") == 2
            and inspect.getsource(default_planner.DefaultLoadPlanner.load_bytes).count("torch.load(") == 2
            and mcore_loads.count("torch.load(") == 3 and len(mcore_loads) == 6 and "import torch\n" in mcore)


def upstream_call_sites() -> dict:
    """Source facts each patch relies on (checked by tests; a change means: re-check the patch)."""
    from megatron.core.models.common.embeddings import rope_utils
    from megatron.core.optimizer import clip_grads, optimizer
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.tensor_parallel import layers
    from megatron.core.transformer.moe import moe_utils
    from megatron.core.transformer.moe.router import TopKRouter

    finalize = importlib.import_module("megatron.core.distributed.finalize_model_grads")
    scaler = inspect.getsource(getattr(TopKRouter.attach_and_log_load_balancing_loss, "__wrapped__",
                                       TopKRouter.attach_and_log_load_balancing_loss))
    return {
        "moe_aux_loss_token_scale": "activation = MoEAuxLossAutoScaler.apply(activation, aux_loss * num_tokens)"
        in scaler and "num_tokens = valid_token_count if valid_token_count is not None" in scaler,
        # The gating GEMM reads the global; the import's fallback branch leaves it undefined.
        "te_general_gemm": "te_general_gemm is not None" in inspect.getsource(moe_utils.RouterGatingLinearFunction)
        and "te_general_gemm" not in _import_fallback(inspect.getsource(moe_utils)),
        # The weight-gradient backward calls the kernel module by these names and arguments.
        "wgrad_accumulation_fusion": "fused_weight_gradient_mlp_cuda.wgrad_gemm_accum_fp32(\n"
        "                            total_input, grad_output, weight.main_grad" in inspect.getsource(layers)
        and "import fused_weight_gradient_mlp_cuda" in inspect.getsource(layers),
        # state_dict() reads the step from the inner state; loading copies every state key.
        "torch_adam_distributed_optimizer": 'steps = list(set([s["step"].item() for s in inner_state_dict["state"]'
        in inspect.getsource(DistributedOptimizer.state_dict)
        and 'dst_tensors = {"param": main_param, **optim_state}' in inspect.getsource(
            getattr(DistributedOptimizer._set_main_param_and_optimizer_states, "__wrapped__",
                    DistributedOptimizer._set_main_param_and_optimizer_states)),
        # Both unfused paths (sequences, packed documents) reach RoPE through the module globals,
        # with Megatron's rotation and per-document frequencies.
        "rope_tables": _rope_sources_unchanged(rope_utils),
        # The optimizers reach the multi-tensor kernels through these module globals.
        "foreach_optimizer_ops": "l2_norm_impl,\n" in inspect.getsource(clip_grads.get_grad_norm_fp32)
        and "multi_tensor_scale_impl, dummy_overflow_buf, [grads, grads], clip_coeff" in inspect.getsource(
            clip_grads.clip_grad_by_total_norm_fp32)
        and inspect.getsource(optimizer).count("_multi_tensor_copy_this_to_that(\n") == 3,
        # The layers call the mappings through their module globals, always naming the group.
        "single_rank_tp_mappings": _layer_mapping_calls(inspect.getsource(layers)) == {
            "copy_to_tensor_model_parallel_region(input_, group=self.tp_group)": 1,
            "reduce_from_tensor_model_parallel_region(output_parallel, group=self.tp_group)": 2},
        # Both parallel linear layers call the function through the module global; without
        # communication its forward is one GEMM (+ bias) and its backward the lines below.
        "linear_without_communication": inspect.getsource(layers).count(
            "return linear_with_grad_accumulation_and_async_allreduce(input, weight, *args, **kwargs)") == 2
        and _linear_sources_unchanged(inspect.getsource(layers.LinearWithGradAccumulationAndAsyncCommunication)),
        # Both layers reach the function through the module global, with the arguments
        # megatron_ext.fp8.linear takes.
        "fp8_linear": inspect.getsource(layers).count(
            "return linear_with_grad_accumulation_and_async_allreduce(input, weight, *args, **kwargs)") == 2
        and list(inspect.signature(getattr(layers.linear_with_grad_accumulation_and_async_allreduce, "__wrapped__",
                                           layers.linear_with_grad_accumulation_and_async_allreduce)).parameters)
        [:6] == ["input", "weight", "bias", "gradient_accumulation_fusion", "allreduce_dgrad", "sequence_parallel"],
        # The per-token scaling is the function's last block, as the patch redoes it.
        "token_scaling_without_sync": inspect.getsource(getattr(finalize.finalize_model_grads, "__wrapped__",
                                                                finalize.finalize_model_grads)).rstrip().endswith(
            """    if num_tokens is not None:

        # the number of tokens is only present on the last stage, so broadcast it
        # to the other ranks in the pipeline parallel group.
        assert not isinstance(pp_group, list)
        last_rank = get_pp_last_rank(pp_group)
        torch.distributed.broadcast(num_tokens, src=last_rank, group=pp_group)

        # all-reduce across DP ranks.
        torch.distributed.all_reduce(num_tokens, group=dp_cp_group)
        for model_chunk in model:
            if num_tokens > 0:
                scaling = 1.0 / num_tokens
                model_chunk.scale_gradients(scaling)"""),
        # The index caches are read through each module's `numpy` global, with pickle allowed.
        "dataset_indices_without_pickle": all(_reads_indices_through_numpy(name) for name in DATASET_MODULES),
        # Every unpickling of a torch_dist load (.metadata, byte items, common.pt) is a call of
        # the module global `pickle` / `torch` in these modules.
        "checkpoint_reads_without_code": _checkpoint_unpickling_sites(),
    }


def _reads_indices_through_numpy(module_name: str) -> bool:
    source = inspect.getsource(importlib.import_module(module_name))
    return ("\nimport numpy\n" in source and "numpy.load(" in source
            and "np.load(" not in source and "from numpy import" not in source)


def _linear_sources_unchanged(source: str) -> bool:
    return all(line in source for line in (
        "output = torch.matmul(total_input, weight.t())",
        "output = output + bias",
        "grad_input = grad_output.matmul(weight)",
        "grad_output, total_input = prepare_input_tensors_for_wgrad_compute(",
        "total_input, grad_output, weight.main_grad",
        "if hasattr(weight, \"grad_added_to_main_grad\"):",
        "weight.grad_added_to_main_grad = True",
        "grad_weight = grad_output.t().matmul(total_input)",
        "grad_bias = grad_output.sum(dim=0) if use_bias else None",
        "return grad_input, grad_weight, grad_bias, None, None, None, None, None, None"))


def _rope_sources_unchanged(rope_utils) -> bool:
    entry = inspect.getsource(rope_utils.apply_rotary_pos_emb)
    bshd = inspect.getsource(getattr(rope_utils._apply_rotary_pos_emb_bshd, "__wrapped__",
                                     rope_utils._apply_rotary_pos_emb_bshd))
    thd = inspect.getsource(getattr(rope_utils._apply_rotary_pos_emb_thd, "__wrapped__",
                                    rope_utils._apply_rotary_pos_emb_thd))
    return (entry.count("return _apply_rotary_pos_emb_bshd(") == 1 and "return _apply_rotary_pos_emb_thd(" in entry
            and "cos_ = (torch.cos(freqs) * mscale).to(t.dtype)" in bshd
            and "t = (t * cos_) + (_rotate_half(t, rotary_interleaved) * sin_)" in bshd
            and "return torch.cat((t, t_pass), dim=-1)" in bshd
            and "_get_thd_freqs_on_this_cp_rank(cp_rank, cp_size, x, freqs, seq_start_offset)" in thd
            and "_get_thd_freqs_on_this_cp_rank(cp_rank, cp_size, x, freqs) for x in sequence_splits" in thd
            and "seq_start_offset = cu_seqlens[i].item()" in thd
            and "freqs.dim() >= 1 and freqs.size(0) == cu_seqlens[-1]" in thd)


def _layer_mapping_calls(source: str) -> dict:
    """How often each call of the two identity-on-one-rank mappings occurs in a source."""
    import re

    calls = re.findall(r"\b((?:copy_to|reduce_from)_tensor_model_parallel_region\([^)]*\))", source)
    return {call: calls.count(call) for call in calls}


def _import_fallback(source: str) -> str:
    """The first `except ImportError:` block of a module's source."""
    return source.split("except ImportError:", 1)[1].split("\n\n", 1)[0]


PATCHES = (moe_aux_loss_token_scale, te_general_gemm, wgrad_accumulation_fusion,
           torch_adam_distributed_optimizer, rope_tables, foreach_optimizer_ops,
           single_rank_tp_mappings, linear_without_communication, fp8_linear, token_scaling_without_sync,
           dataset_indices_without_pickle, checkpoint_reads_without_code)


def apply() -> None:
    """Install every patch once (checks the pinned megatron-core version)."""
    global _applied
    if _applied:
        return
    import megatron.core

    if megatron.core.__version__ != PINNED_MEGATRON_CORE:
        raise RuntimeError(f"megatron_ext.patches are pinned to megatron-core {PINNED_MEGATRON_CORE}, found "
                           f"{megatron.core.__version__}; re-check each patch against it")
    for patch in PATCHES:
        patch()
    _applied = True
