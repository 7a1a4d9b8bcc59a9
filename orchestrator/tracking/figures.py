"""Figures of runs, drawn from what the MLflow store holds (matplotlib's Agg canvas, PNG).

* ``run_figures(client, run_id, out_dir)``: one run's ``curves.png`` (train loss, learning rate, train and val
  top-1 against step) and ``firing_rate.png`` (the last measured firing rate of every spiking layer, coloured by
  stage; ``models/telemetry.py``). The tracker draws them when a run ends and logs them under ``figures/``.
* ``comparison_figures(tracking_uri, run_ids, out_dir)``: across runs. When the runs differ only in architecture
  (``model.name``, ``model.connection``, ``model.da.*``) and cover at least two depths: ``val_top1_vs_depth.png``,
  final val top-1 against depth with one line per residual connection (the DANet paper's central comparison);
  otherwise ``val_top1_by_param.png``, a bar chart per varying param. Always ``val_top1_curves.png``, the runs'
  val top-1 curves overlaid. ``orchestrator sweep`` logs them on its parent run; ``orchestrator runs compare
  --out DIR`` writes them.

Only the object-oriented API is used (``Figure`` + ``FigureCanvasAgg``): no pyplot state, no GUI backend, safe in
the tracker's thread.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Any

CURVE_PANELS = (  # (title, y label, metric keys drawn in the panel)
    ("train loss", "loss", ("loss",)),
    ("learning rate", "lr", ("lr",)),
    ("top-1 accuracy", "top-1", ("train_top1", "val_top1", "ema_val_top1")),
)
LAYER_PREFIX = "telemetry/firing_rate/layer/"
VAL_TOP1 = "val_top1"
ARCH_PARAMS = ("model.name", "model.connection", "model.da.domain", "model.da.span", "model.da.weights")
# params that say where or how a run was tracked or launched, not what was trained: never "the difference"
IGNORED_PREFIXES = ("tracking.", "launch.", "derived.", "data.root")
CONNECTION_LABELS = {"spiking": "plain spiking", "sew_add": "SEW (ADD)", "sew_iand": "SEW (IAND)",
                     "membrane": "membrane shortcut", "da": "DA"}
MAX_BAR_PARAMS = 6
DPI = 110


def _natural(key: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


def _stage(layer: str) -> str:
    m = re.match(r"stages\.(\d+)\.", layer)
    if m:
        return f"stage{int(m.group(1)) + 1}"
    return "head" if layer.startswith(("head", "fc")) else "stem"


def _short_layer(name: str) -> str:
    """``stages.0.branches.1.neurons.0`` -> ``s0.b1.n0``: a tick label (the stage is also its colour)."""
    return re.sub(r"([A-Za-z_]+)\.(\d+)", lambda m: m.group(1)[0] + m.group(2), name)


def _canvas(width: float, height: float, **margins: float):
    """A figure with fixed margins (in inches where given as ``*_in``): a layout engine would draw every
    figure twice, which is most of the cost on a loaded node."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    left, right = margins.get("left_in", 0.75), margins.get("right_in", 0.2)
    bottom, top = margins.get("bottom_in", 0.55), margins.get("top_in", 0.5)
    fig.subplots_adjust(left=left / width, right=1 - right / width, bottom=bottom / height, top=1 - top / height,
                        wspace=margins.get("wspace", 0.35))
    return fig


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png")
    tmp.replace(path)
    return path


def history(client, run_id: str, key: str) -> tuple[list[int], list[float]]:
    """A metric's (steps, values) in step order; a step logged twice keeps its last value."""
    by_step: dict[int, tuple[int, float]] = {}
    for m in client.get_metric_history(run_id, key):
        if m.step not in by_step or m.timestamp >= by_step[m.step][0]:
            by_step[m.step] = (m.timestamp, m.value)
    steps = sorted(by_step)
    return steps, [by_step[s][1] for s in steps]


