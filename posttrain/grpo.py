"""GRPO with verifiable rewards, on the one training loop.

`python -m posttrain.grpo [checkpoint.load=SFT_CKPT checkpoint.weights_only=true] [k=v ...]`

Every `grpo.updates_per_batch` optimizer steps (the stage's `before_step` hook, on every rank,
with the current weights) a rollout batch is made; the steps between train on it again:

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
   rows with "tests" are code (`run_code_tests` on its last code block). With grpo.rm_load or
   grpo.rewards the reward combines weighted sources: these verifiers, reward models, PRMs and
   user functions (`posttrain.rewards`; the models run on this job's ranks and layout). Rewards are summed over
   the DP group, so groups split across ranks are normalised together:
   A = (r - mean_group) / (std + 1e-4), the std of the group (grpo.scale_rewards=group), of the
   batch (batch) or none (none: centring only, Dr. GRPO). With grpo.dynamic_sampling, groups
   whose rewards all agree are sampled again with new prompts (steps 2-3), for at most
   grpo.max_sampling_rounds rounds, then kept as they are with a warning.
4. Log-probs of the completions at the sampling temperature (log softmax(logits / T), as TRL
   and verl take them): the behaviour ("old") log-probs from the policy with the weights that
   sampled them, recomputed here as verl does so that an external engine's numerics never
   enter the ratio, and the reference log-probs from the frozen reference model (see
   `posttrain.reference`), skipped when grpo.kl_coef=0.

The loss per completion token t, with ratio = exp(logp - logp_behaviour) (grpo.importance=token)
or the completion's exp(mean_t(logp - logp_behaviour)) (sequence, GSPO), and KL the
grpo.kl_estimator (k3 = exp(ref - logp) - (ref - logp) - 1 by default):

    -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A) + kl_coef * KL

aggregated as grpo.loss_agg says (token_mean: summed over tokens and normalised by the global
number of completion tokens, as every loss of the loop). The policy's log-probs are at the
sampling temperature too. With grpo.mask_truncated, completions cut at max_new_tokens have no
loss tokens. Reported per step: reward, KL, clip fraction (as verl counts it: the tokens where
the clipped term is the one taken, i.e. ratio > 1 + eps_high with A > 0 or ratio < 1 - eps_low
with A < 0; `clip_frac_low` / `clip_frac_high` split it), completion length, the share of
truncated completions, and with several reward sources each one's mean (reward_verifier, reward_rm, ...).

The options and their TRL / verl names (variants in `posttrain.losses`, checked against each
project's formula in tests/test_losses.py):
- `clip_eps_low`, `clip_eps_high` (default `clip_eps`): TRL epsilon / epsilon_high, verl
  clip_ratio_low / clip_ratio_high (DAPO clip-higher). verl's dual clip is not applied (as TRL).
- `importance=token|sequence`: TRL importance_sampling_level; sequence is GSPO.
- `loss_agg`: verl loss_agg_mode token-mean (TRL bnpo), seq-mean-token-mean (TRL grpo),
  seq-mean-token-sum, seq-mean-token-sum-norm (Dr. GRPO, TRL dr_grpo: / (completions * max_new_tokens)).
- `updates_per_batch=N`: TRL num_iterations (verl ppo_epochs with one mini-batch); a run resumed
  between two rollouts samples a new batch, so checkpoint.save_interval a multiple of N resumes exactly.
- `scale_rewards=group|batch|none`: TRL scale_rewards (verl norm_adv_by_std_in_grpo = group / none);
  the former booleans still work: true = group, false = none.
- `mask_truncated`: TRL mask_truncated_completions.
- `dynamic_sampling`, `max_sampling_rounds`: DAPO dynamic sampling (verl filter_groups,
  max_num_gen_batches), here a group is resampled in place; verl errors at the bound, this keeps the batch.
- `kl_estimator=k1|k2|k3|k1+|k3+|k3_bias_corrected`: verl kl_penalty names (k3 without verl's
  low_var_kl clamps, i.e. TRL's); `+` = verl's straight-through k2 gradient;
  k3_bias_corrected = TRL use_bias_correction_kl (k3 times the importance ratio).
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
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Protocol, Sequence, Tuple

import torch
from megatron.core import parallel_state

from data_prep.chat import encode_chat
from data_prep.synth.backends import extract_code
from megatron_ext import data
from megatron_ext.config import Config, ConfigError
from megatron_ext.dist import launch_env
from megatron_ext.schedule import report
from megatron_ext.stages import LOSS, Stage, require
from megatron_ext.generation import Generation, SamplingParams, generate
from posttrain.datasets import Cycled, chat_tokenizer, pad_to, read_jsonl_lines
from posttrain.logprobs import token_logps
from megatron_ext.forward import eval_mode, forward_only
from posttrain import losses, rewards as reward_sources
from posttrain.reference import Reference
from posttrain.synthetic import arithmetic_prompts
from data_prep.verifiers import run_code_tests
from data_prep.verifiers.math import DEFAULT_TIMEOUT_S, DIFFERENT, EQUAL, NO_ANSWER, judge_math

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- rollouts


class RolloutEngine(Protocol):
    """Where completions come from. Called on every rank, collectively."""

    def sync(self, rt) -> None:
        """Make the engine sample from the policy's current weights."""

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> Generation:
        """One completion per prompt, sampled as `params` say (max_new_tokens, temperature, seed,
        eos_token_id); the stage rescores the tokens itself: see the module doc."""


