"""python -m tools.recipe: the Qwen2.5-Math self-improvement loop as one command.

    python -m tools.recipe --out runs/math_loop                       # laptop: tiny debug model, CPU
    python -m tools.recipe --out runs/math_loop --preset qwen2_5_1_5b \\
        --executor slurm --nodes 2 --gpus-per-node 8 'cpt:data.paths=[/data/math_web]'

Each step's checkpoint feeds the next:

  data     problems (train / held out), SFT conversations, a synthetic math corpus (tokenized)
  cpt      continued pretraining on the math corpus                 (posttrain.cpt, stage=cpt_math)
  sft      SFT on worked answers                                    (posttrain.sft)
  rm_data  k samples per problem from the SFT model, each judged by the verifier (tools.eval);
           a problem with a correct and a wrong sample gives a (prompt, chosen, rejected) pair
  rm       reward model on those pairs, from the SFT weights        (posttrain.rm)
  rs       RM-ranked rejection sampling: k samples per problem, the verified ones ranked by the
           RM, the best kept (with its score) as SFT data            (tools.eval + eval.rm_load)
  sft2     SFT on the rejection-sampled answers, from the SFT model (posttrain.sft)
  grpo     GRPO with the verifier's reward and the RM's (Qwen2.5-Math's shaping, grpo.rm_load)
  eval     pass@k, maj@k and RM@k on the held-out problems          (tools.eval)

Every step writes `OUT/<step>/summary.json` (atomically) when it succeeds; a rerun skips the
steps that have one, so a recipe that stopped resumes at the step that did not finish (a training
step resumes from its own checkpoints, as a requeued Slurm job does). The end prints one table of
every step's metrics (also `OUT/summary.json`).

`--executor local` runs the steps here one after the other (training steps as one process, or
under torchrun with `--gpus-per-node N`); `--executor slurm` submits one job per pending step
with `sbatch --dependency=afterok:<previous job>`, each job running `python -m tools.recipe
--out OUT --step NAME` (training and evaluation through slurm/launch.py, so they use every rank
of the job); `--dry-run` prints what would run. Change any step's config with `STEP:key=value`
(e.g. `sft:train.steps=200`, `all:parallel.tp=2` for every training step).
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from data_prep.synth.records import write_jsonl
from megatron_ext.checkpoint.store import write_atomic
from megatron_ext.requeue import with_checkpoint_overrides

REPO = Path(__file__).resolve().parent.parent
STEPS = ("data", "cpt", "sft", "rm_data", "rm", "rs", "sft2", "grpo", "eval")
TRAINING = {"cpt": "cpt_math", "sft": "sft", "rm": "rm", "sft2": "sft", "grpo": "grpo"}
"""Training steps and the stage each runs."""


@dataclass(frozen=True)
class Preset:
    """Sizes of one run of the recipe; `overrides` per step (`all`: every training step)."""

    problems: int
    eval_problems: int
    max_operand: int
    samples: int
    """Samples per problem in rm_data, rs and eval (k)."""
    overrides: Dict[str, Tuple[str, ...]] = field(default_factory=dict)


_TINY = ("model=qwen2_debug", "data.seq_length=64", "train.micro_batch_size=8", "train.global_batch_size=16",
         "train.warmup_steps=0", "train.lr_schedule=constant", "train.eval_interval=0",
         "checkpoint.save_interval=0")
PRESETS = {
    "debug": Preset(problems=64, eval_problems=16, max_operand=4, samples=4, overrides={
        "all": _TINY,
        "cpt": ("train.steps=4", "train.lr=1e-3", "train.min_lr=1e-3", "data.seq_length=128"),
        "sft": ("train.steps=20", "train.lr=1e-2", "train.min_lr=1e-2"),
        "rm": ("train.steps=8", "train.lr=1e-3", "train.min_lr=1e-3"),
        "sft2": ("train.steps=8", "train.lr=2e-3", "train.min_lr=2e-3"),
        "grpo": ("train.steps=6", "train.lr=2e-4", "train.min_lr=2e-4", "grpo.group_size=4",
                 "grpo.max_new_tokens=8"),
        **{step: ("eval.max_new_tokens=8",) for step in ("rm_data", "rs", "eval")}}),
    "qwen2_5_1_5b": Preset(problems=20000, eval_problems=500, max_operand=999, samples=8, overrides={
        "all": ("model=qwen2_5_1_5b", "precision=bf16", "data.seq_length=2048"),
        "cpt": ("train.steps=2000",),
        "sft": ("train.steps=1000", "train.lr=1e-5", "train.min_lr=1e-6"),
        "rm": ("train.steps=500", "train.lr=5e-6", "train.min_lr=5e-7"),
        "sft2": ("train.steps=1000", "train.lr=1e-5", "train.min_lr=1e-6"),
        "grpo": ("train.steps=500", "grpo.max_new_tokens=1024"),
        **{step: ("eval.max_new_tokens=1024",) for step in ("rm_data", "rs", "eval")}}),
}


class RecipeError(RuntimeError):
    """A step failed or its inputs are missing; the message names the step and its log."""


@dataclass
class Recipe:
    out: Path
    preset: Preset
    overrides: Dict[str, List[str]]
    launcher: str = "local"
    """How a step starts its ranks: `local` (one process, or torchrun) or `slurm` (inside a job)."""
    gpus_per_node: int = 0

    def dir(self, step: str) -> Path:
        return self.out / step

    def log(self, step: str) -> Path:
        return self.out / "logs" / f"{step}.log"

    def done(self, step: str) -> bool:
        return (self.dir(step) / "summary.json").is_file()

    def summary(self, step: str) -> dict:
        return json.loads((self.dir(step) / "summary.json").read_text())

    def step_overrides(self, step: str) -> List[str]:
        """The preset's then the user's overrides of `step` (`all` first for a training step):
        the user's last, so they win."""
        scopes = ("all", step) if step in TRAINING else (step,)
        return [*(o for s in scopes for o in self.preset.overrides.get(s, ())),
                *(o for s in scopes for o in self.overrides.get(s, []))]

    def run(self, step: str, argv: Sequence[str]) -> None:
        """Run one command of `step`, its output appended to the step's log."""
        log = self.log(step)
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a", encoding="utf-8") as f:
            f.write("$ " + shlex.join(argv) + "\n")
            f.flush()
            code = subprocess.run(list(argv), cwd=REPO, stdout=f, stderr=subprocess.STDOUT).returncode
        if code != 0:
            tail = "".join(log.read_text(encoding="utf-8", errors="replace").splitlines(True)[-15:])
            raise RecipeError(f"step {step}: `{shlex.join(argv[:4])} ...` exited {code}; log {log}:\n{tail}")

    def module(self, module: str, stage: Optional[str], args: Sequence[str]) -> List[str]:
        """The command that runs `module` on the step's ranks: a training stage (`args` name it) or,
        with `stage` None, tools.eval."""
        if self.launcher == "slurm":  # training steps name their stage in `args`
            return [sys.executable, str(REPO / "slurm" / "launch.py"), *([] if stage else ["stage=eval"]), *args]
        if self.gpus_per_node > 1:
            return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={self.gpus_per_node}",
                    "-m", module, *args]
        return [sys.executable, "-m", module, *args]


