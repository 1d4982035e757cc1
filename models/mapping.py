"""Declarative weight mapping between Hugging Face Qwen checkpoints and Megatron-Core's GPTModel.

A family declares its weights once as a list of `Rule`s; `expand()` turns the rules into one
`Entry` per Megatron parameter of a concrete model (layer and expert indices filled in), and
both converter directions read those entries:

    HF -> Megatron: `fuse(entry.kind, [hf tensors], model_config)` -> full (unsharded) tensor
    Megatron -> HF: `split(entry.kind, full tensor, model_config)` -> HF tensors, in entry.hf order

Megatron names are those of the local-spec GPTModel at TP=PP=EP=1 (global layer and expert
numbers); the converters translate to and from per-rank names.

Kinds:
- `copy`: one HF tensor, identical to the Megatron one.
- `qkv`: q, k, v projections fused into `linear_qkv`, in Megatron's interleaved layout: per query
  group g, the group's query heads, then k_g, then v_g. Tensor-parallel ranks then get whole
  groups by a plain split of dim 0.
- `gate_up`: SwiGLU gate and up projections stacked into `linear_fc1` as [gate; up].
- `pair_logit`: a two-class token-classification head [2, hidden] (HF `score.weight`, classes
  wrong / correct, read by softmax) as one binary logit [1, hidden] = row 1 - row 0: softmax's
  P(correct) equals sigmoid of that logit exactly. Back to HF as [0; w].

Reward models (posttrain.rm / posttrain.prm) replace the LM head by a value head
`output_layer.weight` [1, hidden]: `head_rules` swaps the family's `lm_head` rule for HF's
`score.weight` (`*ForSequenceClassification` for a reward model, `*ForTokenClassification`
with two labels for a process reward model). A head with a bias adds `output_layer.bias` [1]
(`score.bias`; a PRM's by `pair_logit`, b[1] - b[0]); Qwen2.5-Math-RM / PRM's MLP head
(`Qwen2ForRewardModel` / `Qwen2ForProcessRewardModel`) is `output_layer.hidden_weight` /
`hidden_bias` (`score.0.*`) then `output_layer.weight` / `bias` (`score.2.*`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch

from models.config import ModelConfig

KINDS = ("copy", "qkv", "gate_up", "pair_logit")
# Where a rule applies: once per model, once per layer, per dense-MLP layer, per MoE layer,
# per routed expert of a MoE layer, once per model only with untied embeddings.
SCOPES = ("model", "untied", "layer", "dense", "moe", "expert")


@dataclass(frozen=True)
class Rule:
    """One Megatron parameter pattern and the HF tensor pattern(s) it is made from.

    Patterns may contain `{layer}` and `{expert}`, filled in by `expand()`.
    """

    mcore: str
    hf: Tuple[str, ...]
    kind: str = "copy"
    scope: str = "layer"

    def __post_init__(self):
        if self.kind not in KINDS or self.scope not in SCOPES:
            raise ValueError(f"bad rule {self}: kind must be in {KINDS}, scope in {SCOPES}")
        arity = {"copy": 1, "qkv": 3, "gate_up": 2, "pair_logit": 1}[self.kind]
        if len(self.hf) != arity:
            raise ValueError(f"rule for {self.mcore}: kind {self.kind} takes {arity} HF tensors")


@dataclass(frozen=True)
class Entry:
    """A rule instantiated for one concrete Megatron parameter."""

    mcore: str
    hf: Tuple[str, ...]
    kind: str


def moe_layers(m: ModelConfig) -> List[bool]:
    """Per layer: True when the layer's MLP is a mixture of experts."""
    if not m.is_moe:
        return [False] * m.num_layers
    if m.moe_layer_freq is None:
        return [True] * m.num_layers
    return [bool(x) for x in m.moe_layer_freq]


