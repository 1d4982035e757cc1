"""Convert Qwen checkpoints between Hugging Face and Megatron-Core.

    python -m tools.convert hf-to-mcore --hf-dir DIR --out CKPT [--tp N --pp N --ep N --etp N]
    python -m tools.convert mcore-to-hf --ckpt CKPT --out DIR [--max-shard-size 5GB] [--no-verify]

Both directions read one declarative weight mapping per family (`models.<family>.RULES`).
hf-to-mcore builds the Megatron model at the requested layout (spawning local gloo ranks when
not launched by torchrun), fills each rank's parameters from HF tensors read one at a time,
and writes a `dist_checkpointing` checkpoint that loads at any layout. Any HF tensor the mapping
does not use, or any Megatron parameter it does not fill, is an error naming it. Outputs are
written to a staging directory and renamed into place when complete. mcore-to-hf first checks a
training checkpoint's files against its CRC manifest, as resuming does (--no-verify skips that).

Reward models travel with their value head (the checkpoint's `head`, see
megatron_ext.checkpoint.HEADS): a reward model (python -m posttrain.rm) is HF
`*ForSequenceClassification` (num_labels=1, `score.weight`, `pad_token_id` set so transformers
scores each row's last non-pad token); a process reward model (python -m posttrain.prm, one
binary logit per token) is `*ForTokenClassification` with num_labels=2 (TRL's PRM format:
softmax over [wrong, correct] logits [0, z], so P(correct) = sigmoid(z)). hf-to-mcore reads both
back. Qwen2.5-Math-RM / PRM (`Qwen2ForRewardModel` / `Qwen2ForProcessRewardModel`: `score.0`
Linear hidden->hidden with bias, ReLU, `score.2` Linear hidden->num_labels with bias) come in with
`model.value_head=mlp` (a PRM's two logits as one, their difference); a token-classification PRM
whose class biases differ keeps the difference as a bias (`model.value_head_bias`). They go back
in the same layouts; transformers has no class for Qwen2ForRewardModel / ForProcessRewardModel
(the published checkpoints ship remote code), so only their weights and config.json are written.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from tqdm import tqdm

from data_prep.indexed import check_writable_dir
from megatron_ext import checkpoint, offline, placement
from megatron_ext.grouped_experts import sequential_named_parameters
from models import registry
from models.mapping import (HF_DIMS, Entry, by_mcore_name, expand, expected_hf_shapes, fuse, head_rules, hf_dim_sizes,
                            hf_indices, hf_pattern, split)
from tools import ranks
from tools.hf_io import HFCheckpoint, HFCheckpointError, ShardWriter, dtype_of, parse_size, tokenizer_files


def _rank0() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


_HEAD_OF_ARCH = {"ForCausalLM": "lm", "ForSequenceClassification": "rm", "ForTokenClassification": "prm"}
_ARCH_OF_HEAD = {head: suffix for suffix, head in _HEAD_OF_ARCH.items()}
# Qwen2.5-Math-RM / PRM (remote code, no transformers class): an MLP value head `score.0` (hidden ->
# hidden, bias), ReLU, `score.2` (hidden -> num_labels, bias); num_labels is fixed by the class.
_MLP_HEAD_OF_ARCH = {"ForProcessRewardModel": "prm", "ForRewardModel": "rm"}
_MLP_ARCH_OF_HEAD = {head: suffix for suffix, head in _MLP_HEAD_OF_ARCH.items()}
_MLP_FAMILIES = ("qwen2",)  # the families whose published reward models have the MLP head
_LABELS = {"rm": 1, "prm": 2}
_HEAD_WORDS = {"rm": "reward model", "prm": "process reward model"}


def num_labels(config: dict) -> int:
    """config.json's label count as transformers reads it (id2label, else num_labels, else 2)."""
    if isinstance(config.get("id2label"), dict):
        return len(config["id2label"])
    return int(config.get("num_labels", 2))


def _mlp_head(arch: str):
    return next((h for suffix, h in _MLP_HEAD_OF_ARCH.items() if arch.endswith(suffix)), None)


