"""Reward sources (posttrain.rewards): each source and Qwen2.5-Math's shaping against a hand
computation, the list form parsed and every bad entry named; GRPO with grpo.rm_load on a tiny
reward model trained here (its rewards equal a direct forward of the RM; PP=2 equals one
process); tools.synth model --rm keeps the best-scored verified completion with its score."""

import json
import math
import re
import threading
from http.server import HTTPServer

import pytest
import torch

from tests.forked_ranks import run_on_ranks
from tests.stage_fixture import stage_batch
from tests.test_grpo import GRPO


def char_count(row, completion):
    """A user reward function (grpo.rewards {source: fn, name: tests.test_rewards:char_count})."""
    return float(len(completion)) / 10


def not_a_number(row, completion):
    return "many"


def _sigmoid(x):
    return 1 / (1 + math.exp(-x))


def test_combination_and_qwen_math_shaping_by_hand():
    from posttrain.rewards import RewardSource, combine

    parts = torch.tensor([[1.0, 0.0, 1.0], [2.0, -1.0, 0.0]])  # verifier, rm
    sources = [RewardSource("verifier"), RewardSource("rm", path="x")]
    got = combine(parts, sources, "qwen_math")
    want = [_sigmoid(0.5 * 2.0) + 0.0, _sigmoid(-0.5) - 1.0, _sigmoid(0.0) + 0.0]
    assert got.tolist() == pytest.approx(want, abs=1e-7)
    weighted = [RewardSource("verifier", weight=2.0), RewardSource("rm", path="x", weight=0.25)]
    assert combine(parts, weighted, "none").tolist() == pytest.approx([2.5, -0.25, 2.0])
    # qwen_math leaves prm / fn sources as they are, and weights still apply to the shaped values
    mixed = [RewardSource("verifier", weight=0.5), RewardSource("fn", name="m:f", weight=3.0)]
    assert combine(parts, mixed, "qwen_math").tolist() == pytest.approx([6.0, -3.5, 0.0])


def test_prm_aggregates_by_hand():
    from posttrain.evals.runner import prm_reduce
    from posttrain.rewards import prm_score, split_steps

    probs = [0.9, 0.5, 0.8]
    assert prm_score(probs, "min") == 0.5 and prm_score(probs, "last") == 0.8
    assert prm_score(probs, "product") == pytest.approx(0.9 * 0.5 * 0.8)
    assert prm_score([], "min") is None
    assert prm_reduce(probs) == {"min": 0.5, "last": 0.8, "prod": pytest.approx(0.36)}  # eval's PRM@k
    assert split_steps("a = 1\n\n b = 2 \n\n\n\nso 3") == ["a = 1", "b = 2", "so 3"]


def test_verifier_and_function_sources_score_by_hand():
    from megatron_ext.cli import load_config
    from posttrain.grpo import GRPOStage, reward

    cfg = load_config(GRPO + ['grpo.rewards=[{source: verifier}, {source: fn, name: "tests.test_rewards:char_count", '
                              'weight: 0.5}]', "grpo.kl_coef=0"])
    stage = GRPOStage(cfg)
    rows = [{"prompt": "1+2?", "answer": "3"}, {"prompt": "4+4?", "answer": "8"}]
    texts = ["3", "it is 9"]
    parts = stage.rewards.score(rows, texts, lambda row, text: reward(row, text))
    assert parts.tolist() == [[1.0, 0.0], [pytest.approx(0.1), pytest.approx(0.7)]]
    assert stage.rewards.combine(parts).tolist() == pytest.approx([1.05, 0.35])
    assert stage.rewards.names == ["reward_verifier", "reward_fn"]
    bad = GRPOStage(load_config(GRPO + ['grpo.rewards=[{source: fn, name: "tests.test_rewards:not_a_number"}]']))
    with pytest.raises(ValueError, match="not_a_number returned nan .* must return a finite number"):
        bad.rewards.score(rows, texts, lambda row, text: 0.0)


def _converted_meta(path, head, **model):
    from megatron_ext.checkpoint import write_converted_meta
    from megatron_ext.cli import load_config

    m = load_config(["model=qwen3_debug"]).model
    for k, v in model.items():
        setattr(m, k, v)
    path.mkdir()
    write_converted_meta(path, m, torch.float32, None, head=head)
    return path


