"""tools.recipe: the self-improvement loop (CPT -> SFT -> RM -> rejection sampling -> SFT ->
GRPO with the RM -> evaluation) as one command, each step's checkpoint feeding the next."""

import json
import shutil
import sys

import pytest

from tools import recipe

# A shortened debug recipe: the same nine steps, fewer optimizer steps where nothing reads them.
SHORT = ["cpt:train.steps=1", "rm:train.steps=2", "sft2:train.steps=2", "grpo:train.steps=2"]


def test_overrides_name_their_step():
    assert recipe.parse_overrides(["sft:train.steps=3", "all:parallel.tp=2"]) == {
        "sft": ["train.steps=3"], "all": ["parallel.tp=2"]}
    for bad in ("train.steps=3", "sfft:train.steps=3", "sft:train.steps"):
        with pytest.raises(recipe.RecipeError, match="an override is STEP:key=value"):
            recipe.parse_overrides([bad])
    r = recipe.Recipe(recipe.REPO, recipe.PRESETS["debug"], recipe.parse_overrides(["all:train.seed=3",
                                                                                   "sft:train.steps=5"]))
    sft = r.step_overrides("sft")
    assert sft[-2:] == ["train.seed=3", "train.steps=5"] and "model=qwen2_debug" in sft  # the user's last
    assert "train.seed=3" not in r.step_overrides("eval")  # `all` is every training step


def test_slurm_chain_dry_run(tmp_path, capsys):
    assert recipe.main(["--out", str(tmp_path), "--executor", "slurm", "--dry-run", "--nodes", "2",
                        "--gpus-per-node", "8", "sft:train.steps=9"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("sbatch")]
    assert len(lines) == len(recipe.STEPS)
    assert "--dependency" not in lines[0] and all("--dependency=afterok:" in line for line in lines[1:])
    sft = next(line for line in lines if "--job-name=recipe-sft " in line)
    assert "--nodes=2 --ntasks-per-node=8 --gpus-per-node=8" in sft
    assert "--launcher slurm --step sft sft:train.steps=9" in sft
    data = lines[0]
    assert "--nodes=1 --ntasks-per-node=1 --gpus-per-node=0" in data


def _table(out: str) -> dict:
    rows = {}
    for line in out.splitlines():
        parts = line.split(None, 2)
        if len(parts) >= 2 and parts[0] in recipe.STEPS:
            rows[parts[0]] = parts[1]
    return rows


def _run_and_resume(tmp_path, capsys, overrides):
    out = tmp_path / "loop"
    assert recipe.main(["--out", str(out), *overrides]) == 0
    first = capsys.readouterr().out
    assert _table(first) == {step: "done" for step in recipe.STEPS}, first[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == set(recipe.STEPS)
    assert {"pass@1", "pass@4", "maj@4", "rm@4"} <= set(summary["eval"])
    assert summary["rm_data"]["pairs"] > 0 and summary["rs"]["kept"] > 0
    assert "reward_rm" in summary["grpo"] and "reward_verifier" in summary["grpo"]
    kept = [json.loads(line) for line in (out / "rs" / "sft.jsonl").read_text().splitlines()]
    assert all("rm_score" in row and row["messages"][-1]["role"] == "assistant" for row in kept)
    # Stopped during GRPO (after its last checkpoint, before its summary): a rerun resumes there.
    (out / "grpo" / "summary.json").unlink()
    shutil.rmtree(out / "eval")
    assert recipe.main(["--out", str(out), *overrides]) == 0
    again = capsys.readouterr().out
    assert "data: done before, skipped" in again and "sft2: done before, skipped" in again
    assert "grpo: running" in again and "eval: running" in again
    assert json.loads((out / "grpo" / "summary.json").read_text()) == summary["grpo"]
    return summary


def test_shortened_recipe_runs_every_step_and_resumes(tmp_path, capsys):
    _run_and_resume(tmp_path, capsys, SHORT)


@pytest.mark.slow
def test_debug_recipe_end_to_end(tmp_path, capsys):
    summary = _run_and_resume(tmp_path, capsys, [])
    assert summary["sft"]["lm_loss"] < summary["sft"]["lm_loss_first"]


def test_a_step_needs_the_ones_before(tmp_path, capsys):
    assert recipe.main(["--out", str(tmp_path), "--step", "sft"]) == 1
    assert "step sft needs data, cpt first" in capsys.readouterr().err
