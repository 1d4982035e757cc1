"""Command-line tools: converters, logits, generation, estimators."""

import megatron_ext  # noqa: F401  (installs the warning filters before Megatron-Core is imported)
