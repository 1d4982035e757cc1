"""Rewards of completions from several sources, weighted and shaped: GRPO's rollouts, and the
reward-model scoring that evaluation (RM@k, PRM@k) and RM-ranked rejection sampling share.

Sources (the `grpo` config section):

    grpo.rm_load=CKPT        the verifiers plus a reward model, with Qwen2.5-Math's shaping
    grpo.rewards=[{source: verifier}, {source: rm, path: CKPT, weight: 0.5},
                  {source: prm, path: CKPT, aggregate: min}, {source: fn, name: "mymod:score"}]
    grpo.reward_shaping=none|qwen_math

- `verifier`: the rule verifiers (math answer equivalence, code tests: `posttrain.grpo.reward`),
  1 or 0.
- `rm`: a reward model's score (the value head's logit at the conversation's last token, as
  `posttrain.rm` trains it) of the prompt as the user turn and the completion as the reply. The
  checkpoint is one written by `python -m posttrain.rm` or converted from Hugging Face by
  `tools.convert` (head rm).
- `prm`: a process reward model (`posttrain.prm`, or converted with head prm): the completion is
  split into steps at blank lines, P(step correct) = sigmoid of the value head at each step's
  separator, and the steps' probabilities are reduced by `aggregate`: `min`, `last` or `product`.
  A completion without steps gets 0.
- `fn`: a user function `module:function` (resolved like `stage_class`), called as
  `fn(row, completion) -> float` with the data row (its "prompt", "answer" / "tests", ...).

The reward is sum_i weight_i * shape(r_i). `none` leaves every r_i as it is; `qwen_math` is
Qwen2.5-Math's r = sigmoid(0.5 * r_rm) + (r_verifier - 1): it maps an rm source's score to
sigmoid(0.5 * r) and a verifier's to r - 1 (prm and fn sources unchanged), so a verifier and an rm
source with weight 1 give exactly that formula. `grpo.rm_load` alone means the sources
[verifier, rm] with `qwen_math` (unless grpo.reward_shaping says otherwise).

Model sources run on the ranks and layout of the policy (their own model with a value head,
frozen, built like the reference model at the policy's TP/PP; one model per source, built on
first use); their scores are computed where the rollouts are, collectively over the model
replica's TP/PP ranks, and shared from the last pipeline stage to every stage.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from data_prep.chat import encode_chat
from megatron_ext.config import Config, ConfigError
from megatron_ext.forward import frozen, share_from_last_stage

log = logging.getLogger(__name__)

SOURCES = ("verifier", "rm", "prm", "fn")
MODEL_SOURCES = ("rm", "prm")
STEP_SEPARATOR = "\n\n"
PRM_AGGREGATES: Dict[str, Callable[[Sequence[float]], float]] = {
    "min": min, "last": lambda probs: probs[-1], "product": math.prod}
"""How a PRM's step probabilities become one score (ProcessBench's and Qwen2.5-Math's choices)."""
SHAPINGS: Dict[str, Dict[str, Callable[[torch.Tensor], torch.Tensor]]] = {
    "none": {},
    "qwen_math": {"rm": lambda r: torch.sigmoid(0.5 * r), "verifier": lambda r: r - 1},
}
"""Per-source maps applied before the weighted sum (sources not named are unchanged)."""


@dataclass
class RewardSource:
    """One entry of `grpo.rewards`."""

    source: str = "verifier"
    """verifier | rm | prm | fn"""
    weight: float = 1.0
    """Its weight in the sum."""
    path: Optional[str] = None
    """rm / prm: the checkpoint (training checkpoint, its root, or a tools.convert checkpoint)."""
    aggregate: str = "min"
    """prm: how the step probabilities become one score (min | last | product)."""
    name: Optional[str] = None
    """fn: `module:function`, called as fn(row, completion) -> float."""


# ---------------------------------------------------------------- configuration


def sources_of(p) -> List[RewardSource]:
    """The configured sources of a `grpo` section: grpo.rewards, else grpo.rm_load's verifier + rm,
    else the verifiers alone."""
    if p.rewards:
        return [s if isinstance(s, RewardSource) else RewardSource(**dict(s)) for s in p.rewards]
    if p.rm_load:
        return [RewardSource("verifier"), RewardSource("rm", path=p.rm_load)]
    return [RewardSource("verifier")]


