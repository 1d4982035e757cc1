"""GRPO with verifiable rewards, on the one training loop.

`python -m posttrain.grpo [checkpoint.load=SFT_CKPT checkpoint.weights_only=true] [k=v ...]`

Each optimizer step (the stage's `before_step` hook, on every rank, with the current weights):

1. Prompts: global batch = global_batch_size / group_size prompts, each repeated
   `grpo.group_size` times; every DP rank takes the samples its micro-batches will read.
2. Rollouts: a `RolloutEngine` samples one completion per sample (temperature
   `grpo.temperature`, up to `grpo.max_new_tokens`, stopping at `<|im_end|>`) and
   returns the behaviour log-probs of the sampled tokens. `PolicyRollout` samples from the
   training model itself (collective over TP/PP), so weight sync is trivial; an external engine
   (vLLM, SGLang) implements the same two methods and receives the weights in `sync`.
3. Rewards from the verifiers: rows with "answer" are math (`verify_math` on the completion,
   at most `grpo.verify_timeout_s` seconds each: an answer not judged in time, or too large
   to evaluate, gets 0 and is counted in a warning),
   rows with "tests" are code (`run_code_tests` on its last code block). Rewards are summed over
   the DP group, so groups split across ranks are normalised together:
   A = (r - mean_group) / (std_group + 1e-4)   (centring only with grpo.scale_rewards=false).
4. Log-probs of the completions at the sampling temperature (log softmax(logits / T), as TRL
   and verl take them): the behaviour ("old") log-probs from the policy with the weights that
   sampled them, recomputed here as verl does so that an external engine's numerics never
   enter the ratio, and the reference log-probs from the frozen reference model (see
   `posttrain.reference`), skipped when grpo.kl_coef=0.

The loss per completion token t, with ratio = exp(logp - logp_behaviour):

    -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A) + kl_coef * (exp(ref - logp) - (ref - logp) - 1)

summed over tokens and normalised by the global number of completion tokens (as every loss of
the loop). The policy's log-probs are at the sampling temperature too. Reported per step:
reward, KL, clip fraction (as verl counts it: the tokens where the clipped term is the one
taken, i.e. ratio > 1 + eps with A > 0 or ratio < 1 - eps with A < 0), completion length.
Data rows: jsonl with "prompt" (text, sent as one user turn in ChatML) and "answer" or
"tests" (with an optional "setup": the problem's helpers the tests use, see `reward`); the default is a synthetic one-digit-sum task
(`posttrain.synthetic.arithmetic_prompts`), which a model first fine-tuned on
`posttrain/data/arithmetic_sft.jsonl` (`python -m posttrain.sft`) can earn rewards on.
"""

from __future__ import annotations

import logging
import sys
from collections import Counter
from functools import partial
from dataclasses import dataclass
from typing import Dict, List, Optional, Protocol, Sequence

import torch
from megatron.core import parallel_state

from data_prep.chat import encode_chat
from data_prep.synth.backends import extract_code
from megatron_ext import data
from megatron_ext.config import Config, ConfigError
from megatron_ext.generation import Generation, generate
from posttrain.common import (Cycled, chat_tokenizer, pad_to, read_jsonl_lines, report, require, run_cli,
                              token_logps)
from posttrain.reference import Reference, forward_only
from posttrain.synthetic import arithmetic_prompts
from data_prep.verifiers import run_code_tests
from data_prep.verifiers.math import DEFAULT_TIMEOUT_S, DIFFERENT, EQUAL, NO_ANSWER, judge_math

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- rollouts


class RolloutEngine(Protocol):
    """Where completions come from. Called on every rank, collectively."""

    def sync(self, rt) -> None:
        """Make the engine sample from the policy's current weights."""

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float,
                 seed: int, eos_token_id: int) -> Generation:
        """One completion per prompt (the stage rescores the tokens itself: see the module doc)."""


class PolicyRollout:
    """Samples from the training model itself (same weights, same layout: nothing to sync)."""

    def __init__(self):
        self.rt = None

    def sync(self, rt) -> None:
        self.rt = rt

    def generate(self, prompts, max_new_tokens, temperature, seed, eos_token_id) -> Generation:
        return generate(self.rt, prompts, max_new_tokens, temperature=temperature, seed=seed,
                        eos_token_id=eos_token_id)


# ---------------------------------------------------------------- rewards and advantages


