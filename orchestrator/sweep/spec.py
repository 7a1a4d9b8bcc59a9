"""A sweep's runs from a config and overrides: expanded, named, and every run's config validated up front."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.config import Config, load_config
from orchestrator.errors import UserError

from .axes import Axis, expand, parse_overrides, run_name, unique_names

# Keys the sweep sets on each run itself (or that would split the runs across stores / experiments, away
# from their parent run).
RESERVED = ("tracking.run_name", "tracking.parent_run_id")
NO_AXIS = ("tracking.tracking_uri", "tracking.experiment", "tracking.artifact_location", "tracking.backend")


@dataclass
class RunSpec:
    index: int
    name: str
    overrides: list[str]  # fixed + this run's axis values, as the user wrote them
    cfg: Config = field(repr=False)


@dataclass
class SweepSpec:
    config_arg: str  # what every rank gets as --config: a preset name or an absolute YAML path
    fixed: list[str]
    axes: list[Axis]
    runs: list[RunSpec]


def config_arg(config: str | None) -> str:
    """A YAML path made absolute (the ranks may start elsewhere), else the preset name."""
    return str(Path(config).resolve()) if config and Path(config).is_file() else (config or "digits")


def build(config: str | None, overrides: list[str], world_size: Callable[[Config], int] | None = None,
          checks: Callable[[Config], list[str]] | None = None) -> SweepSpec:
    """Expand and validate. ``world_size(cfg) -> int`` gives the ranks of one run, for the batch arithmetic;
    ``checks(cfg)`` returns more problems of a run (its dataset, ...). Every problem of every run is reported at
    once (one UserError), naming the axis values of the runs that have it."""
    from orchestrator.preflight import check_batch

    fixed, axes = parse_overrides(overrides)
    for o in fixed:
        key = o.partition("=")[0].strip()
        if key in RESERVED:
            raise UserError(f"{key} is set by the sweep for each run (run names: model + axis values; the parent "
                            "run: the sweep's); drop it from the command line")
    for a in axes:
        if a.key in RESERVED or a.key in NO_AXIS:
            raise UserError(f"'{a.key}' cannot be an axis: all runs of a sweep share the MLflow store and experiment"
                            " of their parent run; run one sweep per value")
    combos = expand(axes)
    problems: list[tuple[list[tuple[str, str]], str]] = []  # (the run's axis values, message)
    runs: list[RunSpec] = []
    for i, combo in enumerate(combos):
        ovr = fixed + [f"{k}={v}" for k, v in combo]
        try:
            cfg = load_config(config, ovr)  # the schema, every choice and range, model.name in the registry
            more = check_batch(cfg, world_size(cfg)) if world_size is not None else []
            more += checks(cfg) if checks is not None else []
            if more:
                raise UserError("\n".join(more))
        except UserError as e:
            problems.append((combo, str(e)))
            continue
        runs.append(RunSpec(i, run_name(cfg, combo), ovr, cfg))
    if problems:
        raise UserError(_summarise(problems, combos))
    for r, n in zip(runs, unique_names([r.name for r in runs]), strict=True):
        r.name = n
    return SweepSpec(config_arg(config), fixed, axes, runs)


def _summarise(problems: list[tuple[list[tuple[str, str]], str]], combos: list[list[tuple[str, str]]]) -> str:
    """One line per problem, said once: bare when every run has it (a fixed override, the config), else
    prefixed by the one axis value that all runs having it share (``model.T=0``), else by each run's values."""
    where: dict[str, list[int]] = {}
    for combo, msg in problems:
        for m in msg.splitlines():
            where.setdefault(m, []).append(combos.index(combo))
    lines: list[str] = []
    for m, runs in where.items():
        if len(runs) == len(combos):
            lines.append(m)
            continue
        have = set(runs)
        value = next((f"{k}={v}" for c in combos for k, v in c
                      if {i for i, o in enumerate(combos) if (k, v) in o} == have), None)
        if value:
            lines.append(f"sweep runs with {value}: {m}")
        else:
            lines += [f"sweep run {' '.join(f'{k}={v}' for k, v in combos[i])}: {m}" for i in runs]
    return "\n".join(lines)
