"""Synthetic math and code corpora, verified before they are written.

- `data_prep.synth.math_gen`: programmatic problems (arithmetic, fractions, linear and quadratic
  equations, word problems) with computed answers and worked solutions ending in `\\boxed{}`.
- `data_prep.synth.code_gen`: function-writing tasks with a reference solution and generated
  unit tests, checked in the sandbox.
- `data_prep.synth.backends`: model-generated synthesis behind one interface (an
  OpenAI-compatible HTTP endpoint, or our own Megatron model via `tools.generate`) with
  rejection sampling through `data_prep.verifiers`.
- `python -m data_prep.synth`: writes jsonl records ({"text", "domain", "kind", "source",
  "generator", "seed", "index", "verified", "id", ...}) that `python -m data_prep.tokenize`
  reads directly (`--text-key text`).
"""