def reward(row: dict, completion: str, math_timeout_s: float = DEFAULT_TIMEOUT_S,
           unjudged: Optional[Counter] = None) -> float:
    """1.0 if the completion is verified correct for the row, else 0.0.

    A math answer gets 0 when it is not judged within `math_timeout_s` seconds or is too large
    to evaluate; `unjudged` (when given) counts those by reason ("timeout", "too large", "error").

    A code row's optional "setup" (the problem's imports and helpers its tests use) is the
    sandbox's `trusted_setup`: the completion may call those helpers, and the tests always
    use the row's definitions, never the completion's redefinitions."""
    if "answer" in row:
        verdict = judge_math(completion, str(row["answer"]), math_timeout_s)
        if unjudged is not None and verdict.reason not in (EQUAL, DIFFERENT, NO_ANSWER):
            unjudged[verdict.reason] += 1
        return float(verdict.correct)
    return float(run_code_tests(extract_code(completion, row.get("entry_point")), row["tests"],
                                trusted_setup=row.get("setup") or "").status == "passed")


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True) -> torch.Tensor:
    """Rewards [n * group_size] (consecutive groups) -> group-normalised advantages."""
    groups = rewards.float().view(-1, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if scale:
        centred = centred / (groups.std(dim=1, keepdim=True) + 1e-4)
    return centred.reshape(-1)


def grpo_token_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor,
                    advantages: torch.Tensor, clip_eps: float, kl_coef: float):
    """Per-token clipped policy loss + k3 KL ([b, s] each; advantages [b]) and the pieces."""
    ratio = torch.exp(logp - old_logp)
    adv = advantages.unsqueeze(-1)
    unclipped = -ratio * adv
    clipped_loss = -torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * adv
    policy = torch.maximum(unclipped, clipped_loss)
    diff = ref_logp - logp
    kl = torch.exp(diff) - diff - 1
    clipped = (clipped_loss > unclipped).float()  # verl's pg_clipfrac: the clip changed the loss
    return policy + kl_coef * kl, kl, clipped


def grpo_loss_func(batch: dict, p, output: torch.Tensor):
    """loss_func for the loop: summed over completion tokens, count = completion tokens."""
    mask = batch["loss_mask"]
    logp = output.float()  # token log-probs at the sampling temperature (token_logps)
    ref = batch["ref_logp"] if p.kl_coef > 0 else logp.detach()
    per_token, kl, clipped = grpo_token_loss(logp, batch["old_logp"], ref, batch["advantage"], p.clip_eps, p.kl_coef)
    n_tok, n_seq = mask.sum(), mask.shape[0]
    loss = (per_token * mask).sum()
    rep = report({"lm loss": (loss, n_tok), "reward": (batch["reward"].sum(), n_seq),
                  "kl": ((kl * mask).sum(), n_tok), "clip_frac": ((clipped * mask).sum(), n_tok),
                  "completion_len": (mask.sum(), n_seq)})
    return loss, n_tok.to(torch.int), rep


# ---------------------------------------------------------------- data


def prompt_rows(cfg: Config) -> List[dict]:
    """The task's rows: posttrain.data_path (jsonl) or the synthetic arithmetic task."""
    p = cfg.posttrain
    if p.data_path is None:
        return arithmetic_prompts(p.num_samples, p.task_seed)
    lines = read_jsonl_lines(p.data_path)
    rows = [row for _, row in lines]
    for i, row in lines:
        if not isinstance(row.get("prompt"), str) or not ("answer" in row or isinstance(row.get("tests"), list)):
            raise ValueError(f"{p.data_path}:{i}: a GRPO row needs a string 'prompt' and an 'answer' "
                             "or a list of 'tests'")
        if not isinstance(row.get("setup", ""), str):
            raise ValueError(f"{p.data_path}:{i}: 'setup' (the problem's code the tests use) must be a string")
    if not rows:
        raise ValueError(f"{p.data_path}: no rows")
    return rows


class RolloutBuffer(torch.utils.data.Dataset):
    """The loop's training dataset: sample i is whatever `before_step` prepared for index i."""

    def __init__(self, length: int):
        self.length = length
        self.samples: Dict[int, dict] = {}

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        if i not in self.samples:
            raise RuntimeError(f"GRPO: rollout sample {i} was not prepared for this step")
        return self.samples[i]


