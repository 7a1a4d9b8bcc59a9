"""Load a preset or YAML file, apply dotlist overrides, validate, and return a plain ``Config``.

Nothing below the CLI sees a DictConfig: ``load_config`` returns the dataclass via ``OmegaConf.to_object``.
Every problem is reported at once, each naming its full key and what would be valid.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from importlib import resources
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from orchestrator.config.schema import CHOICES, Config
from orchestrator.errors import UserError

DEFAULT_PRESET = "digits"


def preset_names() -> list[str]:
    """Names of the presets shipped as package data."""
    folder = resources.files("orchestrator") / "presets"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _preset_text(name_or_path: str) -> tuple[str, str]:
    """Return (preset name, YAML text) for a preset name or a YAML file path."""
    path = Path(name_or_path)
    if name_or_path.endswith((".yaml", ".yml")) or path.is_file():
        if not path.is_file():
            raise UserError(f"config file not found: {name_or_path} (give a preset name: {', '.join(preset_names())})")
        return path.stem, path.read_text()
    names = preset_names()
    if name_or_path not in names:
        hint = difflib.get_close_matches(name_or_path, names, n=1)
        did = f" Did you mean '{hint[0]}'?" if hint else ""
        raise UserError(f"unknown preset '{name_or_path}'; valid presets: {', '.join(names)}.{did}")
    return name_or_path, (resources.files("orchestrator") / "presets" / f"{name_or_path}.yaml").read_text()


def _dotted_keys(node: Any, prefix: str = "") -> list[str]:
    out = []
    if hasattr(node, "__dataclass_fields__"):
        for k in node.__dataclass_fields__:
            out += _dotted_keys(getattr(node, k), f"{prefix}{k}.")
            out.append(f"{prefix}{k}")
    return out


_ALL_KEYS = _dotted_keys(Config())


def _friendly(err: OmegaConfBaseException, origin: str) -> str:
    """One line naming the full key and what is valid, from an OmegaConf error."""
    key = getattr(err, "full_key", None) or ""
    msg = str(err).splitlines()[0]
    if isinstance(err, (ConfigKeyError, ConfigAttributeError)) or "not in" in msg:
        # OmegaConf names the key relative to its parent; give the full dotted key and close matches.
        bad = key or msg
        hint = difflib.get_close_matches(bad, _ALL_KEYS, n=1, cutoff=0.6)
        did = f" Did you mean '{hint[0]}'?" if hint else ""
        parent = bad.rsplit(".", 1)[0] if "." in bad else ""
        valid = [k.rsplit(".", 1)[-1] for k in _ALL_KEYS if k.rsplit(".", 1)[0] == parent and k.count(".") == bad.count(".")] if parent else []
        valid_s = f" Valid keys under '{parent}': {', '.join(valid)}." if valid else ""
        return f"{origin}: unknown config key '{bad}'.{did}{valid_s}"
    if isinstance(err, ValidationError):
        m = re.search(r"Value '(.*?)'", msg)
        val = m.group(1) if m else "?"
        want = re.search(r"converted to (\w+)", msg)
        typ = want.group(1) if want else "the declared type"
        return f"{origin}: wrong type for '{key}': '{val}' is not a valid {typ}"
    return f"{origin}: {key + ': ' if key else ''}{msg}"


def _check_overrides(overrides: Iterable[str]) -> list[str]:
    bad = [o for o in overrides if "=" not in o or o.startswith("=")]
    if bad:
        raise UserError(f"override '{bad[0]}' is not of the form key=value (e.g. train.epochs=3 model.T=2)")
    return list(overrides)


def validate(cfg: Config) -> list[str]:
    """Every semantic problem in a config, each one line naming the key and what is valid."""
    problems = []
    for key, valid in CHOICES.items():
        obj: Any = cfg
        for part in key.split("."):
            obj = getattr(obj, part)
        if obj not in valid:
            hint = difflib.get_close_matches(str(obj), valid, n=1)
            did = f" Did you mean '{hint[0]}'?" if hint else ""
            problems.append(f"invalid value '{obj}' for '{key}'; expected one of [{', '.join(valid)}].{did}")
    positive = {
        "model.T": cfg.model.T,
        "model.num_classes": cfg.model.num_classes,
        "model.width": cfg.model.width,
        "model.input_size": cfg.model.input_size,
        "train.global_batch_size": cfg.train.global_batch_size,
        "launch.nodes": cfg.launch.nodes,
        "launch.gpus_per_node": cfg.launch.gpus_per_node,
        "launch.local_ranks": cfg.launch.local_ranks,
        "data.image_size": cfg.data.image_size,
    }
    for key, val in positive.items():
        if val <= 0:
            problems.append(f"'{key}' must be > 0, got {val}")
    for key, val in {"train.epochs": cfg.train.epochs, "train.max_steps": cfg.train.max_steps,
                     "train.micro_batch_size": cfg.train.micro_batch_size}.items():
        if val < 0:
            problems.append(f"'{key}' must be >= 0, got {val}")
    if cfg.deepspeed.zero_stage not in (0, 1, 2, 3):
        problems.append(f"invalid value '{cfg.deepspeed.zero_stage}' for 'deepspeed.zero_stage'; expected one of [0, 1, 2, 3]")
    if cfg.optim.lr <= 0:
        problems.append(f"'optim.lr' must be > 0, got {cfg.optim.lr}")
    if not 0 <= cfg.train.label_smoothing < 1:
        problems.append(f"'train.label_smoothing' must be in [0, 1), got {cfg.train.label_smoothing}")
    return problems


def load_config(name_or_path: str | None = None, overrides: Iterable[str] = ()) -> Config:
    """Schema <- preset (or YAML path) <- dotlist overrides, validated. Raises UserError on bad input."""
    name, text = _preset_text(name_or_path or DEFAULT_PRESET)
    overrides = _check_overrides(overrides)
    schema = OmegaConf.structured(Config)
    try:
        preset = OmegaConf.create(text)
    except OmegaConfBaseException as e:  # pragma: no cover - malformed YAML shipped by a user
        raise UserError(f"config '{name}': {str(e).splitlines()[0]}") from None
    try:
        merged = OmegaConf.merge(schema, preset)
    except OmegaConfBaseException as e:
        raise UserError(_friendly(e, f"config '{name}'")) from None
    if "preset" not in preset:
        merged.preset = name
    try:
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(overrides))
    except OmegaConfBaseException as e:
        raise UserError(_friendly(e, "override")) from None
    cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    problems = validate(cfg)
    if problems:
        raise UserError("; ".join(problems))
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
