"""BENCHMARKS.md's section for one job check (issue 14): the JSON of ``tools/gpu_train_check.py`` as markdown.

    python tools/gpu_train_report.py docs/bench/gpu_train_h200.json >> BENCHMARKS.md   # then edit the prose

What each lever gave is reported as a ratio to the baseline measured in the same run (the model step as configured
before issue 14), the end-to-end rates as ratios to the preset's job, the profile as device time per group and
its share, memory per checkpointing policy against ``orchestrator plan``'s estimate, and the verdict of each
check (resumed, equivalence, the embedded default, the 200 img/s floor). Bad input (a missing file, not a job
check's JSON) is one line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_train_check import DIAGNOSTIC, REQUIRED, VARIANTS  # noqa: E402

FLOOR, GOAL = 200.0, 400.0  # the issue's end-to-end floor and goal, img/s (danet152, T=4, 224 px, bf16)


def _f(v, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec) if isinstance(v, (int, float)) else str(v)


def _x(v, ref) -> str:
    """``v`` as a ratio to ``ref`` ('1.23x'), '-' where either is missing."""
    return f"{v / ref:.2f}x" if isinstance(v, (int, float)) and isinstance(ref, (int, float)) and ref else "-"


def _verdicts(r: dict) -> list[str]:
    d, t = r.get("default_launch") or {}, r.get("direct_train") or {}
    e2e = r.get("end_to_end_img_per_s")
    floor = ("not measured" if e2e is None else f"{e2e:.1f} img/s: meets the floor" if e2e >= FLOOR
             else f"{e2e:.1f} img/s: BELOW the floor")  # fmt: skip
    return [
        f"- The job (`danet152_imagenet`, interrupted with SIGINT and relaunched): status {r['job_status']}, resumed "
        f"{r['resumed']}, final weights equal to an uninterrupted run's: {r.get('weights_equal_uninterrupted')}, "
        f"losses equal: {r.get('losses_equal_uninterrupted')}.",
        f"- `orchestrator launch` with no arguments: {d.get('status')}, {d.get('world_size')} rank(s) (expected "
        f"{d.get('expected_world_size')}), val top-1 {_f(d.get('val_top1'), '.3f')}, {_f(d.get('wall_s'))} s; "
        f"`orchestrator train` by hand: {t.get('status')}, {t.get('world_size')} rank(s), {_f(t.get('wall_s'))} s.",
        f"- End to end at the preset's micro-batch, against the issue's floor of {FLOOR:.0f} img/s (goal "
        f"{GOAL:.0f}): {floor} ({_x(e2e, r.get('baseline_img_per_s'))} the model step alone as configured before).",
    ]


def _rates(r: dict) -> list[str]:
    base, e2e = r.get("baseline_img_per_s"), r.get("end_to_end_img_per_s")
    eq = r.get("equivalence") or {}
    rows = ["| what | micro-batch | img/s | vs baseline | gradients vs baseline (fp32) |", "|---|---|---|---|---|"]
    for name, v in (r.get("model_step_variants") or {}).items():
        kw = VARIANTS.get(name, {})
        mb = r["micro_batch"] * kw.get("batch_factor", 1)
        check = eq.get(name)
        said = ("the baseline" if name == "baseline" else "diagnostic (not a step the job runs)" if name in DIAGNOSTIC
                else "not checked: the same computation" if check is None and not set(kw) - {"benchmark", "batch_factor"}
                else "not checked" if check is None else
                f"{'equal' if check.get('equal') else 'DIFFER' if check.get('equal') is False else '?'}"
                + (f" (\\|dg\\|/\\|g\\| {check['grad_rel_l2']:.1g})" if "grad_rel_l2" in check else ""))  # fmt: skip
        rows.append(f"| model step: {name} | {mb} | {_f(v.get('img_per_s'))} | {_x(v.get('img_per_s'), base)} | "
                    f"{said} |")  # fmt: skip
    rows.append(f"| **the real job, end to end** (steady state) | {r['micro_batch']} | **{_f(e2e)}** | "
                f"{_x(e2e, base)} | - |")  # fmt: skip
    preset = {"fusions": "off", "micro-batch": str(r["micro_batch"]), "train.precision": r["precision"]}
    for label, by in (("fusions", r.get("end_to_end_by_fusion")), ("micro-batch", r.get("end_to_end_by_micro_batch")),
                      ("train.precision", r.get("end_to_end_by_precision"))):  # fmt: skip
        for k, v in (by or {}).items():
            if k == preset[label]:
                continue  # (the preset's job itself, listed above)
            mb = k if label == "micro-batch" else r["micro_batch"]
            extra = f" ({', '.join(r.get('fusion_overrides') or [])})" if label == "fusions" and k == "on" else ""
            rows.append(f"| the job, {label} {k}{extra} | {mb} | {_f(v)} | {_x(v, base)} ({_x(v, e2e)} the job) | - |")
    g = r.get("graphs") or {}
    if "speedup" in g:
        rows.append(f"| model step replayed from one CUDA graph (what launches cost) | {r['micro_batch']} | "
                    f"{_f(g['img_per_s'])} | {g['speedup']:.2f}x eager | - |")  # fmt: skip
    return rows


def _profile(r: dict) -> list[str]:
    p = r.get("profile") or {}
    groups = p.get("groups_ms_per_step") or {}
    if not groups:
        return ["No profile (see errors)."]
    busy = sum(groups.values()) or 1.0
    out = [f"{p.get('timing', '')}, {p.get('steps')} steps of `{r.get('fastest_variant')}`: "
           f"{_f(p.get('wall_ms_per_step'))} ms wall per step, {_f(p.get('device_ms_per_step'))} ms busy"
           + (f", host gaps {_f(p['host_gap_ms_per_step'])} ms" if p.get("host_gap_ms_per_step") is not None else "")
           + ".", "", "| group | ms/step | share |", "|---|---|---|"]  # fmt: skip
    out += [f"| {k} | {v:.2f} | {v / busy:.0%} |" for k, v in groups.items()]
    tops = p.get("top_ops") or []
    if tops:
        out += ["", "Top ops (" + ("device time of what each launched; nested ops overlap" if p.get(
            "host_gap_ms_per_step") is not None else "CPU self time") + "):", ""]  # fmt: skip
        out += [f"- `{t['op']}`: {t['ms_per_step']:.2f} ms/step, {t['calls_per_step']:g} calls" for t in tops[:8]]
    if p.get("other_top"):
        out += ["", "In `other` (no group names them yet): " + ", ".join(
            f"`{o['name']}` {o['ms_per_step']:.2f} ms" for o in p["other_top"][:5]) + "."]  # fmt: skip
    return out


def _memory(r: dict) -> list[str]:
    m = r.get("memory_by_policy") or {}
    if not m.get("policies"):
        return ["Not measured (see errors)."]
    out = [f"Micro-batch {m['micro_batch']} on a {m['card_gb']} GiB card; `auto` picks {m['auto_policy']}, the "
           f"fastest policy measured to fit is {m['fastest_fitting_policy']}.", "",
           "| policy | plan GiB | measured GiB | measured / plan | img/s |", "|---|---|---|---|---|"]  # fmt: skip
    out += [f"| {p} | {_f(v.get('plan_gb'), '.2f')} | {_f(v.get('peak_gb'), '.2f')} | "
            f"{_f(v.get('measured_over_plan'), '.2f')} | {_f(v.get('img_per_s'))} |" for p, v in m["policies"].items()]
    return out


def report(r: dict, source: str) -> str:
    """The markdown section for job check result ``r`` (read from ``source``)."""
    title = "dry run on CPU: the path, not a speed" if r.get("dry_run") else "measured"
    out = [f"### Issue 14: the real job on {r['gpu']} ({title})", "",
           f"`STEPS=train bash tools/gpu_check.sh` (tools/gpu_train_check.py), torch {r['torch']}: {r['model']}, "
           f"T={r['T']}, {r['resolution']} px, {r['precision']}, micro-batch {r['micro_batch']} x {r['world_size']} "
           f"rank(s); the JSON is `{source}` ({_f(r.get('wall_s'))} s).", "",
           *_verdicts(r), "", "What each lever gave, side by side in the same run (ratios to the baseline):", "",
           *_rates(r), "", "Where the model step's time goes:", "", *_profile(r), "",
           "Memory per checkpointing policy on the fastest settings, against `orchestrator plan`:", "",
           *_memory(r)]  # fmt: skip
    notes = [f"`{k[:-5]}` ran on {v}" for k, v in r.items() if k.endswith("_path") and isinstance(v, str)]
    notes += [n for n in (r.get("fusion_note"), r.get("plan_micro_batch_note")) if n]
    notes += list(r.get("skipped") or [])
    if notes or r.get("errors"):
        out += ["", "Notes and errors:", ""] + [f"- {n}" for n in notes + list(r.get("errors") or [])]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", type=Path, help="a job check's JSON (docs/bench/gpu_train_<gpu>.json)")
    args = parser.parse_args(argv)
    try:
        r = json.loads(args.json.read_text())
    except (OSError, ValueError) as e:
        print(f"gpu_train_report: error: {args.json}: cannot read it as JSON ({e})", file=sys.stderr)
        return 2
    missing = [k for k in REQUIRED if not isinstance(r, dict) or k not in r]
    if missing:
        print(f"gpu_train_report: error: {args.json}: not a job check's JSON (lacks {', '.join(missing[:4])}); give "
              "the file tools/gpu_train_check.py wrote", file=sys.stderr)  # fmt: skip
        return 2
    sys.stdout.write(report(r, str(args.json)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
