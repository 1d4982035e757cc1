"""Bradley-Terry reward model: a scalar value head read at each sequence's last token.

`python -m posttrain.rm [k=v ...]` trains on `posttrain.data_path` (jsonl rows with "prompt",
"chosen", "rejected") or the synthetic preference task of `posttrain.synthetic`. A micro-batch
holds whole pairs (chosen at even, rejected at odd positions); the loss is
-log sigmoid(r_chosen - r_rejected) summed over pairs and normalised by the global pair count;
accuracy (r_chosen > r_rejected) and the mean margin are logged with it.
`export_hf` writes the model as Hugging Face `Qwen2/Qwen3ForSequenceClassification` weights.
"""

from __future__ import annotations

import json
import sys
from functools import partial
from pathlib import Path
from typing import List

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

from data_prep.chat import format_preference
from data_prep.tokenizer import get_tokenizer
from megatron_ext import data
from megatron_ext.config import Config, ConfigError
from megatron_ext.schedule import report
from megatron_ext.stages import LOSS, Stage, require
from posttrain import synthetic
from posttrain.datasets import Cycled, chat_tokenizer, pad_to, read_jsonl

HF_ARCH = {"qwen2": "Qwen2ForSequenceClassification", "qwen3": "Qwen3ForSequenceClassification",
           "qwen2_moe": "Qwen2MoeForSequenceClassification", "qwen3_moe": "Qwen3MoeForSequenceClassification"}


class ValueHead(torch.nn.Module):
    """Replaces GPTModel.output_layer: hidden [s, b, h] -> one score per position [s, b, 1].

    Layout (`model.value_head`, `model.value_head_bias`): by default one projection `weight`
    [1, h] without bias; `mlp` puts `hidden_weight` [h, h] + `hidden_bias` [h] and a ReLU before
    it (Qwen2.5-Math-RM / PRM); `value_head_bias` adds `bias` [1] to the final projection.
    `weight` is drawn first from the seeded generator, so the default head is the same whatever
    the layout options add; biases start at zero.

    The weights are replicated on every TP rank (their input, the final norm's output, is too), so
    each rank computes the full score and the full gradient; nothing needs reducing over TP.
    Under sequence parallelism the sequence shards are gathered first; the backward keeps
    this rank's shard of the (identical) full gradient.
    """

    is_value_head = True  # what megatron_ext.checkpoint.has_value_head looks for

    def __init__(self, hidden_size: int, sequence_parallel: bool, seed: int, std: float, bias: bool = False,
                 mlp: bool = False):
        super().__init__()
        g = torch.Generator().manual_seed(seed)  # same init on every TP rank
        self.weight = torch.nn.Parameter(torch.randn(1, hidden_size, generator=g) * std)
        self.mlp = mlp
        if mlp:
            self.hidden_weight = torch.nn.Parameter(torch.randn(hidden_size, hidden_size, generator=g) * std)
            self.hidden_bias = torch.nn.Parameter(torch.zeros(hidden_size))
        self.bias = torch.nn.Parameter(torch.zeros(1)) if bias else None
        self.sequence_parallel = sequence_parallel

    def forward(self, hidden, weight=None, runtime_gather_output=None):
        if self.sequence_parallel:
            hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)
        dtype = hidden.dtype
        if self.mlp:
            hidden = F.relu(F.linear(hidden, self.hidden_weight.to(dtype), self.hidden_bias.to(dtype)))
        bias = None if self.bias is None else self.bias.to(dtype)
        return F.linear(hidden, self.weight.to(dtype), bias), None


def add_value_head(chunk, cfg: Config) -> None:
    """Stage hook: swap the LM output layer of the last pipeline stage for a ValueHead of the
    layout `cfg.model` names (`value_head`, `value_head_bias`)."""
    if cfg.model.tie_word_embeddings and cfg.parallel.pp > 1:
        raise ConfigError("reward model: model.tie_word_embeddings with parallel.pp > 1 is not supported")
    if chunk.post_process:
        chunk.share_embeddings_and_output_weights = False
        chunk.output_layer = ValueHead(cfg.model.hidden_size, cfg.parallel.sp, cfg.train.seed,
                                       cfg.train.init_method_std, bias=cfg.model.value_head_bias,
                                       mlp=cfg.model.value_head == "mlp")


def pair_items(tokenizer, rows: List[dict], seq_length: int, where: str) -> List[dict]:
    """Chosen, rejected, chosen, ... samples: ids, next-token labels, reply mask, last index."""
    items = []
    for i, row in enumerate(rows):
        missing = {"prompt", "chosen", "rejected"} - set(row)
        if missing:
            raise ValueError(f"{where} row {i}: missing {sorted(missing)}")
        pair = format_preference(tokenizer, row["prompt"], row["chosen"], row["rejected"])
        for ids, mask in ((pair.chosen_ids, pair.chosen_mask), (pair.rejected_ids, pair.rejected_mask)):
            what = f"{where} row {i}"
            items.append({"tokens": torch.tensor(pad_to(ids, seq_length, tokenizer.pad, what)),
                          "labels": torch.tensor(pad_to(ids[1:], seq_length, tokenizer.pad, what)),
                          "loss_mask": torch.tensor(pad_to(mask[1:], seq_length, 0, what), dtype=torch.float32),
                          "position_ids": torch.arange(seq_length), "last": torch.tensor(len(ids) - 1)})
    return items


