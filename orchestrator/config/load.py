"""Load a preset or YAML file, apply dotlist overrides, validate, and return a plain ``Config``.

Nothing below the CLI sees a DictConfig: ``load_config`` returns the dataclass via ``OmegaConf.to_object``.
Every problem is reported at once, one line each, naming its full key (and, for a YAML file the user gave, the
file and line), the value and what would be valid: values are applied one leaf at a time so one bad key does not
hide the next, and the semantic checks (enums, ranges, the model registry) run on whatever did apply.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from dataclasses import fields, is_dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException, ValidationError

from orchestrator.config.schema import CHOICES, Config
from orchestrator.errors import UserError

DEFAULT_PRESET = "digits"


def preset_names() -> list[str]:
    """Names of the presets shipped as package data."""
    folder = resources.files("orchestrator") / "presets"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


# --- the schema's keys -------------------------------------------------------------------------------------------
def _schema_keys(cls: type, prefix: str = "") -> dict[str, str]:
    """Dotted key -> declared type (as written in schema.py); groups map to their class name."""
    out: dict[str, str] = {}
    for f in fields(cls):
        key = f"{prefix}{f.name}"
        default = f.default_factory() if callable(f.default_factory) else f.default  # type: ignore[misc]
        if is_dataclass(default):
            out[key] = type(default).__name__
            out.update(_schema_keys(type(default), f"{key}."))
        else:
            out[key] = str(f.type)
    return out


_TYPES = _schema_keys(Config)
_ALL_KEYS = list(_TYPES)
_GROUPS = {k for k, t in _TYPES.items() if t.endswith("Config")}
_DICT_FIELDS = {k for k, t in _TYPES.items() if t == "dict" or t.startswith("dict[")}


def _known(key: str) -> bool:
    return key in _TYPES or any(key.startswith(f"{d}.") for d in _DICT_FIELDS)


def _unknown_key(key: str) -> str:
    hint = difflib.get_close_matches(key, _ALL_KEYS, n=1, cutoff=0.6)
    did = f" Did you mean '{hint[0]}'?" if hint else ""
    parent = key.rsplit(".", 1)[0] if "." in key else ""
    if parent in _GROUPS:
        valid = [k.rsplit(".", 1)[-1] for k in _ALL_KEYS if k.rsplit(".", 1)[0] == parent and k.count(".") == key.count(".")]
        return f"unknown config key '{key}'.{did} Valid keys under '{parent}': {', '.join(valid)}."
    if "." not in key:
        return f"unknown config key '{key}'.{did} Valid groups: {', '.join(k for k in _ALL_KEYS if '.' not in k)}."
    return f"unknown config key '{key}'.{did}"


# --- reading the base config -------------------------------------------------------------------------------------
class _Source:
    """Where the base values come from: a shipped preset or a YAML file the user named."""

    def __init__(self, name: str, text: str, path: str | None):
        self.name, self.text, self.path = name, text, path
        self.lines: dict[str, int] = {}

    def origin(self, key: str) -> str:
        line = self.lines.get(key)
        where = self.path if self.path else f"preset {self.name}"
        return f"{where}:{line}" if line else where


def _read_source(name_or_path: str) -> _Source:
    """The preset or YAML file behind --config; UserError naming it when it cannot be found or read."""
    path = Path(name_or_path)
    names = preset_names()
    if path.is_dir() and name_or_path not in names:  # a folder named like a preset (e.g. ./digits) is no config
        raise UserError(f"--config {name_or_path} is a directory; give a YAML file or a preset name ({', '.join(names)})")
    if name_or_path.endswith((".yaml", ".yml")) or path.is_file() or "/" in name_or_path:
        if not path.exists():
            raise UserError(f"--config {name_or_path}: config file not found (give a YAML file or a preset name: "
                            f"{', '.join(names)})")
        try:
            return _Source(path.stem, path.read_text(), str(path))
        except UnicodeDecodeError:
            raise UserError(f"--config {name_or_path}: not a text (UTF-8) YAML file") from None
        except OSError as e:
            raise UserError(f"--config {name_or_path}: cannot read it ({e.strerror})") from None
    if name_or_path not in names:
        hint = difflib.get_close_matches(name_or_path, names, n=1)
        did = f" Did you mean '{hint[0]}'?" if hint else ""
        raise UserError(f"--config: unknown preset '{name_or_path}'; valid presets: {', '.join(names)} "
                        f"(or a YAML file path).{did}")
    text = (resources.files("orchestrator") / "presets" / f"{name_or_path}.yaml").read_text()
    return _Source(name_or_path, text, None)


def _line_map(node: Any, prefix: str = "", out: dict[str, int] | None = None) -> dict[str, int]:
    """Dotted key -> 1-based line of that key in a composed YAML mapping."""
    out = {} if out is None else out
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            key = f"{prefix}{k.value}"
            out.setdefault(key, k.start_mark.line + 1)
            _line_map(v, f"{key}.", out)
    return out


def _parse(src: _Source) -> dict:
    """The YAML text as a plain dict; UserError naming the file and line of a syntax error."""
    where = src.path or f"preset {src.name}"
    try:
        node = OmegaConf.create(src.text) if src.text.strip() else OmegaConf.create({})
        src.lines = _line_map(yaml.compose(src.text)) if src.text.strip() else {}
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = f":{mark.line + 1}" if mark is not None else ""
        # where YAML noticed it, and where the construct it was reading began (often the line to fix)
        ctx = f" ({e.context} at line {e.context_mark.line + 1})" if e.context and e.context_mark else ""
        raise UserError(f"{where}{line}: not valid YAML: {e.problem or e.context}{ctx}") from None
    except yaml.YAMLError as e:
        raise UserError(f"{where}: not valid YAML: {str(e).splitlines()[0]}") from None
    except OmegaConfBaseException as e:
        raise UserError(f"{where}: {str(e).splitlines()[0]}") from None
    if not isinstance(node, DictConfig):
        raise UserError(f"{where}:1: expected a mapping of config groups ({', '.join(sorted(_GROUPS))}), "
                        f"got a {type(node).__name__.replace('Config', '').lower()}")
    return OmegaConf.to_container(node, resolve=False)  # type: ignore[return-value]


def _leaves(values: dict, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, value) for every value the schema stores as one node: groups are descended into."""
    out = []
    for k, v in values.items():
        key = f"{prefix}{k}"
        if key in _GROUPS and isinstance(v, dict):
            out += _leaves(v, f"{key}.")
        else:
            out.append((key, v))
    return out


