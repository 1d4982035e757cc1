"""Training throughput of a named model: tokens/s/GPU, model TFLOP/s/GPU, MFU, peak memory.

    python -m tools.bench_train model=qwen2_5_1_5b precision=bf16 data.seq_length=4096 \
        train.micro_batch_size=1 train.global_batch_size=8 [--layers N] [--steps 20] \
        [--warmup 5] [--data synthetic|corpus] [--compare transformers] [--profile N] [--json OUT]

Runs `--warmup` + `--steps` optimizer steps of the one training loop (any parallel/precision
overrides apply; launch under torchrun for several GPUs) and reports over the timed steps only.
`--layers N` keeps the first N layers of the model (and of a MoE model's dense/MoE layer pattern)
so that a large model fits one GPU. `--data synthetic` (default) feeds seeded Zipf-distributed
token ids whose second half repeats the first, so no tokenizer or corpus is needed and the loss
still falls; `--data corpus` uses the configured data (the bundled sample by default). With
`cpt.document_mask=true` (e.g. `stage=long_context`) the synthetic samples are documents
separated by EOD tokens, trained document-masked as the CPT stage does: 1/8 to 1/2 of the
sequence long, or 1/2 to 3/2 of `--doc-length N` tokens (web or code corpora pack dozens of
documents into a long sequence).

`--profile N` runs N more steps after the timed ones under torch.profiler and prints the
operators with the most self time on the device (the JSON's `profile`): what to optimise next.
The same steps run under cProfile too, which ranks the Python functions by their own host time
(`profile_python`; the main thread only: on GPUs the backward pass runs in autograd's device
threads and shows as `run_backward`), for when the device waits for the host.

`--compare transformers` then trains the same architecture with Hugging Face transformers in
the same process, as a peer: the HF config of our model config (after `--layers`), the same
synthetic samples in the same order, sequence length, micro-batch and global batch (gradient
accumulation), SDPA attention, bf16 autocast over fp32 master weights on CUDA (fp32 on CPU),
torch.optim.AdamW (fused on CUDA) with our lr schedule, betas, eps, weight decay (not on
biases and norms, as Megatron) and gradient clipping, timed the same way over the same
warmup/timed steps. Our model is freed before the peer is built; on GPU each run's peak memory
is its own. It reports the peer's tokens/s and MFU (same FLOP formula) and ours / transformers.
The peer runs in one process only: --compare refuses a world size above 1.

Model FLOPs (training = forward + backward = 3 x forward), per token of sequence length s:

    6 * N_active + 12 * L * h_attn * s

N_active counts the matmul weights a token passes through: per layer the QKV projection
h*(a+2g)*d and the output projection a*d*h, then a dense SwiGLU MLP 3*h*f, or in a MoE layer
the router h*E, only the top-k routed experts k*3*h*f_e, and the shared expert 3*h*f_s (+ h for
its gate); plus the output layer h*V (counted even when tied to the embedding). The embedding
lookup, norms and biases are excluded. The attention term counts QK^T and AV (4*s*h_attn
forward per token and layer, h_attn = a*d heads x head dim) over the full s x s score matrix,
as PaLM and llm-foundry do (no causal-mask discount). Model TFLOP/s/GPU = FLOPs per token x
tokens/s / GPUs; MFU divides it by the GPU's dense peak (table below: BF16 for bf16, FP8 for
the FP8 recipes; no peak for fp32 or unknown devices, where MFU is reported as n/a). Recompute
does not change these model FLOPs. Peak memory is torch.cuda.max_memory_allocated on GPU and
the process's peak RSS on CPU, the maximum over ranks.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import logging
import gc
import math
import os
import pstats
import resource
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from megatron_ext import dist, stages
from megatron_ext.callbacks import Callback
from megatron_ext.cli import fail, load_config, override_value, parse_tool_args
from megatron_ext.config import Config, ConfigError, validate
from megatron_ext.layout import Layout
from megatron_ext.pretrain import PretrainStage
from posttrain.cpt import document_masked

log = logging.getLogger("tools.bench_train")

FLOP_FORMULA = ("model FLOPs/token = 6*N_active + 12*L*h_attn*s  (N_active: matmul weights a token uses: "
                "QKV + out proj, dense MLP or router + top-k experts + shared expert, output layer; "
                "no embedding lookup, norms or biases; attention over the full s x s scores)")

# Dense (no sparsity) peak TFLOP/s per GPU by device-name pattern: (bf16, fp8).
PEAK_TFLOPS = {
    "H100 SXM / H100 80GB HBM3": (("H100",), ("PCIe", "NVL"), 989.0, 1979.0),
    "H200": (("H200",), (), 989.0, 1979.0),
}
SYNTHETIC_VOCAB = 16384  # synthetic ids come from the first 16k of the vocabulary
QWEN_EOD = 151643  # Qwen's <|endoftext|>: above SYNTHETIC_VOCAB, so it only ever ends a document


# ---------------------------------------------------------------- model FLOPs

def active_params(cfg: Config) -> Dict[str, int]:
    """Matmul weights one token passes through, by part (see the module docstring)."""
    from tools.estimate_memory import is_moe_layer

    m = cfg.model
    h, a, g, d = m.hidden_size, m.num_attention_heads, m.num_query_groups, m.kv_channels
    parts = dict(attention=0, mlp=0, router=0, experts=0, shared_expert=0, output_layer=h * m.vocab_size)
    for layer in range(m.num_layers):
        parts["attention"] += h * (a + 2 * g) * d + a * d * h
        if not is_moe_layer(cfg, layer):
            parts["mlp"] += 3 * h * m.ffn_hidden_size
            continue
        parts["router"] += h * m.num_experts
        parts["experts"] += m.moe_router_topk * 3 * h * (m.moe_ffn_hidden_size or m.ffn_hidden_size)
        if m.moe_shared_expert_intermediate_size:
            parts["shared_expert"] += 3 * h * m.moe_shared_expert_intermediate_size
            parts["shared_expert"] += h if m.moe_shared_expert_gate else 0
    parts["total"] = sum(parts.values())
    return parts


def flops_per_token(cfg: Config) -> float:
    """Training model FLOPs per token: 6*N_active + 12*L*h_attn*s."""
    m = cfg.model
    attention = 12 * m.num_layers * m.num_attention_heads * m.kv_channels * cfg.data.seq_length
    return 6 * active_params(cfg)["total"] + attention


def peak_tflops(device_name: str, precision: str) -> Optional[float]:
    """Dense peak TFLOP/s of a GPU for a precision, or None when not in the table."""
    if precision not in ("bf16",) and not precision.startswith("fp8_"):
        return None
    for include, exclude, bf16, fp8 in PEAK_TFLOPS.values():
        if any(k in device_name for k in include) and not any(k in device_name for k in exclude):
            return fp8 if precision.startswith("fp8_") else bf16
    return None


# ---------------------------------------------------------------- config and data

def cut_layers(cfg: Config, layers: int) -> None:
    """Keep the first `layers` layers (and the matching prefix of a MoE layer pattern)."""
    m = cfg.model
    if not 1 <= layers <= m.num_layers:
        raise ConfigError(f"--layers={layers} must be in [1, model.num_layers={m.num_layers}]")
    m.num_layers = layers
    if m.moe_layer_freq is not None:
        m.moe_layer_freq = list(m.moe_layer_freq)[:layers]
    if m.max_window_layers is not None:
        m.max_window_layers = min(m.max_window_layers, layers)


class SyntheticDataset(torch.utils.data.Dataset):
    """Seeded token ids, Zipf-distributed over SYNTHETIC_VOCAB ids; the second half of each
    sequence repeats the first, so a model can learn both the unigram law and copying.

    With `eod`, a sample is a run of such documents, each ended by `eod`, for document-masked
    (packed) training: lengths 1/8 to 1/2 of the sample, or with `doc_length`, 1/2 to 3/2 of it.
    """

    def __init__(self, samples: int, seq_length: int, vocab_size: int, seed: int, eod: Optional[int] = None,
                 doc_length: Optional[int] = None):
        self.samples, self.seq, self.seed, self.eod = samples, seq_length, seed, eod
        self.vocab = min(vocab_size, SYNTHETIC_VOCAB)
        n = seq_length + 1
        self.doc_lengths = (max(2, n // 8), max(3, n // 2 + 1)) if doc_length is None else \
            (max(2, doc_length // 2), max(3, doc_length * 3 // 2 + 1))

    def __len__(self) -> int:
        return self.samples

    def _document(self, rng: np.random.Generator, length: int) -> np.ndarray:
        first = (rng.zipf(1.2, size=(length + 1) // 2) - 1) % self.vocab
        return np.concatenate([first, first])[:length]

    def __getitem__(self, idx: int) -> Dict[str, torch.Tensor]:
        rng = np.random.default_rng((self.seed, idx))
        n = self.seq + 1
        if self.eod is None:
            ids = self._document(rng, n)
        else:
            docs, total = [], 0
            while total < n:
                length = int(rng.integers(*self.doc_lengths))
                docs += [self._document(rng, length - 1), np.array([self.eod])]
                total += length
            ids = np.concatenate(docs)[:n]
        ids = torch.from_numpy(ids.astype(np.int64))
        return dict(tokens=ids[:-1], labels=ids[1:], loss_mask=torch.ones(self.seq),
                    position_ids=torch.arange(self.seq))


class SyntheticStage(PretrainStage):
    """Pretraining on SyntheticDataset (no tokenizer or corpus needed)."""

    def datasets(self, cfg, train_samples: int, valid_samples: int):
        return SyntheticDataset(train_samples, cfg.data.seq_length, cfg.model.vocab_size, cfg.train.seed), None


def make_stage(cfg: Config, data: str, doc_length: Optional[int] = None):
    """The bench's stage: `corpus` is the configured stage itself (the registry's, on its own
    data); `synthetic` pretrains on random tokens, document-masked when the config says so (the
    CPT stage's packing, so long-context runs measure the path they train on), with documents
    of about `doc_length` tokens where given."""
    if data == "corpus":
        return stages.make(cfg)
    if not document_masked(cfg):
        return SyntheticStage()
    from posttrain.cpt import CPTStage

    class SyntheticDocumentStage(CPTStage):
        def datasets(self, cfg, train_samples: int, valid_samples: int):
            eod = min(QWEN_EOD, cfg.model.vocab_size - 1)
            self._packing = (eod, 2 * cfg.parallel.cp)  # what CPTStage sets from the tokenizer
            return SyntheticDataset(train_samples, cfg.data.seq_length, cfg.model.vocab_size,
                                    cfg.train.seed, eod=eod, doc_length=doc_length), None

    return SyntheticDocumentStage()


# ---------------------------------------------------------------- profile

class Profiler(Callback):
    """torch.profiler (and cProfile) over the run's last `steps` optimizer steps (run after the
    timed ones, so profiling overhead never enters the numbers). `table()` ranks the operators
    by their own time on the device (host time on CPU): the list to work down when optimising."""

    def __init__(self, total_steps: int, steps: int):
        self.start_at, self.profiler, self.python = total_steps - steps, None, None
        self.total_ms = self.host_total_ms = self.kernel_launches = self.python_total_ms = None
        self.host_rows: List[Dict] = []
        self.python_rows: List[Dict] = []

    def before_step(self, run) -> None:
        if run.state.step == self.start_at and self.profiler is None:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(activities=activities)
            self.profiler.start()
            self.python = cProfile.Profile()
            self.python.enable()

    def table(self, top: int = 30) -> List[Dict]:
        """The `top` entries by self time: name, calls, milliseconds, share of all self time. On
        a GPU the entries are kernels (the operators that launch them would count the same time
        twice), and `host_rows` ranks the operators by their own host time (what to cut where
        the kernels leave the device idle); on CPU the entries are operators."""
        if self.profiler is None:
            return []
        self.python.disable()
        self.profiler.stop()
        self.python_rows, self.python_total_ms = python_rows(self.python, 15)
        events = self.profiler.key_averages()
        if not torch.cuda.is_available():
            rows, self.total_ms = _ranked(events, lambda e: e.self_cpu_time_total, top)
            return rows
        on_device = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        # (user annotations such as the optimizer's step span kernels listed on their own)
        kernels = [e for e in on_device if not getattr(e, "is_user_annotation", False)]
        ops = [e for e in events if e.device_type != torch.autograd.DeviceType.CUDA]
        self.kernel_launches = sum(e.count for e in kernels)
        self.host_rows, self.host_total_ms = _ranked(ops, lambda e: e.self_cpu_time_total, 15)
        rows, self.total_ms = _ranked(kernels or events, lambda e: e.self_device_time_total, top)
        return rows


def python_rows(profile: cProfile.Profile, top: int) -> Tuple[List[Dict], float]:
    """The `top` Python functions (and builtins) of a cProfile run by their own time, as rows
    like `_ranked`'s, named `path:line(function)` relative to the package they belong to."""
    stats = pstats.Stats(profile).stats  # {(file, line, function): (calls, ncalls, own s, cumulative s, callers)}
    rows = [dict(name=f"{_short_path(file)}:{line}({function})" if line else function, calls=ncalls,
                 self_ms=own * 1e3) for (file, line, function), (_, ncalls, own, _, _) in stats.items()]
    total = sum(r["self_ms"] for r in rows) or 1.0
    rows.sort(key=lambda r: -r["self_ms"])
    return [dict(r, share=r["self_ms"] / total) for r in rows[:top]], total