def preference_datasets(cfg: Config, train_samples: int, valid_samples: int):
    """Pair datasets from posttrain.data_path (90/10 split) or the synthetic task."""
    tok = chat_tokenizer(cfg)
    p = cfg.posttrain
    if p.data_path:
        rows = read_jsonl(p.data_path)
        n_valid = max(1, len(rows) // 10)
        train_rows, valid_rows, where = rows[:-n_valid], rows[-n_valid:], p.data_path
    else:
        train_rows = synthetic.preference_rows(p.num_samples, p.task_seed)
        valid_rows = synthetic.preference_rows(max(64, valid_samples // 2), p.task_seed + 10_000)
        where = "synthetic preference task"
    train = Cycled(pair_items(tok, train_rows, cfg.data.seq_length, where), train_samples, cfg.train.seed, unit=2)
    valid = Cycled(pair_items(tok, valid_rows, cfg.data.seq_length, where), valid_samples, cfg.train.seed, unit=2)
    return train, (valid if valid_samples else None)


def scores_at_last(output: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """[b, s, 1] head outputs -> [b] score at each sequence's last token."""
    return output.squeeze(-1).float().gather(1, last.view(-1, 1)).squeeze(1)


def bradley_terry_loss(last: torch.Tensor, output: torch.Tensor):
    """Sum over pairs of -log sigmoid(r_c - r_r); count = pairs; accuracy and margin reported."""
    r = scores_at_last(output, last)
    chosen, rejected = r[0::2], r[1::2]
    losses = -F.logsigmoid(chosen - rejected)
    n = chosen.numel()
    rep = report({LOSS: (losses.sum(), n), "accuracy": ((chosen > rejected).float().sum(), n),
                  "margin": ((chosen - rejected).sum(), n)})
    return losses.sum(), torch.tensor(n, dtype=torch.int), rep


class RewardModelStage(Stage):
    """Bradley-Terry reward model on the one training loop."""

    entry, loss_name = "posttrain.rm", "rm_loss"  # the loss: Bradley-Terry
    help_keys = ("posttrain.data_path", "posttrain.num_samples", "posttrain.task_seed")

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        require(cfg, "rm", pairs=True)

    customize_model = staticmethod(add_value_head)

    def datasets(self, cfg: Config, train_samples: int, valid_samples: int):
        return preference_datasets(cfg, train_samples, valid_samples)

    def forward_step(self, data_iterator, model):
        batch = data.on_this_rank(next(data_iterator))
        output = model(batch["tokens"], batch["position_ids"], attention_mask=None)
        return output, partial(bradley_terry_loss, batch["last"])


def export_hf(chunk, cfg: Config, out_dir) -> Path:
    """Write a TP=PP=1 reward model chunk as a HF `*ForSequenceClassification` directory.

    The backbone uses the family's weight mapping (as tools.convert); the value head becomes
    `score.weight` [1, hidden]. `pad_token_id` lets HF find each row's last real token.
    """
    from safetensors.torch import save_file

    from megatron_ext.grouped_experts import sequential_named_parameters
    from models import registry
    from models.mapping import expand, split

    m = cfg.model
    chunk = getattr(chunk, "module", chunk)
    params = {k: v.detach() for k, v in sequential_named_parameters(chunk)}
    if not isinstance(chunk.output_layer, ValueHead):
        raise ValueError("export_hf: the model has no ValueHead (not a reward model)")
    if chunk.output_layer.mlp or chunk.output_layer.bias is not None:
        raise ValueError("export_hf: transformers' *ForSequenceClassification holds a linear value head without "
                         f"bias (model.value_head={m.value_head}, model.value_head_bias={m.value_head_bias}); "
                         "convert the checkpoint with python -m tools.convert mcore-to-hf")
    tensors = {"score.weight": params.pop("output_layer.weight").contiguous()}
    for entry in expand(registry.family(m.family).RULES, m):
        if entry.mcore == "output_layer.weight":
            continue
        for name, t in zip(entry.hf, split(entry.kind, params[entry.mcore], m)):
            tensors[name] = t.contiguous().clone()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    tok = get_tokenizer(cfg.data.tokenizer)
    config = registry.hf_config_for(m, next(iter(params.values())).dtype, None)
    config.update(architectures=[HF_ARCH[m.family]], num_labels=1, pad_token_id=tok.pad,
                  bos_token_id=tok.eod, eos_token_id=tok.eod)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


if __name__ == "__main__":
    from megatron_ext.train import run_stage

    sys.exit(run_stage("rm"))
