"""The paper's central claim at small scale (issue 9, item 3), with fixed seeds on the bundled digits at 32x32.

Same steps, same recipe for every model: tools/claim_table.py's DEFAULTS (60 optimizer steps x batch 16, width 4,
T=4, AdamW 0.002 at batch 16, 10% warmup + cosine, seed 0) with ``model.zero_init_residual=true`` as in the
danet*_imagenet presets; in-process with the project's config, DALI loader, optimizer, schedule, loss and evaluation.

Measured (seed 0, 1 thread, on the Intel box; docs/RESULTS.md has the table):
1. DANet-152 clearly above the plain spiking ResNet-152: 0.5404 vs 0.0975 val top-1 (chance 0.10). HOLDS.
2. DANet-152 no worse than DANet-18: 0.5404 vs 0.3370. HOLDS with zero-init residuals. Without them
   (zero_init_residual=false, the digits preset's setting) it does NOT hold at this budget: DANet-152 0.3955 vs
   DANet-18 0.5877 (claim 1 still holds there: 0.3955 vs 0.0975). docs/RESULTS.md says so.

The numbers are printed (pytest -s) and are in every assertion message; a 1-thread rerun on the same machine
reproduced them to the digit.
Runtime: the three runs in 2 processes of 1 thread: 105 s on the 2-core AMD box on 12-01 evening (that day's
fresh-clone suite spent 161 s on them one after another in 2 threads), giving 0.5376 / 0.0975 / 0.3398
(danet152 / spiking_resnet152 / danet18); the earlier 2-thread rerun there (docs/RESULTS.md) gave 0.5432 / 0.0975 /
0.3398.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

from claim_table import DEFAULTS, train_eval  # noqa: E402

# one torch thread per run, the runs side by side in up to 2 processes (the two 152-layer ones first): on 2
# cores about 75 s for the three, against 105-160 s one after another in 2 threads (a thread's reductions add in
# another order, so the figures move in the 3rd digit; the margins below are 20 and 3 points)
RECIPE = {**DEFAULTS, "lr": 0.032, "zero_init": True, "threads": 1}
MODELS = ("danet152", "spiking_resnet152", "danet18")
CLEAR_MARGIN = 0.20  # "clearly higher": 20 points of top-1 on 359 val images (chance is 0.10)
NO_WORSE_TOL = 0.03  # "no worse": within 3 points (~11 of 359 images)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def results():
    if not (REPO / ".cache/data/digits/meta.json").is_file():
        pytest.skip("digits dataset not built (run `orchestrator launch` on the digits preset once)")
    workers = max(1, min(2, os.cpu_count() or 1))
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        runs = {name: pool.submit(train_eval, name, **RECIPE) for name in MODELS}
        out = {name: run.result() for name, run in runs.items()}
    print("\nclaim at small scale (digits 32x32, " + ", ".join(f"{k}={v}" for k, v in RECIPE.items()) + "):")
    for r in out.values():
        print(f"  {r['model']:<18} val top-1 {r['val_top1']:.4f}  top-5 {r['val_top5']:.4f}  "
              f"val loss {r['val_loss']:.4f}  train loss {r['final_train_loss']:.4f}  {r['total_s']:.0f}s wall "
              f"{r['cpu_s']:.0f}s cpu")
    return out


def _numbers(res) -> str:
    return ", ".join(f"{r['model']} {r['val_top1']:.4f}" for r in res.values())


def test_danet152_clearly_beats_plain_spiking_resnet152(results):
    d, s = results["danet152"]["val_top1"], results["spiking_resnet152"]["val_top1"]
    assert d >= s + CLEAR_MARGIN, f"DANet-152 {d:.4f} vs spiking ResNet-152 {s:.4f} ({_numbers(results)})"


def test_danet152_no_worse_than_danet18(results):
    d152, d18 = results["danet152"]["val_top1"], results["danet18"]["val_top1"]
    assert d152 >= d18 - NO_WORSE_TOL, f"DANet-152 {d152:.4f} vs DANet-18 {d18:.4f} ({_numbers(results)})"