def hf_head(hf: HFCheckpoint) -> str:
    """The output head an HF directory holds, by config.json's `architectures`: "lm"
    (`*ForCausalLM`, or none named), "rm" (`*ForSequenceClassification`, num_labels=1, or
    `Qwen2ForRewardModel`) or "prm" (`*ForTokenClassification`, num_labels=2, or
    `Qwen2ForProcessRewardModel`). Anything else is refused, naming the class."""
    archs = hf.config.get("architectures") or []
    where = hf.dir / "config.json"
    if not archs:
        return "lm"
    arch = archs[0]
    mlp = _mlp_head(arch)
    if mlp is not None:
        return mlp  # the class fixes num_labels (1 / 2); check_head checks score.2's shape
    head = next((h for suffix, h in _HEAD_OF_ARCH.items() if arch.endswith(suffix)), None)
    if head is None:
        supported = [f"*{s}" for s in _HEAD_OF_ARCH] + [f"Qwen2{s}" for s in _MLP_HEAD_OF_ARCH]
        raise HFCheckpointError(f"{where}: architectures={archs}: {arch} is not supported (supported: "
                                f"{', '.join(supported)})")
    if head != "lm" and num_labels(hf.config) != _LABELS[head]:
        raise HFCheckpointError(
            f"{where}: {arch} with num_labels={num_labels(hf.config)}: this stack's {_HEAD_WORDS[head]} "
            f"converts from num_labels={_LABELS[head]} only")
    return head


def head_layout(hf: HFCheckpoint, head: str) -> dict:
    """ModelConfig value-head fields of an HF reward model: `Qwen2ForRewardModel` /
    `Qwen2ForProcessRewardModel` have the MLP head with biases; a token-classification PRM whose
    `score.bias` differs between its two labels keeps the difference as a bias. {} otherwise
    (a linear head without bias, the default)."""
    if head == "lm":
        return {}
    if _mlp_head((hf.config.get("architectures") or [""])[0]) is not None:
        return {"value_head": "mlp", "value_head_bias": True}
    if head == "prm" and "score.bias" in hf.names():
        bias = hf.get("score.bias")
        if list(bias.shape) == [2] and bias[0] != bias[1]:
            return {"value_head_bias": True}
    return {}


def check_head(hf: HFCheckpoint, m, head: str) -> List[str]:
    """The value head's tensors must have the shapes of its layout: `score.weight` [num_labels,
    hidden] (plus `score.bias` [num_labels]), or for the MLP head `score.0.weight` [hidden,
    hidden], `score.0.bias` [hidden], `score.2.weight` [num_labels, hidden], `score.2.bias`
    [num_labels]. Returned, as read outside the weight mapping: a PRM's `score.bias` equal for
    both labels (it cancels in the softmax); an `lm_head.weight` beside the MLP head (its class
    has no LM head: left out)."""
    if head == "lm":
        return []
    h, labels = m.hidden_size, _LABELS[head]
    final = "score.2." if m.value_head == "mlp" else "score."
    want = {final + "weight": [labels, h], final + "bias": [labels]}
    if m.value_head == "mlp":
        want.update({"score.0.weight": [h, h], "score.0.bias": [h]})
    for name, shape in want.items():
        if name in hf.names() and list(hf.shape(name)) != shape:
            raise HFCheckpointError(f"HF tensor {name} in {hf.file_of(name)} has shape {list(hf.shape(name))}, "
                                    f"expected {shape} ({_HEAD_WORDS[head]}, num_labels={labels}, hidden_size={h})")
    if m.value_head == "mlp":
        # Qwen2.5-Math-RM-72B ships the LM head of its base model, which its class never reads.
        unused = ["lm_head.weight"] if "lm_head.weight" in hf.names() else []
        if unused and _rank0():
            print(f"note: {hf.dir}: lm_head.weight is not part of {hf.config['architectures'][0]} (not read by it); "
                  "not converted", file=sys.stderr)
        return unused
    if m.value_head_bias or "score.bias" not in hf.names():
        return []  # the weight mapping reads the bias
    if head == "rm":
        return []  # check_names names it: transformers' SequenceClassification head has no bias
    bias = hf.get("score.bias")
    if bias[0] != bias[1]:  # head_layout gave such a PRM a bias: not reached
        raise HFCheckpointError(f"HF tensor score.bias in {hf.file_of('score.bias')} is {bias.tolist()}: "
                                "it differs between the two labels, and the value head has no bias")
    return ["score.bias"]