class PolicyRollout:
    """Samples from the training model itself (same weights, same layout: nothing to sync)."""

    def __init__(self):
        self.rt = None

    def sync(self, rt) -> None:
        self.rt = rt

    def generate(self, prompts, params: SamplingParams) -> Generation:
        return generate(self.rt, prompts, params)


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


def group_advantages(rewards: torch.Tensor, group_size: int, scale=True) -> torch.Tensor:
    """Rewards [n * group_size] (consecutive groups) -> group-normalised advantages; `scale` is a
    grpo.scale_rewards mode (group, batch, none; True = group, False = none)."""
    mode = ("group" if scale else "none") if isinstance(scale, bool) else scale
    return losses.grpo_advantages(rewards, group_size, mode)


def grpo_token_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor,
                    advantages: torch.Tensor, mask: torch.Tensor, p):
    """Per-token policy loss (grpo.importance, clip range) + kl_coef * KL (grpo.kl_estimator),
    [b, s] each (advantages [b]), with the KL and the policy terms."""
    low, high = clip_range(p)
    terms = losses.POLICY_LOSSES[p.importance](logp, old_logp, advantages, mask, low, high)
    kl = losses.KL_ESTIMATORS[p.kl_estimator](logp, ref_logp, terms.ratio)
    return terms.loss + p.kl_coef * kl, kl, terms


