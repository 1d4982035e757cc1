"""Benchmark evaluation of checkpoints on the training runtime (`python -m tools.eval`).

- `posttrain.evals.metrics`: pass@k (unbiased), maj@k, best-of-k by a scorer; pure Python.
- `posttrain.evals.tasks`: the problems of each task (HumanEval, held-out synthetic math/code,
  local GSM8K/MATH, MBPP and ProcessBench jsonl), their chat prompts and how a completion is judged.
- `posttrain.evals.runner`: the collective part (generate, score with a reward model / PRM) and
  the report (JSON + table).
"""