def check_names(hf: HFCheckpoint, entries: List[Entry], family: str, ignore=()) -> None:
    """The HF directory must hold exactly the tensors the mapping names (and `ignore`)."""
    needed = {h: e.mcore for e in entries for h in e.hf}
    present = set(hf.names()) - set(ignore)
    missing = [h for h in needed if h not in present]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise HFCheckpointError(f"HF tensor {missing[0]} is missing from {hf.dir}{more}; "
                                f"it is needed for Megatron parameter {needed[missing[0]]}")
    extra = sorted(present - needed.keys())
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise HFCheckpointError(f"HF tensor {extra[0]} in {hf.file_of(extra[0])} is not used by the {family} "
                                f"weight mapping{more}; refusing to drop weights")


_SIZE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                "head_dim", "num_experts", "moe_intermediate_size", "shared_expert_intermediate_size")


def check_counts(hf: HFCheckpoint) -> None:
    """config.json's sizes must be positive integers, and it may claim no more layers or experts
    than the weights hold (checked before the config is read: it makes per-layer lists)."""
    for field in _SIZE_FIELDS:
        value = hf.config.get(field)
        if value is not None and (type(value) is not int or value <= 0):
            raise HFCheckpointError(f"{hf.dir / 'config.json'}: {field}={value!r} is not a positive integer")
    for kind, fields in (("layer", ("num_hidden_layers",)), ("expert", ("num_experts", "num_local_experts"))):
        field = next((f for f in fields if f in hf.config), None)
        held = hf_indices(hf.names(), kind)
        if field is not None and (type(hf.config[field]) is not int or hf.config[field] > len(held)):
            raise HFCheckpointError(f"{hf.dir / 'config.json'}: {field}={hf.config[field]!r}, but the weights "
                                    f"in {hf.dir} hold {len(held)} {kind}s")


def check_sizes(hf: HFCheckpoint, m) -> None:
    """Every HF tensor's shape (from the safetensors headers) must be what config.json's sizes
    make it, before a model of those sizes is allocated: the error names tensor and config field."""
    sizes = hf_dim_sizes(m)
    for name in hf.names():
        dims = HF_DIMS.get(hf_pattern(name))
        if dims is None:
            continue  # not a tensor of the weight mapping: check_names names it
        want, got = [sizes[d] if isinstance(d, str) else d for d in dims], list(hf.shape(name))
        if got != want:
            fields = [f"{d}={w}" for d, g, w in itertools.zip_longest(dims, got, want) if g != w and d is not None]
            because = f" (config.json: {', '.join(fields)})" if fields else ""
            raise HFCheckpointError(f"HF tensor {name} in {hf.file_of(name)} has shape {got}, expected {want}{because}")


def open_hf(hf_dir: str):
    """Read and check an HF directory: (reader, family module, ModelConfig, entries, dtype, head)."""
    hf = HFCheckpoint(hf_dir)
    family = registry.family_for_hf(hf.config)
    head = hf_head(hf)
    check_counts(hf)
    m = family.config_from_hf(hf.config, name=Path(hf_dir).resolve().name)
    layout = head_layout(hf, head)
    if layout.get("value_head") == "mlp" and family.FAMILY not in _MLP_FAMILIES:
        raise HFCheckpointError(f"{hf.dir / 'config.json'}: {hf.config['architectures'][0]} is a {family.FAMILY} "
                                f"model; the MLP value head converts for {', '.join(_MLP_FAMILIES)} only")
    m = dataclasses.replace(m, **layout)
    check_sizes(hf, m)
    entries = expand(head_rules(family.RULES, head, m), m)
    check_names(hf, entries, family.FAMILY, ignore=check_head(hf, m, head))
    dtype = dtype_of(hf, entries[0].hf[0])
    return hf, family, m, entries, dtype, head


def add_head(chunks, cfg, head: str) -> None:
    """Give a reward model's chunks their value head (as posttrain.rm / posttrain.prm build them)."""
    if head == "lm":
        return
    from posttrain.rm import add_value_head

    for chunk in chunks:
        add_value_head(chunk, cfg)


def _source_entry(name: str, by_name: Dict[str, Entry], tied: bool) -> Entry:
    # With tied embeddings the last pipeline stage holds its own copy of the embedding (a value
    # head, never tied, has its own entry).
    if tied and name == "output_layer.weight" and name not in by_name:
        return by_name["embedding.word_embeddings.weight"]
    if name not in by_name:
        raise HFCheckpointError(f"Megatron parameter {name} has no source in the weight mapping")
    return by_name[name]