def write_json(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(value, indent=2, default=str) + "\n")


# ---------------------------------------------------------------- steps


def user_turn(problem: str) -> str:
    """What the model is asked, everywhere in the recipe (SFT, sampling, GRPO, evaluation): the
    evaluation's math prompt, so each stage trains on the form the next one samples with."""
    from posttrain.evals.tasks import MATH_INSTRUCTION

    return f"{problem}\n{MATH_INSTRUCTION}"


def _sums(n: int, seed: int, max_operand: int) -> List[dict]:
    import random

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        rows.append({"id": f"sum-{seed}-{i}", "problem": f"What is {a}+{b}?", "answer": str(a + b)})
    return rows


def step_data(r: Recipe) -> dict:
    """Problems to train on and held-out ones, SFT conversations, the math corpus (tokenized)."""
    d, p = r.dir("data"), r.preset
    train, held_out = _sums(p.problems, 1, p.max_operand), _sums(p.eval_problems, 2, p.max_operand)
    seen = {row["problem"] for row in train}
    held_out = [row for row in held_out if row["problem"] not in seen] or held_out
    write_jsonl(train, d / "problems.jsonl")
    write_jsonl(held_out, d / "eval.jsonl")
    write_jsonl([{"prompt": user_turn(row["problem"]), "answer": row["answer"]} for row in train], d / "grpo.jsonl")
    write_jsonl([{"messages": [{"role": "user", "content": user_turn(row["problem"])},
                               {"role": "assistant", "content": f"\\boxed{{{row['answer']}}}"}]} for row in train],
                d / "sft.jsonl")
    r.run("data", [sys.executable, "-m", "data_prep.synth", "programmatic", "--domain", "math",
                   "--kinds", "arithmetic", "--n", str(max(p.problems, 64)), "--seed", "0",
                   "--out", str(d / "corpus.jsonl")])
    r.run("data", [sys.executable, "-m", "data_prep.tokenize", "--input", str(d / "corpus.jsonl"),
                   "--output-prefix", str(d / "corpus"), "--tokenizer", "qwen3", "--append-eod", "--quiet"])
    return {"problems": len(train), "held_out": len(held_out)}


