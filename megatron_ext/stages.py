"""The stage registry: every entry point finds a stage the same way.

A stage X is `conf/stage/X.yaml` plus the class its `stage_class: module:Class` names. The YAML
sets the stage's defaults; the class supplies `datasets` and `forward_step` to the one training
loop (see `megatron_ext.pretrain.Stage`) and checks the stage's own rules when it is constructed
from the validated config (raising ConfigError). Optional hooks, looked up on the instance:

- `customize_model(chunk, cfg)`: change each model chunk before it is wrapped (value heads, the
  reference model's snapshot);
- `before_step(rt, state)`: collective work before each step (e.g. RL rollouts);
- `derive_metrics(metrics) -> metrics`: metrics computed from the step's reduced means;
- `loss_name`: what the console and the metrics file call the loss (default `lm_loss`);
- `uses_reference_model` (class attribute): the stage keeps a frozen copy of the model it
  starts from, so a launcher must pin that model across requeues.

Adding a stage is one module and one YAML; `python -m megatron_ext.train stage=X`, the
`posttrain.*` entries, `slurm/launch.py` (whose dry run constructs the stage, so its rules apply
before a job queues) and `tools.bench --data corpus` all go through `make()`.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import List

from megatron_ext.config import Config, ConfigError

STAGE_DIR = Path(__file__).resolve().parent.parent / "conf" / "stage"


def names() -> List[str]:
    """Every stage with a config, sorted."""
    return sorted(p.stem for p in STAGE_DIR.glob("*.yaml"))


def stage_class_of(name: str) -> str:
    """The `module:Class` that conf/stage/<name>.yaml names (without composing a config)."""
    from omegaconf import OmegaConf

    path = STAGE_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"stage={name}: no conf/stage/{name}.yaml; the stages are {', '.join(names())}")
    value = OmegaConf.load(path).get("stage_class")
    if not value:
        raise ConfigError(f"conf/stage/{name}.yaml: no stage_class (module:Class of the stage)")
    return str(value)


def resolve(spec: str, where: str = "stage_class"):
    """The class (or factory) that `module:Class` names."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"{where}={spec!r} is not of the form module:Class")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"{where}={spec!r}: cannot import {module_name} ({e})") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ConfigError(f"{where}={spec!r}: {module_name} has no {attr}") from None


def make(cfg: Config):
    """The configured stage, constructed from the (validated) config; its own rules raise ConfigError."""
    return resolve(cfg.stage_class)(cfg)


def uses_reference_model(name: str) -> bool:
    return bool(getattr(resolve(stage_class_of(name), f"conf/stage/{name}.yaml stage_class"),
                        "uses_reference_model", False))