def fill_rank(hf: HFCheckpoint, chunks, m, entries: List[Entry]) -> set:
    """Copy HF tensors into this rank's parameters; returns the global names filled."""
    by_name, filled = by_mcore_name(entries), set()
    params = [(chunk, name, p) for chunk in chunks for name, p in sequential_named_parameters(chunk)]
    for chunk, name, param in tqdm(params, desc="hf-to-mcore", unit="param", disable=not _rank0(), file=sys.stderr):
        gname = placement.global_name(chunk, name, m)
        entry = _source_entry(gname, by_name, m.tie_word_embeddings)
        for h, want in zip(entry.hf, expected_hf_shapes(entry, placement.full_shape(param, name), m)):
            if hf.shape(h) != want:
                raise HFCheckpointError(f"HF tensor {h} in {hf.file_of(h)} has shape {list(hf.shape(h))}, "
                                        f"expected {list(want)} (for Megatron parameter {gname})")
        full = fuse(entry.kind, [hf.get(h) for h in entry.hf], m)
        with torch.no_grad():
            param.copy_(placement.tp_shard(full, name))
        filled.add(entry.mcore)
        del full
    return filled


def _all_filled(filled: set, entries: List[Entry]) -> None:
    everyone = [filled]
    if torch.distributed.is_initialized():
        everyone = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(everyone, filled)
    unfilled = sorted({e.mcore for e in entries} - set().union(*everyone))
    if unfilled:
        raise HFCheckpointError(f"Megatron parameter {unfilled[0]} was not filled by any rank "
                                f"({len(unfilled)} unfilled)")


def _hf_to_mcore_rank(hf_dir: str, out: str, layout: dict, overwrite: bool) -> dict:
    start = time.time()
    hf, family, m, entries, dtype, head = open_hf(hf_dir)
    cfg = offline.layout_config(m, dtype, **layout)
    chunks = offline.build(cfg)
    add_head(chunks, cfg, head)
    _all_filled(fill_rank(hf, chunks, m, entries), entries)
    hf.close()
    tmp = offline.staging_dir(Path(out))
    checkpoint.save_converted_weights(chunks, tmp)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    if _rank0():
        checkpoint.write_converted_meta(tmp, m, dtype, hf.config, head=head)
        files = tokenizer_files(hf.dir)
        if files:
            (tmp / checkpoint.TOKENIZER_DIR).mkdir()
            for f in files:
                shutil.copy2(f, tmp / checkpoint.TOKENIZER_DIR / f.name)
        offline.publish(tmp, Path(out), overwrite)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    offline.release_layout()
    n_params = sum(p.numel() for c in chunks for p in c.parameters())
    return {"family": family.FAMILY, "head": head, "hf_tensors": sum(len(e.hf) for e in entries),
            "mcore_tensors": len(entries), "rank0_params": n_params, "dtype": str(dtype),
            "seconds": round(time.time() - start, 2)}


def hf_to_mcore(hf_dir: str, out: str, tp=1, pp=1, ep=1, etp=None, overwrite=False) -> dict:
    """Convert an HF directory to a Megatron checkpoint written at layout tp/pp/ep/etp."""
    if Path(out).exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    _, _, m, _, dtype, head = open_hf(hf_dir)  # fail on bad input before starting any ranks
    if head != "lm" and tp > 1:
        raise HFCheckpointError(f"{hf_dir}: a {_HEAD_WORDS[head]} converts at --tp 1 (its value head is "
                                "replicated, not split)")
    check_writable_dir(Path(out).absolute().parent)
    layout = dict(tp=tp, pp=pp, ep=ep, etp=etp)
    world = offline.world_size(offline.layout_config(m, dtype, **layout))
    return ranks.run(_hf_to_mcore_rank, world, hf_dir, out, layout, overwrite)


def _named_tokenizer(name: str, m, out: Path) -> Optional[dict]:
    """Write the tokenizer a training job named (Qwen family or HF directory) into `out`.

    Returns the token ids config.json should carry, or None when nothing fits: a tokenizer with
    more tokens than the model's vocabulary is not this model's tokenizer.
    """
    from data_prep.tokenizer import QwenTokenizer, get_tokenizer, write_hf_tokenizer

    if Path(name).is_dir():
        for f in tokenizer_files(Path(name)):
            shutil.copy2(f, out / f.name)
        return None
    tok = get_tokenizer(name)
    if not isinstance(tok, QwenTokenizer) or tok.vocab_size > m.vocab_size:
        print(f"note: tokenizer {name!r} does not fit vocab_size={m.vocab_size}; none written", file=sys.stderr)
        return None
    with tempfile.TemporaryDirectory() as tmp:
        for f in tokenizer_files(write_hf_tokenizer(tok.family, tmp)):
            shutil.copy2(f, out / f.name)
    return {"bos_token_id": tok.eod, "eos_token_id": tok.eod}