def _train(r: Recipe, step: str, start: Optional[str], args: Sequence[str]) -> dict:
    """A training step: the stage from `start`'s weights, checkpoints under OUT/<step>/checkpoints,
    metrics in OUT/<step>/metrics.jsonl; resumes from its own checkpoints after an interruption."""
    stage = TRAINING[step]
    ckpt = r.dir(step) / "checkpoints"
    overrides = [f"stage={stage}", *args, f"checkpoint.dir={ckpt}", f"logger.metrics_file={r.dir(step)}/metrics.jsonl"]
    if start:
        overrides += [f"checkpoint.load={start}", "checkpoint.weights_only=true"]
    overrides += r.step_overrides(step)
    if r.launcher == "local":  # as slurm/launch.py does for a requeued job: the step's own progress wins
        overrides, _ = with_checkpoint_overrides(overrides, step)
    module = "posttrain.cpt" if stage.startswith("cpt") else f"posttrain.{stage}"
    r.run(step, r.module(module, stage, overrides))
    return metrics_summary(r.dir(step) / "metrics.jsonl")


def metrics_summary(path: Path) -> dict:
    """First and last loss, and the last value of every other train metric of a metrics file."""
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    train = [rec for rec in records if rec.get("kind") == "train"]
    if not train:
        raise RecipeError(f"{path}: no training step was logged")
    loss_key = next(k for k in train[0] if k.endswith("loss"))
    out = {"steps": train[-1]["step"], f"{loss_key}_first": train[0][loss_key], loss_key: train[-1][loss_key]}
    skip = {"step", "kind", loss_key, "lr", "grad_norm", "tokens/s"}
    out.update({k: v for k, v in train[-1].items() if k not in skip})
    return out


def _newest(r: Recipe, step: str) -> str:
    return str(r.dir(step) / "checkpoints")


def _sample(r: Recipe, step: str, policy: str, problems: Path, k: int, rm: Optional[str] = None) -> dict:
    """k samples per problem from `policy` with tools.eval (judged; RM-scored with `rm`): the report."""
    report = r.dir(step) / "samples.json"
    args = [f"checkpoint.load={policy}", f"eval.tasks=[{problems}]", f"eval.k={k}", "eval.temperature=1.0",
            f"eval.out={report}"]
    if rm:
        args.append(f"eval.rm_load={rm}")
    r.run(step, r.module("tools.eval", None, args + r.step_overrides(step)))
    return json.loads(report.read_text())


def _items(report: dict) -> List[dict]:
    (task,) = report["tasks"].values()
    return task["items"]


def _problems_by_id(r: Recipe) -> Dict[str, dict]:
    rows = [json.loads(line) for line in (r.dir("data") / "problems.jsonl").read_text().splitlines()]
    return {row["id"]: row for row in rows}


def step_rm_data(r: Recipe) -> dict:
    """Verifier-labelled preference pairs from the SFT model's samples."""
    report = _sample(r, "rm_data", _newest(r, "sft"), r.dir("data") / "problems.jsonl", r.preset.samples)
    problems, pairs = _problems_by_id(r), []
    for item in _items(report):
        good = [c for c, ok in zip(item["completions"], item["correct"]) if ok]
        bad = [c for c, ok in zip(item["completions"], item["correct"]) if not ok]
        for chosen, rejected in zip(good, bad):
            pairs.append({"prompt": user_turn(problems[item["id"]]["problem"]), "chosen": chosen,
                          "rejected": rejected, "id": item["id"]})
    if not pairs:
        raise RecipeError(f"step rm_data: no problem has both a correct and a wrong sample among "
                          f"{r.preset.samples} (accuracy {_accuracy(report):.2f}): raise the samples or change "
                          "the SFT step (nothing to train the reward model on)")
    write_jsonl(pairs, r.dir("rm_data") / "pairs.jsonl")
    return {"pairs": len(pairs), "sample_accuracy": _accuracy(report)}


