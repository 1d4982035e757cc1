"""GRPO: advantages, behaviour and reference log-probs (at the sampling temperature), the
clipped loss and verl's clip fraction equal a hand computation from full logits at TP=1 and
TP=2; pipeline parallelism (with and without virtual stages) trains like one process; runs
resume exactly; reward rises (slow)."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from tests.forked_ranks import run_on_ranks
from tests.stage_fixture import stage_batch, stage_metrics, train_stage

GRPO = ["stage=grpo", "model=qwen3_debug", "train.micro_batch_size=2", "train.global_batch_size=4",
        "grpo.group_size=2", "grpo.max_new_tokens=3"]


def test_group_advantages():
    from posttrain.grpo import group_advantages

    r = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0])
    got = group_advantages(r, 4)
    # group 1: mean .75, std (unbiased) .5; group 2: mean .25, std .5
    want = torch.tensor([0.25, -0.75, 0.25, 0.25, -0.25, -0.25, 0.75, -0.25]) / (0.5 + 1e-4)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(group_advantages(r, 4, scale=False), want * (0.5 + 1e-4))
    assert group_advantages(torch.ones(4), 2).abs().max() == 0  # no signal when a group agrees


def test_reward_verifies_math_and_code():
    from posttrain.grpo import reward

    assert reward({"answer": "7"}, "3+4 = 7") == 1.0 and reward({"answer": "7"}, "8") == 0.0
    tests = ["assert add(2, 3) == 5"]
    assert reward({"tests": tests}, "```python\ndef add(a, b):\n    return a + b\n```") == 1.0
    assert reward({"tests": tests}, "def add(a, b):\n    return a - b") == 0.0
    # A math answer that cannot be judged in time is wrong and counted, never a stall.
    from collections import Counter

    unjudged = Counter()
    assert reward({"answer": "2"}, r"\boxed{((x^{1000})^{1000})^{10}}", 1.0, unjudged) == 0.0
    assert reward({"answer": "x"}, r"\boxed{x}", 1.0, unjudged) == 1.0
    assert unjudged == Counter({"too large": 1})


def _sandbox_modes():
    from data_prep.verifiers.code import sandbox_problem

    problem = sandbox_problem("bwrap")
    return [pytest.param("bwrap", marks=pytest.mark.skipif(problem is not None, reason=f"isolated sandbox unavailable: {problem}")),
            "unsafe_local"]


@pytest.mark.parametrize("mode", _sandbox_modes())
def test_code_reward_oracle_is_the_rows_setup(mode, monkeypatch):
    """A row's tests call a helper the problem defines ("setup"): redefining it earns nothing."""
    from posttrain.grpo import reward

    monkeypatch.setenv("CODE_SANDBOX", mode)
    row = {"prompt": "Write decode(s), the inverse of encode.",
           "setup": "def encode(s):\n    return s[1:] + s[:1]\n",
           "tests": ["for w in ['abc', 'hello']:\n    assert decode(encode(w)) == w"]}
    assert reward(row, "```python\ndef decode(s):\n    return s[-1:] + s[:-1]\n```") == 1.0
    assert reward(row, "```python\ndef decode(s):\n    for _ in range(len(s) - 1):\n        s = encode(s)\n    return s\n```") == 1.0
    assert reward(row, "```python\ndef encode(s):\n    return s\n\ndef decode(s):\n    return s\n```") == 0.0
    assert reward(row, "```python\nencode = str\ndef decode(s):\n    return s\n```") == 0.0


def test_bad_config_is_named():
    from megatron_ext.cli import load_config
    from megatron_ext.config import ConfigError
    from posttrain.grpo import GRPOStage

    with pytest.raises(ConfigError, match="grpo.group_size=3 must be >= 2 and divide train.global_batch_size=4"):
        GRPOStage(load_config(GRPO + ["grpo.group_size=3"]))
    with pytest.raises(ConfigError, match="grpo.verify_timeout_s=0.0 must be a positive number of seconds"):
        GRPOStage(load_config(GRPO + ["grpo.verify_timeout_s=0"]))
    cfg = load_config(GRPO + ["data.seq_length=8"])
    with pytest.raises(ConfigError, match="data.seq_length=8 is too short for GRPO"):
        GRPOStage(cfg).datasets(cfg, 4, 0)