def _write_hf(m, dtype, src: checkpoint.Source, params: dict, out: Path, max_shard_bytes: int) -> Tuple[int, int]:
    """Split every Megatron tensor into its HF tensors and write a complete HF directory."""
    entries = expand(head_rules(registry.family(m.family).RULES, src.head, m), m)
    writer = ShardWriter(out, max_shard_bytes)
    for entry in tqdm(entries, desc="mcore-to-hf", unit="param", file=sys.stderr):
        for name, tensor in zip(entry.hf, split(entry.kind, params[entry.mcore].detach(), m)):
            writer.add(name, tensor)
    if src.head != "lm" and not m.value_head_bias and (src.head == "prm" or m.value_head == "mlp"):
        # The HF head has a bias (token classification, the MLP head's score.2): zero.
        final = "score.2.bias" if m.value_head == "mlp" else "score.bias"
        writer.add(final, torch.zeros(_LABELS[src.head], dtype=params["output_layer.weight"].dtype))
    shards = writer.close()
    base = src.hf_config
    for f in tokenizer_files(src.tokenizer_dir) if src.tokenizer_dir else []:
        shutil.copy2(f, out / f.name)
    if src.tokenizer_name and base is None:
        base = _named_tokenizer(src.tokenizer_name, m, out)
    config = registry.hf_config_for(m, dtype, base)
    if src.head != "lm":
        _head_config(config, src)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return shards, writer.total_bytes


def _pad_id(src: checkpoint.Source) -> int:
    """The padding token id of a reward model's tokenizer (transformers scores each row at its
    last token that is not this one)."""
    if src.hf_config and src.hf_config.get("pad_token_id") is not None:
        return int(src.hf_config["pad_token_id"])
    name = str(src.tokenizer_dir) if src.tokenizer_dir else src.tokenizer_name
    if name:
        from data_prep.tokenizer import get_tokenizer

        return int(get_tokenizer(name).pad)
    raise HFCheckpointError(f"{src.path}: a {_HEAD_WORDS[src.head]} needs pad_token_id in config.json (transformers "
                            "finds each row's last token by it), and the checkpoint names no tokenizer to take it from")


def check_exportable(src: checkpoint.Source) -> None:
    """Refuse a value head that no HF class holds: a bias on a reward model's linear head
    (transformers' `*ForSequenceClassification` has none), or the MLP head in a family without
    `*ForRewardModel` checkpoints."""
    m = src.model
    if src.head == "lm":
        return
    if m.value_head == "mlp" and m.family not in _MLP_FAMILIES:
        raise HFCheckpointError(f"{src.path}: a {m.family} {_HEAD_WORDS[src.head]} with model.value_head=mlp has no "
                                f"HF layout (Qwen2{_MLP_ARCH_OF_HEAD[src.head]} is {', '.join(_MLP_FAMILIES)} only)")
    if src.head == "rm" and m.value_head == "linear" and m.value_head_bias:
        raise HFCheckpointError(f"{src.path}: a reward model with model.value_head_bias=true has no HF layout "
                                "(transformers' *ForSequenceClassification score has no bias); refusing to drop it")


def _head_config(config: dict, src: checkpoint.Source) -> None:
    """config.json of a reward model: the family's classification class (Qwen2ForRewardModel /
    Qwen2ForProcessRewardModel for the MLP head), its labels, pad token."""
    suffix = (_MLP_ARCH_OF_HEAD if src.model.value_head == "mlp" else _ARCH_OF_HEAD)[src.head]
    arch = config["architectures"][0].replace(_ARCH_OF_HEAD["lm"], suffix)
    labels = _LABELS[src.head]
    config.update(architectures=[arch], num_labels=labels, pad_token_id=_pad_id(src),
                  id2label={str(i): f"LABEL_{i}" for i in range(labels)},
                  label2id={f"LABEL_{i}": i for i in range(labels)})


