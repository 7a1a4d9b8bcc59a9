"""The central claim at small scale: val top-1 per connection type and depth, same steps and recipe.

Trains each model in-process on the bundled digits data (32x32 FFRecord) with the project's own pieces: the
config loader (digits preset + overrides), ``orchestrator.data.dali.build_loader``, ``engine.build_optimizer`` and
``engine.lr_lambda`` (the recipe: AdamW, linear-lr scaling, warmup + cosine), ``loop.loss_fn`` and
``loop.evaluate``. DeepSpeed is left out (one CPU rank, fp32: it would only wrap the same optimizer step).

    python tools/claim_table.py                      # the grid below -> docs/RESULTS.md
    python tools/claim_table.py --depths 18 --kinds danet --steps 20 --out /tmp/r.md

Used by tests/test_claim.py (``train_eval``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

KINDS = {"spiking": "spiking_resnet", "sew_add": "sew_resnet", "ms(membrane)": "ms_resnet", "danet": "danet"}
DATA = os.environ.get("DIGITS_ROOT", str(REPO / ".cache/data/digits"))

# The small-scale recipe (digits preset, shortened): every run gets exactly these.
DEFAULTS = dict(steps=60, batch=16, width=4, T=4, seed=0, lr=0.008, warmup_frac=0.1)


def train_eval(name: str, steps: int = 60, batch: int = 16, width: int = 4, T: int = 4, seed: int = 0,
               lr: float = 0.008, warmup_frac: float = 0.1, threads: int = 1, zero_init: bool = False) -> dict:
    """Train ``name`` for ``steps`` optimizer steps on digits and evaluate on the whole val split."""
    import torch

    from models import create_model
    from orchestrator.config.load import load_config
    from orchestrator.data.dali import build_loader
    from orchestrator.train.engine import build_optimizer, lr_lambda
    from orchestrator.train.loop import evaluate, loss_fn
    from orchestrator.train.worker import model_kwargs, seed_everything

    torch.set_num_threads(threads)
    cfg = load_config("digits", [f"data.root={DATA}", f"model.name={name}", f"model.width={width}",
                                 f"model.T={T}", f"train.global_batch_size={batch}", f"train.seed={seed}",
                                 f"optim.lr={lr}", "train.epochs=1", f"optim.warmup_epochs={warmup_frac}",
                                 f"model.zero_init_residual={str(zero_init).lower()}", "tracking.backend=none"])
    seed_everything(seed, True)
    model = create_model(name, **model_kwargs(cfg))
    opt = build_optimizer(cfg, model)
    # The cosine spans exactly ``steps`` (lr_lambda spans epochs x steps_per_epoch; epochs=1).
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, steps))
    train_loader = build_loader(cfg.data, "train", 0, 1, batch, seed, "cpu", expect_classes=10)
    val_loader = build_loader(cfg.data, "val", 0, 1, batch, seed, "cpu", expect_classes=10)
    t0, c0 = time.perf_counter(), time.process_time()
    step, epoch, losses = 0, 0, []
    model.train()
    while step < steps:
        train_loader.set_epoch(epoch)
        for x, y in train_loader:
            loss = loss_fn(cfg, model(x).float(), y)
            if not math.isfinite(float(loss.detach())):
                raise RuntimeError(f"{name}: non-finite loss at step {step + 1}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            step += 1
            if step >= steps:
                break
        epoch += 1
    train_s = time.perf_counter() - t0
    m = evaluate(model, val_loader, cfg, "cpu")
    return {"model": name, "zero_init": zero_init, "steps": steps, "batch": batch, "width": width, "T": T, "seed": seed,
            "val_top1": round(m["val_top1"], 4), "val_top5": round(m["val_top5"], 4),
            "val_loss": round(m["val_loss"], 4), "final_train_loss": round(sum(losses[-5:]) / len(losses[-5:]), 4),
            "train_s": round(train_s, 1), "total_s": round(time.perf_counter() - t0, 1),
            "cpu_s": round(time.process_time() - c0, 1)}  # ~ the wall time on an idle machine (1 thread)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kinds", default=",".join(KINDS), help="comma list of " + ", ".join(KINDS))
    ap.add_argument("--depths", default="18,50,152")
    for k, v in DEFAULTS.items():
        ap.add_argument(f"--{k.replace('_', '-')}", type=type(v), default=v)
    ap.add_argument("--out", default=str(REPO / "docs/RESULTS.md"))
    ap.add_argument("--jsonl", default="", help="also append each result as a JSON line here")
    ap.add_argument("--reuse", default="", help="comma list of JSON-lines files: runs with the same settings found "
                    "there are not trained again")
    ap.add_argument("--render-only", action="store_true", help="train nothing: the table from --reuse (missing "
                    "cells say 'not run')")
    a = ap.parse_args(argv)
    kinds = [k for k in a.kinds.split(",") if k]
    depths = [int(d) for d in a.depths.split(",") if d]
    rec = dict(steps=a.steps, batch=a.batch, width=a.width, T=a.T, seed=a.seed, lr=a.lr, warmup_frac=a.warmup_frac)
    results: dict = {}
    done = {}
    for path in filter(None, a.reuse.split(",")):
        for line in Path(path).read_text().splitlines():
            r = json.loads(line)
            if not r.get("zero_init") and all(r.get(k) == rec[k] for k in ("steps", "batch", "width", "T", "seed")):
                done[r["model"]] = r
    for depth in depths:
        for kind in kinds:
            name = f"{KINDS[kind]}{depth}"
            if name in done:
                results[(kind, depth)] = done[name]
                continue
            if a.render_only:
                continue
            r = train_eval(name, **rec)
            results[(kind, depth)] = r
            print(json.dumps(r), flush=True)
            if a.jsonl:
                with open(a.jsonl, "a") as f:
                    f.write(json.dumps(r) + "\n")
    cmd = "python tools/claim_table.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = ["# Results: connection type x depth at small scale (digits, 32x32)", "",
             "Validation top-1 on the 359 held-out digits after the same number of optimizer steps with the same",
             "recipe for every model (`tools/claim_table.py`, in-process: the project's config, DALI loader, optimizer,",
             "lr schedule, loss and evaluation; one CPU rank, fp32).", "",
             f"Settings: {a.steps} steps x batch {a.batch} (~{a.steps * a.batch / 1438:.2f} epochs of 1,438 train "
             f"images), width {a.width}, T={a.T}, seed {a.seed}, AdamW lr {a.lr} at batch 256 (linearly scaled), "
             f"warmup {a.warmup_frac:.0%} then cosine to 0, weight decay 1e-4, loss mean_output, digits preset "
             "augmentation.", "",
             f"Command: `{cmd.strip()}`; each run's wall time is in the second table (a 2-core CPU machine shared "
             "with other jobs, so times are upper bounds).", "",
             "| connection | " + " | ".join(f"depth {d}" for d in depths) + " |",
             "|---|" + "---|" * len(depths)]
    for kind in kinds:
        cells = [f"{results[(kind, d)]['val_top1']:.4f}" if (kind, d) in results else "not run" for d in depths]
        lines.append(f"| {kind} ({KINDS[kind]}N) | " + " | ".join(cells) + " |")
    lines += ["", "Final train loss (mean of the last 5 steps) / wall seconds per run:", "",
              "| connection | " + " | ".join(f"depth {d}" for d in depths) + " |", "|---|" + "---|" * len(depths)]
    for kind in kinds:
        cells = [f"{results[(kind, d)]['final_train_loss']:.3f} / {results[(kind, d)]['total_s']:.0f}s"
                 if (kind, d) in results else "-" for d in depths]
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    Path(a.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
