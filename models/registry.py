"""Family lookup: by our `ModelConfig.family` or by an HF `model_type`."""

from __future__ import annotations

from types import ModuleType
from typing import Any, Dict, Optional

from models.config import ModelConfig
from models import qwen2, qwen2_moe, qwen3, qwen3_moe
from models.hf_config import HFConfigError, as_dict

FAMILIES: Dict[str, ModuleType] = {mod.FAMILY: mod for mod in (qwen2, qwen3, qwen2_moe, qwen3_moe)}
BY_MODEL_TYPE: Dict[str, ModuleType] = {mod.MODEL_TYPE: mod for mod in FAMILIES.values()}


def family(name: str) -> ModuleType:
    """The family module for a ModelConfig.family value."""
    if name not in FAMILIES:
        raise KeyError(f"unknown model family {name!r}; known: {sorted(FAMILIES)}")
    return FAMILIES[name]


def family_for_hf(hf: Any) -> ModuleType:
    """The family module for an HF config, by its `model_type`."""
    model_type = as_dict(hf).get("model_type")
    if model_type not in BY_MODEL_TYPE:
        raise HFConfigError(f"unknown model_type {model_type!r}; supported: {sorted(BY_MODEL_TYPE)}")
    return BY_MODEL_TYPE[model_type]


def config_from_hf(hf: Any, name: str = None) -> ModelConfig:
    """Any supported HF config -> ModelConfig."""
    return family_for_hf(hf).config_from_hf(hf, name)


def config_to_hf(m: ModelConfig) -> Dict[str, Any]:
    """ModelConfig -> HF `config.json` fields of its family."""
    return family(m.family).config_to_hf(m)


def hf_config_for(m: ModelConfig, dtype, base: Optional[dict]) -> dict:
    """config.json: the source HF config (keeps token ids etc.) updated from the ModelConfig;
    `dtype` is the torch dtype of the weights written next to it."""
    derived = config_to_hf(m)
    config = dict(base or {})
    if isinstance(config.get("rope_parameters"), dict):  # transformers 5 spelling: keep one source of truth
        config["rope_parameters"] = {**config["rope_parameters"], "rope_theta": derived.pop("rope_theta")}
    config.update(derived)
    config["dtype" if "dtype" in config else "torch_dtype"] = str(dtype).replace("torch.", "")
    return config
