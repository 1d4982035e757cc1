"""Per-GPU training memory for a config: parameters, gradients, optimizer state, activations.

    python -m tools.estimate_memory model=qwen3_8b parallel.tp=4 parallel.pp=2 precision=bf16 \
        parallel.distributed_optimizer=true data.seq_length=4096 [--world-size N] [--json]

Static memory is counted exactly, per rank, from the model config and the layout, the way
Megatron-Core lays it out: the parameters each pipeline stage builds (vocabulary and linear
layers split over TP, routed experts over EP x ETP, layers over PP/VPP by Megatron's own
`get_num_layers_to_build` / `get_transformer_layer_offset`), the DDP gradient buffers (fp32,
`grad_reduce_in_fp32`; in buckets as `parallel.overlap_grad_reduce` cuts them, padded as Megatron
pads them for the distributed optimizer), and the
Adam state (exp_avg + exp_avg_sq in fp32, plus fp32 master weights when the parameters are
not fp32), sharded over the data-parallel(+context) group - or, for expert parameters with
EP > 1, the expert-data-parallel group - when `parallel.distributed_optimizer` is set.

Activation memory is an estimate (Korthikanti et al. 2022, "Reducing Activation Recomputation
in Large Transformer Models", adapted). Per layer and micro-batch, with s = seq / CP local
tokens per sequence, b micro-batch, h hidden, a heads, g query groups, d head dim, f FFN size,
t = TP and n = s*b/t with sequence parallelism (s*b without), counted in the activation dtype:

    attention   2*n*h                 RMSNorm input, QKV input
                + s*b*(a+2g)*d/t      Q, K, V kept by (flash/fused) attention
                + s*b*(a+g)*d/t       q, k before QK-norm (Qwen3 only)
                + s*b*a*d/t           attention output = output-projection input
    dense MLP   2*n*h + 3*s*b*f/t     RMSNorm input, FC1 input, SwiGLU input (2f), FC2 input
    MoE layer   2*n*h + 8*n*E bytes   RMSNorm/router input; fp32 router logits and scores
                + k*n*(ETP*h + 3*fe + h)   top-k token copies: expert input (all-gathered over
                                      ETP), SwiGLU input, FC2 input, weighted combine input
                + 3*s*b*fs/t + n*h    shared expert (SwiGLU + FC2 inputs, gated output)

No dropout (Qwen trains without it), no activation recomputation, and no s^2 attention terms
(fused attention keeps softmax statistics only). The last stage adds 2*n*h (final norm and
output-layer inputs) plus the fp32 softmax of the vocabulary-parallel cross entropy,
4*s*b*V/t bytes, for one micro-batch; every other stage keeps its n*h output per in-flight
micro-batch. Pipeline rank r holds min(PP - r, M) micro-batches under 1F1B (M micro-batches
per step); interleaved with VPP = v it holds min(2*(PP-r-1) + (v-1)*PP + 1, M*v) model-chunk
micro-batches, each worth one chunk's layers. Not counted: CUDA context, communication
buffers, transient tensors (e.g. the bf16 logits) and allocator fragmentation.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from megatron_ext.cli import fail, load_config, parse_tool_args
from megatron_ext.config import Config, ConfigError, validate
from megatron_ext.layout import Layout

ADAM_STATE_BYTES = 8  # exp_avg + exp_avg_sq, fp32
MASTER_WEIGHT_BYTES = 4  # fp32 copy of non-fp32 parameters
GRAD_BYTES = 4  # DDP grad buffers are fp32 (grad_reduce_in_fp32=True)
GIB = 1024 ** 3


@dataclass(frozen=True)
class Param:
    """One parameter tensor a rank builds: its elements and how DDP treats it."""

    name: str
    numel: int
    expert: bool = False
    """Routed-expert weight kept out of the dense buffer (EP > 1): reduced over expert-DP."""
    shared_embedding: bool = False
    """Embedding shared with the last stage: Megatron gives it its own bucket."""


# ---------------------------------------------------------------- parameters (exact)

def is_moe_layer(cfg: Config, layer: int) -> bool:
    m = cfg.model
    return m.is_moe and (m.moe_layer_freq is None or bool(m.moe_layer_freq[layer]))


def _attention_params(cfg: Config, lay: Layout, pre: str) -> List[Param]:
    m, t = cfg.model, lay.tp
    h, d = m.hidden_size, m.kv_channels
    qkv_rows = (m.num_attention_heads + 2 * m.num_query_groups) * d // t
    # Order of Megatron's named_parameters(): the projection is registered before QKV.
    out = [Param(pre + "input_layernorm.weight", h),
           Param(pre + "self_attention.linear_proj.weight", h * m.num_attention_heads * d // t),
           Param(pre + "self_attention.linear_qkv.weight", qkv_rows * h)]
    if m.qkv_bias:
        out.append(Param(pre + "self_attention.linear_qkv.bias", qkv_rows))
    if m.qk_norm:
        out += [Param(pre + "self_attention.q_layernorm.weight", d),
                Param(pre + "self_attention.k_layernorm.weight", d)]
    return out + [Param(pre + "pre_mlp_layernorm.weight", h)]


def _mlp_params(h: int, ffn: int, split: int, pre: str, expert: bool = False) -> List[Param]:
    """SwiGLU MLP: FC1 holds gate and up (2*ffn rows), both split over `split` ranks."""
    return [Param(pre + "linear_fc1.weight", 2 * ffn // split * h, expert),
            Param(pre + "linear_fc2.weight", h * (ffn // split), expert)]


def _moe_params(cfg: Config, lay: Layout, pre: str) -> List[Param]:
    m = cfg.model
    h = m.hidden_size
    out = [Param(pre + "router.weight", m.num_experts * h)]
    fe = m.moe_ffn_hidden_size or m.ffn_hidden_size
    for j in range(m.num_experts // lay.ep):
        out += _mlp_params(h, fe, lay.etp, f"{pre}experts.local_experts.{j}.", expert=lay.ep > 1)
    if m.moe_shared_expert_intermediate_size:
        if m.moe_shared_expert_gate:
            out.append(Param(pre + "shared_experts.gate_weight", h))
        out += _mlp_params(h, m.moe_shared_expert_intermediate_size, lay.tp, pre + "shared_experts.")
    return out


def layer_params(cfg: Config, lay: Layout, layer: int, local_index: int) -> List[Param]:
    """Parameters of global layer `layer`, built as the chunk's `local_index`-th layer."""
    pre = f"decoder.layers.{local_index}."
    mlp = (_moe_params(cfg, lay, pre + "mlp.") if is_moe_layer(cfg, layer)
           else _mlp_params(cfg.model.hidden_size, cfg.model.ffn_hidden_size, lay.tp, pre + "mlp."))
    return _attention_params(cfg, lay, pre) + mlp