def _accuracy(report: dict) -> float:
    (task,) = report["tasks"].values()
    return task["metrics"]["accuracy"]


def step_rs(r: Recipe) -> dict:
    """RM-ranked rejection sampling: per problem, the verified sample the RM scores highest."""
    report = _sample(r, "rs", _newest(r, "sft"), r.dir("data") / "problems.jsonl", r.preset.samples,
                     rm=_newest(r, "rm"))
    problems, rows = _problems_by_id(r), []
    for item in _items(report):
        verified = [(score, i) for i, (ok, score) in enumerate(zip(item["correct"], item["rm"])) if ok]
        if not verified:
            continue
        score, i = max(verified, key=lambda s: (s[0], -s[1]))
        rows.append({"messages": [{"role": "user", "content": user_turn(problems[item["id"]]["problem"])},
                                  {"role": "assistant", "content": item["completions"][i]}],
                     "id": item["id"], "rm_score": score, "sample": i, "source": f"rs:{_newest(r, 'sft')}"})
    if not rows:
        raise RecipeError(f"step rs: no problem has a verified sample (accuracy {_accuracy(report):.2f})")
    write_jsonl(rows, r.dir("rs") / "sft.jsonl")
    return {"kept": len(rows), "of": len(_items(report)), "mean_rm_score": sum(x["rm_score"] for x in rows) / len(rows)}


def step_eval(r: Recipe) -> dict:
    report = _sample(r, "eval", _newest(r, "grpo"), r.dir("data") / "eval.jsonl", r.preset.samples,
                     rm=_newest(r, "rm"))
    (task,) = report["tasks"].values()
    return dict(task["metrics"])


STEP_FUNCTIONS: Dict[str, Callable[[Recipe], dict]] = {
    "data": step_data,
    "cpt": lambda r: _train(r, "cpt", None, [f"data.paths=[{r.dir('data')}/corpus]", "cpt.mixture_steps=[]",
                                             "cpt.mixture_weights=[]", "checkpoint.weights_only=false"]),
    "sft": lambda r: _train(r, "sft", _newest(r, "cpt"), [f"posttrain.data_path={r.dir('data')}/sft.jsonl"]),
    "rm_data": step_rm_data,
    "rm": lambda r: _train(r, "rm", _newest(r, "sft"), [f"posttrain.data_path={r.dir('rm_data')}/pairs.jsonl"]),
    "rs": step_rs,
    "sft2": lambda r: _train(r, "sft2", _newest(r, "sft"), [f"posttrain.data_path={r.dir('rs')}/sft.jsonl"]),
    "grpo": lambda r: _train(r, "grpo", _newest(r, "sft2"), [f"posttrain.data_path={r.dir('data')}/grpo.jsonl",
                                                              f"grpo.rm_load={_newest(r, 'rm')}"]),
    "eval": step_eval,
}


# ---------------------------------------------------------------- running the steps


RESUMABLE = ("checkpoints", "metrics.jsonl")
"""What a training step keeps when it runs again: its checkpoints and the metrics of their steps
(the loop drops the records after the step it resumes from)."""


def run_step(r: Recipe, step: str) -> dict:
    """Run one step from a clean directory (a training step keeps its checkpoints, to resume)
    and record its summary; the summary is what marks the step done."""
    missing = [s for s in STEPS[:STEPS.index(step)] if not r.done(s)]
    if missing:
        raise RecipeError(f"step {step} needs {', '.join(missing)} first (no summary.json)")
    d = r.dir(step)
    if d.exists():  # a step that did not finish: start it again, a training step from its checkpoints
        for child in d.iterdir():
            if child.name not in RESUMABLE:
                shutil.rmtree(child) if child.is_dir() else child.unlink()
    summary = STEP_FUNCTIONS[step](r)
    write_json(d / "summary.json", summary)
    return summary


def run_local(r: Recipe, steps: Sequence[str], dry_run: bool) -> None:
    for step in steps:
        if r.done(step):
            print(f"[recipe] {step}: done before, skipped", flush=True)
            continue
        if dry_run:
            print(f"[recipe] {step}: would run (log {r.log(step)})", flush=True)
            continue
        print(f"[recipe] {step}: running (log {r.log(step)})", flush=True)
        summary = run_step(r, step)
        print(f"[recipe] {step}: " + ", ".join(f"{k} {_fmt(v)}" for k, v in summary.items()), flush=True)