def _apply(merged: DictConfig, key: str, value: Any) -> str | None:
    """Set one leaf in place; the problem (without its origin) when the schema refuses it."""
    if not _known(key):
        return _unknown_key(key)
    if key in _GROUPS:
        first = next(k for k in _ALL_KEYS if k.startswith(f"{key}."))
        return f"'{key}' is a group of keys, not a value: set its keys (e.g. {first}=...)"
    try:
        OmegaConf.update(merged, key, value, merge=True)
    except ValidationError:
        return f"wrong type for '{key}': {value!r} is not a valid {_TYPES.get(key, 'value')}"
    except OmegaConfBaseException as e:
        return f"'{key}': {str(e).splitlines()[0]}"
    return None


def _split_override(o: str) -> tuple[str, Any] | None:
    if "=" not in o or o.startswith("="):
        return None
    key = o.split("=", 1)[0].strip()
    # the value typed as OmegaConf types dotlists (YAML), interpolations left as written
    node: Any = OmegaConf.to_container(OmegaConf.from_dotlist([o]), resolve=False)
    for part in key.split("."):
        node = node[part]
    return key, node


# --- semantic checks ---------------------------------------------------------------------------------------------
def _problems(cfg: Config) -> list[tuple[str, str]]:
    """(key, one line) for every semantic problem: enums, ranges, the model registry, cross-field rules."""
    from models import REGISTRY  # the registry create_model builds from; imports torch

    out: list[tuple[str, str]] = []

    def get(key: str) -> Any:
        obj: Any = cfg
        for part in key.split("."):
            obj = getattr(obj, part)
        return obj

    for key, valid in CHOICES.items():
        val = get(key)
        if val not in valid:
            hint = difflib.get_close_matches(str(val), valid, n=1)
            did = f" Did you mean '{hint[0]}'?" if hint else ""
            out.append((key, f"invalid value '{val}' for '{key}'; expected one of [{', '.join(valid)}].{did}"))
    if cfg.model.name not in REGISTRY:
        hint = difflib.get_close_matches(cfg.model.name, list(REGISTRY), n=1)
        did = f" Did you mean '{hint[0]}'?" if hint else ""
        out.append(("model.name", f"unknown model '{cfg.model.name}' for 'model.name'; valid names (orchestrator "
                                  f"models list): {', '.join(REGISTRY)}.{did}"))

    def check(key: str, ok: bool, want: str) -> None:
        if not ok:
            out.append((key, f"'{key}' must be {want}, got {get(key)!r}"))

    for key in ("model.T", "model.num_classes", "model.in_channels", "model.width", "model.input_size",
                "data.image_size", "data.val_resize", "data.num_threads", "data.prefetch",
                "train.global_batch_size", "train.eval_every_epochs", "train.log_every_steps",
                "optim.reference_batch_size", "tracking.buffer_size", "launch.nodes", "launch.gpus_per_node",
                "launch.local_ranks", "launch.cpus_per_task", "launch.signal_lead_s", "launch.rank_timeout_s"):
        check(key, get(key) > 0, "> 0")
    for key in ("model.memory_budget_gb", "train.epochs", "train.max_steps", "train.micro_batch_size",
                "train.grad_clip", "train.nan_skip_limit", "train.checkpoint_every_steps", "train.keep_top_k",
                "train.stall_report_s",
                "optim.weight_decay", "optim.warmup_epochs", "optim.min_lr", "data.mixup_alpha",
                "data.cutmix_alpha", "deepspeed.gradient_accumulation_steps"):
        check(key, get(key) >= 0, ">= 0")
    check("deepspeed.zero_stage", cfg.deepspeed.zero_stage in (0, 1, 2, 3), "one of [0, 1, 2, 3]")
    check("optim.lr", cfg.optim.lr > 0, "> 0")
    check("optim.step_gamma", cfg.optim.step_gamma > 0, "> 0")
    check("optim.momentum", 0 <= cfg.optim.momentum < 1, "in [0, 1)")
    check("optim.betas", len(cfg.optim.betas) == 2 and all(0 <= b < 1 for b in cfg.optim.betas),
          "two values in [0, 1)")
    check("optim.step_milestones", all(m > 0 for m in cfg.optim.step_milestones)
          and list(cfg.optim.step_milestones) == sorted(set(cfg.optim.step_milestones)),
          "increasing positive epochs")
    check("train.label_smoothing", 0 <= cfg.train.label_smoothing < 1, "in [0, 1)")
    check("train.ema_decay", 0 <= cfg.train.ema_decay < 1, "in [0, 1) (0 = off)")
    fuse = cfg.model.fuse_bn_neuron
    check("model.fuse_bn_neuron", isinstance(fuse, bool) or fuse == "auto", "true, false or auto")
    n = cfg.model.neuron
    check("model.neuron.tau", n.type not in ("lif", "plif") or n.tau > 1, "> 1 for a LIF/PLIF neuron")
    check("model.neuron.v_threshold", n.v_threshold > 0, "> 0")
    check("model.neuron.surrogate_alpha", n.surrogate_alpha > 0, "> 0")
    d = cfg.data
    check("data.rrc_scale_min", 0 < d.rrc_scale_min <= 1, "in (0, 1]")
    check("data.rrc_ratio_min", 0 < d.rrc_ratio_min <= d.rrc_ratio_max, f"in (0, data.rrc_ratio_max={d.rrc_ratio_max}]")
    check("data.val_resize", d.val_resize >= d.image_size,
          f">= data.image_size={d.image_size} (validation center-crops image_size from it)")
    channels = cfg.model.in_channels
    check("data.mean", len(d.mean) == channels, f"{channels} values (one per model.in_channels)")
    check("data.std", len(d.std) == channels and all(s > 0 for s in d.std),
          f"{channels} positive values (one per model.in_channels)")
    l = cfg.launch  # noqa: E741
    check("launch.mem", not l.mem or re.fullmatch(r"\d+[KMGT]?", str(l.mem)) is not None,
          "empty or a Slurm memory size like 64G")
    if l.time:
        from launch.slurm import parse_time  # lazily: launch.slurm imports the schema

        try:
            parse_time(l.time)
        except UserError as e:
            out.append(("launch.time", str(e)))
    return out