def chunk_layers(tcfg, pp_rank: int, vp_stage) -> range:
    """Global layer indices of one model chunk, by Megatron-Core's own partitioning rules."""
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    count = get_num_layers_to_build(tcfg, vp_stage=vp_stage, pp_rank=pp_rank)
    offset = get_transformer_layer_offset(tcfg, vp_stage=vp_stage, pp_rank=pp_rank)
    return range(offset, offset + count)


def chunk_params(cfg: Config, lay: Layout, layers: range, pre_process: bool, post_process: bool) -> List[Param]:
    """One GPTModel chunk's parameters in named_parameters() order."""
    m = cfg.model
    if m.vocab_size % lay.tp:
        raise ConfigError(f"model.vocab_size={m.vocab_size} is not divisible by parallel.tp={lay.tp} "
                          "(the vocabulary is split over tensor-parallel ranks)")
    vocab_shard = m.vocab_size // lay.tp * m.hidden_size
    out = []
    if pre_process:
        # With PP > 1 a tied embedding is also held (as output layer) by the last stage.
        shared = m.tie_word_embeddings and lay.pp > 1 and not post_process
        out.append(Param("embedding.word_embeddings.weight", vocab_shard, shared_embedding=shared))
    for i, layer in enumerate(layers):
        out += layer_params(cfg, lay, layer, i)
    if post_process:
        out.append(Param("decoder.final_layernorm.weight", m.hidden_size))
        if not (m.tie_word_embeddings and pre_process):
            out.append(Param("output_layer.weight", vocab_shard))
    return out


