"""Pieces every post-training stage shares: metric reports, padding, checks, the CLI.

Stage metrics: a stage's loss_func reports [sum, count] pairs (loss, accuracy, margins,
rewards) with `report`; the one loop reduces every one of them over micro-batches and data
parallelism, sends them along the pipeline, logs them and returns them in each step's record
(`megatron_ext.loop`), validation means as `val_*`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from data_prep.readers import read_json_lines
from megatron_ext.config import Config, ConfigError


DATA_DIR = Path(__file__).resolve().parent / "data"


def report(pairs: Dict[str, tuple]) -> Dict[str, torch.Tensor]:
    """A loss_func report: {name: tensor([sum, count])} from {name: (sum, count)}.

    Kept on the device of the sum: a host copy here would stall the GPU after every micro-batch;
    the loop copies the summed reports to the host once per step (loop.reduce_reports). A count
    is a tensor or a Python number (filled on the device, not copied there)."""
    out = {}
    for k, (s, c) in pairs.items():
        s = s.detach().float().reshape(())
        c = c.detach().to(s.device, torch.float32).reshape(()) if torch.is_tensor(c) else \
            torch.full((), float(c), device=s.device)
        out[k] = torch.stack([s, c])
    return out


class Cycled(torch.utils.data.Dataset):
    """`items` repeated (each epoch in a fresh seeded order) up to `length` samples.

    The loop asks for steps * global_batch samples; a small dataset is walked in epochs.
    `unit` keeps groups of consecutive items together (2 for chosen/rejected pairs).
    """

    def __init__(self, items: Sequence, length: int, seed: int, unit: int = 1):
        if not items:
            raise ValueError("empty dataset")
        self.items, self.unit, self.seed = items, unit, seed
        self.length = max(length, len(items))
        self._orders: Dict[int, List[int]] = {}

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        groups = len(self.items) // self.unit
        epoch, pos = divmod(i // self.unit, groups)
        if epoch not in self._orders:
            g = torch.Generator().manual_seed(self.seed * 100003 + epoch)
            self._orders[epoch] = torch.randperm(groups, generator=g).tolist()
        return self.items[self._orders[epoch][pos] * self.unit + i % self.unit]


def pad_to(ids: Sequence[int], length: int, pad: int, what: str) -> List[int]:
    """Right-pad `ids` to `length`; a sample that does not fit is an error naming it."""
    if len(ids) > length:
        raise ValueError(f"{what} has {len(ids)} tokens > data.seq_length={length}; raise data.seq_length")
    return list(ids) + [pad] * (length - len(ids))


def read_jsonl(path) -> List[dict]:
    """Rows of a jsonl file (errors name the file and line; see `read_jsonl_lines`)."""
    return [row for _, row in read_jsonl_lines(path)]


def read_jsonl_lines(path) -> List[Tuple[int, dict]]:
    """(line number, row) of each non-empty line of a jsonl file (`.jsonl.gz` / `.jsonl.zst` too),
    for errors that name the line.

    The file may come from anyone: it is read by `data_prep.readers.read_json_lines`, with the
    limits of `data_prep.tokenize`. A line that is not a JSON object is a ValueError
    "PATH:LINE: REASON: DETAIL": malformed_json, invalid_utf8, corrupt_file (damaged compressed
    data), too_deep (nested deeper than MAX_JSON_DEPTH = 100 levels, refused before json.loads
    recurses) or too_large (longer than DEFAULT_MAX_RECORD_BYTES = 16 MiB, skipped unread, so
    reading holds at most that much of one line). 16 MiB is about 4M tokens, far beyond any
    data.seq_length a row has to fit, so no setting raises the limit."""
    return list(read_json_lines(path))


def require(cfg: Config, stage: str, *, pairs: bool = False, no_cp: bool = True, no_pp: bool = False) -> None:
    """Checks a post-training stage adds to `megatron_ext.config.validate`."""
    errors = []
    if pairs and cfg.train.micro_batch_size % 2:
        errors.append(f"stage {stage}: train.micro_batch_size={cfg.train.micro_batch_size} must be even "
                      "(a micro-batch holds whole chosen/rejected pairs)")
    if no_cp and cfg.parallel.cp > 1:
        errors.append(f"stage {stage}: parallel.cp={cfg.parallel.cp} is not supported (sequence-level losses)")
    if no_pp and cfg.parallel.pp > 1:
        errors.append(f"stage {stage}: parallel.pp={cfg.parallel.pp} is not supported (rollouts run the whole model)")
    if errors:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(errors))


def chat_tokenizer(cfg: Config):
    """data.tokenizer with the chat rendering `posttrain.chat_template` chooses (`auto`: the
    tokenizer's own template, plain ChatML without one; `chatml`; or a template path)."""
    from data_prep.chat import set_chat_template
    from data_prep.tokenizer import get_tokenizer

    tok = get_tokenizer(cfg.data.tokenizer)
    try:
        return set_chat_template(tok, cfg.posttrain.chat_template)
    except ValueError as e:
        raise ConfigError(f"invalid config:\n  - posttrain.chat_template: {e}") from None


def unwrap(model) -> torch.nn.Module:
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


def token_logps(model, tokens: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log p(labels[b, s] | tokens[b, :s+1]) per position, [b, s], from logits / temperature.

    Exact under TP: Megatron's vocab-parallel cross entropy returns -log p(label) without
    gathering the logits. Only the chunk that holds the output layer (the last pipeline stage,
    or its last virtual chunk) computes log-probs; every other chunk returns its hidden states
    unchanged, to be handed to the next stage.
    """
    position_ids = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)
    if not unwrap(model).post_process:
        return model(tokens, position_ids, attention_mask=None)
    if temperature == 1.0:
        return -model(tokens, position_ids, attention_mask=None, labels=labels)
    from megatron_ext.cross_entropy import vocab_parallel_cross_entropy

    logits = model(tokens, position_ids, attention_mask=None)  # [b, s, V/tp]
    return -vocab_parallel_cross_entropy(logits / temperature, labels)


def run_cli(stage_name: str, make_stage: Callable[[Config], object], argv: Optional[Sequence[str]] = None) -> int:
    """`python -m posttrain.<stage> k=v ...`: conf/stage/<stage>.yaml + overrides, on the shared entry."""
    from megatron_ext.train import run

    return run(argv, make_stage, name=stage_name, base_overrides=[f"stage={stage_name}"])