def test_list_form_parsed_and_bad_entries_named(tmp_path):
    """Every bad entry is named by its key before any process group; a checkpoint is read for its
    metadata only (missing, another head, a model the policy's layout cannot split)."""
    from megatron_ext.cli import load_config
    from megatron_ext.config import ConfigError
    from posttrain.grpo import GRPOStage
    from posttrain.rewards import RewardSource, config_errors, shaping_of, sources_of

    lm = _converted_meta(tmp_path / "lm", "lm")
    rm = _converted_meta(tmp_path / "rm", "rm")
    odd = _converted_meta(tmp_path / "odd", "rm", num_attention_heads=3, num_query_groups=1)
    cfg = load_config(GRPO + [f"grpo.rm_load={rm}"])
    assert sources_of(cfg.grpo) == [RewardSource("verifier"), RewardSource("rm", path=str(rm))]
    assert shaping_of(cfg.grpo) == "qwen_math" and config_errors(cfg.grpo, cfg) == []
    listed = load_config(GRPO + [f"grpo.rewards=[{{source: verifier}}, {{source: rm, path: {rm}, weight: 0.5}}]"])
    assert shaping_of(listed.grpo) == "none" and listed.grpo.rewards[1] == RewardSource("rm", 0.5, str(rm))
    entries = ("[{source: rmm}, {source: rm}, {source: verifier, path: /x}, "
               f"{{source: prm, path: {rm}, aggregate: mean}}, {{source: fn, name: nomodule}}, "
               f"{{source: fn, name: 'tests.test_rewards:nothing'}}, {{source: rm, path: {lm}}}, "
               f"{{source: rm, path: {tmp_path}/none}}, {{source: prm, path: {odd}}}]")
    bad = load_config(GRPO + [f"grpo.rewards={entries}"])
    errors = "\n".join(config_errors(bad.grpo, bad, world=2))
    for words in ("grpo.rewards[0].source='rmm' is not one of verifier, rm, prm, fn",
                  "grpo.rewards[1].path: a rm source needs a checkpoint path",
                  "grpo.rewards[2].path: a verifier source takes no path",
                  f"grpo.rewards[3].path={rm} is not a PRM checkpoint (its head is rm)",
                  "grpo.rewards[3].aggregate='mean' is not one of min, last, product",
                  "grpo.rewards[4].name='nomodule' is not of the form module:Class",
                  "grpo.rewards[5].name='tests.test_rewards:nothing': tests.test_rewards has no nothing",
                  f"grpo.rewards[6].path={lm} is not a RM checkpoint (its head is lm)",
                  f"grpo.rewards[7].path={tmp_path}/none: {tmp_path}/none: no such checkpoint directory",
                  f"grpo.rewards[8].path={odd} is not a PRM checkpoint"):
        assert words in errors, (words, errors)
    assert len(errors.splitlines()) == 10, errors  # nothing else
    tp2 = load_config(GRPO + [f"grpo.rm_load={odd}", "parallel.tp=2"])
    assert any("grpo.rm_load=" in e and "does not fit the policy's layout" in e and "num_attention_heads" in e
               for e in config_errors(tp2.grpo, tp2, world=2))
    for overrides, words in (([f"grpo.rm_load={tmp_path}/none"], f"grpo.rm_load={tmp_path}/none"),
                             ([f"grpo.rm_load={rm}", "grpo.rewards=[{source: verifier}]"], "both set"),
                             (["grpo.reward_shaping=cubic"], "grpo.reward_shaping='cubic' is not one of none, qwen_math"),
                             (["grpo.reward_shaping=qwen_math"], "qwen_math (sigmoid(0.5 * r_rm) + r_verifier - 1) "
                                                                 "needs an rm and a verifier source")):
        with pytest.raises(ConfigError, match=re.escape(words)):
            GRPOStage(load_config(GRPO + overrides))


# ---------------------------------------------------------------- with a reward model trained here

STEP1 = ["model=qwen3_debug", "train.steps=1", "train.warmup_steps=0", "train.micro_batch_size=2",
         "train.global_batch_size=2"]


def _train_reward_models(rank, world_size, root):
    from megatron_ext.train import run_stage

    return [run_stage("rm", STEP1 + ["data.seq_length=48", "posttrain.num_samples=4", f"checkpoint.dir={root}/rm"]),
            run_stage("prm", STEP1 + ["data.seq_length=80", "posttrain.num_samples=4", f"checkpoint.dir={root}/prm"])]


@pytest.fixture(scope="module")
def reward_models(tmp_path_factory):
    """A tiny RM and PRM: one step of python -m posttrain.rm / posttrain.prm on their synthetic tasks."""
    root = tmp_path_factory.mktemp("reward_models")
    assert run_on_ranks(_train_reward_models, 1, str(root)) == [[0, 0]]
    return root / "rm", root / "prm"


@pytest.fixture(scope="module")
def rm_ckpt(reward_models):
    return reward_models[0]


