"""The paper's central claim at small scale (issue 9, item 3), with fixed seeds on the bundled digits at 32x32.

Same steps, same recipe (tools/claim_table.py's DEFAULTS: 60 steps x batch 16, width 4, T=4, AdamW, warmup +
cosine, seed 0), in-process with the project's config, DALI loader, optimizer, schedule, loss and evaluation:

1. DANet-152 reaches clearly higher val top-1 than the plain spiking ResNet-152 (which degrades with depth):
   HOLDS, measured 0.3705 vs 0.0975 (chance is 0.10: the plain spiking ResNet-152 does not learn at all);
2. DANet-152 is no worse than DANet-18: DOES NOT HOLD at this budget, measured 0.3705 vs 0.6045 (recorded as a
   strict xfail with the numbers).

The measured numbers are printed (pytest -s) and are in every assertion message; docs/RESULTS.md has the full
table. Runtime: the three runs took 1,335 s of wall time on the busy shared machine (load 10-15 on 2 cores)
but ~225 s of CPU time in one torch thread, so ~4 min on an idle 2-core machine (extrapolated, not measured idle).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

from claim_table import DEFAULTS, train_eval  # noqa: E402

RECIPE = {**DEFAULTS, "lr": 0.032}
CLEAR_MARGIN = 0.20  # "clearly higher": 20 points of top-1 on 359 val images (chance is 0.10)
NO_WORSE_TOL = 0.03  # "no worse": within 3 points (~11 of 359 images)


pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def results():
    if not (REPO / ".cache/data/digits/meta.json").is_file():
        pytest.skip("digits dataset not built (python -m orchestrator data digits, or run the demo once)")
    out = {name: train_eval(name, **RECIPE) for name in ("danet152", "spiking_resnet152", "danet18")}
    print("\nclaim at small scale (digits 32x32, " + ", ".join(f"{k}={v}" for k, v in RECIPE.items()) + "):")
    for r in out.values():
        print(f"  {r['model']:<18} val top-1 {r['val_top1']:.4f}  top-5 {r['val_top5']:.4f}  "
              f"val loss {r['val_loss']:.4f}  train loss {r['final_train_loss']:.4f}  {r['total_s']:.0f}s")
    return out


def _numbers(res) -> str:
    return ", ".join(f"{r['model']} {r['val_top1']:.4f}" for r in res.values())


def test_danet152_clearly_beats_plain_spiking_resnet152(results):
    d, s = results["danet152"]["val_top1"], results["spiking_resnet152"]["val_top1"]
    assert d >= s + CLEAR_MARGIN, f"DANet-152 {d:.4f} vs spiking ResNet-152 {s:.4f} ({_numbers(results)})"


@pytest.mark.xfail(strict=True, reason="measured (seed 0, 60 steps x 16, width 4): DANet-152 0.3705 vs DANet-18 "
                   "0.6045 val top-1; at this tiny budget the deeper DANet is still behind the shallow one (DANet-50: "
                   "0.4930). docs/RESULTS.md. strict: should it start to hold, this fails so the docs get updated")
def test_danet152_no_worse_than_danet18(results):
    d152, d18 = results["danet152"]["val_top1"], results["danet18"]["val_top1"]
    assert d152 >= d18 - NO_WORSE_TOL, f"DANet-152 {d152:.4f} vs DANet-18 {d18:.4f} ({_numbers(results)})"