def grpo_loss_func(batch: dict, p, output: torch.Tensor):
    """loss_func for the loop: the loss as grpo.loss_agg sums and counts it (token_mean: summed
    over completion tokens, count = completion tokens); metrics per token or per completion."""
    mask = batch["loss_mask"]
    logp = output.float()  # token log-probs at the sampling temperature (token_logps)
    ref = batch["ref_logp"] if p.kl_coef > 0 else logp.detach()
    per_token, kl, terms = grpo_token_loss(logp, batch["old_logp"], ref, batch["advantage"], mask, p)
    loss, count = losses.LOSS_AGGREGATIONS[p.loss_agg](per_token, mask, p.max_new_tokens)
    n_tok, n_seq = mask.sum(), mask.shape[0]
    low, high = (terms.clipped_low * mask).sum(), (terms.clipped_high * mask).sum()
    rep = report({LOSS: (loss, count), "reward": (batch["reward"].sum(), n_seq),
                  "kl": ((kl * mask).sum(), n_tok), "clip_frac": (low + high, n_tok),
                  "clip_frac_low": (low, n_tok), "clip_frac_high": (high, n_tok),
                  "completion_len": (batch["length"].sum(), n_seq), "truncated": (batch["truncated"].sum(), n_seq),
                  **{k: (batch[k].sum(), n_seq) for k in batch if k.startswith("reward_")}})  # per reward source
    return loss, count.to(torch.int), rep


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
    """PPO ratio clipping range on both sides: shorthand for clip_eps_low = clip_eps_high
    (TRL's `epsilon`, verl's `clip_ratio`)."""
    clip_eps_low: Optional[float] = None
    """Clip below at 1 - clip_eps_low (None: clip_eps); TRL `epsilon`, verl `clip_ratio_low`."""
    clip_eps_high: Optional[float] = None
    """Clip above at 1 + clip_eps_high (None: clip_eps); DAPO's clip-higher, e.g. 0.28 (TRL
    `epsilon_high`, verl `clip_ratio_high`)."""
    importance: str = "token"
    """Importance ratio per `token` (PPO/GRPO) or per `sequence` (GSPO: exp of the completion's
    mean log-ratio; TRL `importance_sampling_level`, verl `policy_loss.loss_mode=gspo`)."""
    loss_agg: str = "token_mean"
    """How per-token losses are averaged (verl `loss_agg_mode`): `token_mean` over all completion
    tokens (TRL `bnpo`), `seq_mean_token_mean` (TRL `grpo`, the GSPO paper's),
    `seq_mean_token_sum`, or `seq_mean_token_sum_norm` (Dr. GRPO's constant normaliser
    completions * max_new_tokens, TRL `dr_grpo`)."""
    updates_per_batch: int = 1
    """Optimizer steps per rollout batch (TRL `num_iterations`, the GRPO paper's mu): a rollout
    every N steps, each step trains on the same completions with the behaviour log-probs of the
    policy that sampled them, so clipping acts from the second step on."""
    adv_estimator: str = "grpo"
    """Advantage estimator (verl `algorithm.adv_estimator`): `grpo`, group-relative rewards."""
    scale_rewards: str = "group"
    """Divide the group-centred rewards by the std of the `group`, of the whole `batch`, or
    `none` (Dr. GRPO), as TRL's `scale_rewards`. The former booleans are aliases: true = group,
    false = none."""
    kl_coef: float = 0.02
    """Weight of the KL estimate to the reference model (0: no reference model)."""
    kl_estimator: str = "k3"
    """Per-token KL to the reference: `k1`, `k2`, `k3` (TRL's), verl's `k1+`/`k3+` (the value of
    k1/k3 with the gradient of k2), or `k3_bias_corrected` (TRL `use_bias_correction_kl`: k3 times
    the importance ratio, the same value on-policy and another gradient)."""
    mask_truncated: bool = False
    """Completions that hit max_new_tokens without the stop token get no loss (TRL
    `mask_truncated_completions`); their rewards still count in the group's advantages."""
    dynamic_sampling: bool = False
    """Resample groups whose rewards are all equal (no signal) with new prompts, up to
    grpo.max_sampling_rounds rounds (DAPO's dynamic sampling, verl `filter_groups`)."""
    max_sampling_rounds: int = 4
    """Most sampling rounds per rollout with grpo.dynamic_sampling; groups still without signal
    after the last are kept (a warning says how many), where verl stops with an error."""
    verify_timeout_s: float = DEFAULT_TIMEOUT_S
    """Seconds to judge one math answer (`verify_math`); one not judged in time gets reward 0."""
    rm_load: Optional[str] = None
    """A reward model checkpoint (posttrain.rm, or tools.convert with head rm) whose score joins
    the verifiers' reward with Qwen2.5-Math's shaping (see posttrain.rewards)."""
    rewards: List[reward_sources.RewardSource] = field(default_factory=list)
    """The reward's sources with weights (verifier, rm, prm, fn; see posttrain.rewards); empty: the
    verifiers (and grpo.rm_load's RM)."""
    reward_shaping: Optional[str] = None
    """none | qwen_math (r = sigmoid(0.5 * r_rm) + r_verifier - 1); null: qwen_math with
    grpo.rm_load alone, else none."""


def reward_scale(p) -> str:
    """grpo.scale_rewards, with the former booleans read as their modes (true: group, false: none)."""
    return {"true": "group", "false": "none"}.get(str(p.scale_rewards).lower(), p.scale_rewards)


def clip_range(p) -> Tuple[float, float]:
    """(eps_low, eps_high): grpo.clip_eps_low / clip_eps_high, each defaulting to grpo.clip_eps."""
    return (p.clip_eps if p.clip_eps_low is None else p.clip_eps_low,
            p.clip_eps if p.clip_eps_high is None else p.clip_eps_high)


def option_errors(p) -> List[str]:
    """The policy-loss options' problems (unknown names list the known ones)."""
    errors = []
    for table, key in ((losses.POLICY_LOSSES, "importance"), (losses.LOSS_AGGREGATIONS, "loss_agg"),
                       (losses.ADVANTAGE_ESTIMATORS, "adv_estimator"), (losses.KL_ESTIMATORS, "kl_estimator"),
                       (losses.REWARD_SCALES, "scale_rewards")):
        value = reward_scale(p) if key == "scale_rewards" else getattr(p, key)
        try:
            losses.lookup(table, value, f"grpo.{key}")
        except ConfigError as e:
            errors.append(str(e))
    low, high = clip_range(p)
    if not (0 < low < 1 and high > 0):
        errors.append(f"grpo.clip_eps_low={low} must be in (0, 1) and grpo.clip_eps_high={high} positive")
    if p.updates_per_batch < 1 or p.max_sampling_rounds < 1:
        errors.append(f"grpo.updates_per_batch={p.updates_per_batch} and grpo.max_sampling_rounds="
                      f"{p.max_sampling_rounds} must be >= 1")
    return errors