def _recording_stage(cfg):
    """GRPO that records the (row, text) of each verified completion, in rollout order."""
    from posttrain.grpo import GRPOStage

    class Stage(GRPOStage):
        seen = []

        def completion_reward(self, row, text, unjudged):
            self.seen.append((row, text))
            return super().completion_reward(row, text, unjudged)

    return Stage(cfg)


def _plain_values(chunk, ids):
    """A plain forward of a value-head model on one sequence: its value at every position."""
    ids = torch.tensor([ids])
    with torch.no_grad():
        return chunk(ids, torch.arange(ids.shape[1]).unsqueeze(0), attention_mask=None)[0, :, 0]


def _rm_rollout(rank, world_size, overrides, keys):
    """The first rollout's per-sample rewards, and by plain forwards of the reward models on the
    verified (row, text) pairs: each RM's score, each PRM's step probabilities."""
    from posttrain.rewards import prm_inputs, rm_inputs, split_steps

    cfg, stage, _, _ = stage_batch("grpo", world_size, GRPO + overrides, make_stage=_recording_stage)
    samples = [stage.buffer.samples[i] for i in sorted(stage.buffer.samples)]
    direct = {}
    for i, chunks in stage.rewards.models.items():  # built at the policy's layout
        if stage.rewards.sources[i].source == "rm":
            direct[i] = [float(_plain_values(chunks[0], rm_inputs(stage.tokenizer, row["prompt"], text))[-1])
                         for row, text in stage.seen]
        else:
            direct[i] = []
            for row, text in stage.seen:
                ids, at = prm_inputs(stage.tokenizer, row["prompt"], split_steps(text))
                direct[i].append(torch.sigmoid(_plain_values(chunks[0], ids)[at]).tolist())
    return [{k: float(s[k]) for k in keys} for s in samples], direct, stage.rewards.shaping


@pytest.mark.parametrize("world_size", [1, 2])
def test_grpo_rm_reward_is_the_reward_model_score_shaped(rm_ckpt, world_size):
    """grpo.rm_load alone: reward_rm is the RM's score of (prompt, completion), and the reward is
    Qwen2.5-Math's sigmoid(0.5 * r_rm) + (r_verifier - 1); on two data-parallel ranks each rank
    gets its own completions' values back from the reduced batch."""
    overrides = [f"grpo.rm_load={rm_ckpt}", f"train.micro_batch_size={2 // world_size}"]
    runs = run_on_ranks(_rm_rollout, world_size, overrides, ("reward", "reward_rm", "reward_verifier"))
    for samples, direct, shaping in runs:
        assert shaping == "qwen_math" and len(samples) == len(direct[1]) == 4 // world_size
        for s, d in zip(samples, direct[1]):
            assert s["reward_rm"] == pytest.approx(d, abs=1e-5)
            assert s["reward"] == pytest.approx(_sigmoid(0.5 * d) + s["reward_verifier"] - 1, abs=1e-6)
    scores = [s["reward_rm"] for samples, _, _ in runs for s in samples]
    assert len({round(x, 6) for x in scores}) > 1  # the RM tells the completions apart


def test_grpo_weighted_rm_and_prm_sources(reward_models):
    """grpo.rewards with an RM and a PRM (min of the step probabilities; 0 without steps) beside
    the verifier, no shaping: reward = sum of weight * source, each source what its model says."""
    rm, prm = reward_models
    listed = (f"grpo.rewards=[{{source: verifier}}, {{source: rm, path: {rm}, weight: 0.5}}, "
              f"{{source: prm, path: {prm}, aggregate: min, weight: 2.0}}]")
    keys = ("reward", "reward_verifier", "reward_rm", "reward_prm")
    samples, direct, shaping = run_on_ranks(_rm_rollout, 1, [listed], keys)[0]
    assert shaping == "none" and len(samples) == 4
    for s, score, probs in zip(samples, direct[1], direct[2]):
        assert s["reward_rm"] == pytest.approx(score, abs=1e-5)
        assert s["reward_prm"] == pytest.approx(min(probs) if probs else 0.0, abs=1e-6)
        want = s["reward_verifier"] + 0.5 * s["reward_rm"] + 2.0 * s["reward_prm"]
        assert s["reward"] == pytest.approx(want, abs=1e-5)
    assert any(probs for probs in direct[2])  # some completions have steps