def shaping_of(p) -> str:
    """grpo.reward_shaping; unset: qwen_math for grpo.rm_load alone, else none."""
    if p.reward_shaping is not None:
        return p.reward_shaping
    return "qwen_math" if p.rm_load and not p.rewards else "none"


def metric_names(sources: Sequence[RewardSource]) -> List[str]:
    """Each source's metric (`reward_verifier`, `reward_rm`, a repeated kind numbered from 2);
    none with a single source, whose values are the reward itself."""
    if len(sources) < 2:
        return []
    names, seen = [], {}
    for s in sources:
        seen[s.source] = seen.get(s.source, 0) + 1
        names.append(f"reward_{s.source}" + (str(seen[s.source]) if seen[s.source] > 1 else ""))
    return names


def _entry_errors(i: int, s: RewardSource, where: str, cfg: Optional[Config], world: int) -> List[str]:
    key = f"{where}[{i}]"
    if s.source not in SOURCES:
        return [f"{key}.source={s.source!r} is not one of {', '.join(SOURCES)}"]
    errors = []
    if not math.isfinite(float(s.weight)):
        errors.append(f"{key}.weight={s.weight} must be a finite number")
    if (s.path is not None) != (s.source in MODEL_SOURCES):
        errors.append(f"{key}.path: a {s.source} source " + ("needs a checkpoint path" if s.path is None
                                                              else "takes no path (only rm and prm do)"))
    elif s.path is not None:
        errors += model_source_errors(s.path, s.source, f"{key}.path", cfg, world)
    if s.source == "prm" and s.aggregate not in PRM_AGGREGATES:
        errors.append(f"{key}.aggregate={s.aggregate!r} is not one of {', '.join(PRM_AGGREGATES)}")
    if (s.name is not None) != (s.source == "fn"):
        errors.append(f"{key}.name: " + ("an fn source needs module:function" if s.name is None
                                         else f"a {s.source} source takes no name (only fn does)"))
    elif s.name is not None:
        errors += _function_errors(s.name, f"{key}.name")
    return errors


def _function_errors(spec: str, key: str) -> List[str]:
    from megatron_ext.stages import resolve

    try:
        fn = resolve(spec, key)
    except ConfigError as e:
        return [str(e)]
    return [] if callable(fn) else [f"{key}={spec!r} is not callable"]


def model_source_errors(path: str, kind: str, key: str, cfg: Optional[Config], world: int) -> List[str]:
    """Problems of a reward-model checkpoint for source `kind` (rm / prm), read from its metadata
    only: missing, unreadable, another head, or a model that the policy's layout cannot run."""
    from megatron_ext.checkpoint import CheckpointError, open_checkpoint
    from megatron_ext.config import validate

    try:
        src = open_checkpoint(path)
    except (CheckpointError, OSError) as e:
        return [f"{key}={path}: {e}"]
    if src.head != kind:
        trained = "python -m posttrain." + kind
        return [f"{key}={path} is not a {kind.upper()} checkpoint (its head is {src.head}); a {kind} source needs "
                f"one written by {trained} or converted from Hugging Face with head {kind}"]
    if cfg is None:
        return []
    try:
        validate(dataclasses.replace(cfg, model=src.model), world)
    except ConfigError as e:
        return [f"{key}={path}: its model ({src.model.name}) does not fit the policy's layout: "
                + str(e).replace("invalid config:\n  - ", "").replace("\n  - ", "; ")]
    return []


