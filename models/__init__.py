"""Qwen model families on Megatron-Core.

`transformer_config()` maps our `ModelConfig` (HF `config.json` terms) plus the parallel
layout and precision to Megatron-Core's `TransformerConfig`; `megatron_ext.spec` picks the
layer spec. Named sizes live in `conf/model/*.yaml`.
"""

from models.common import transformer_config

__all__ = ["transformer_config"]
