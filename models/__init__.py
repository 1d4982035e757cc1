"""Qwen model families: what the architectures are, independent of any training runtime.

`models.config.ModelConfig` holds an architecture in HF `config.json` terms. One module per
family (`qwen2`, `qwen3`, `qwen2_moe`, `qwen3_moe`) holds the HF config mapping and the
declarative weight mapping (`models.mapping`) that both converter directions read;
`models.registry` finds a family by name or HF `model_type`. Named sizes live in
`conf/model/*.yaml`. The runtime maps a ModelConfig to Megatron-Core's TransformerConfig
(`megatron_ext.transformer`) and picks the layer spec (`megatron_ext.spec`).
"""