def run_figures(client, run_id: str, out_dir: Path) -> list[Path]:
    """Draw one run's figures into ``out_dir``; returns the PNGs written (none when it logged nothing to draw)."""
    run = client.get_run(run_id)
    metrics = run.data.metrics
    title = run.info.run_name or run_id
    out_dir = Path(out_dir)
    written = []
    panels = [(t, y, [k for k in keys if k in metrics]) for t, y, keys in CURVE_PANELS]
    panels = [p for p in panels if p[2]]
    if panels:
        fig = _canvas(4.2 * len(panels), 3.4, top_in=0.65)
        axes = fig.subplots(1, len(panels), squeeze=False)[0]
        for ax, (name, ylabel, keys) in zip(axes, panels, strict=True):
            for key in keys:
                steps, values = history(client, run_id, key)
                ax.plot(steps, values, marker="o" if len(steps) <= 20 else None, markersize=3, label=key)
            ax.set_title(name)
            ax.set_xlabel("step")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            if len(keys) > 1:
                ax.legend(fontsize=8)
        fig.suptitle(title)
        written.append(_save(fig, out_dir / "curves.png"))
    layers = sorted((k for k in metrics if k.startswith(LAYER_PREFIX)), key=_natural)
    if layers:
        names = [k[len(LAYER_PREFIX):] for k in layers]
        stages = [_stage(n) for n in names]
        order = list(dict.fromkeys(stages))
        colors = {s: f"C{i}" for i, s in enumerate(order)}
        labelled = len(layers) <= 40
        fig = _canvas(max(6.0, min(0.22 * len(layers), 18.0)), 4.2, bottom_in=1.0 if labelled else 0.55,
                      top_in=0.75)
        ax = fig.subplots()
        xs = list(range(len(layers)))
        rates = [metrics[k] for k in layers]
        ax.bar(xs, rates, color=[colors[s] for s in stages])
        from matplotlib.patches import Patch

        handles = [Patch(color=colors[s], label=s) for s in order]
        mean = metrics.get("telemetry/firing_rate/mean")
        if mean is not None:
            handles.append(ax.axhline(mean, color="k", linestyle="--", linewidth=1, label=f"mean {mean:.3f}"))
        if labelled:
            ax.set_xticks(xs, [_short_layer(n) for n in names], rotation=90, fontsize=7)
        else:
            ax.set_xlabel("spiking layer (network order)")
        ax.set_ylim(0, max(rates + [mean or 0.0]) * 1.1 or 1.0)
        ax.set_ylabel("spikes per neuron per step")
        fig.suptitle(f"{title}: firing rate per layer", y=0.99)
        ax.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, 1.07), fontsize=8,
                  ncols=min(len(handles), 6), frameon=False)
        ax.grid(axis="y", alpha=0.3)
        written.append(_save(fig, out_dir / "firing_rate.png"))
    return written


# ------------------------------------------------------------------------------------------------ comparison


def architecture(params: dict[str, str]) -> tuple[int | None, str]:
    """(depth, connection label) of a run from its params: the depth from the model registry, the connection
    from ``model.connection`` (``default`` = the family's own) and, for DA, ``model.da.*``."""
    name = params.get("model.name", "")
    family, depth = None, None
    try:
        from models.resnet import FAMILIES, REGISTRY

        if name in REGISTRY:
            family, depth = REGISTRY[name]
            family_conn = FAMILIES[family].value
        else:
            family_conn = None
    except ImportError:  # models needs torch; the name still carries the depth
        family_conn = None
    if depth is None:
        m = re.fullmatch(r"([a-z_]+?)(\d+)", name)
        depth = int(m.group(2)) if m else None
    conn = params.get("model.connection", "default")
    if conn in ("", "default"):
        conn = family_conn or (name.rstrip("0123456789") or "default")
    label = CONNECTION_LABELS.get(conn, conn)
    if conn == "da":
        label = f"DA ({params.get('model.da.domain', 'membrane')}, {params.get('model.da.span', 'network')}"
        label += ", fixed)" if params.get("model.da.weights") == "fixed" else ")"
    return depth, label


def varying_params(param_sets: list[dict[str, str]]) -> list[str]:
    """Params whose value differs between the runs (tracking/launch/derived ones left out), sorted."""
    keys = {k for p in param_sets for k in p}
    return sorted(k for k in keys if not k.startswith(IGNORED_PREFIXES)
                  and len({p.get(k) for p in param_sets}) > 1)


def _final(run) -> float | None:
    v = run.data.metrics.get(VAL_TOP1)
    return None if v is None else float(v)


def _label(run) -> str:
    return run.info.run_name or run.info.run_id[:8]