def _short_path(file: str) -> str:
    """A source path from its package on (site-packages/torch/... -> torch/...; this repo's relative)."""
    for marker in ("site-packages" + os.sep, "dist-packages" + os.sep):
        if marker in file:
            return file.split(marker, 1)[1]
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
    return file[len(here):] if file.startswith(here) else file


def _ranked(events, microseconds, top: int) -> Tuple[List[Dict], float]:
    """The `top` events by `microseconds(event)`, as rows with their share, and the total (ms)."""
    rows = [(e.key, e.count, microseconds(e) / 1e3) for e in events]
    total = sum(ms for _, _, ms in rows) or 1.0
    rows.sort(key=lambda r: -r[2])
    return [dict(name=name, calls=calls, self_ms=ms, share=ms / total) for name, calls, ms in rows[:top]], total


def _spread(seconds: List[float]) -> str:
    """min / median / max of the timed steps: an outlier (a collection pause, a recompilation)
    shows here rather than only in the mean."""
    ordered = sorted(seconds)
    return f"min {ordered[0]:.4f}, median {ordered[len(ordered) // 2]:.4f}, max {ordered[-1]:.4f}"


def format_profile(summary: Dict, steps: int) -> str:
    """The profile's table; on a GPU also how much of a step the kernels fill (the rest is the
    device waiting for the host), how many kernels a step launches, and the host's own top list."""
    rows = summary["profile"]
    where = "kernels by self device" if torch.cuda.is_available() else "operators by self host"
    lines = [f"profile: top {where} time over {steps} step(s)"]
    lines += _profile_lines(rows)
    host = summary.get("profile_host")
    if host:
        busy = summary["profile_total_ms"] / 1e3 / steps / summary["step_time_s"]
        lines.append(f"  kernels fill {100 * busy:.0f}% of the timed step time ({summary['step_time_s']:.3f} s); "
                     f"{summary['profile_kernel_launches'] / steps:,.0f} kernel launches per step")
        lines.append(f"profile: top operators by self host time ({summary['profile_host_total_ms'] / steps:.0f} ms "
                     "of host time per step)")
        lines += _profile_lines(host)
    python = summary.get("profile_python")
    if python:
        lines.append(f"profile: top Python functions by own host time, main thread "
                     f"({summary['profile_python_total_ms'] / steps:.0f} ms per step under cProfile)")
        lines += _profile_lines(python)
    return "\n".join(lines)