@dataclass
class GRPOOptions:
    """GRPO's own options (the `grpo` config section)."""

    group_size: int = 8
    """Completions sampled per prompt; train.global_batch_size must be a multiple."""
    max_new_tokens: int = 8
    """Longest sampled completion."""
    temperature: float = 1.0
    """Sampling temperature of rollouts (policy, behaviour and reference log-probs use it too)."""
    clip_eps: float = 0.2
    """PPO ratio clipping range."""
    kl_coef: float = 0.02
    """Weight of the k3 KL estimate to the reference model (0: no reference model)."""
    scale_rewards: bool = True
    """Divide group-centred rewards by the group's std (False: centring only, as Dr. GRPO)."""
    verify_timeout_s: float = DEFAULT_TIMEOUT_S
    """Seconds to judge one math answer (`verify_math`); one not judged in time gets reward 0."""


class GRPOStage:
    """GRPO on the one training loop (see the module doc)."""

    config_section, config_options = "grpo", GRPOOptions

    loss_name = "grpo_loss"  # the console and metrics-file name of the loss (clipped policy loss + KL)

    uses_reference_model = True
    """The frozen reference is the model the run starts from (megatron_ext.stages)."""

    def __init__(self, cfg: Config, engine: Optional[RolloutEngine] = None):
        require(cfg, "grpo")
        p, t = cfg.grpo, cfg.train
        errors = []
        if p.group_size < 2 or t.global_batch_size % p.group_size:
            errors.append(f"grpo.group_size={p.group_size} must be >= 2 and divide "
                          f"train.global_batch_size={t.global_batch_size}")
        if p.max_new_tokens < 1 or p.temperature <= 0 or p.clip_eps <= 0 or p.kl_coef < 0:
            errors.append(f"need grpo.max_new_tokens >= 1 (got {p.max_new_tokens}), temperature > 0 "
                          f"({p.temperature}), clip_eps > 0 ({p.clip_eps}), kl_coef >= 0 ({p.kl_coef})")
        if not 0 < p.verify_timeout_s < float("inf"):
            errors.append(f"grpo.verify_timeout_s={p.verify_timeout_s} must be a positive number of seconds")
        if cfg.data.num_workers:
            errors.append(f"data.num_workers={cfg.data.num_workers}: GRPO's rollouts live in this process; use 0")
        if errors:
            raise ConfigError("invalid config:\n  - " + "\n  - ".join(errors))
        self.cfg = cfg
        self.engine = engine or PolicyRollout()
        self.reference = Reference(cfg) if p.kl_coef > 0 else None
        self.tokenizer = chat_tokenizer(cfg)  # prompts in the model's chat template
        self.eos = self.tokenizer.token_to_id("<|im_end|>")
        self.buffer: Optional[RolloutBuffer] = None
        self.prompts: Optional[Cycled] = None

    def customize_model(self, chunk, cfg: Config) -> None:
        if self.reference is not None:
            self.reference.snapshot(chunk, cfg)

    def text(self, completion: Sequence[int]) -> str:
        """A completion's text: without the stop token and the model's padded-vocabulary ids."""
        return self.tokenizer.decode([x for x in completion if x != self.eos and x < self.tokenizer.vocab_size])

    def encode_prompt(self, row: dict) -> List[int]:
        ids, _ = encode_chat(self.tokenizer, [{"role": "user", "content": row["prompt"]}], add_generation_prompt=True)
        return ids

    def datasets(self, cfg: Config, train_samples: int, valid_samples: int):
        rows = prompt_rows(cfg)
        longest = max(len(self.encode_prompt(r)) for r in rows)
        need = longest + cfg.grpo.max_new_tokens - 1
        if need > cfg.data.seq_length:
            raise ConfigError(f"data.seq_length={cfg.data.seq_length} is too short for GRPO: the longest prompt "
                              f"has {longest} tokens + grpo.max_new_tokens={cfg.grpo.max_new_tokens} "
                              f"needs {need}")
        g = cfg.grpo.group_size
        self.prompts = Cycled(rows, train_samples // g + 1, cfg.train.seed)
        self.buffer = RolloutBuffer(train_samples)
        return self.buffer, None

    # ------------------------------------------------------------ one step's rollouts

    def before_step(self, rt, state) -> None:
        cfg, p, t = self.cfg, self.cfg.grpo, self.cfg.train
        dp_rank, dp = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
        start = state.consumed_samples
        mine = [i for mb in data.micro_batch_indices(start, t.global_batch_size, t.micro_batch_size, dp_rank, dp)
                for i in mb]
        rows = [self.prompts[i // p.group_size] for i in mine]
        prompts = [self.encode_prompt(r) for r in rows]
        self.engine.sync(rt)
        # One seed per (step, DP replica): the same on its TP/PP ranks, and again after a resume.
        seed = (t.seed * 1_000_003 + state.step * 1009 + dp_rank) % (2 ** 63)
        out = self.engine.generate(prompts, p.max_new_tokens, p.temperature, seed, self.eos)
        texts = [self.text(ids) for ids in out.tokens]
        rewards = torch.zeros(t.global_batch_size)
        unjudged: Counter = Counter()
        for i, row, text in zip(mine, rows, texts):
            rewards[i - start] = reward(row, text, p.verify_timeout_s, unjudged)
        if unjudged:
            log.warning("GRPO step %d: %d math answers not judged (%s), rewarded 0", state.step,
                        sum(unjudged.values()), ", ".join(f"{k}: {v}" for k, v in sorted(unjudged.items())))
        if dp > 1:
            on_device = rewards.cuda() if torch.cuda.is_available() else rewards
            torch.distributed.all_reduce(on_device, group=parallel_state.get_data_parallel_group())
            rewards = on_device.cpu()
        advantages = group_advantages(rewards, p.group_size, p.scale_rewards)
        samples = [self._sample(prompt, ids, rewards[i - start], advantages[i - start])
                   for i, prompt, ids in zip(mine, prompts, out.tokens)]
        self._add_logps(rt.model, samples, "old_logp")
        if self.reference is not None:
            self._add_logps(self.reference.build(), samples, "ref_logp")
        self.buffer.samples = dict(zip(mine, samples))

    def _sample(self, prompt: List[int], completion: List[int], reward_value, advantage) -> dict:
        s = self.cfg.data.seq_length
        seq = prompt + completion
        what = "GRPO sample"
        start = len(prompt) - 1  # label position of the first completion token
        mask = [0] * start + [1] * len(completion)
        return {"tokens": torch.tensor(pad_to(seq[:-1], s, self.tokenizer.pad, what)),
                "labels": torch.tensor(pad_to(seq[1:], s, self.tokenizer.pad, what)),
                "position_ids": torch.arange(s),
                "loss_mask": torch.tensor(pad_to(mask, s, 0, what), dtype=torch.float32),
                "old_logp": torch.zeros(s), "ref_logp": torch.zeros(s),  # set by _add_logps
                "reward": reward_value.clone(), "advantage": advantage.clone()}

    def _add_logps(self, chunks, samples: List[dict], key: str) -> None:
        """samples[i][key] = token log-probs of chunks' model at the sampling temperature."""
        mbs, temperature = self.cfg.train.micro_batch_size, self.cfg.grpo.temperature
        batches = [{k: torch.stack([x[k] for x in samples[i:i + mbs]]) for k in ("tokens", "labels")}
                   for i in range(0, len(samples), mbs)]

        def forward(batch, model):
            batch = data.on_this_rank(batch)
            out = token_logps(model, batch["tokens"], batch["labels"], temperature)
            return out, lambda output: (output.sum() * 0, torch.tensor(1, dtype=torch.int),
                                        {"logps": output.detach().float().cpu()})

        modes = [c.training for c in chunks]
        for c in chunks:
            c.eval()
        try:
            reports = forward_only(chunks, batches, forward, self.cfg.data.seq_length)
        finally:
            for c, mode in zip(chunks, modes):
                c.train(mode)
        if reports:  # the last pipeline stage, the only one whose loss_func reads them
            logps = torch.cat([r["logps"] for r in reports])
            for sample, row in zip(samples, logps):
                sample[key] = row

    # ------------------------------------------------------------ training and evaluation

    def forward_step(self, data_iterator, model):
        batch = data.on_this_rank(next(data_iterator))
        output = token_logps(model, batch["tokens"], batch["labels"], self.cfg.grpo.temperature)
        return output, partial(grpo_loss_func, batch, self.cfg.grpo)

    def accuracy(self, rt, rows: Sequence[dict], max_new_tokens: Optional[int] = None) -> float:
        """Fraction of `rows` answered correctly with greedy decoding (collective)."""
        prompts = [self.encode_prompt(r) for r in rows]
        out = generate(rt, prompts, max_new_tokens or self.cfg.grpo.max_new_tokens, greedy=True,
                       eos_token_id=self.eos)
        texts = [self.text(ids) for ids in out.tokens]
        return sum(reward(r, x, self.cfg.grpo.verify_timeout_s) for r, x in zip(rows, texts)) / len(rows)


if __name__ == "__main__":
    sys.exit(run_cli("grpo", GRPOStage))
