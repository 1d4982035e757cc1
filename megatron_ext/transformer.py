"""The runtime's Megatron-Core TransformerConfig: ModelConfig + layout + precision, for all Qwen families.

Every Qwen family is a pre-norm decoder with RMSNorm, SwiGLU, RoPE and GQA and no linear
biases; the families differ only in flags carried by ModelConfig (QKV bias for Qwen2, per-head
QK-norm and a decoupled head_dim for Qwen3, routed/shared experts for the MoE variants).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer import TransformerConfig

from megatron_ext.config import Config, grouped_gemm_enabled

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def params_dtype(precision: str) -> torch.dtype:
    # FP8 recipes keep bf16 master weights; TE casts GEMM inputs to FP8 inside the layers.
    return _DTYPES.get(precision, torch.bfloat16)


def _moe_kwargs(cfg: Config) -> dict:
    m = cfg.model
    if not m.is_moe:
        return {}
    return dict(
        num_moe_experts=m.num_experts,
        moe_ffn_hidden_size=m.moe_ffn_hidden_size or m.ffn_hidden_size,
        moe_router_topk=m.moe_router_topk,
        # Megatron's default is top-k then softmax over the k, i.e. HF norm_topk_prob=True;
        # pre-softmax (softmax over all experts, then top-k) is HF norm_topk_prob=False.
        moe_router_pre_softmax=not m.norm_topk_prob,
        moe_shared_expert_intermediate_size=m.moe_shared_expert_intermediate_size,
        moe_shared_expert_gate=m.moe_shared_expert_gate,
        moe_layer_freq=list(m.moe_layer_freq) if m.moe_layer_freq is not None else 1,
        moe_router_dtype="fp32",
        **_moe_training_kwargs(cfg),
    )


def _moe_training_kwargs(cfg: Config) -> dict:
    """Router/dispatch choices from the `moe` config group."""
    e = cfg.moe
    return dict(
        moe_token_dispatcher_type=e.dispatcher,
        moe_router_load_balancing_type=e.load_balancing,
        moe_aux_loss_coeff=e.aux_loss_coeff if e.load_balancing != "none" else 0.0,
        moe_z_loss_coeff=e.z_loss_coeff,
        moe_router_enable_expert_bias=e.expert_bias,
        moe_router_bias_update_rate=e.bias_update_rate,
        # Megatron-Core implements expert-bias balancing for sigmoid scores only.
        moe_router_score_function="sigmoid" if e.expert_bias else "softmax",
        moe_expert_capacity_factor=e.capacity_factor,
        moe_token_drop_policy="probs",
        moe_grouped_gemm=grouped_gemm_enabled(cfg),
    )


# Our precision names -> Megatron-Core's `fp8_recipe` and the recipe's default `fp8` format.
FP8_RECIPES = {
    "fp8_delayed": ("delayed", "hybrid"),
    "fp8_current": ("tensorwise", "hybrid"),  # per-tensor current scaling
    "fp8_blockwise": ("blockwise", "e4m3"),  # TE's Float8BlockScaling takes E4M3 only
}


def precision_kwargs(cfg: Config) -> dict:
    """TransformerConfig fields for `precision.*`: dtypes, and the FP8 recipe TE runs the GEMMs in.

    fp32/bf16 set no FP8 field; FP8 recipes keep bf16 parameters (fp32 under
    precision.fp8_emulate) and, through Transformer Engine, set `fp8` (format), `fp8_recipe`, and
    for delayed scaling the amax history length and reduction. Through torchao they set none:
    megatron_ext.fp8 marks the linear layers instead."""
    from megatron_ext.precision import fp8_backend

    p = cfg.precision
    dtype = torch.float32 if p.fp8_emulate else params_dtype(p.name)
    out = dict(params_dtype=dtype, pipeline_dtype=dtype, bf16=dtype == torch.bfloat16)
    if p.name in FP8_RECIPES and fp8_backend(p) == "te":
        recipe, default_format = FP8_RECIPES[p.name]
        out.update(fp8=p.fp8_format or default_format, fp8_recipe=recipe)
        if recipe == "delayed":
            out.update(fp8_amax_history_len=p.fp8_amax_history_len,
                       fp8_amax_compute_algo=p.fp8_amax_compute_algo)
    return out


def recompute_kwargs(cfg: Config) -> dict:
    """TransformerConfig fields for `train.recompute`.

    `selective` recomputes core attention (Megatron's default recompute module); `full`
    checkpoints every layer's input and reruns each layer (uniform method, one layer per unit)."""
    mode = cfg.train.recompute
    if mode == "selective":
        return dict(recompute_granularity="selective")
    if mode == "full":
        return dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    return {}


def transformer_config(cfg: Config) -> TransformerConfig:
    """Build the TransformerConfig for `cfg` on this machine (CPU: fusions off, CPU init)."""
    m, p = cfg.model, cfg.parallel
    on_gpu = torch.cuda.is_available()
    return TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        kv_channels=m.kv_channels,
        normalization="RMSNorm",
        layernorm_epsilon=m.norm_eps,
        add_bias_linear=False,
        add_qkv_bias=m.qkv_bias,
        qk_layernorm=m.qk_norm,
        gated_linear_unit=True,
        activation_func=F.silu,
        # Qwen trains without dropout; Megatron's defaults are 0.1.
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=cfg.train.init_method_std,
        tensor_model_parallel_size=p.tp,
        pipeline_model_parallel_size=p.pp,
        virtual_pipeline_model_parallel_size=p.vpp,
        num_layers_in_first_pipeline_stage=p.first_stage_layers,
        num_layers_in_last_pipeline_stage=p.last_stage_layers,
        context_parallel_size=p.cp,
        expert_model_parallel_size=p.ep,
        expert_tensor_parallel_size=p.etp or p.tp,
        sequence_parallel=p.sp,
        # The interleaved schedule sends activations and gradients to the same peer at once
        # (with pp=2, both neighbours are one rank). Batched isend/irecv posts them in an order
        # the receiver does not mirror, so same-shaped tensors can swap; Megatron-LM's default
        # for vpp, overlapped individual isend/irecv, keeps them matched.
        overlap_p2p_comm=p.vpp is not None,
        batch_p2p_comm=p.vpp is None,
        **precision_kwargs(cfg),
        **recompute_kwargs(cfg),
        use_cpu_initialization=not on_gpu,
        # Fused kernels are CUDA-only; on GPU Megatron picks them per spec.
        bias_activation_fusion=on_gpu,
        masked_softmax_fusion=on_gpu,
        # With no linear bias and no hidden dropout (above) bias-dropout-add is one add: Megatron's
        # fused version compiles to that same single kernel behind TorchDynamo and AOTAutograd's
        # per-call host overhead (about 100 us per call, forward and backward, on a CPU host,
        # against about 35 us eagerly), twice per layer and micro-batch.
        bias_dropout_fusion=False,
        # Weight gradients accumulate into the fp32 main_grad inside the GEMM (TE's own, or
        # megatron_ext.patches' stand-in for Apex's kernel); needs Megatron DDP's main_grad.
        gradient_accumulation_fusion=on_gpu,
        persist_layer_norm=on_gpu,
        apply_rope_fusion=False,
        # Loss is summed over tokens and normalised by the global token count, so any
        # DP/PP split of the batch gives the same gradient as one process.
        calculate_per_token_loss=True,
        # train.cuda_graph: the loop wraps the schedule in Megatron's full-iteration graph; no
        # per-layer graphs (the scope keeps the layers from making their own).
        **(dict(cuda_graph_impl="local", cuda_graph_scope="full_iteration",
                cuda_graph_warmup_steps=cfg.train.cuda_graph_warmup_steps) if cfg.train.cuda_graph else {}),
        **_moe_kwargs(cfg),
    )