def _profile_lines(rows: List[Dict]) -> List[str]:
    return [f"  {100 * r['share']:5.1f}%  {r['self_ms']:10.2f} ms  {r['calls']:7d}  {r['name'][:90]}" for r in rows]


# ---------------------------------------------------------------- measurement

def peak_memory_bytes() -> Tuple[int, str]:
    """This process's peak memory and how it was measured."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated(), "torch.cuda.max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak RSS (CPU)"


def _max_over_ranks(value: float) -> float:
    if not torch.distributed.is_initialized():
        return value
    t = torch.tensor([float(value)], dtype=torch.float64)
    t = t.cuda() if torch.cuda.is_available() else t
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return float(t.item())


def summarize(cfg: Config, history: List[dict], warmup: int, world: int, spec: str) -> Dict:
    """Bench result over the steps after `warmup` (loop records carry global tokens/s)."""
    timed = history[warmup:]
    tokens = cfg.train.global_batch_size * cfg.data.seq_length
    seconds = [tokens / r["tokens_per_s"] for r in timed]
    tps_gpu = tokens * len(timed) / sum(seconds) / world
    fpt = flops_per_token(cfg)
    tflops = fpt * tps_gpu / 1e12
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    peak = peak_tflops(device, cfg.precision.name) if device != "cpu" else None
    memory, memory_kind = peak_memory_bytes()
    p = cfg.parallel
    return dict(
        model=cfg.model.name, num_layers=cfg.model.num_layers, precision=cfg.precision.name, spec=spec,
        device=device, world_size=world,
        layout=dict(tp=p.tp, pp=p.pp, vpp=p.vpp, cp=p.cp, ep=p.ep, etp=p.etp or p.tp, sp=p.sp,
                    dp=Layout.of(cfg, world).dp, distributed_optimizer=p.distributed_optimizer),
        recompute=cfg.train.recompute, cuda_graph=cfg.train.cuda_graph, seq_length=cfg.data.seq_length,
        micro_batch_size=cfg.train.micro_batch_size, global_batch_size=cfg.train.global_batch_size,
        warmup_steps=warmup, timed_steps=len(timed), step_time_s=sum(seconds) / len(seconds), step_times_s=seconds,
        tokens_per_s_per_gpu=tps_gpu, active_params=active_params(cfg), model_flops_per_token=fpt,
        flop_formula=FLOP_FORMULA, model_tflops_per_gpu=tflops, peak_tflops=peak,
        mfu=tflops / peak if peak else None, peak_memory_bytes=int(_max_over_ranks(memory)),
        peak_memory_kind=memory_kind, losses=[r["loss"] for r in history],
    )


def format_report(r: Dict) -> str:
    lay = r["layout"]
    peak = (f"{r['peak_tflops']:.0f} TFLOP/s dense {r['precision']}" if r["peak_tflops"]
            else f"no peak known for {r['device']} at {r['precision']}")
    mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
    spec = r["spec"] + (" (no Transformer Engine: torch SDPA attention, compiled fusions)"
                        if r["spec"] == "local" and r["device"] != "cpu" else "")
    return "\n".join([
        f"bench: {r['model']} ({r['num_layers']} layers), precision={r['precision']}, spec={spec}, "
        f"recompute={r['recompute']}" + (", the step as one CUDA graph" if r.get("cuda_graph") else ""),
        f"  device: {r['device']} x {r['world_size']}; tp={lay['tp']} pp={lay['pp']} cp={lay['cp']} "
        f"ep={lay['ep']} dp={lay['dp']} sp={lay['sp']} distributed_optimizer={lay['distributed_optimizer']}",
        f"  seq={r['seq_length']} micro_batch={r['micro_batch_size']} global_batch={r['global_batch_size']}; "
        f"{r['timed_steps']} timed steps after {r['warmup_steps']} warmup",
        f"  step time          {r['step_time_s']:.4f} s (mean; {_spread(r['step_times_s'])})",
        f"  tokens/s/GPU       {r['tokens_per_s_per_gpu']:,.1f}",
        f"  active params      {r['active_params']['total']:,} (matmul weights per token)",
        f"  FLOPs/token        {r['model_flops_per_token']:.4e}",
        f"  model TFLOP/s/GPU  {r['model_tflops_per_gpu']:.4f}",
        f"  peak               {peak}",
        f"  MFU                {mfu}",
        f"  peak memory        {r['peak_memory_bytes'] / 2**30:.3f} GiB ({r['peak_memory_kind']})",
        f"  losses             {' '.join(f'{x:.4f}' for x in r['losses'])}",
        f"  formula: {r['flop_formula']}",
    ])


# ---------------------------------------------------------------- the transformers peer

def hf_peer_model(cfg: Config, device: torch.device) -> torch.nn.Module:
    """Our model config as a transformers model: random init at our std, fp32 weights, SDPA."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from models import registry

    hf = AutoConfig.for_model(**registry.config_to_hf(cfg.model))
    hf.initializer_range, hf.use_cache = cfg.train.init_method_std, False  # training: no KV cache
    if cfg.model.num_experts:  # the same load-balancing loss as ours, when ours has one
        hf.output_router_logits = cfg.moe.load_balancing == "aux_loss"
        hf.router_aux_loss_coef = cfg.moe.aux_loss_coeff
    torch.manual_seed(cfg.train.seed)
    with device:
        model = AutoModelForCausalLM.from_config(hf, attn_implementation="sdpa")
    return model.float().train()