def expand(rules: Sequence[Rule], m: ModelConfig) -> List[Entry]:
    """Every Megatron parameter of model `m` with the HF tensors it maps to, in HF file order."""
    entries: List[Entry] = []

    def add(rule: Rule, **idx) -> None:
        entries.append(Entry(rule.mcore.format(**idx), tuple(h.format(**idx) for h in rule.hf), rule.kind))

    for rule in rules:
        if rule.scope == "model" or (rule.scope == "untied" and not m.tie_word_embeddings):
            add(rule)
    for layer, is_moe in enumerate(moe_layers(m)):
        for rule in rules:
            if rule.scope == "layer" or rule.scope == ("moe" if is_moe else "dense"):
                add(rule, layer=layer)
            elif rule.scope == "expert" and is_moe:
                for expert in range(m.num_experts):
                    add(rule, layer=layer, expert=expert)
    return entries


def by_mcore_name(entries: Sequence[Entry]) -> Dict[str, Entry]:
    return {e.mcore: e for e in entries}


def _qkv_sizes(m: ModelConfig) -> Tuple[int, int, int]:
    """(query groups, query rows per group, rows per k or v head)."""
    hd, groups = m.kv_channels, m.num_query_groups
    return groups, m.num_attention_heads // groups * hd, hd


def fuse(kind: str, tensors: Sequence[torch.Tensor], m: ModelConfig) -> torch.Tensor:
    """HF tensors -> one full Megatron tensor (see the module docstring for the layouts)."""
    if kind == "copy":
        return tensors[0]
    if kind == "gate_up":
        return torch.cat(list(tensors), dim=0)
    if kind == "pair_logit":
        return (tensors[0][1:2] - tensors[0][0:1]).contiguous()
    q, k, v = tensors
    groups, q_rows, hd = _qkv_sizes(m)
    rest = q.shape[1:]  # (hidden,) for weights, () for biases
    per_group = [q.reshape(groups, q_rows, *rest), k.reshape(groups, hd, *rest), v.reshape(groups, hd, *rest)]
    return torch.cat(per_group, dim=1).reshape(-1, *rest)


def split(kind: str, tensor: torch.Tensor, m: ModelConfig) -> List[torch.Tensor]:
    """One full Megatron tensor -> its HF tensors (contiguous, so they can be written as-is)."""
    if kind == "copy":
        return [tensor]
    if kind == "gate_up":
        return [t.contiguous() for t in torch.chunk(tensor, 2, dim=0)]
    if kind == "pair_logit":
        return [torch.cat([torch.zeros_like(tensor), tensor], dim=0)]
    groups, q_rows, hd = _qkv_sizes(m)
    rest = tensor.shape[1:]
    grouped = tensor.reshape(groups, q_rows + 2 * hd, *rest)
    q, k, v = torch.split(grouped, [q_rows, hd, hd], dim=1)
    return [t.reshape(-1, *rest).contiguous() for t in (q, k, v)]


def expected_hf_shapes(entry: Entry, mcore_shape: Sequence[int], m: ModelConfig) -> List[Tuple[int, ...]]:
    """The HF tensor shapes that make up a Megatron tensor of `mcore_shape` (no data touched)."""
    meta = torch.empty(tuple(mcore_shape), device="meta")
    return [tuple(t.shape) for t in split(entry.kind, meta, m)]


# Building blocks shared by the families. Megatron names follow the local layer spec.
_L = "model.layers.{layer}."
_M = "decoder.layers.{layer}."

EMBEDDING = Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), scope="model")
FINAL_NORM = Rule("decoder.final_layernorm.weight", ("model.norm.weight",), scope="model")
# With tied embeddings HF has no lm_head tensor and Megatron reuses the embedding.
OUTPUT = Rule("output_layer.weight", ("lm_head.weight",), scope="untied")
# Value heads (always present: a reward model never ties its head to the embedding). The final
# projection is HF `score` of a *ForSequenceClassification (rm, copied) or a two-label
# *ForTokenClassification (prm, `pair_logit`); Qwen2.5-Math-RM / PRM (`model.value_head=mlp`)
# name the hidden layer `score.0` and the final one `score.2`.
HEAD_RULES = {"rm": Rule("output_layer.weight", ("score.weight",), scope="model"),
              "prm": Rule("output_layer.weight", ("score.weight",), kind="pair_logit", scope="model")}