def sbatch_command(r: Recipe, step: str, after: Optional[str], args: argparse.Namespace) -> List[str]:
    """One job of the chain: the step's ranks (training and evaluation use the whole allocation)."""
    ranks = step in TRAINING or step in ("rm_data", "rs", "eval")
    cmd = ["sbatch", "--parsable", f"--job-name=recipe-{step}", f"--output={r.out}/logs/{step}-%j.log",
           "--open-mode=append", f"--nodes={args.nodes if ranks else 1}"]
    gpus = args.gpus_per_node if ranks else 0
    cmd += [f"--ntasks-per-node={max(gpus, 1)}", f"--gpus-per-node={gpus}"]
    if args.time:
        cmd.append(f"--time={args.time}")
    cmd += list(args.sbatch_arg or [])
    if after:
        cmd.append(f"--dependency=afterok:{after}")
    inner = [sys.executable, "-m", "tools.recipe", "--out", str(r.out), "--preset", args.preset,
             "--launcher", "slurm", "--step", step, *args.overrides]
    return cmd + ["--wrap", f"cd {shlex.quote(str(REPO))} && {shlex.join(inner)}"]


def submit(r: Recipe, steps: Sequence[str], args: argparse.Namespace) -> List[Tuple[str, str]]:
    """sbatch each pending step, each after the previous one succeeded; [(step, job id)]."""
    jobs, after = [], None
    for step in steps:
        if r.done(step):
            print(f"[recipe] {step}: done before, not submitted", flush=True)
            continue
        cmd = sbatch_command(r, step, after, args)
        if args.dry_run:
            print(shlex.join(cmd), flush=True)
            after = f"<{step}>"
            continue
        (r.out / "logs").mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RecipeError(f"sbatch for step {step} failed: {proc.stderr.strip() or proc.stdout.strip()}")
        after = proc.stdout.strip().split(";")[0]
        jobs.append((step, after))
        print(f"[recipe] {step}: job {after}", flush=True)
    return jobs


def table(r: Recipe) -> str:
    """One line per step: its state and metrics."""
    lines = [f"{'step':<8} {'state':<8} metrics"]
    for step in STEPS:
        if r.done(step):
            summary = r.summary(step)
            lines.append(f"{step:<8} {'done':<8} " + ", ".join(f"{k} {_fmt(v)}" for k, v in summary.items()))
        else:
            lines.append(f"{step:<8} {'pending':<8}")
    return "\n".join(lines)


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def parse_overrides(items: Sequence[str]) -> Dict[str, List[str]]:
    """`STEP:key=value` -> {STEP: [key=value]}; `all:` applies to every training step."""
    out: Dict[str, List[str]] = {}
    for item in items:
        step, sep, override = item.partition(":")
        if not sep or "=" not in override or (step not in STEPS and step != "all"):
            raise RecipeError(f"{item!r}: an override is STEP:key=value with STEP one of {', '.join(STEPS)} or all")
        out.setdefault(step, []).append(override)
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.recipe", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    ap.add_argument("--out", required=True, help="the recipe's directory (every step's data, checkpoints, logs)")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="debug")
    ap.add_argument("--executor", choices=["local", "slurm"], default="local")
    ap.add_argument("--launcher", choices=["local", "slurm"], default="local", help=argparse.SUPPRESS)
    ap.add_argument("--step", choices=STEPS, help="run this one step (what each Slurm job runs)")
    ap.add_argument("--until", choices=STEPS, default=STEPS[-1], help="stop after this step")
    ap.add_argument("--nodes", type=int, default=1)
    ap.add_argument("--gpus-per-node", type=int, default=0, help="ranks per node (0: one CPU process)")
    ap.add_argument("--time", help="sbatch --time of each job")
    ap.add_argument("--sbatch-arg", action="append", help="one more sbatch option, e.g. --sbatch-arg=--partition=gpu")
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("overrides", nargs="*", metavar="STEP:key=value")
    args = ap.parse_args(argv)
    try:
        r = Recipe(Path(args.out).resolve(), PRESETS[args.preset], parse_overrides(args.overrides),
                   launcher=args.launcher, gpus_per_node=args.gpus_per_node)
        if args.step:
            run_step(r, args.step)
            return 0
        steps = STEPS[:STEPS.index(args.until) + 1]
        if args.executor == "slurm":
            submit(r, steps, args)
            return 0
        run_local(r, steps, args.dry_run)
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if not args.dry_run:
        write_json(r.out / "summary.json", {s: r.summary(s) for s in STEPS if r.done(s)})
    print(table(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