def peer_batches(cfg: Config, dataset, step: int, device: torch.device):
    """The micro-batches of optimizer step `step`: global samples in order, as ours at DP=1."""
    t = cfg.train
    for first in range(step * t.global_batch_size, (step + 1) * t.global_batch_size, t.micro_batch_size):
        items = [dataset[i] for i in range(first, first + t.micro_batch_size)]
        yield {k: torch.stack([x[k] for x in items]).to(device, non_blocking=True)
               for k in ("tokens", "labels", "position_ids")}


def train_peer(cfg: Config, warmup: int) -> Dict:
    """Train the transformers peer for cfg.train.steps steps; its bench numbers over the timed ones."""
    import transformers

    from megatron_ext.build import lr_scheduler

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    left_over = torch.cuda.memory_allocated() if cuda else 0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    model = hf_peer_model(cfg, device)
    t = cfg.train
    params = [p for p in model.parameters() if p.requires_grad]
    # Megatron decays matrices only (not biases or norm weights); the scheduler scales by wd_mult.
    groups = [dict(params=[p for p in params if p.dim() > 1], wd_mult=1.0),
              dict(params=[p for p in params if p.dim() <= 1], wd_mult=0.0)]
    optimizer = torch.optim.AdamW(groups, lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps,
                                  weight_decay=t.weight_decay, fused=cuda)
    scheduler = lr_scheduler(optimizer, t)
    dataset = SyntheticDataset(t.steps * t.global_batch_size, cfg.data.seq_length, cfg.model.vocab_size, t.seed)
    micro = t.global_batch_size // t.micro_batch_size
    bf16 = cuda and cfg.precision.name != "fp32"
    aux_coef = getattr(model.config, "router_aux_loss_coef", 0.0)
    history = []
    for step in range(t.steps):
        start = time.time()
        total = torch.zeros((), device=device)
        for batch in peer_batches(cfg, dataset, step, device):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
                out = model(input_ids=batch["tokens"], position_ids=batch["position_ids"])
            loss = torch.nn.functional.cross_entropy(out.logits.float().flatten(0, 1), batch["labels"].flatten())
            aux = getattr(out, "aux_loss", None)
            ((loss if aux is None else loss + aux_coef * aux) / micro).backward()
            total += loss.detach()
        if t.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(params, t.clip_grad)
        optimizer.step()
        scheduler.step(increment=1)
        optimizer.zero_grad(set_to_none=True)
        loss = (total / micro).item()  # waits for the device, as our loop's loss reduction does
        if cuda:
            torch.cuda.synchronize()
        history.append(dict(loss=loss, tokens_per_s=t.global_batch_size * cfg.data.seq_length / (time.time() - start)))

    timed = history[warmup:]
    tokens = t.global_batch_size * cfg.data.seq_length
    seconds = [tokens / r["tokens_per_s"] for r in timed]
    step_time = sum(seconds) / len(seconds)
    tflops = flops_per_token(cfg) * tokens / step_time / 1e12
    peak = peak_tflops(torch.cuda.get_device_name(), "bf16") if bf16 else None
    memory, memory_kind = peak_memory_bytes()
    return dict(
        library="transformers", version=transformers.__version__,
        attn_implementation=model.config._attn_implementation,
        experts_implementation=getattr(model.config, "_experts_implementation", None),
        precision="bf16 autocast, fp32 master weights" if bf16 else "fp32",
        optimizer=f"torch.optim.AdamW(fused={cuda})", params=sum(p.numel() for p in params),
        step_time_s=step_time, step_times_s=seconds, tokens_per_s_per_gpu=tokens / step_time, model_tflops_per_gpu=tflops,
        peak_tflops=peak, mfu=tflops / peak if peak else None, peak_memory_bytes=memory,
        peak_memory_kind=memory_kind if cuda else memory_kind + " of the whole process, both runs",
        memory_allocated_before_bytes=left_over, losses=[r["loss"] for r in history],
    )