def test_grpo_with_rm_pipeline_parallel_equals_one_process(rm_ckpt):
    """GRPO with grpo.rm_load at PP=2 (the RM split over the same two stages) gives one process's
    per-step losses and metrics, the per-source rewards included; the RM's rewards give signal
    where the verifier's (all 0 from random weights) give none."""
    from tests.test_dpo import _check_layout_equals_one_process
    from tests.test_grpo import _grpo_train

    base = ["grpo.temperature=0.7", "train.steps=2", "train.lr=1e-3", "checkpoint.keep_last=0",
            f"grpo.rm_load={rm_ckpt}"]
    ref, _ = run_on_ranks(_grpo_train, 1, base)[0]
    assert all(h["reward_verifier"] == 0 and h["reward_rm"] != 0 and h["kl"] >= 0 for h in ref), ref
    assert ref[1]["kl"] > 1e-6, ref  # the RM's advantages moved the policy at step 1
    results = [h for h, _ in run_on_ranks(_grpo_train, 2, base + ["parallel.pp=2"])]
    _check_layout_equals_one_process(ref, results, 2, ("kl", "clip_frac", "completion_len", "reward", "reward_rm",
                                                       "reward_verifier"))


# ---------------------------------------------------------------- RM-ranked rejection sampling


def _synth_with_rm(rank, world_size, url, rm, out):
    from megatron_ext.config import Config
    from posttrain.evals.runner import load_model
    from tools import synth

    argv = ["model", "--tasks", "math:linear", "--n", "3", "--base-url", url, "--model", "m", "--samples", "4",
            "--rm", rm]
    codes = [synth.main(argv + ["--rm-keep", "all", "--out", f"{out}/all.jsonl"]),
             synth.main(argv + ["--out", f"{out}/best.jsonl"])]
    records = [json.loads(line) for line in open(f"{out}/all.jsonl")]
    from data_prep.tokenizer import get_tokenizer
    from posttrain.rewards import rm_inputs

    chunks, src = load_model(rm, Config(), value_stage="rm")
    tok = get_tokenizer(src.tokenizer_name)
    direct = []
    with torch.no_grad():
        for r in records:
            ids = torch.tensor([rm_inputs(tok, r["prompt"], r["completion"])])
            direct.append(float(chunks[0](ids, torch.arange(ids.shape[1]).unsqueeze(0), attention_mask=None)[0, -1, 0]))
    return codes, direct


def test_synth_keeps_the_best_scored_verified_completion(rm_ckpt, tmp_path):
    """tools.synth model --rm: every verified completion scored by the RM (its score equals a
    plain forward of the RM), ranked per problem; the default keeps the best one with its score."""
    from tests.test_synth import _Endpoint

    server = HTTPServer(("127.0.0.1", 0), _Endpoint)  # solves each equation, wrongly for odd samples
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        codes, direct = run_on_ranks(_synth_with_rm, 1, f"http://127.0.0.1:{server.server_port}", str(rm_ckpt),
                                     str(tmp_path))[0]
    finally:
        server.shutdown()
    assert codes == [0, 0]
    every = [json.loads(line) for line in (tmp_path / "all.jsonl").read_text().splitlines()]
    best = [json.loads(line) for line in (tmp_path / "best.jsonl").read_text().splitlines()]
    assert len(every) == 3 * 2 and len(best) == 3  # samples 0 and 2 are verified, per problem
    assert [r["rm_score"] for r in every] == pytest.approx(direct, abs=1e-5)
    for task in {r["task_id"] for r in every}:
        mine = [r for r in every if r["task_id"] == task]
        top = max(mine, key=lambda r: r["rm_score"])
        assert [r["rm_rank"] for r in mine] == [1, 2] and mine[0] is top
        kept, = [r for r in best if r["task_id"] == task]
        assert kept["completion"] == top["completion"] and kept["rm_score"] == top["rm_score"]
        assert kept["rm_rank"] == 1 and kept["verified"] and kept["index"] % 2 == 0


def test_synth_rm_is_checked_before_sampling(tmp_path, capsys):
    from data_prep.synth.__main__ import main as synth_main
    from tools import synth

    lm = _converted_meta(tmp_path / "lm", "lm")
    argv = ["model", "--tasks", "math:linear", "--n", "1", "--base-url", "http://127.0.0.1:9", "--model", "m",
            "--out", str(tmp_path / "o.jsonl")]
    assert synth.main(argv + ["--rm", str(lm)]) == 2
    assert "not a reward model checkpoint (its head is lm)" in capsys.readouterr().err
    assert synth.main(argv + ["--rm", str(tmp_path / "none")]) == 2
    assert "no such checkpoint directory" in capsys.readouterr().err
    assert synth_main(argv + ["--rm", str(lm)]) == 2 and "python -m tools.synth" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        synth.main(argv + ["--rm", str(lm), "--rm-keep", "0"])
    assert "is not best, all or a positive integer" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()
