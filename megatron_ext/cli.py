"""Hydra config composition shared by every entry point (`python -m megatron_ext.train k=v ...`).

Also the parts of the command line every entry shares: flag parsing (`-h/--help`,
`--print-config`), the check that every override names a key of the schema (with a
did-you-mean), and the help text (config groups, the most used keys with their defaults).
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import re
import sys
import textwrap
import typing
from functools import lru_cache
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from megatron_ext import stages
from megatron_ext.stages import info as stage_info
from megatron_ext.config import Config, ConfigError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

HELP_FLAGS = ("-h", "--help")
PRINT_CONFIG = "--print-config"


# ---------------------------------------------------------------- composition


def load_config(overrides: Sequence[str] = (), config_name: str = "config") -> Config:
    """Compose `conf/<config_name>.yaml` with Hydra overrides into a typed Config.

    The schema is Config plus the chosen stage's own section (`megatron_ext.stages.schema_for`).
    Unknown keys (with or without Hydra's `+`), wrong types and missing values raise
    ConfigError naming the key. Cross-field rules are checked separately by
    `megatron_ext.config.validate`, the stage's own by the stage when it is constructed.
    """
    schema = job_schema(overrides)
    check_overrides(overrides, schema)
    ConfigStore.instance().store(name="base_config", node=schema)
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            composed = compose(config_name=config_name, overrides=list(overrides))
        return OmegaConf.to_object(composed)
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(f"bad config or override: {e}") from None


def _parsed(overrides: Sequence[str]) -> list:
    """The overrides Hydra can parse (check_overrides reports the others)."""
    parser, out = OverridesParser.create(), []
    for raw in overrides:
        if not str(raw).startswith("-"):
            try:
                out += parser.parse_overrides([str(raw)])
            except HydraException:
                pass
    return out


def job_schema(overrides: Sequence[str] = ()) -> type:
    """The schema a job with these overrides is composed into: Config plus the section of its
    stage (the last `stage=X`, else conf/config.yaml's default; `stage_class=` if set)."""
    stage, spec = default_stage(), None
    for o in _parsed(overrides):
        if o.is_delete():
            continue
        if o.key_or_group == "stage" and o.package is None:
            stage = str(o.value())
        elif o.key_or_group == "stage_class":
            spec = str(o.value())
    return stages.schema_for(spec or stages.stage_class_of(stage))


def config_groups() -> Dict[str, List[str]]:
    """Config group -> its options (`conf/<group>/<option>.yaml`), sorted."""
    return {d.name: sorted(p.stem for p in d.glob("*.yaml"))
            for d in sorted(CONF_DIR.iterdir()) if d.is_dir() and any(d.glob("*.yaml"))}


def default_stage() -> str:
    """The stage conf/config.yaml's defaults list picks (what `megatron_ext.train` runs without stage=)."""
    return _default_groups().get("stage", "pretrain")


@lru_cache(maxsize=None)
def _default_groups() -> Dict[str, str]:
    """Groups that conf/config.yaml's defaults list already chooses -> the default option."""
    out = {}
    for entry in OmegaConf.load(CONF_DIR / "config.yaml").get("defaults", []):
        if isinstance(entry, dict) or OmegaConf.is_dict(entry):
            for group, option in dict(entry).items():
                out[str(group)] = str(option)
    return out


# ---------------------------------------------------------------- the schema


@lru_cache(maxsize=None)
def _hints(cls) -> Dict[str, object]:
    return typing.get_type_hints(cls)


def _is_dataclass_type(t) -> bool:
    return isinstance(t, type) and dataclasses.is_dataclass(t)


def _is_list_type(t) -> bool:
    origin = typing.get_origin(t)
    if origin is typing.Union:  # Optional[List[...]]
        return any(_is_list_type(a) for a in typing.get_args(t) if a is not type(None))
    return origin in (list, List)


def field_names(cls) -> List[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _resolve(parts: Sequence[str], schema: type = Config) -> Tuple[int, object]:
    """Walk `parts` down the schema: (how many parts resolved, the type reached)."""
    node: object = schema
    for i, part in enumerate(parts):
        if not _is_dataclass_type(node) or part not in field_names(node):
            return i, node
        node = _hints(node)[part]
    return len(parts), node


def is_schema_key(key: str, schema: type = Config) -> bool:
    return _resolve(key.split("."), schema)[0] == len(key.split("."))


@lru_cache(maxsize=None)
def _leaf_paths(schema: type = Config) -> Tuple[str, ...]:
    out = []

    def walk(cls, prefix):
        for name in field_names(cls):
            t = _hints(cls)[name]
            if _is_dataclass_type(t):
                walk(t, f"{prefix}{name}.")
            else:
                out.append(f"{prefix}{name}")

    walk(schema, "")
    return tuple(out)


# Keys that moved into a stage's own section: old key -> new key (for the error message).
MOVED_KEYS = {
    "posttrain.sft_packing": "sft.packing",
    "posttrain.dpo_loss": "dpo.loss", "posttrain.beta": "dpo.beta", "posttrain.simpo_gamma": "dpo.simpo_gamma",
    **{f"posttrain.{k}": f"grpo.{k}" for k in ("group_size", "max_new_tokens", "temperature", "clip_eps",
                                                 "kl_coef", "scale_rewards")},
    **{f"data.{k}": f"cpt.{k}" for k in ("mixture_steps", "mixture_weights", "document_mask")},
}


def suggest(key: str, limit: int = 3, schema: type = Config) -> List[str]:
    """Schema keys close to an unknown `key`: the same last name in another section
    (`lr` -> `train.lr`, `train.tp` -> `parallel.tp`), then names close to it among the fields
    of the section it names (difflib over the dataclass field names), then close last names
    in any section."""
    parts = key.split(".")
    last = parts[-1]
    by_leaf: Dict[str, List[str]] = {}
    for path in _leaf_paths(schema):
        by_leaf.setdefault(path.rsplit(".", 1)[-1], []).append(path)
    found = list(by_leaf.get(last, []))
    depth, node = _resolve(parts, schema)
    if _is_dataclass_type(node):
        prefix = parts[:depth]
        for name in difflib.get_close_matches(parts[depth], field_names(node), n=limit, cutoff=0.6):
            candidate = ".".join([*prefix, name, *parts[depth + 1:]])
            found.append(candidate if is_schema_key(candidate, schema) else ".".join([*prefix, name]))
    if not found:
        for name in difflib.get_close_matches(last, list(by_leaf), n=limit, cutoff=0.75):
            found += by_leaf[name]
    return [k for k in dict.fromkeys(found) if k != key][:limit]


def _unknown_key(key: str, text: str, schema: type) -> str:
    """Why `key` (set by the override `text`) is not in this job's schema, with the nearest keys."""
    if key in MOVED_KEYS:
        return f"unknown config key {key} in {text!r}: it is now {MOVED_KEYS[key]} (the stage's own section)"
    section = key.split(".", 1)[0]
    if "." in key and section in stages.names() and not is_schema_key(section, schema):
        return f"unknown config key {key} in {text!r}: {section}.* is the section of stage={section}, " \
               "which this job does not run"
    near = suggest(key, schema=schema)
    hint = f"; did you mean {', '.join(near[:-1]) + ' or ' if len(near) > 1 else ''}{near[-1]}?" if near else ""
    return f"unknown config key {key} in {text!r}{hint}"


def check_overrides(overrides: Sequence[str], schema: type = Config) -> None:
    """Every override must set a key of the schema (megatron_ext/config.py, plus the stage's own
    section) or pick a config group option; raise ConfigError naming each one that does not,
    with a did-you-mean.

    Hydra's `+key=value` adds a key to a config; the schema is closed, so here it is an
    error like any unknown key (Hydra would otherwise let it through and nothing reads it).
    `++key=value` sets an existing key. `+group=option` is refused for groups the defaults
    list already picks (use `group=option`); other groups are left to Hydra.
    """
    parser = OverridesParser.create()
    groups = config_groups()
    errors = []
    for raw in overrides:
        text = str(raw)
        if text.startswith("-"):
            errors.append(f"{text!r} is a flag, not a key=value override; flags go before the overrides "
                          "and --help lists them")
            continue
        try:
            (parsed,) = parser.parse_overrides([text])
        except HydraException as e:
            errors.append(f"cannot parse override {text!r}: {str(e).splitlines()[0]} "
                          "(the form is key=value, e.g. train.steps=100)")
            continue
        key = parsed.key_or_group
        if key in groups and parsed.package is None:
            if parsed.is_add() and key in _default_groups():
                errors.append(f"{text!r}: the config group {key} is already chosen by conf/config.yaml "
                              f"(default {_default_groups()[key]}); pick another with "
                              f"{key}={parsed.value()} (no +)")
            continue  # group options are Hydra's (an unknown option lists the available ones)
        if key.startswith("hydra.") or key == "hydra":
            errors.append(f"{text!r}: Hydra's own settings are not used by this project's entry points")
            continue
        if parsed.package is not None:
            errors.append(f"{text!r}: key@package is only for config groups ({', '.join(groups)})")
            continue
        depth, node = _resolve(key.split("."), schema)
        if depth == len(key.split(".")) - 1 and _is_list_type(node) and key.rsplit(".", 1)[1].isdigit():
            errors.append(f"{text!r}: set the whole list, e.g. {key.rsplit('.', 1)[0]}=[...]")
        elif not is_schema_key(key, schema):
            errors.append(f"{_unknown_key(key, text, schema)} "
                          "(every key: --print-config; the schema: megatron_ext/config.py and the stage's class"
                          + ("; a + does not add keys to it" if parsed.is_add() else "") + ")")
        elif parsed.is_add():
            errors.append(f"{text!r}: {key} already exists; set it with {text[1:]} (no +)")
    if errors:
        raise ConfigError("bad override(s):\n  - " + "\n  - ".join(errors))


# ---------------------------------------------------------------- flags


def split_flags(argv: Sequence[str]) -> tuple[List[str], List[str]]:
    """Separate flags (`-h`, `--help`, `--print-config`, anything starting with `-`) from
    Hydra `key=value` overrides (`~key` deletions included)."""
    flags = [a for a in argv if a.startswith("-")]
    return flags, [a for a in argv if not a.startswith("-")]


def parse_tool_args(parser, argv: Sequence[str]) -> tuple:
    """`(options, overrides)` for a tool that takes flags plus `key=value` config overrides:
    `parser`'s options, and the overrides among `argv`; anything else is a usage error naming it."""
    args, rest = parser.parse_known_args(list(argv))
    bad = [a for a in rest if a.startswith("-") or "=" not in a]
    if bad:
        parser.error(f"unrecognised argument(s) {bad}; pass config changes as key=value overrides")
    return args, rest


def override_key(override: str) -> str:
    """The key a Hydra override sets: `train.lr` for `train.lr=1`, `+train.lr=1` and `~train.lr`."""
    return override.split("=", 1)[0].lstrip("+~")


def override_value(overrides: Sequence[str], key: str) -> Optional[str]:
    """The value the last `key=value` override of `key` gives (as written), or None."""
    found = None
    for o in overrides:
        if "=" in o and override_key(o) == key:
            found = o.split("=", 1)[1]
    return found


def with_override(base: Sequence[str], overrides: Sequence[str]) -> List[str]:
    """`base` overrides unless `overrides` set the same key, then `overrides` (the later wins)."""
    given = {override_key(o) for o in overrides}
    return [o for o in base if override_key(o) not in given] + list(overrides)


def config_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def fail(message: str, code: int = 2) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


# ---------------------------------------------------------------- help


@lru_cache(maxsize=None)
def field_docs(cls) -> Dict[str, str]:
    """The docstring under each field of a config dataclass (its attribute docstring)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) \
                and isinstance(after, ast.Expr) and isinstance(getattr(after, "value", None), ast.Constant) \
                and isinstance(after.value.value, str):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def key_doc(key: str, schema: type = Config) -> str:
    section, _, name = key.rpartition(".")
    depth, cls = _resolve(section.split("."), schema) if section else (0, schema)
    return field_docs(cls).get(name, "") if _is_dataclass_type(cls) else ""


def _first_sentence(text: str) -> str:
    """Up to the first full stop that ends a sentence (not `e.g.`, `i.e.`, `Dr.`)."""
    return re.split(r"(?<!e\.g)(?<!i\.e)(?<!Dr)\.(?:\s+|$)", " ".join(text.split()), maxsplit=1)[0]


def yaml_comment(path: Path) -> str:
    """The leading comment block of a conf/ YAML file (its description), without the `#`s."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        if not line.startswith("# @package"):
            lines.append(line[2:] if line.startswith("# ") else line[1:])
    return "\n".join(lines)


# The keys most runs change, in the order the help lists them.
COMMON_KEYS = (
    "train.steps", "train.global_batch_size", "train.micro_batch_size", "train.lr", "train.min_lr",
    "train.warmup_steps", "train.lr_schedule", "train.seed", "train.eval_interval",
    "data.seq_length", "data.paths", "data.weights",
    "parallel.tp", "parallel.pp", "parallel.cp", "parallel.ep", "parallel.sp", "parallel.distributed_optimizer",
    "checkpoint.dir", "checkpoint.save_interval", "checkpoint.load", "checkpoint.weights_only",
    "checkpoint.override_schedule",
    "logger.tensorboard_dir", "logger.wandb",
)
def _value_text(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ",".join(_value_text(v) for v in value) + "]"
    return str(value)


def _get(cfg, key: str):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _wrap_list(names: Sequence[str], default: Optional[str], indent: int, width: int = 100) -> List[str]:
    items = [f"{n} (default)" if n == default else n for n in names]
    lines = textwrap.wrap(" | ".join(items), width=width - indent, break_on_hyphens=False)
    return [" " * indent + line for line in lines]


def groups_help(cfg: Optional[Config], stages: Optional[Sequence[str]] = None) -> List[str]:
    """The config groups with their options (the default marked), one line per stage option."""
    defaults = _default_groups()
    chosen = {"model": cfg.model.name, "precision": cfg.precision.name, "stage": cfg.stage} if cfg else {}
    lines = ["Config groups (pick an option with group=option; conf/<group>/<option>.yaml):"]
    for group, options in config_groups().items():
        current = chosen.get(group, defaults.get(group))
        if group == "stage":
            shown = [s for s in options if stages is None or s in stages]
            lines.append(f"  {group}:")
            for s in shown:
                about = _first_sentence(yaml_comment(CONF_DIR / group / f"{s}.yaml"))
                about = re.sub(r"\s*\(python -m [^)]*\)", "", about).split(": ")[0]
                mark = " (default)" if s == current else ""
                lines += textwrap.wrap(f"{s}{mark}: {about}", width=96, initial_indent="    ",
                                       subsequent_indent="      ")
            continue
        lines.append(f"  {group}:")
        lines += _wrap_list(options, current, 4)
    return lines


def keys_help(cfg: Config, keys: Sequence[str], width: int = 100) -> List[str]:
    """One row per key: `key=value` (this entry's value) and the first sentence of its docstring."""
    rows = [(f"{k}={_value_text(_get(cfg, k))}", _first_sentence(key_doc(k, type(cfg)))) for k in keys]
    left = max(len(r[0]) for r in rows) + 4
    lines = []
    for setting, doc in rows:
        wrapped = textwrap.wrap(doc, width=max(width - left, 30)) or [""]
        lines.append(f"  {setting:<{left - 2}}{wrapped[0]}".rstrip())
        lines += [" " * left + more for more in wrapped[1:]]
    return lines


OVERRIDES_HELP = """\
Overrides (Hydra syntax, any number):
  key=value           set a key: train.steps=100 checkpoint.dir=runs/ckpt 'data.paths=[a,b]'
  group=option        pick a config group option: model=qwen3_8b precision=bf16
  ++key=value         the same as key=value
  A key that is not in the schema (megatron_ext/config.py) is an error, with or without +,
  and the message suggests the nearest keys.
Resuming (checkpoint.load): a changed train.steps, lr, min_lr, warmup_steps, lr_schedule,
  wsd_decay_steps or weight_decay is refused unless checkpoint.override_schedule=true, which
  applies the new schedule from the resumed step."""


def config_help(cfg: Config, stages: Optional[Sequence[str]] = None,
                keys_title: str = "Most used keys, with this entry's defaults (--print-config lists every key):") -> str:
    """The config part of any entry's help: config groups (stage options limited to `stages`),
    the most used keys with their values in `cfg` (plus the keys of `stages`), override rules.
    Entries with their own argparse flags can put it in their epilog."""
    lines = groups_help(cfg, stages) + ["", keys_title]
    lines += keys_help(cfg, COMMON_KEYS)
    extra = list(dict.fromkeys(k for s in (stages or ()) for k in stage_info(s).help_keys if k not in COMMON_KEYS))
    own = [f.name for f in dataclasses.fields(type(cfg)) if f.name not in field_names(Config)]
    extra += [f"{section}.{name}" for section in own for name in field_names(_hints(type(cfg))[section])]
    if extra:
        lines.append(f"Keys of this stage ({', '.join(stages)}):")
        lines += keys_help(cfg, extra)
    return "\n".join(lines + ["", OVERRIDES_HELP])


def help_text(prog: str, description: str, cfg: Config, stages: Optional[Sequence[str]] = None,
              note: Optional[str] = None) -> str:
    """`--help` of a training entry: what it does, config groups, the most used keys with the
    defaults of this entry (cfg composed with its stage), overrides, flags, exit codes."""
    lines = [f"usage: {prog} [-h] [--print-config] [key=value ...]", "", description.strip(), "",
             config_help(cfg, stages), "",
             "Flags:",
             "  -h, --help          show this help and exit",
             "  --print-config      print the composed, validated config (every key) as YAML and exit",
             "",
             "Exit codes: 0 done, 1 checkpoint or non-finite loss error, 2 bad config or flag,",
             "  75 saved after a preemption signal (requeue)."]
    if note:
        lines += ["", note]
    return "\n".join(lines) + "\n"