def _hand_logps(model, batch, temperature=1.0):
    logits = model(batch["tokens"], batch["position_ids"], attention_mask=None).float()
    return F.log_softmax(logits / temperature, -1).gather(-1, batch["labels"].unsqueeze(-1)).squeeze(-1)


def _grpo_batch(rank, world_size, overrides):
    cfg, stage, model, batch = stage_batch("grpo", world_size, GRPO + overrides)
    temperature = cfg.grpo.temperature
    with torch.no_grad():
        before = _hand_logps(model, batch, temperature) if world_size == 1 else None
        w = model.module.decoder.final_layernorm.weight  # move the policy off the reference
        w.mul_(1 + 0.5 * torch.sin(torch.arange(w.numel(), dtype=w.dtype)))
        after = _hand_logps(model, batch, temperature) if world_size == 1 else None
    rollout_logp = batch["old_logp"].clone()
    # Behaviour log-probs away from the policy and advantages of both signs, so clipping acts.
    mask = batch["loss_mask"]
    batch["old_logp"] = batch["ref_logp"] + 0.4 * torch.sin(torch.arange(mask.numel()).view_as(mask) * 1.7) * mask
    batch["advantage"] = torch.tensor([1.5, -0.7])
    out, loss_func = stage.forward_step(iter([batch]), model)
    loss, n, rep = loss_func(out)
    return (loss.item(), int(n), {k: v.tolist() for k, v in rep.items()}, batch, rollout_logp, before, after)


def _by_hand(batch, logp, clip_eps=0.2, kl_coef=0.02):
    """Loss, verl's clip count (the clipped term is the one taken) and the sign-blind count."""
    total, clipped, outside = 0.0, 0, 0
    for b in range(logp.shape[0]):
        a = float(batch["advantage"][b])
        for s in range(logp.shape[1]):
            if not batch["loss_mask"][b, s]:
                continue
            lp, old, ref = float(logp[b, s]), float(batch["old_logp"][b, s]), float(batch["ref_logp"][b, s])
            ratio = math.exp(lp - old)
            outside += abs(ratio - 1) > clip_eps
            clipped += (a > 0 and ratio > 1 + clip_eps) or (a < 0 and ratio < 1 - clip_eps)
            total += -min(ratio * a, min(max(ratio, 1 - clip_eps), 1 + clip_eps) * a)
            total += kl_coef * (math.exp(ref - lp) - (ref - lp) - 1)
    return total, clipped, outside