def _mcore_to_hf_rank(ckpt, out: str, max_shard_bytes: int, overwrite: bool) -> dict:
    start = time.time()
    src = checkpoint.open_checkpoint(ckpt)
    m, dtype, base = src.model, src.dtype, src.hf_config
    entries = expand(head_rules(registry.family(m.family).RULES, src.head, m), m)
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else None
    # Loaded whole (TP=PP=EP=1); extra ranks, if launched with more, are idle data-parallel replicas.
    cfg = offline.layout_config(m, dtype, world=world)
    chunks = offline.build(cfg)
    add_head(chunks, cfg, src.head)
    checkpoint.load_weights(chunks, src)
    params = dict(sequential_named_parameters(chunks[0]))
    unmapped = sorted(set(params) - {e.mcore for e in entries})
    if unmapped:
        raise HFCheckpointError(f"Megatron parameter {unmapped[0]} has no HF name in the {m.family} mapping")
    tmp = offline.staging_dir(Path(out))
    shards = total = 0
    if _rank0():
        shards, total = _write_hf(m, dtype, src, params, tmp, max_shard_bytes)
        offline.publish(tmp, Path(out), overwrite)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    offline.release_layout()
    return {"family": m.family, "head": src.head, "hf_tensors": sum(len(e.hf) for e in entries),
            "mcore_tensors": len(entries), "shards": shards, "bytes": total, "seconds": round(time.time() - start, 2)}


def mcore_to_hf(ckpt: str, out: str, max_shard_size: str = "5GB", overwrite=False, verify=True) -> dict:
    """Convert a Megatron checkpoint (written at any layout, by tools.convert or by training) to HF.

    A training checkpoint's files are checked against its CRC manifest first (`verify`)."""
    src = checkpoint.open_checkpoint(ckpt, verify=verify)  # fail early on a non-checkpoint
    check_exportable(src)
    if Path(out).exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    check_writable_dir(Path(out).absolute().parent)
    return ranks.run(_mcore_to_hf_rank, None, src, out, parse_size(max_shard_size), overwrite)


def build_parser() -> argparse.ArgumentParser:
    """The command line: one subcommand per direction, every flag with help text."""
    parser = argparse.ArgumentParser(prog="python -m tools.convert", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="direction", required=True)
    a = sub.add_parser("hf-to-mcore", help="HF directory -> Megatron dist checkpoint",
                       description="Convert a Hugging Face Qwen model directory (config.json + safetensors) "
                                   "into a Megatron-Core distributed checkpoint that loads at any layout.")
    a.add_argument("--hf-dir", required=True,
                   help="HF model directory: config.json plus model.safetensors or a sharded index")
    a.add_argument("--out", required=True, help="checkpoint directory to create")
    a.add_argument("--tp", type=int, default=1, help="tensor-parallel size to run the conversion at (default 1)")
    a.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to run the conversion at (default 1)")
    a.add_argument("--ep", type=int, default=1, help="expert-parallel size, MoE models (default 1)")
    a.add_argument("--etp", type=int, default=None, help="expert tensor-parallel size (default: same as --tp)")
    b = sub.add_parser("mcore-to-hf", help="Megatron dist checkpoint -> HF directory",
                       description="Convert a Megatron checkpoint (tools.convert or training) into a Hugging "
                                   "Face model directory that transformers loads.")
    b.add_argument("--ckpt", required=True, help="a tools.convert checkpoint, or a training checkpoint (iter_N or its root)")
    b.add_argument("--out", required=True, help="HF directory to create")
    b.add_argument("--max-shard-size", default="5GB", help="largest .safetensors shard, e.g. 5GB, 500MB (default 5GB)")
    b.add_argument("--no-verify", action="store_true",
                   help="do not check a training checkpoint's files against its CRC manifest "
                        "(a corrupted checkpoint then converts silently)")
    for p in (a, b):
        p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    return parser


def main(argv=None) -> int:
    """Command-line entry; returns the exit status (2 with a one-line message on bad input)."""
    args = build_parser().parse_args(argv)
    try:
        if args.direction == "hf-to-mcore":
            summary = hf_to_mcore(args.hf_dir, args.out, args.tp, args.pp, args.ep, args.etp, args.overwrite)
        else:
            summary = mcore_to_hf(args.ckpt, args.out, args.max_shard_size, args.overwrite, not args.no_verify)
    except (ValueError, KeyError, OSError, ranks.RankError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if _rank0():
        print(f"converted {summary['hf_tensors']} HF tensors <-> {summary['mcore_tensors']} Megatron tensors "
              f"({args.direction}, {summary['family']}) in {summary['seconds']} s -> {args.out}")
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
