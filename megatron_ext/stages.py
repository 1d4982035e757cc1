"""The stage contract and the table of stages: every entry finds a stage the same way.

A stage X is `conf/stage/X.yaml` (its defaults) plus the class its `stage_class: module:Class`
names, a subclass of `Stage` below. The class is the whole contract: the two methods every stage
supplies, the optional hooks with their defaults, and what the launchers need to know (entry
module, reference model, config section, help keys). `table()` lists every stage with those
facts; `python -m megatron_ext.train stage=X`, the `posttrain.*` entries, `--help`,
`slurm/launch.py` (whose dry run constructs the stage, so its rules apply before a job queues)
and `tools.bench_train --data corpus` all read it. Adding a stage is one class and one YAML.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar, Dict, List, Optional, Tuple

from megatron_ext.config import Config, ConfigError

STAGE_DIR = Path(__file__).resolve().parent.parent / "conf" / "stage"

LOSS = "loss"
"""The key of the loss in every report and record: a stage's loss_func reports it as
{LOSS: [sum, count]}, the loop's step records hold its mean under the same key. Only the console
and the metrics file show it under the stage's `loss_name`."""


def require(cfg: Config, stage: str, *, pairs: bool = False, no_cp: bool = True, no_pp: bool = False) -> None:
    """Checks a post-training stage adds to `megatron_ext.config.validate`."""
    errors = []
    if pairs and cfg.train.micro_batch_size % 2:
        errors.append(f"stage {stage}: train.micro_batch_size={cfg.train.micro_batch_size} must be even "
                      "(a micro-batch holds whole chosen/rejected pairs)")
    if no_cp and cfg.parallel.cp > 1:
        errors.append(f"stage {stage}: parallel.cp={cfg.parallel.cp} is not supported (sequence-level losses)")
    if no_pp and cfg.parallel.pp > 1:
        errors.append(f"stage {stage}: parallel.pp={cfg.parallel.pp} is not supported (rollouts run the whole model)")
    if errors:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(errors))


class Stage:
    """What a training stage supplies to the one loop (`megatron_ext.loop.train`).

    Constructed as `Stage(cfg)` from the validated config; the constructor checks the stage's own
    rules (raising ConfigError) before any process group exists. Subclasses implement `datasets`
    and `forward_step` and override the hooks they need; the loop calls every hook directly.
    """

    entry: ClassVar[str] = "megatron_ext.train"
    """The module users run for this stage (`python -m <entry>`); every stage also runs under
    `python -m megatron_ext.train stage=X`."""
    loss_name: ClassVar[str] = "lm_loss"
    """What the console and the metrics file call the loss."""
    uses_reference_model: ClassVar[bool] = False
    """The stage keeps a frozen copy of the model it starts from, so a launcher must pin that
    model across requeues."""
    cuda_graph_safe: ClassVar[bool] = False
    """The training step has fixed shapes and no host syncs: `train.cuda_graph=true` may capture
    it as one CUDA graph (refused otherwise)."""
    config_section: ClassVar[Optional[str]] = None
    config_options: ClassVar[Optional[type]] = None
    """The stage's own config section: a dataclass whose fields are the stage's keys (`dpo.beta`);
    the YAML sets its defaults, overrides are checked against it like any key, and only the chosen
    stage's section is in the job's schema (`schema_for`)."""
    help_keys: ClassVar[Tuple[str, ...]] = ()
    """Keys outside the stage's own section that it reads, listed in its `--help`."""

    def __init__(self, cfg: Optional[Config] = None):
        self.cfg = cfg

    def datasets(self, cfg: Config, train_samples: int, valid_samples: int) -> Tuple[Any, Any]:
        """(train, valid) datasets of at least that many samples (valid may be None)."""
        raise NotImplementedError(f"{type(self).__name__}.datasets")

    def forward_step(self, data_iterator, model):
        """Megatron's forward step: (output, loss_func); loss_func(output) returns
        (loss sum, count, {LOSS: [sum, count], other metrics: [sum, count]})."""
        raise NotImplementedError(f"{type(self).__name__}.forward_step")

    def customize_model(self, chunk, cfg: Config) -> None:
        """Change each model chunk before it is wrapped (value heads, a reference snapshot)."""

    def before_step(self, rt, state) -> None:
        """Collective work before each optimizer step (e.g. RL rollouts); every rank calls it."""

    def derive_metrics(self, metrics: Dict[str, Optional[float]]) -> Dict[str, Optional[float]]:
        """Metrics computed from the step's reduced means (e.g. an F1 from hit counts)."""
        return metrics

    def callbacks(self, cfg: Config) -> List[Any]:
        """Extra `megatron_ext.callbacks.Callback`s the stage runs around each step."""
        return []


@dataclass(frozen=True)
class StageInfo:
    """One row of the table: what a launcher needs to know about a stage without building it."""

    name: str
    stage_class: Optional[str]
    """`module:Class`; None for a job that is not a training stage (evaluation)."""
    entry: str
    uses_reference_model: bool = False
    config_section: Optional[str] = None
    help_keys: Tuple[str, ...] = ()

    @property
    def trains(self) -> bool:
        return self.stage_class is not None


EVAL = StageInfo("eval", None, "tools.eval")
"""Evaluation of a checkpoint: launched like a stage (`slurm/launch.py stage=eval`), but it runs
`python -m tools.eval` (no conf/stage/eval.yaml: it composes the default config plus `eval.*`)."""


def names() -> List[str]:
    """Every training stage with a config, sorted."""
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


def stage_class(spec: str) -> type:
    """The `Stage` subclass that `module:Class` names."""
    cls = resolve(spec)
    if not (isinstance(cls, type) and issubclass(cls, Stage)):
        raise ConfigError(f"stage_class={spec!r} is not a subclass of megatron_ext.stages.Stage "
                          "(which lists the methods and hooks a stage supplies)")
    return cls


def make(cfg: Config) -> Stage:
    """The configured stage, constructed from the (validated) config; its own rules raise ConfigError."""
    cls = stage_class(cfg.stage_class)
    if cfg.train.cuda_graph and not cls.cuda_graph_safe:
        raise ConfigError(f"train.cuda_graph=true: stage_class={cfg.stage_class} does not declare its training "
                          "step capturable as a CUDA graph (cuda_graph_safe: fixed shapes, no host syncs)")
    return cls(cfg)


def info(name: str) -> StageInfo:
    """The table's row for stage `name` (or the evaluation job)."""
    if name == EVAL.name:
        return EVAL
    spec = stage_class_of(name)
    cls = stage_class(spec)
    section = section_of(spec)
    return StageInfo(name, spec, cls.entry, cls.uses_reference_model, section[0] if section else None,
                     tuple(cls.help_keys))


def table() -> List[StageInfo]:
    """Every training stage, then the evaluation job."""
    return [info(name) for name in names()] + [EVAL]


def section_of(spec: str) -> Optional[Tuple[str, type]]:
    """(section name, options dataclass) that the stage class `spec` declares, or None."""
    cls = stage_class(spec)
    name, options = cls.config_section, cls.config_options
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
