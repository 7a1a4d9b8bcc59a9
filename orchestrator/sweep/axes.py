"""Axes of a sweep: which overrides are axes, their cartesian product, and run names (pure functions).

Hydra multirun's convention: ``key=a,b,c`` is an axis with three values; a comma inside brackets, braces or
quotes does not split, so ``optim.betas=[0.9,0.99]`` is one (list) value and ``optim.betas=[0.9,0.99],[0.9,0.999]``
an axis of two lists.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from typing import Any

from orchestrator.errors import UserError

_OPEN = {"[": "]", "{": "}", "(": ")"}
# String values that say nothing on their own in a run name: they get their key's last part as a prefix.
_GENERIC = {"none", "null", "auto", "default", "true", "false", "on", "off", "yes", "no", ""}
_UNSAFE = re.compile(r"[^A-Za-z0-9_.+-]")


@dataclass(frozen=True)
class Axis:
    key: str
    values: tuple[str, ...]  # as written on the command line, one per run


def split_values(text: str) -> list[str]:
    """``"a,[1,2],'x,y'"`` -> ``["a", "[1,2]", "'x,y'"]``: split on commas outside brackets and quotes."""
    parts, cur, stack, quote = [], [], [], ""
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in _OPEN:
            stack.append(_OPEN[ch])
        elif stack and ch == stack[-1]:
            stack.pop()
        elif ch == "," and not stack:
            parts.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    parts.append("".join(cur))
    return parts


def parse_overrides(overrides: list[str]) -> tuple[list[str], list[Axis]]:
    """Split a sweep's overrides into the fixed ones (every run gets them) and the axes, in command-line order."""
    fixed: list[str] = []
    axes: list[Axis] = []
    seen: dict[str, str] = {}
    for o in overrides:
        key, eq, value = o.partition("=")
        key = key.strip()
        if not eq or not key:
            raise UserError(f"override '{o}' is not of the form key=value or key=a,b,c (an axis)")
        if "\t" in o or "\n" in o:
            raise UserError(f"override {o!r} contains a tab or newline; sweep overrides are single-line values")
        if key in seen:
            raise UserError(f"'{key}' is given twice ('{seen[key]}' and '{o}'); give it once (key=a,b,c for an axis)")
        seen[key] = o
        values = split_values(value)
        if len(values) == 1:
            fixed.append(o)
            continue
        empty = [i for i, v in enumerate(values) if not v.strip()]
        if empty:
            raise UserError(f"axis '{o}' has an empty value (position {empty[0] + 1}); write key=a,b,c")
        dup = next((v for i, v in enumerate(values) if v in values[:i]), None)
        if dup is not None:
            raise UserError(f"axis '{o}' lists '{dup}' twice; each value makes one run")
        axes.append(Axis(key, tuple(values)))
    return fixed, axes


def expand(axes: list[Axis]) -> list[list[tuple[str, str]]]:
    """The cartesian product, first axis slowest: one ``[(key, value), ...]`` per run."""
    keys = [a.key for a in axes]
    return [list(zip(keys, combo, strict=True)) for combo in itertools.product(*[a.values for a in axes])]


def _leaf(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def _get(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = cfg.get(part) if isinstance(cfg, dict) else getattr(cfg, part)
    return cfg


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def short_value(key: str, cfg: Any, axis_keys: set[str] | frozenset[str] = frozenset()) -> str:
    """The short form of the resolved value of ``key`` in ``cfg`` for a run name: ``T4``, ``lr0.1``,
    ``sew_add``, ``checkpointing_none``, ``no_hflip``; ``model.connection=da`` names its DA variant
    (``da_membrane_network``) unless the DA settings are axes of their own."""
    value = _get(cfg, key)
    leaf = _leaf(key)
    if key == "model.connection" and value == "da" and not axis_keys & {"model.da.domain", "model.da.span"}:
        da = cfg.model.da
        text = f"da_{da.domain}_{da.span}" + ("_fixed" if da.weights == "fixed" else "")
    elif isinstance(value, bool):
        text = leaf if value else f"no_{leaf}"
    elif isinstance(value, (int, float)):
        text = f"{leaf}{value}"
    elif isinstance(value, (list, tuple)):
        text = leaf + "_".join(str(v) for v in value)
    elif value is None:
        text = f"{leaf}_none"
    elif isinstance(value, str) and (value.lower() in _GENERIC or _looks_numeric(value)):
        text = f"{leaf}_{value}"
    else:
        text = str(value)
    return _UNSAFE.sub("_", text)


def run_name(cfg: Any, combo: list[tuple[str, str]]) -> str:
    """``<model name>-<short axis value>-...``: the model first, then each axis (model.name itself is the first
    part already)."""
    keys = {k for k, _ in combo}
    parts = [_UNSAFE.sub("_", str(cfg.model.name))]
    parts += [short_value(k, cfg, keys) for k, _ in combo if k != "model.name"]
    return "-".join(parts)


def unique_names(names: list[str]) -> list[str]:
    """Disambiguate names two runs would share: the second gets ``-2``, the third ``-3`` (stable in order)."""
    out: list[str] = []
    taken = set(names)
    count: dict[str, int] = {}
    for n in names:
        count[n] = count.get(n, 0) + 1
        if count[n] == 1:
            out.append(n)
            continue
        i = count[n]
        while f"{n}-{i}" in taken:
            i += 1
        taken.add(f"{n}-{i}")
        out.append(f"{n}-{i}")
    return out