def format_peer(r: Dict, ratio: float) -> str:
    p = r["transformers"]
    mfu = f"{100 * p['mfu']:.1f}%" if p["mfu"] is not None else "n/a"
    return "\n".join([
        f"peer: transformers {p['version']} ({p['attn_implementation']} attention, "
        f"experts={p['experts_implementation']}, {p['precision']}, {p['optimizer']}), same shape and data",
        f"  step time          {p['step_time_s']:.4f} s (mean; {_spread(p['step_times_s'])})",
        f"  tokens/s/GPU       {p['tokens_per_s_per_gpu']:,.1f}",
        f"  model TFLOP/s/GPU  {p['model_tflops_per_gpu']:.4f}",
        f"  MFU                {mfu}",
        f"  peak memory        {p['peak_memory_bytes'] / 2**30:.3f} GiB ({p['peak_memory_kind']})",
        f"  losses             {' '.join(f'{x:.4f}' for x in p['losses'])}",
        f"ours / transformers  {ratio:.3f} (tokens/s)",
    ])


def free_device_memory() -> None:
    """Drop what the finished run left (its model and optimizer are unreferenced by now)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- CLI

def parse_args(argv: Sequence[str]) -> Tuple[argparse.Namespace, List[str]]:
    parser = argparse.ArgumentParser(prog="python -m tools.bench_train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=None, help="keep the first N layers")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    parser.add_argument("--data", choices=("synthetic", "corpus"), default="synthetic",
                        help="synthetic: random tokens, pretraining loss (document-masked when cpt.document_mask); "
                             "corpus: the configured stage= itself on its own data (the stage registry's class)")
    parser.add_argument("--compare", choices=("transformers",), default=None,
                        help="also train the same model with Hugging Face transformers in this process and "
                             "report ours / transformers (single process only: refused under a world size > 1)")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="after the timed steps, run N more under torch.profiler and report the operators "
                             "that take the most device time (ours only; default 0: no profile)")
    parser.add_argument("--doc-length", type=int, default=None, metavar="N",
                        help="synthetic documents of N/2 to 3N/2 tokens under cpt.document_mask=true "
                             "(default: 1/8 to 1/2 of the sequence)")
    parser.add_argument("--json", metavar="OUT", default=None, help="also write the result as JSON ('-': stdout)")
    args, rest = parse_tool_args(parser, argv)
    if args.doc_length is not None and args.doc_length < 2:
        parser.error(f"need --doc-length >= 2 (got {args.doc_length})")
    if args.steps < 1 or args.warmup < 0 or args.profile < 0:
        parser.error(f"need --steps >= 1, --warmup >= 0 and --profile >= 0 "
                     f"(got {args.steps}, {args.warmup}, {args.profile})")
    if args.compare and args.data != "synthetic":
        parser.error("--compare needs --data synthetic (the peer trains on the same synthetic samples)")
    return args, rest


def bench_config(args: argparse.Namespace, overrides: List[str], world: int, check_device: bool = True) -> Config:
    """The validated config of a bench run: the overrides, cut layers, warmup + timed steps.
    Synthetic data needs no `data.paths` (a stage like long_context leaves them to be given)."""
    if args.data == "synthetic" and override_value(overrides, "data.paths") is None:
        overrides = ["data.paths=[]", *overrides]
    cfg = load_config(overrides)
    if args.layers is not None:
        cut_layers(cfg, args.layers)
    cfg.train.steps = args.warmup + args.steps + args.profile
    cfg.train.warmup_steps = min(cfg.train.warmup_steps, cfg.train.steps - 1)
    cfg.train.eval_interval = cfg.train.exit_interval = 0
    validate(cfg, world, check_device=check_device)
    if args.compare and world > 1:
        raise ConfigError(f"--compare runs the transformers peer in one process; got world size {world}: "
                          "run the comparison without torchrun")
    if args.compare and document_masked(cfg):
        raise ConfigError("--compare does not support cpt.document_mask=true (the peer has no packed documents)")
    if args.doc_length is not None and not (args.data == "synthetic" and document_masked(cfg)):
        raise ConfigError(f"--doc-length {args.doc_length} shapes synthetic packed documents: it needs --data synthetic "
                          f"and data.document_mask=true (got --data {args.data}, "
                          f"cpt.document_mask={document_masked(cfg)})")
    return cfg


def main(argv=None) -> int:
    from megatron_ext.loggers import setup_console_logging

    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    setup_console_logging()
    world = dist.launch_env().world_size
    try:
        cfg = bench_config(args, overrides, world)
    except ConfigError as e:
        fail(str(e))
    from megatron_ext.loop import train
    from megatron_ext.spec import use_transformer_engine

    stage = make_stage(cfg, args.data, args.doc_length)
    profiler = Profiler(cfg.train.steps, args.profile)
    try:
        result = train(cfg, stage, [profiler])
        spec = "transformer-engine" if use_transformer_engine() else "local"
        summary = summarize(cfg, result.history[:len(result.history) - args.profile], args.warmup, world, spec)
        summary["profile"] = profiler.table()
        p = profiler
        summary.update(profile_steps=args.profile, profile_total_ms=p.total_ms, profile_host=p.host_rows,
                       profile_host_total_ms=p.host_total_ms, profile_kernel_launches=p.kernel_launches,
                       profile_python=p.python_rows, profile_python_total_ms=p.python_total_ms)
    finally:
        result = None
        dist.destroy()
    report = format_report(summary)
    if args.profile:
        report += "\n" + format_profile(summary, args.profile)
    if args.compare:
        free_device_memory()
        summary["transformers"] = train_peer(cfg, args.warmup)
        summary["ours_over_transformers"] = (summary["tokens_per_s_per_gpu"]
                                             / summary["transformers"]["tokens_per_s_per_gpu"])
        report += "\n" + format_peer(summary, summary["ours_over_transformers"])
    if dist.launch_env().rank == 0:
        bad = [x for x in summary["losses"] if x is None or not math.isfinite(x)]
        print(report + (f"\n  WARNING: non-finite losses {bad}" if bad else ""))
        if args.json == "-":
            print(json.dumps(summary, indent=2))
        elif args.json:
            with open(args.json, "w") as f:
                json.dump(summary, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