def comparison_figures(tracking_uri: str, run_ids: list[str], out_dir: Path) -> list[Path]:
    """Write the comparison PNGs of ``run_ids`` into ``out_dir``; return their paths (see the module docstring).
    Runs without a val top-1 are left out of the plots; an unknown run id is a UserError."""
    from mlflow.tracking import MlflowClient

    from . import util

    util.apply_http_env()
    client = MlflowClient(tracking_uri=tracking_uri)
    runs = []
    for rid in run_ids:
        try:
            runs.append(client.get_run(rid))
        except Exception as exc:  # noqa: BLE001
            if not (util.is_not_found(exc) or util.is_permanent(exc)):
                raise
            from orchestrator.errors import UserError

            raise UserError(f"no run {rid!r} at {tracking_uri} (see `orchestrator runs list`)") from None
    out_dir = Path(out_dir)
    params = [util.effective_params(r.data.params) for r in runs]
    written = []
    scored = [(r, p) for r, p in zip(runs, params, strict=True) if _final(r) is not None]
    differ = varying_params([p for _, p in scored])
    archs = [architecture(p) for _, p in scored]
    depths = {d for d, _ in archs if d is not None}
    if scored and differ and set(differ) <= set(ARCH_PARAMS) and len(depths) > 1:
        written.append(_depth_figure(scored, archs, out_dir / "val_top1_vs_depth.png"))
    elif scored:
        written.append(_bar_figure(scored, differ, out_dir / "val_top1_by_param.png"))
    curves = _curves_figure(client, runs, out_dir / "val_top1_curves.png")
    if curves is not None:
        written.append(curves)
    return written


def _depth_figure(scored: list, archs: list[tuple[int | None, str]], path: Path) -> Path:
    lines: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for (run, _), (depth, conn) in zip(scored, archs, strict=True):
        if depth is not None:
            lines[conn][depth].append(_final(run))
    fig = _canvas(6.4, 4.4)
    ax = fig.subplots()
    for i, (conn, by_depth) in enumerate(sorted(lines.items())):
        ds = sorted(by_depth)
        means = [sum(by_depth[d]) / len(by_depth[d]) for d in ds]
        ax.plot(ds, means, marker="o", color=f"C{i}", label=conn)
        for d in ds:  # every run, where a depth has several (seeds)
            if len(by_depth[d]) > 1:
                ax.scatter([d] * len(by_depth[d]), by_depth[d], color=f"C{i}", s=10, alpha=0.5)
    all_depths = sorted({d for by in lines.values() for d in by})
    ax.set_xticks(all_depths, [str(d) for d in all_depths])
    ax.set_xlabel("depth")
    ax.set_ylabel("final val top-1")
    ax.set_title("val top-1 against depth, per residual connection")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _bar_figure(scored: list, differ: list[str], path: Path) -> Path:
    """One panel per varying param (mean final val top-1 per value, each run a dot); by run when none varies."""
    panels: list[tuple[str, dict[str, list[float]]]] = []
    for key in differ[:MAX_BAR_PARAMS]:
        by_value: dict[str, list[float]] = defaultdict(list)
        for run, p in scored:
            by_value[str(p.get(key, "-"))].append(_final(run))
        panels.append((key, by_value))
    if not panels:
        panels = [("run", {_label(r): [_final(r)] for r, _ in scored})]
    fig = _canvas(max(4.0, 3.6 * len(panels)), 4.0, bottom_in=1.0, top_in=0.7)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (key, by_value) in zip(axes, panels, strict=True):
        values = sorted(by_value, key=_natural)
        xs = list(range(len(values)))
        ax.bar(xs, [sum(by_value[v]) / len(by_value[v]) for v in values], color="C0", alpha=0.8)
        for x, v in zip(xs, values, strict=True):
            ax.scatter([x] * len(by_value[v]), by_value[v], color="k", s=8, zorder=3)
        ax.set_xticks(xs, [v if len(v) <= 18 else v[:17] + "…" for v in values], rotation=30, ha="right",
                      fontsize=8)
        ax.set_title(key)
        ax.set_ylabel("final val top-1")
        ax.set_ylim(0, 1)
        ax.grid(axis="y", alpha=0.3)
    hidden = len(differ) - len(panels) if differ else 0
    fig.suptitle("final val top-1 by varying param" + (f" ({hidden} more not shown)" if hidden > 0 else ""))
    return _save(fig, path)


def _curves_figure(client, runs: list[Any], path: Path) -> Path | None:
    fig = _canvas(7.0, 4.4)
    ax = fig.subplots()
    drawn = 0
    for i, run in enumerate(runs):
        steps, values = history(client, run.info.run_id, VAL_TOP1)
        if steps:
            ax.plot(steps, values, marker="o" if len(steps) <= 20 else None, markersize=3, color=f"C{i % 10}",
                    label=_label(run))
            drawn += 1
    if not drawn:
        return None
    ax.set_xlabel("step")
    ax.set_ylabel("val top-1")
    ax.set_title("val top-1 during training")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncols=2 if drawn > 8 else 1)
    return _save(fig, path)