def test_grpo_loss_matches_hand_computation_at_tp1_and_tp2():
    """At temperature 0.7: every log-prob is log_softmax(logits / 0.7)."""
    (loss, n, rep, batch, rollout_logp, before, after), = run_on_ranks(_grpo_batch, 1, ["grpo.temperature=0.7"])
    mask = batch["loss_mask"].bool()
    assert n == int(mask.sum()) > 0
    # The behaviour log-probs and the reference's are the policy's own before the update.
    torch.testing.assert_close(rollout_logp[mask], before[mask], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(batch["ref_logp"][mask], before[mask], rtol=1e-4, atol=1e-4)
    assert (after - before)[mask].abs().max() > 1e-3  # the policy really moved
    hand, clipped, outside = _by_hand(batch, after)
    assert 0 < clipped < outside  # some tokens outside the range are not clipped given A's sign
    assert math.isclose(loss, hand, rel_tol=1e-5, abs_tol=1e-6), (loss, hand)
    assert math.isclose(rep["clip_frac"][0], clipped, abs_tol=1e-6)
    for got, n2, _, b2, _, _, _ in run_on_ranks(_grpo_batch, 2, ["parallel.tp=2", "grpo.temperature=0.7"]):
        assert n2 == n and torch.equal(b2["tokens"], batch["tokens"])  # the same rollouts
        assert math.isclose(got, hand, rel_tol=1e-5, abs_tol=1e-6), (got, hand)


def _grpo_train(rank, world_size, overrides, make_stage=None):
    history = train_stage("grpo", world_size, GRPO + overrides, make_stage)
    return history, stage_metrics(history)


def test_grpo_resumes_exactly_on_two_data_parallel_ranks(tmp_path):
    base = ["train.steps=4", "train.global_batch_size=8", "train.lr=1e-3", "train.lr_schedule=constant",
            "train.warmup_steps=0", "checkpoint.keep_last=0"]
    ckpt = [f"checkpoint.dir={tmp_path}"]
    straight = run_on_ranks(_grpo_train, 2, base)
    run_on_ranks(_grpo_train, 2, base + ckpt + ["train.exit_interval=2"])
    resumed = run_on_ranks(_grpo_train, 2, base + ckpt + ["checkpoint.load=auto"])
    for rank in range(2):
        (ref_hist, ref_metrics), (hist, metrics) = straight[rank], resumed[rank]
        assert [h["loss"] for h in hist] == [h["loss"] for h in ref_hist[2:]]
        assert [h["grad_norm"] for h in hist] == [h["grad_norm"] for h in ref_hist[2:]]
        assert metrics == ref_metrics[2:]
    assert any(m["kl"] > 0 for m in straight[0][1])  # the policy moved off the reference


def _sft_then_grpo(rank, world_size, tmp):
    from megatron_ext.cli import load_config
    from megatron_ext.config import validate
    from megatron_ext.loop import train
    from posttrain.grpo import GRPOStage
    from posttrain.sft import SFTStage

    cfg = load_config(["stage=sft", "model=qwen3_debug", f"posttrain.data_path={tmp}/sft.jsonl",
                       "data.seq_length=16", "train.micro_batch_size=16", "train.global_batch_size=32",
                       "train.steps=20", "train.lr=1e-2", "train.min_lr=1e-3", "train.warmup_steps=2",
                       f"checkpoint.dir={tmp}/sft"])
    validate(cfg, world_size)
    train(cfg, SFTStage(cfg))
    cfg = load_config(["stage=grpo", "model=qwen3_debug", f"posttrain.data_path={tmp}/rl.jsonl",
                       f"checkpoint.load={tmp}/sft/iter_0000020", "checkpoint.weights_only=true",
                       "train.steps=15", "train.lr=1e-3", "train.min_lr=1e-3"])
    validate(cfg, world_size)
    return [h["reward"] for h in train(cfg, GRPOStage(cfg)).history]


@pytest.mark.slow
def test_grpo_raises_mean_reward_after_sft_warm_start(tmp_path):
    from posttrain.synthetic import arithmetic_chat_rows, arithmetic_prompts

    for name, rows in (("sft", arithmetic_chat_rows(200, 3, max_operand=1)), ("rl", arithmetic_prompts(200, 5, max_operand=1))):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rewards = run_on_ranks(_sft_then_grpo, 1, tmp_path)[0]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    print(f"GRPO mean reward: first 5 steps {first:.3f}, last 5 steps {last:.3f}; per step {rewards}")
    assert last > first + 0.08, rewards


def _fixed_advantages_stage(cfg):
    """GRPO with the advantages replaced by fixed +-1 per completion: from random weights every
    reward is 0, which would leave nothing to train on and compare."""
    from posttrain.grpo import GRPOStage

    class Stage(GRPOStage):
        def before_step(self, rt, state):
            super().before_step(rt, state)
            for i, sample in self.buffer.samples.items():
                sample["advantage"] = torch.tensor(1.0 if i % 2 == 0 else -1.0)

    return Stage(cfg)


def test_grpo_pipeline_parallel_equals_one_process():
    """The same seed gives the same initial weights at any layout; PP=2 from scratch samples the
    same completions and gives one process's per-step losses and metrics; at step 1 the policy
    is the reference (KL 0). (Not with virtual stages: megatron_ext.generation's forward-only
    call does not drive the interleaved schedule yet.)"""
    from tests.test_dpo import _check_layout_equals_one_process

    base = ["grpo.temperature=0.7", "train.steps=2", "train.lr=1e-3", "checkpoint.keep_last=0"]
    ref, _ = run_on_ranks(_grpo_train, 1, base, _fixed_advantages_stage)[0]
    assert ref[0]["kl"] < 1e-7 and ref[1]["kl"] > 1e-6, ref  # the policy moved at step 2
    results = [h for h, _ in run_on_ranks(_grpo_train, 2, base + ["parallel.pp=2"], _fixed_advantages_stage)]
    _check_layout_equals_one_process(ref, results, 2, ("kl", "clip_frac", "completion_len", "reward"))


# ---------------------------------------------------------------- policy-loss options on the model


def _recording_stage(cfg, parity_reward=False, fixed_advantages=False):
    """GRPO whose engine records how many prompts each generate call sampled; with parity_reward,
    a reward random-weight completions can earn (the decoded text has an even length), so groups
    with and without signal occur; with fixed_advantages, +-1 per completion (see
    _fixed_advantages_stage)."""
    from posttrain.grpo import GRPOStage, PolicyRollout

    class Recording(PolicyRollout):
        calls = []

        def generate(self, prompts, params):
            self.calls.append(len(prompts))
            return super().generate(prompts, params)

    class Stage(GRPOStage):
        def completion_reward(self, row, text, unjudged):
            return float(len(text) % 2 == 0) if parity_reward else super().completion_reward(row, text, unjudged)

        def before_step(self, rt, state):
            super().before_step(rt, state)
            if fixed_advantages:
                for i, sample in self.buffer.samples.items():
                    sample["advantage"] = torch.tensor(1.0 if i % 2 == 0 else -1.0)

    return Stage(cfg, engine=Recording())


def _rollout(rank, world_size, overrides):
    """The first rollout batch's samples (all of them: one rank) and the engine's calls."""
    cfg, stage, _, _ = stage_batch("grpo", world_size, GRPO + overrides, samples=8,
                                   make_stage=lambda c: _recording_stage(c, parity_reward=True))
    keys = ("tokens", "loss_mask", "reward", "advantage", "length", "truncated")
    samples = [{k: stage.buffer.samples[i][k] for k in keys} for i in sorted(stage.buffer.samples)]
    return samples, list(stage.engine.calls)


def test_dynamic_sampling_resamples_groups_without_signal():
    """DAPO's dynamic sampling: groups whose rewards all agree are sampled again with new prompts
    (only they: the engine gets 2 prompts per such group), groups with signal are kept as they
    were, and at most grpo.max_sampling_rounds rounds run."""
    base = ["train.global_batch_size=8", "train.micro_batch_size=8"]
    plain, calls = run_on_ranks(_rollout, 1, base)[0]
    dynamic, dyn_calls = run_on_ranks(_rollout, 1, base + ["grpo.dynamic_sampling=true",
                                                              "grpo.max_sampling_rounds=4"])[0]
    assert calls == [8]
    rewards = torch.stack([s["reward"] for s in plain]).view(4, 2)
    flat = (rewards[:, 0] == rewards[:, 1]).tolist()
    assert any(flat) and not all(flat), rewards  # the toy has groups with and without signal
    assert dyn_calls[0] == 8 and dyn_calls[1] == 2 * sum(flat) and 1 < len(dyn_calls) <= 4, dyn_calls
    final = torch.stack([s["reward"] for s in dynamic]).view(4, 2)
    for g in range(4):
        for k in (2 * g, 2 * g + 1):
            same = torch.equal(dynamic[k]["tokens"], plain[k]["tokens"])
            assert same == (not flat[g]), (g, flat)  # kept exactly when it had signal
    assert len(dyn_calls) == 4 or bool((final[:, 0] != final[:, 1]).all()), (dyn_calls, final)


def test_mask_truncated_gives_completions_without_the_stop_token_no_loss():
    """TRL's mask_truncated_completions: a completion that hit max_new_tokens without <|im_end|>
    has no loss tokens; its reward still counts. From random weights every completion is cut off."""
    plain, _ = run_on_ranks(_rollout, 1, [])[0]
    masked, _ = run_on_ranks(_rollout, 1, ["grpo.mask_truncated=true"])[0]
    for a, b in zip(plain, masked):
        assert torch.equal(a["tokens"], b["tokens"]) and torch.equal(a["reward"], b["reward"])
        assert a["length"] == a["loss_mask"].sum() == 3 and a["truncated"] == 1  # max_new_tokens=3, no stop
        assert b["loss_mask"].sum() == 0 and b["length"] == 3


def test_mask_truncated_keeps_finished_completions():
    from megatron_ext.cli import load_config
    from posttrain.grpo import GRPOStage

    stage = GRPOStage(load_config(GRPO + ["grpo.mask_truncated=true", "grpo.kl_coef=0"]))
    one = torch.tensor(1.0)
    finished = stage._sample([5, 6, 7], [8, stage.eos], one, one, truncated=False)
    cut = stage._sample([5, 6, 7], [8, 9], one, one, truncated=True)
    assert finished["loss_mask"].tolist()[:4] == [0, 0, 1, 1] and finished["truncated"] == 0
    assert cut["loss_mask"].sum() == 0 and cut["truncated"] == 1 and cut["length"] == 2


def _multi_pass(rank, world_size, overrides):
    from megatron_ext.cli import load_config
    from megatron_ext.config import validate
    from megatron_ext.loop import train

    cfg = load_config(["stage=grpo", *GRPO, *overrides])
    validate(cfg, world_size)
    stage = _recording_stage(cfg, fixed_advantages=True)
    return train(cfg, stage).history, list(stage.engine.calls)


def test_updates_per_batch_reuses_the_rollout_and_clips_from_the_second_pass():
    """grpo.updates_per_batch=2 (TRL num_iterations): a rollout at steps 1 and 3 only; steps 2 and
    4 train on the same completions with the sampling policy's log-probs, so the ratio is exactly
    1 on each rollout's first pass (no clipping) and clipping acts on the second."""
    history, calls = run_on_ranks(_multi_pass, 1, ["train.steps=4", "train.lr=1e-2", "train.lr_schedule=constant",
                                                   "train.warmup_steps=0", "grpo.updates_per_batch=2",
                                                   "grpo.clip_eps=0.05", "checkpoint.keep_last=0"])[0]
    assert calls == [4, 4], calls  # two rollouts of 4 completions
    clip = [h["clip_frac"] for h in history]
    assert clip[0] == 0 and clip[2] == 0 and clip[1] > 0 and clip[3] > 0, clip
    assert history[0]["completion_len"] == history[1]["completion_len"] and history[0]["kl"] == 0
    assert history[1]["kl"] > 0  # the second pass is off the reference, on the same samples


def test_grpo_options_pipeline_parallel_equals_one_process():
    """Non-default options (GSPO, sequence-mean aggregation, asymmetric clipping, batch-scaled
    rewards, the bias-corrected KL, two updates per rollout, dynamic sampling) at PP=2 give one
    process's per-step losses and metrics."""
    from tests.test_dpo import _check_layout_equals_one_process

    options = ["grpo.importance=sequence", "grpo.loss_agg=seq_mean_token_mean", "grpo.clip_eps_low=0.05",
               "grpo.clip_eps_high=0.1", "grpo.scale_rewards=batch", "grpo.kl_estimator=k3_bias_corrected",
               "grpo.kl_coef=0.1", "grpo.updates_per_batch=2", "grpo.dynamic_sampling=true",
               "grpo.max_sampling_rounds=2"]
    base = ["grpo.temperature=0.7", "train.steps=2", "train.lr=1e-2", "checkpoint.keep_last=0"] + options
    ref, calls = run_on_ranks(_multi_pass, 1, base)[0]
    assert calls == [4, 4]  # from random weights every reward is 0: a second round, then kept
    assert ref[0]["clip_frac"] == 0 and ref[1]["clip_frac"] > 0 and ref[1]["kl"] > 0, ref
    results = [h for h, _ in run_on_ranks(_multi_pass, 2, base + ["parallel.pp=2"])]
    _check_layout_equals_one_process(ref, results, 2, ("kl", "clip_frac", "clip_frac_low", "clip_frac_high",
                                                       "completion_len", "reward"))


def test_dynamic_sampling_on_two_data_parallel_ranks():
    """Each group's two completions are on different DP ranks (micro-batch 1): the ranks agree on
    which groups to sample again (rewards are summed over DP first), each sampling its half."""
    runs = run_on_ranks(_rollout, 2, ["train.global_batch_size=8", "train.micro_batch_size=1",
                                      "grpo.dynamic_sampling=true", "grpo.max_sampling_rounds=3"])
    (mine0, calls0), (mine1, calls1) = runs
    assert calls0 == calls1 and calls0[0] == 4 and len(calls0) > 1, (calls0, calls1)  # 1 prompt per group and rank
    rewards = torch.stack([s["reward"] for pair in zip(mine0, mine1) for s in pair]).view(4, 2)
    signal = rewards[:, 0] != rewards[:, 1]
    assert len(calls0) == 3 or bool(signal.all()), rewards
    advantages = torch.stack([s["advantage"] for pair in zip(mine0, mine1) for s in pair]).view(4, 2)
    assert ((advantages != 0).all(dim=1) == signal).all(), (rewards, advantages)
