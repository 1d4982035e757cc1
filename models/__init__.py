"""Qwen model families on Megatron-Core.

`transformer_config()` maps our `ModelConfig` (HF `config.json` terms) plus the parallel
layout and precision to Megatron-Core's `TransformerConfig`; `megatron_ext.spec` picks the
layer spec. One module per family (`qwen2`, `qwen3`, `qwen2_moe`, `qwen3_moe`) holds the HF
config mapping and the declarative weight mapping (`models.mapping`) that both converter
directions read; `models.registry` finds a family by name or HF `model_type`. Named sizes live
in `conf/model/*.yaml`.
"""

from models.common import transformer_config

__all__ = ["transformer_config"]