def validate(cfg: Config) -> list[str]:
    """Every semantic problem in a config, each one line naming the key and what is valid."""
    return [msg for _, msg in _problems(cfg)]


# --- loading -----------------------------------------------------------------------------------------------------
def resolve_config(name_or_path: str | None = None, overrides: Iterable[str] = ()) -> tuple[Config | None, list[str]]:
    """(config, problems): every problem of the preset or file, the overrides and the values, one line each.
    The config is None when there is no base to build on (an unknown preset, an unreadable or unparsable file)."""
    problems: list[str] = []
    src: _Source | None = None
    values: dict | None = None
    try:
        src = _read_source(name_or_path or DEFAULT_PRESET)
        values = _parse(src)
    except UserError as e:
        problems += e.problems
    merged = OmegaConf.structured(Config)
    set_by: dict[str, str | None] = {}  # key -> where its value came from (None: an override)
    if src is not None and values is not None:
        for key, value in _leaves(values):
            bad = _apply(merged, key, value)
            if bad:
                problems.append(f"{src.origin(key)}: {bad}")
            else:
                set_by[key] = src.origin(key) if src.path else None
        if "preset" not in values:
            merged.preset = src.name
    for o in overrides:
        kv = _split_override(o)
        if kv is None:
            problems.append(f"override '{o}' is not of the form key=value (e.g. train.epochs=3 model.T=2)")
            continue
        bad = _apply(merged, *kv)
        if bad:
            problems.append(f"override {o}: {bad}")
        else:
            set_by[kv[0]] = None
    if values is None:  # no base to validate: the override problems above are all there is to say
        return None, problems
    try:
        cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as e:  # an interpolation that does not resolve
        return None, problems + [f"{getattr(e, 'full_key', '') or 'config'}: {str(e).splitlines()[0]}"]
    for key, msg in _problems(cfg):
        where = set_by.get(key)
        problems.append(f"{where}: {msg}" if where else msg)
    return cfg, problems


def load_config(name_or_path: str | None = None, overrides: Iterable[str] = ()) -> Config:
    """Schema <- preset (or YAML path) <- dotlist overrides, validated. Raises UserError with every problem."""
    cfg, problems = resolve_config(name_or_path, overrides)
    if problems or cfg is None:
        raise UserError(*problems)
    return cfg


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML (what `config show` prints and each run saves)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Config) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def from_yaml_file(path: str | Path) -> Config:
    """Reload a resolved config a run saved (resume, Slurm restarts)."""
    merged = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(str(path)))
    return OmegaConf.to_object(merged)  # type: ignore[return-value]