def value_head_rules(head: str, m: ModelConfig) -> List[Rule]:
    """The value head's rules of a reward model (`head` "rm" / "prm") of layout `m.value_head`,
    `m.value_head_bias`."""
    kind = HEAD_RULES[head].kind
    final = "score.2." if m.value_head == "mlp" else "score."
    rules = []
    if m.value_head == "mlp":
        rules += [Rule("output_layer.hidden_weight", ("score.0.weight",), scope="model"),
                  Rule("output_layer.hidden_bias", ("score.0.bias",), scope="model")]
    rules.append(Rule("output_layer.weight", (final + "weight",), kind=kind, scope="model"))
    if m.value_head_bias:
        rules.append(Rule("output_layer.bias", (final + "bias",), kind=kind, scope="model"))
    return rules


def head_rules(rules: Sequence[Rule], head: str, m: ModelConfig = None) -> List[Rule]:
    """A family's rules for a model whose output layer is `head` ("lm", "rm" or "prm"); a reward
    model's value head has the layout of `m` (default: linear, no bias)."""
    if head == "lm":
        return list(rules)
    out = []
    for r in rules:
        if r.mcore != OUTPUT.mcore:
            out.append(r)
        elif m is None:
            out.append(HEAD_RULES[head])
        else:
            out += value_head_rules(head, m)
    return out

ATTENTION = [
    Rule(_M + "input_layernorm.weight", (_L + "input_layernorm.weight",)),
    Rule(_M + "self_attention.linear_qkv.weight",
         (_L + "self_attn.q_proj.weight", _L + "self_attn.k_proj.weight", _L + "self_attn.v_proj.weight"),
         kind="qkv"),
    Rule(_M + "self_attention.linear_proj.weight", (_L + "self_attn.o_proj.weight",)),
    Rule(_M + "pre_mlp_layernorm.weight", (_L + "post_attention_layernorm.weight",)),
]
QKV_BIAS = [
    Rule(_M + "self_attention.linear_qkv.bias",
         (_L + "self_attn.q_proj.bias", _L + "self_attn.k_proj.bias", _L + "self_attn.v_proj.bias"),
         kind="qkv"),
]
QK_NORM = [
    Rule(_M + "self_attention.q_layernorm.weight", (_L + "self_attn.q_norm.weight",)),
    Rule(_M + "self_attention.k_layernorm.weight", (_L + "self_attn.k_norm.weight",)),
]


def swiglu(mcore_prefix: str, hf_prefix: str, scope: str) -> List[Rule]:
    """A SwiGLU MLP: gate/up fused into linear_fc1, down = linear_fc2."""
    return [
        Rule(mcore_prefix + "linear_fc1.weight", (hf_prefix + "gate_proj.weight", hf_prefix + "up_proj.weight"),
             kind="gate_up", scope=scope),
        Rule(mcore_prefix + "linear_fc2.weight", (hf_prefix + "down_proj.weight",), scope=scope),
    ]


DENSE_MLP = swiglu(_M + "mlp.", _L + "mlp.", scope="dense")
ROUTER = [Rule(_M + "mlp.router.weight", (_L + "mlp.gate.weight",), scope="moe")]
ROUTED_EXPERTS = swiglu(_M + "mlp.experts.local_experts.{expert}.", _L + "mlp.experts.{expert}.", scope="expert")
SHARED_EXPERT = swiglu(_M + "mlp.shared_experts.", _L + "mlp.shared_expert.", scope="moe") + [
    # HF: sigmoid(shared_expert_gate(x)) * shared_expert(x); Megatron's gate_weight is the same [1, hidden].
    Rule(_M + "mlp.shared_experts.gate_weight", (_L + "mlp.shared_expert_gate.weight",), scope="moe"),
]