class GRPOStage(Stage):
    """GRPO on the one training loop (see the module doc)."""

    config_section, config_options = "grpo", GRPOOptions

    entry, loss_name = "posttrain.grpo", "grpo_loss"  # the loss: clipped policy loss + KL
    help_keys = ("posttrain.data_path", "posttrain.num_samples", "posttrain.task_seed", "posttrain.ref_load")

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
        errors += option_errors(p)
        errors += reward_sources.config_errors(p, cfg, launch_env().world_size)  # a bad RM named before any process group
        if cfg.data.num_workers:
            errors.append(f"data.num_workers={cfg.data.num_workers}: GRPO's rollouts live in this process; use 0")
        if errors:
            raise ConfigError("invalid config:\n  - " + "\n  - ".join(errors))
        self.cfg = cfg
        self.engine = engine or PolicyRollout()
        self.reference = Reference(cfg) if p.kl_coef > 0 else None
        self.tokenizer = chat_tokenizer(cfg)  # prompts in the model's chat template
        self.eos = self.tokenizer.token_to_id("<|im_end|>")
        self.rewards = reward_sources.RewardSources(cfg, self.tokenizer)  # grpo.rewards / rm_load (posttrain.rewards)
        self.reward_parts = torch.zeros(len(self.rewards.sources), cfg.train.global_batch_size)  # per source
        self.buffer: Optional[RolloutBuffer] = None
        self.rollout: Optional[List[dict]] = None  # this rank's samples of the current rollout batch
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
        p, t = self.cfg.grpo, self.cfg.train
        dp_rank, dp = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
        start = state.consumed_samples
        offsets = [i - start for mb in data.micro_batch_indices(start, t.global_batch_size, t.micro_batch_size,
                                                                 dp_rank, dp) for i in mb]
        # A rollout every grpo.updates_per_batch steps (and on the first step of a run, resumed or
        # not); the steps between train on its samples again, behaviour log-probs unchanged.
        if self.rollout is None or state.step % p.updates_per_batch == 0:
            self.rollout = self._rollout(rt, state, offsets, dp_rank, dp)
        self.buffer.samples = {start + o: sample for o, sample in zip(offsets, self.rollout)}

    def _rollout(self, rt, state, offsets: List[int], dp_rank: int, dp: int) -> List[dict]:
        """This rank's samples (at `offsets` of the global batch) of a new rollout batch."""
        p, t = self.cfg.grpo, self.cfg.train
        g, n_groups = p.group_size, t.global_batch_size // p.group_size
        first = state.consumed_samples // t.global_batch_size // p.updates_per_batch * n_groups
        self.engine.sync(rt)
        prompts, tokens, finished = [None] * len(offsets), [None] * len(offsets), [None] * len(offsets)
        rewards, redo = torch.zeros(t.global_batch_size), torch.ones(n_groups, dtype=torch.bool)
        rounds = p.max_sampling_rounds if p.dynamic_sampling else 1
        for rnd in range(rounds):
            todo = [j for j, o in enumerate(offsets) if redo[o // g]]
            # Round r > 0 draws its prompts from the r-th next pass over the prompt set.
            rows = [self.prompts[first + offsets[j] // g + rnd * len(self.prompts)] for j in todo]
            ids = [self.encode_prompt(r) for r in rows]
            # One seed per (step, round, DP replica): the same on its TP/PP ranks, and after a resume.
            seed = (t.seed * 1_000_003 + state.step * 1009 + dp_rank + rnd * 7919) % (2 ** 63)
            out = self.engine.generate(ids, SamplingParams(p.max_new_tokens, temperature=p.temperature, seed=seed,
                                                           eos_token_id=self.eos)) if todo else None
            for k, j in enumerate(todo):
                prompts[j], tokens[j], finished[j] = ids[k], out.tokens[k], out.finished[k]
            fresh = self._rewards(state, rows, [self.text(x) for x in out.tokens] if todo else [],
                                  [offsets[j] for j in todo], dp)
            rewards = torch.where(redo.repeat_interleave(g), fresh, rewards)
            redo = ~losses.groups_with_signal(rewards, g)
            if not redo.any():
                break
        if p.dynamic_sampling and redo.any():
            log.warning("GRPO step %d: %d of %d groups still have equal rewards after grpo.max_sampling_rounds=%d "
                        "rounds; trained on as they are", state.step, int(redo.sum()), n_groups, rounds)
        advantages = losses.ADVANTAGE_ESTIMATORS[p.adv_estimator](rewards, g, reward_scale(p))
        samples = [self._sample(prompts[j], tokens[j], rewards[o], advantages[o], not finished[j])
                   for j, o in enumerate(offsets)]
        for sample, o in zip(samples, offsets):  # each reward source's value, logged as reward_<source>
            sample.update({k: self.reward_parts[i, o].clone() for i, k in enumerate(self.rewards.names)})
        self._add_logps(rt.model, samples, "old_logp")
        if self.reference is not None:
            self._add_logps(self.reference.build(), samples, "ref_logp")
        return samples

    def completion_reward(self, row: dict, text: str, unjudged: Counter) -> float:
        """One completion's verifier reward (`reward`): the `verifier` source of posttrain.rewards."""
        return reward(row, text, self.cfg.grpo.verify_timeout_s, unjudged)

    def _rewards(self, state, rows: List[dict], texts: List[str], positions: List[int], dp: int) -> torch.Tensor:
        """[global batch] rewards (grpo.rewards' sources combined) of these completions at their
        positions, summed over DP; each source's raw values go to `reward_parts` at the positions
        sampled on any DP rank (collective: model sources run on the replica's TP/PP ranks)."""
        n_src = len(self.rewards.sources)
        unjudged: Counter = Counter()
        parts = self.rewards.score(rows, texts, lambda row, text: self.completion_reward(row, text, unjudged))
        # rows: the combined reward, each source's, and 1 where a completion was scored
        table = torch.zeros(n_src + 2, self.cfg.train.global_batch_size)
        if positions:
            at = torch.tensor(positions)
            table[0, at] = self.rewards.combine(parts)
            table[1:-1, at] = parts
            table[-1, at] = 1.0
        if unjudged:
            log.warning("GRPO step %d: %d math answers not judged (%s), rewarded 0", state.step,
                        sum(unjudged.values()), ", ".join(f"{k}: {v}" for k, v in sorted(unjudged.items())))
        if dp > 1:
            on_device = table.cuda() if torch.cuda.is_available() else table
            torch.distributed.all_reduce(on_device, group=parallel_state.get_data_parallel_group())
            table = on_device.cpu()
        self.reward_parts = torch.where(table[-1] > 0, table[1:-1], self.reward_parts)
        return table[0]

    def _sample(self, prompt: List[int], completion: List[int], reward_value, advantage, truncated: bool) -> dict:
        s = self.cfg.data.seq_length
        seq = prompt + completion
        what = "GRPO sample"
        start = len(prompt) - 1  # label position of the first completion token
        kept = 0 if truncated and self.cfg.grpo.mask_truncated else 1  # grpo.mask_truncated: no loss
        mask = [0] * start + [kept] * len(completion)
        return {"tokens": torch.tensor(pad_to(seq[:-1], s, self.tokenizer.pad, what)),
                "labels": torch.tensor(pad_to(seq[1:], s, self.tokenizer.pad, what)),
                "position_ids": torch.arange(s),
                "loss_mask": torch.tensor(pad_to(mask, s, 0, what), dtype=torch.float32),
                "old_logp": torch.zeros(s), "ref_logp": torch.zeros(s),  # set by _add_logps
                "reward": reward_value.clone(), "advantage": advantage.clone(),
                "length": torch.tensor(float(len(completion))), "truncated": torch.tensor(float(truncated))}

    def _add_logps(self, chunks, samples: List[dict], key: str) -> None:
        """samples[i][key] = token log-probs of chunks' model at the sampling temperature."""
        mbs, temperature = self.cfg.train.micro_batch_size, self.cfg.grpo.temperature
        batches = [{k: torch.stack([x[k] for x in samples[i:i + mbs]]) for k in ("tokens", "labels")}
                   for i in range(0, len(samples), mbs)]

        def forward(data_iterator, model):
            batch = data.on_this_rank(next(data_iterator))
            out = token_logps(model, batch["tokens"], batch["labels"], temperature)
            return out, lambda output: (output.sum() * 0, torch.tensor(1, dtype=torch.int),
                                        {"logps": output.detach().float().cpu()})

        with eval_mode(chunks):
            reports = forward_only(chunks, forward, batches, seq_length=self.cfg.data.seq_length,
                                   micro_batch_size=mbs)
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
        out = generate(rt, prompts, SamplingParams(max_new_tokens or self.cfg.grpo.max_new_tokens, greedy=True,
                                                   eos_token_id=self.eos))
        texts = [self.text(ids) for ids in out.tokens]
        return sum(reward(r, x, self.cfg.grpo.verify_timeout_s) for r, x in zip(rows, texts)) / len(rows)


if __name__ == "__main__":
    from megatron_ext.train import run_stage

    sys.exit(run_stage("grpo"))