# ---------------------------------------------------------------- DDP buffers and optimizer shards

@dataclass
class Buffer:
    """A DDP grad buffer: padded size, bucket bounds and each parameter's [start, end)."""

    expert: bool
    numel: int
    buckets: List[Tuple[int, int]]
    ranges: List[Tuple[int, int]]


def _pad(n: int, divisor: int) -> int:
    return -(-n // divisor) * divisor


def grad_buffer(params: Sequence[Param], distributed: bool, group_size: int, expert: bool,
                bucket_size: Optional[int] = None) -> Buffer:
    """Mirror of Megatron's `_ParamAndGradBuffer` layout: parameters in reverse order; a bucket
    closes once it holds `bucket_size` elements (None: one bucket), and a shared embedding gets
    its own; with the distributed optimizer each parameter starts 64-aligned and each bucket
    ends padded to a multiple of lcm(group size, 128)."""
    bucket_pad = math.lcm(group_size, 128) if distributed else 1
    param_pad = 64 if distributed else 1
    start = bucket_start = 0
    buckets, ranges, open_bucket = [], [], False
    for p in reversed(params):
        start = _pad(start, param_pad)
        if p.shared_embedding and open_bucket:
            start = _pad(start, bucket_pad)
            buckets.append((bucket_start, start))
            bucket_start, open_bucket = start, False
        ranges.append((start, start + p.numel))
        start += p.numel
        open_bucket = True
        if p.shared_embedding or (bucket_size is not None and start - bucket_start >= bucket_size):
            start = _pad(start, bucket_pad)
            buckets.append((bucket_start, start))
            bucket_start, open_bucket = start, False
    if open_bucket:
        start = _pad(start, bucket_pad)
        buckets.append((bucket_start, start))
    return Buffer(expert, start, buckets, ranges)


def bucket_size(cfg: Config, lay: Layout, pp_rank: int, chunk: int) -> Optional[int]:
    """Elements per gradient bucket of a model chunk, as Megatron's DDP sets them: with the
    reduction overlapped (`megatron_ext.build.overlaps_grad_reduce`), parallel.grad_bucket_size
    or max(40M, 1M x DP), except one bucket on pipeline ranks and virtual stages after the first;
    otherwise one bucket."""
    from megatron_ext.build import overlaps_grad_reduce

    if not overlaps_grad_reduce(cfg, lay.dp_cp, lay.edp) or pp_rank > 0 or chunk > 0:
        return None
    return cfg.parallel.grad_bucket_size or max(40_000_000, 1_000_000 * lay.dp)


def chunk_buffers(params: Sequence[Param], lay: Layout, distributed: bool,
                  bucket_size: Optional[int] = None) -> List[Buffer]:
    """The dense and (EP > 1) expert-parallel grad buffers of one DDP-wrapped chunk."""
    out = []
    for expert, size in ((False, lay.dp_cp), (True, lay.edp)):
        group = [p for p in params if p.expert == expert]
        if group:
            out.append(grad_buffer(group, distributed, size, expert, bucket_size))
    return out


def shard_elements(buf: Buffer, rank: int, size: int) -> int:
    """Parameter elements (padding excluded) in `rank`'s shard of every bucket of `buf`."""
    total = 0
    for lo, hi in buf.buckets:
        shard = (hi - lo) // size
        s_lo, s_hi = lo + rank * shard, lo + (rank + 1) * shard
        total += sum(max(0, min(e, s_hi) - max(b, s_lo)) for b, e in buf.ranges)
    return total


# ---------------------------------------------------------------- activations (estimate)

def _attention_act(cfg: Config, lay: Layout, tokens: int, n: float) -> float:
    m = cfg.model
    a, g, d = m.num_attention_heads, m.num_query_groups, m.kv_channels
    elems = 2 * n * m.hidden_size + tokens * (a + 2 * g) * d / lay.tp + tokens * a * d / lay.tp
    if m.qk_norm:
        elems += tokens * (a + g) * d / lay.tp
    return elems


def _moe_act_bytes(cfg: Config, lay: Layout, tokens: int, n: float, act: int) -> float:
    m = cfg.model
    h, k = m.hidden_size, m.moe_router_topk
    fe = m.moe_ffn_hidden_size or m.ffn_hidden_size
    elems = 2 * n * h + k * n * (lay.etp * h + 3 * fe + h)
    if m.moe_shared_expert_intermediate_size:
        elems += 3 * tokens * m.moe_shared_expert_intermediate_size / lay.tp + n * h
    return elems * act + 8 * n * m.num_experts


def layer_activation_bytes(cfg: Config, lay: Layout, layer: int) -> float:
    """Bytes one micro-batch leaves stored in `layer` for the backward pass (formula above)."""
    act = activation_bytes_per_element(cfg)
    tokens = cfg.data.seq_length // lay.cp * cfg.train.micro_batch_size
    n = tokens / lay.tp if lay.sp else tokens
    attention = _attention_act(cfg, lay, tokens, n) * act
    if is_moe_layer(cfg, layer):
        return attention + _moe_act_bytes(cfg, lay, tokens, n, act)
    return attention + (2 * n * cfg.model.hidden_size + 3 * tokens * cfg.model.ffn_hidden_size / lay.tp) * act


def activation_bytes_per_element(cfg: Config) -> int:
    # FP8 recipes keep most activations in bf16 (TE stores some GEMM inputs in FP8: less).
    return 4 if cfg.precision.name == "fp32" else 2


def in_flight(lay: Layout, pp_rank: int, microbatches: int) -> int:
    """Model-chunk micro-batches whose activations pipeline rank `pp_rank` holds at peak."""
    if lay.vpp == 1:
        return min(lay.pp - pp_rank, microbatches)
    warmup = 2 * (lay.pp - pp_rank - 1) + (lay.vpp - 1) * lay.pp
    return min(warmup + 1, microbatches * lay.vpp)


def _edge_activation_bytes(cfg: Config, lay: Layout, last: bool) -> float:
    """Per micro-batch: the last stage's head (norm, output layer, fp32 softmax); elsewhere the
    stage output kept until its backward."""
    act = activation_bytes_per_element(cfg)
    tokens = cfg.data.seq_length // lay.cp * cfg.train.micro_batch_size
    n = tokens / lay.tp if lay.sp else tokens
    if last:
        return 2 * n * cfg.model.hidden_size * act + 4 * tokens * cfg.model.vocab_size / lay.tp
    return n * cfg.model.hidden_size * act


# ---------------------------------------------------------------- per stage

@dataclass
class StageMemory:
    """Memory of one pipeline rank (the most loaded data-parallel rank for optimizer shards)."""

    pp_rank: int
    layers: List[List[int]]
    """[first, last] global layer index of each model chunk (empty chunk: [])."""
    params: int
    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    activation_bytes_per_microbatch: int
    in_flight_microbatches: int
    """Model-chunk micro-batches held at peak (with VPP each holds one chunk's layers)."""
    activation_bytes: int
    total_bytes: int


def _chunks(cfg: Config, lay: Layout, tcfg, pp_rank: int):
    """(layers, params) of each model chunk of a pipeline rank."""
    out = []
    for v in range(lay.vpp):
        vp = v if lay.vpp > 1 else None
        layers = chunk_layers(tcfg, pp_rank, vp)
        pre = pp_rank == 0 and v == 0
        post = pp_rank == lay.pp - 1 and v == lay.vpp - 1
        out.append((layers, chunk_params(cfg, lay, layers, pre, post)))
    return out


def rank_buffers(cfg: Config, lay: Layout, tcfg, pp_rank: int) -> Tuple[int, List[Buffer]]:
    """Parameter count and DDP grad buffers (every chunk) of a pipeline rank."""
    params, buffers = 0, []
    for chunk, (_, plist) in enumerate(_chunks(cfg, lay, tcfg, pp_rank)):
        params += sum(p.numel for p in plist)
        buffers += chunk_buffers(plist, lay, cfg.parallel.distributed_optimizer, bucket_size(cfg, lay, pp_rank, chunk))
    return params, buffers


def _optimizer_elements(cfg: Config, lay: Layout, buffers: List[Buffer], expert: bool, rank: int) -> int:
    """Parameter elements whose Adam state this rank holds, in the dense or expert buffers."""
    mine = [b for b in buffers if b.expert == expert]
    if cfg.parallel.distributed_optimizer:
        return sum(shard_elements(b, rank, lay.edp if expert else lay.dp_cp) for b in mine)
    return sum(e - s for b in mine for s, e in b.ranges)


def rank_static(cfg: Config, lay: Layout, tcfg, pp_rank: int, dp_rank=None, edp_rank=None) -> Dict[str, int]:
    """Exact parameter count and parameter/grad/optimizer bytes of one rank.

    `dp_rank` indexes the DP x CP group and `edp_rank` the expert-DP group; they only matter
    with the distributed optimizer, whose shards differ by padding. None: the most loaded."""
    from megatron_ext.transformer import params_dtype

    param_size = torch.finfo(params_dtype(cfg.precision.name)).bits // 8
    per_element = ADAM_STATE_BYTES + (MASTER_WEIGHT_BYTES if param_size != 4 else 0)
    params, buffers = rank_buffers(cfg, lay, tcfg, pp_rank)
    held = 0
    for expert, size, rank in ((False, lay.dp_cp, dp_rank), (True, lay.edp, edp_rank)):
        ranks = range(size) if rank is None else [rank]
        held += max(_optimizer_elements(cfg, lay, buffers, expert, r) for r in ranks)
    return dict(params=params, param_bytes=params * param_size,
                grad_bytes=sum(b.numel for b in buffers) * GRAD_BYTES, optimizer_bytes=held * per_element)


def stage_activation_bytes(cfg: Config, lay: Layout, tcfg, pp_rank: int) -> Tuple[float, int, float]:
    """(bytes per micro-batch through all of the rank's chunks, chunk micro-batches held at peak,
    bytes held at peak) of a pipeline rank; see the module docstring for the formula."""
    chunks = _chunks(cfg, lay, tcfg, pp_rank)
    held = in_flight(lay, pp_rank, lay.microbatches)
    layer_bytes = sum(layer_activation_bytes(cfg, lay, i) for layers, _ in chunks for i in layers)
    last = pp_rank == lay.pp - 1
    head = _edge_activation_bytes(cfg, lay, True) if last else 0.0
    # Every chunk but the model's last keeps its output until that micro-batch's backward.
    outputs = (lay.vpp - (1 if last else 0)) * _edge_activation_bytes(cfg, lay, False)
    # Held chunk micro-batches are spread over the rank's chunks: charge the mean chunk; the
    # last stage runs each micro-batch's loss and backward back to back, so holds one head.
    peak = held * (layer_bytes + outputs) / lay.vpp + head
    return layer_bytes + outputs + head, held, peak


def stage_memory(cfg: Config, lay: Layout, tcfg, pp_rank: int) -> StageMemory:
    static = rank_static(cfg, lay, tcfg, pp_rank)
    per_microbatch, held, peak = stage_activation_bytes(cfg, lay, tcfg, pp_rank)
    layers = [[c.start, c.stop - 1] if len(c) else [] for c, _ in _chunks(cfg, lay, tcfg, pp_rank)]
    static_bytes = static["param_bytes"] + static["grad_bytes"] + static["optimizer_bytes"]
    return StageMemory(pp_rank=pp_rank, layers=layers, **static,
                       activation_bytes_per_microbatch=int(round(per_microbatch)), in_flight_microbatches=held,
                       activation_bytes=int(round(peak)), total_bytes=static_bytes + int(round(peak)))


def estimate(cfg: Config, world_size: int) -> Dict:
    """Validate `cfg` at `world_size` and estimate every pipeline stage's per-GPU memory."""
    from megatron_ext.transformer import transformer_config

    validate(cfg, world_size, check_device=False)  # a plan for other machines
    lay = Layout.of(cfg, world_size)
    try:
        tcfg = transformer_config(cfg)
    except (AssertionError, ValueError) as e:  # Megatron-Core's own checks, past ours
        raise ConfigError(f"Megatron-Core rejects this config: {e}") from None
    stages = [stage_memory(cfg, lay, tcfg, r) for r in range(lay.pp)]
    worst = max(stages, key=lambda s: s.total_bytes)
    return dict(model=cfg.model.name, precision=cfg.precision.name, layout=asdict(lay),
                distributed_optimizer=cfg.parallel.distributed_optimizer,
                seq_length=cfg.data.seq_length, micro_batch_size=cfg.train.micro_batch_size,
                microbatches=lay.microbatches,
                stages=[asdict(s) for s in stages], most_loaded_stage=worst.pp_rank,
                total_bytes=worst.total_bytes)


# ---------------------------------------------------------------- CLI

def _gib(n: float) -> str:
    return f"{n / GIB:8.2f}"


def format_report(est: Dict) -> str:
    lay = est["layout"]
    lines = [f"{est['model']}  precision={est['precision']}  world={lay['world']}: tp={lay['tp']} pp={lay['pp']} "
             f"vpp={lay['vpp']} cp={lay['cp']} ep={lay['ep']} etp={lay['etp']} dp={lay['dp']} "
             f"sp={lay['sp']} (expert dp={lay['edp']})",
             f"distributed optimizer={est['distributed_optimizer']}  seq={est['seq_length']}  "
             f"micro-batch={est['micro_batch_size']}  micro-batches/step={est['microbatches']}",
             "",
             "stage  layers           params   params GiB  grads GiB  optim GiB  act/mb GiB  in-flight"
             "  act GiB  total GiB"]
    for s in est["stages"]:
        layers = ",".join(f"{a}-{b}" if a != b else f"{a}" for a, b in (c for c in s["layers"] if c)) or "-"
        lines.append(f"{s['pp_rank']:5d}  {layers:<12} {s['params']:>13,}  {_gib(s['param_bytes'])}    "
                     f"{_gib(s['grad_bytes'])}   {_gib(s['optimizer_bytes'])}    "
                     f"{_gib(s['activation_bytes_per_microbatch'])}  {s['in_flight_microbatches']:9d}  "
                     f"{_gib(s['activation_bytes'])}   {_gib(s['total_bytes'])}")
    lines += ["", f"most loaded: stage {est['most_loaded_stage']}, {est['total_bytes'] / GIB:.2f} GiB per GPU "
              "(static memory exact; activations estimated, see `python -m tools.estimate_memory --help`)"]
    return "\n".join(lines)


def parse_args(argv: Sequence[str]) -> Tuple[argparse.Namespace, List[str]]:
    """Flags, and the Hydra `key=value` overrides (anything else is an error)."""
    parser = argparse.ArgumentParser(prog="python -m tools.estimate_memory", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world-size", type=int, default=None,
                        help="GPUs in the job (default: the smallest the layout fits)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args, rest = parse_tool_args(parser, argv)
    if args.world_size is not None and args.world_size < 1:
        parser.error(f"--world-size={args.world_size} must be >= 1")
    return args, rest


def main(argv=None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(overrides)
        world = args.world_size or Layout.of(cfg).world
        est = estimate(cfg, world)
    except ConfigError as e:
        fail(str(e))
    print(json.dumps(est, indent=2) if args.json else format_report(est))
    return 0


if __name__ == "__main__":
    sys.exit(main())