# ---- HF tensor shapes in config.json's terms: a directory is checked against its config.json
# before a model of the config's size is built (a config may claim any size).

_Q, _KV = "num_attention_heads * head_dim", "num_key_value_heads * head_dim"
_E = _L + "mlp.experts.{expert}."
_S = _L + "mlp.shared_expert."
# HF name pattern -> the config.json size (or fixed size) of each dimension.
HF_DIMS: Dict[str, Tuple] = {
    "model.embed_tokens.weight": ("vocab_size", "hidden_size"),
    "lm_head.weight": ("vocab_size", "hidden_size"),
    "model.norm.weight": ("hidden_size",),
    _L + "input_layernorm.weight": ("hidden_size",),
    _L + "post_attention_layernorm.weight": ("hidden_size",),
    _L + "self_attn.q_proj.weight": (_Q, "hidden_size"),
    _L + "self_attn.k_proj.weight": (_KV, "hidden_size"),
    _L + "self_attn.v_proj.weight": (_KV, "hidden_size"),
    _L + "self_attn.o_proj.weight": ("hidden_size", _Q),
    _L + "self_attn.q_proj.bias": (_Q,),
    _L + "self_attn.k_proj.bias": (_KV,),
    _L + "self_attn.v_proj.bias": (_KV,),
    _L + "self_attn.q_norm.weight": ("head_dim",),
    _L + "self_attn.k_norm.weight": ("head_dim",),
    _L + "mlp.gate_proj.weight": ("intermediate_size", "hidden_size"),
    _L + "mlp.up_proj.weight": ("intermediate_size", "hidden_size"),
    _L + "mlp.down_proj.weight": ("hidden_size", "intermediate_size"),
    _L + "mlp.gate.weight": ("num_experts", "hidden_size"),
    _E + "gate_proj.weight": ("moe_intermediate_size", "hidden_size"),
    _E + "up_proj.weight": ("moe_intermediate_size", "hidden_size"),
    _E + "down_proj.weight": ("hidden_size", "moe_intermediate_size"),
    _S + "gate_proj.weight": ("shared_expert_intermediate_size", "hidden_size"),
    _S + "up_proj.weight": ("shared_expert_intermediate_size", "hidden_size"),
    _S + "down_proj.weight": ("hidden_size", "shared_expert_intermediate_size"),
    _L + "mlp.shared_expert_gate.weight": (1, "hidden_size"),
}


def hf_dim_sizes(m: ModelConfig) -> Dict[str, int]:
    """The size each `HF_DIMS` label stands for in model `m`."""
    return {"vocab_size": m.vocab_size, "hidden_size": m.hidden_size, "intermediate_size": m.ffn_hidden_size,
            _Q: m.num_attention_heads * m.kv_channels, _KV: m.num_query_groups * m.kv_channels,
            "head_dim": m.kv_channels, "num_experts": m.num_experts, "moe_intermediate_size": m.moe_ffn_hidden_size,
            "shared_expert_intermediate_size": m.moe_shared_expert_intermediate_size}


_INDEX = {"layer": re.compile(r"^model\.layers\.(\d+)\."), "expert": re.compile(r"\.experts\.(\d+)\.")}


def hf_pattern(name: str) -> str:
    """An HF tensor name with its layer and expert numbers replaced by `{layer}` / `{expert}`."""
    name = _INDEX["layer"].sub("model.layers.{layer}.", name, count=1)
    return _INDEX["expert"].sub(".experts.{expert}.", name, count=1)


def hf_indices(names: Sequence[str], kind: str) -> List[int]:
    """The distinct layer (kind="layer") or expert numbers that HF tensor names carry, sorted."""
    found = {int(match.group(1)) for match in map(_INDEX[kind].search, names) if match}
    return sorted(found)