def config_errors(p, cfg: Optional[Config] = None, world: int = 1) -> List[str]:
    """Every problem of the reward settings of a `grpo` section (keys named), before any model is
    built; with `cfg`, a reward model must also fit the policy's parallel layout on `world` ranks."""
    errors = []
    if p.rewards and p.rm_load:
        errors.append("grpo.rm_load and grpo.rewards are both set: list the reward model in grpo.rewards "
                      "({source: rm, path: CKPT})")
    try:
        sources = sources_of(p)
    except TypeError as e:
        return errors + [f"grpo.rewards: an entry has an unknown key ({e}); the keys are "
                         f"{', '.join(f.name for f in dataclasses.fields(RewardSource))}"]
    where = "grpo.rewards" if p.rewards else "grpo.rm_load"
    for i, s in enumerate(sources):
        errors += _entry_errors(i, s, where, cfg, world) if p.rewards else \
            (model_source_errors(s.path, "rm", "grpo.rm_load", cfg, world) if s.source == "rm" else [])
    shaping = shaping_of(p)
    if shaping not in SHAPINGS:
        errors.append(f"grpo.reward_shaping={shaping!r} is not one of {', '.join(SHAPINGS)}")
    elif shaping == "qwen_math" and not {"rm", "verifier"} <= {s.source for s in sources}:
        errors.append("grpo.reward_shaping=qwen_math (sigmoid(0.5 * r_rm) + r_verifier - 1) needs an rm and a "
                      "verifier source")
    return errors


def combine(parts: torch.Tensor, sources: Sequence[RewardSource], shaping: str) -> torch.Tensor:
    """[sources, n] raw rewards -> [n]: sum_i weight_i * shape(r_i) (see the module doc)."""
    maps = SHAPINGS[shaping]
    out = torch.zeros(parts.shape[1], dtype=parts.dtype)
    for row, s in zip(parts, sources):
        out += float(s.weight) * maps.get(s.source, lambda r: r)(row)
    return out


# ---------------------------------------------------------------- value-head scoring (collective)


def head_values(chunks, seqs: Sequence[Sequence[int]], pad: int, batch_size: int) -> List[torch.Tensor]:
    """Collective: a value head's output at every position of each sequence (known on every rank
    of the pipeline)."""
    from megatron_ext.generation import forward

    cfg = chunks[0].config
    mult = cfg.tensor_model_parallel_size if cfg.sequence_parallel else 1
    device = next(chunks[0].parameters()).device
    out = []
    for start in range(0, len(seqs), batch_size):
        group = seqs[start:start + batch_size]
        width = -(-max(len(s) for s in group) // mult) * mult
        tokens = torch.full((len(group), width), pad, dtype=torch.long)
        for i, s in enumerate(group):
            tokens[i, :len(s)] = torch.tensor(list(s))
        values = forward(chunks, tokens)  # right padding is invisible to earlier positions (causal)
        values = values[..., 0] if values is not None else torch.zeros(len(group), width)
        values = share_from_last_stage(values.contiguous(), device)
        out += [values[i, :len(s)] for i, s in enumerate(group)]
    return out


def rm_inputs(tok, prompt: str, completion: str) -> List[int]:
    """A reward model's input: the prompt as user turn, the completion as the reply (as
    posttrain.rm trains it: format_preference's ids); its score is read at the last token."""
    return encode_chat(tok, [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}])[0]


def rm_scores(chunks, tok, pairs: Sequence[Tuple[str, str]], batch_size: int) -> List[float]:
    """Collective: the reward model's score of each (prompt, completion)."""
    if not pairs:
        return []
    seqs = [rm_inputs(tok, prompt, completion) for prompt, completion in pairs]
    return [float(v[-1]) for v in head_values(chunks, seqs, tok.pad, batch_size)]


def prm_inputs(tok, question: str, steps: Sequence[str]):
    """PRM input ids (as posttrain/prm.py trains: the question as user turn, each step followed by
    the separator) and the separator positions."""
    ids, _ = encode_chat(tok, [{"role": "user", "content": question}], add_generation_prompt=True)
    positions = []
    for step in steps:
        ids = ids + tok.encode(step + STEP_SEPARATOR)
        positions.append(len(ids) - 1)
    return ids, positions


def split_steps(text: str) -> List[str]:
    """A solution's steps: its blank-line separated paragraphs."""
    return [s.strip() for s in text.split(STEP_SEPARATOR) if s.strip()]


def prm_step_probs(chunks, tok, items: Sequence[Tuple[str, Sequence[str]]], batch_size: int) -> List[List[float]]:
    """Collective: P(step correct) at each step's separator, per (question, steps) item."""
    if not items:
        return []
    inputs = [prm_inputs(tok, q, steps) for q, steps in items]
    values = head_values(chunks, [ids for ids, _ in inputs], tok.pad, batch_size)
    return [torch.sigmoid(v[pos]).tolist() if pos else [] for v, (_, pos) in zip(values, inputs)]


