"""Hydra config composition shared by every entry point (`python -m megatron_ext.train k=v ...`)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Sequence

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from megatron_ext.config import Config, ConfigError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

ConfigStore.instance().store(name="base_config", node=Config)


def load_config(overrides: Sequence[str] = (), config_name: str = "config") -> Config:
    """Compose `conf/<config_name>.yaml` with Hydra overrides into a typed Config.

    Unknown keys, wrong types and missing values raise ConfigError naming the key.
    Cross-field rules are checked separately by `megatron_ext.config.validate`.
    """
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            composed = compose(config_name=config_name, overrides=list(overrides))
        return OmegaConf.to_object(composed)
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(f"bad config or override: {e}") from None


def split_flags(argv: Sequence[str]) -> tuple[List[str], List[str]]:
    """Separate `--flags` from Hydra `key=value` overrides."""
    flags = [a for a in argv if a.startswith("--")]
    return flags, [a for a in argv if not a.startswith("--")]


def config_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def fail(message: str, code: int = 2) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)
