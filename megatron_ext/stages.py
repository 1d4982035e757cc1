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
- `cuda_graph_safe` (class attribute): the stage's training step has fixed shapes and no host
  syncs, so `train.cuda_graph=true` may capture it as one CUDA graph (refused otherwise).
- `config_section` + `config_options` (class attributes): the stage's own config section, a
  dataclass whose fields are the stage's keys (`dpo.beta`, `grpo.group_size`); the YAML sets its
  defaults, overrides are checked against it like any key, and only the chosen stage's section
  is in the job's schema (`schema_for`). The stage validates it when constructed.

Adding a stage is one module and one YAML; `python -m megatron_ext.train stage=X`, the
`posttrain.*` entries, `slurm/launch.py` (whose dry run constructs the stage, so its rules apply
before a job queues) and `tools.bench --data corpus` all go through `make()`.
"""

from __future__ import annotations

import dataclasses
import importlib
from functools import lru_cache
from pathlib import Path
from typing import List, Optional, Tuple

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
    cls = resolve(cfg.stage_class)
    if cfg.train.cuda_graph and not getattr(cls, "cuda_graph_safe", False):
        raise ConfigError(f"train.cuda_graph=true: stage_class={cfg.stage_class} does not declare its training "
                          "step capturable as a CUDA graph (cuda_graph_safe: fixed shapes, no host syncs)")
    return cls(cfg)


def uses_reference_model(name: str) -> bool:
    return bool(getattr(resolve(stage_class_of(name), f"conf/stage/{name}.yaml stage_class"),
                        "uses_reference_model", False))


def section_of(spec: str) -> Optional[Tuple[str, type]]:
    """(section name, options dataclass) that the stage class `spec` declares, or None."""
    cls = resolve(spec)
    name, options = getattr(cls, "config_section", None), getattr(cls, "config_options", None)
    if name is None and options is None:
        return None
    if not (isinstance(name, str) and name.isidentifier() and dataclasses.is_dataclass(options)):
        raise ConfigError(f"{spec}: config_section must be a name and config_options a dataclass "
                          f"(got {name!r}, {options!r})")
    if name in {f.name for f in dataclasses.fields(Config)}:
        raise ConfigError(f"{spec}: config_section={name!r} is already a section of every job")
    return name, options


@lru_cache(maxsize=None)
def schema_for(spec: str) -> type:
    """The config schema of a job running the stage class `spec`: Config plus the stage's own
    section (Config itself for stages without one). Each job's schema holds only its stage's
    section, so another stage's key is an unknown key rather than a silently unread one."""
    section = section_of(spec)
    if section is None:
        return Config
    name, options = section
    cls = dataclasses.make_dataclass(
        f"Config_{name}", [(name, options, dataclasses.field(default_factory=options))], bases=(Config,),
        namespace={"__doc__": f"The whole job, with the `{name}` section of stage class {spec}."})
    cls.__module__ = __name__  # found again by name (pickling) through the module __getattr__
    return cls


def __getattr__(attr: str):
    """`Config_<section>`, the schema classes `schema_for` makes, by name (so they pickle)."""
    if attr.startswith("Config_"):
        for name in names():
            spec = stage_class_of(name)
            section = section_of(spec)
            if section is not None and f"Config_{section[0]}" == attr:
                return schema_for(spec)
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")