def prm_score(probs: Sequence[float], aggregate: str) -> Optional[float]:
    """A solution's PRM score from its step probabilities (None without steps)."""
    return PRM_AGGREGATES[aggregate](list(probs)) if probs else None


# ---------------------------------------------------------------- in training


def build_value_model(cfg: Config, path: str, kind: str) -> List[torch.nn.Module]:
    """Collective: the frozen chunks (this rank's pipeline stage(s)) of a reward-model checkpoint
    at the policy's layout, in eval mode (as `posttrain.reference` builds the reference)."""
    from megatron_ext.build import build_model
    from megatron_ext.checkpoint import load_weights, open_checkpoint
    from megatron_ext.transformer import transformer_config
    from posttrain.rm import add_value_head

    src = open_checkpoint(path)
    if src.head != kind:
        raise ConfigError(f"{path} is not a {kind.upper()} checkpoint (its head is {src.head})")
    mcfg = dataclasses.replace(cfg, model=src.model)
    tcfg = transformer_config(mcfg)
    tcfg.perform_initialization = False  # every weight comes from the checkpoint
    chunks = build_model(mcfg, tcfg, customize=add_value_head)
    load_weights(chunks, src)
    frozen(chunks)
    log.info("reward source %s: %s (%s)", kind, path, src.model.name)
    return chunks


class RewardSources:
    """The configured sources of a GRPO run: raw rewards per source, and their combination."""

    def __init__(self, cfg: Config, tokenizer):
        p = cfg.grpo
        self.cfg, self.tok = cfg, tokenizer
        self.sources = sources_of(p)
        self.shaping = shaping_of(p)
        self.names = metric_names(self.sources)
        self.models: Dict[int, List[torch.nn.Module]] = {}
        self.functions: Dict[int, Callable] = {}

    def _model(self, i: int) -> List[torch.nn.Module]:
        if i not in self.models:
            s = self.sources[i]
            self.models[i] = build_value_model(self.cfg, s.path, s.source)
        return self.models[i]

    def _function(self, i: int) -> Callable:
        if i not in self.functions:
            from megatron_ext.stages import resolve

            self.functions[i] = resolve(self.sources[i].name, f"grpo.rewards[{i}].name")
        return self.functions[i]

    def _call(self, i: int, row: dict, text: str) -> float:
        value = self._function(i)(row, text)
        try:
            value = float(value)
        except (TypeError, ValueError):
            value = math.nan
        if not math.isfinite(value):
            raise ValueError(f"reward function {self.sources[i].name} returned {value!r} for prompt "
                             f"{str(row.get('prompt'))[:60]!r}: it must return a finite number")
        return value

    def score(self, rows: Sequence[dict], texts: Sequence[str], verifier: Callable[[dict, str], float]) -> torch.Tensor:
        """Collective over the model replica (the same rows and texts on its TP/PP ranks): [sources,
        n] raw rewards of the completions `texts` of `rows`."""
        out = torch.zeros(len(self.sources), len(texts))
        mbs = self.cfg.train.micro_batch_size
        for i, s in enumerate(self.sources):
            if s.source == "verifier":
                values = [verifier(row, text) for row, text in zip(rows, texts)]
            elif s.source == "fn":
                values = [self._call(i, row, text) for row, text in zip(rows, texts)]
            elif s.source == "rm":
                values = rm_scores(self._model(i), self.tok, [(r["prompt"], x) for r, x in zip(rows, texts)], mbs)
            else:
                probs = prm_step_probs(self._model(i), self.tok, [(r["prompt"], split_steps(x))
                                                                   for r, x in zip(rows, texts)], mbs)
                values = [prm_score(pr, s.aggregate) or 0.0 for pr in probs]
            if values:
                out[i] = torch.tensor(values, dtype=out.dtype)
        return out

    def combine(self, parts: torch.Tensor) -> torch.Tensor:
        return combine(parts, self.sources, self.shaping)
