"""One rank, a real DeepSpeed engine (gloo) built by the project's build_engine: run one optimizer step of a tiny
linear model over a fixed batch and print the resulting weights as JSON. Used by tests/test_optim.py.

    python tests/helpers/engine_probe.py PORT key=value ...   (config overrides on the digits preset)
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
from probe_exit import run_probe  # noqa: E402  (this folder: the script's own)

from launch.env import RankInfo  # noqa: E402
from orchestrator.config import load_config  # noqa: E402
from orchestrator.train.engine import batch_plan, build_engine, init_distributed, resolve_precision  # noqa: E402
from orchestrator.train.precision import Precision  # noqa: E402


def main() -> int:
    port, overrides = int(sys.argv[1]), sys.argv[2:]
    cfg = load_config("digits", overrides)
    init_distributed(RankInfo(master_port=port), "cpu", 60)
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 3)
    if "bn" in os.environ.get("PROBE_MODEL", ""):  # a BatchNorm: its buffers must follow bf16 (STACK-NOTES)
        model = torch.nn.Sequential(torch.nn.BatchNorm1d(6), model)
    plan = batch_plan(cfg, 1)
    precision = resolve_precision(cfg, "cpu")
    engine = build_engine(cfg, model, plan, steps_per_epoch=10, precision=precision)
    mode = Precision(precision)
    x = torch.randn(cfg.train.global_batch_size, 6)
    y = torch.randint(0, 3, (cfg.train.global_batch_size,))
    for i in range(plan.accumulation):  # one optimizer step: the micro-batches of one global batch
        sl = slice(i * plan.micro_batch, (i + 1) * plan.micro_batch)
        with mode.forward("cpu"):
            out = engine(x[sl].to(mode.inputs))
        loss = torch.nn.functional.cross_entropy(out.float(), y[sl])
        engine.backward(loss)
        engine.step()
    linear = model if isinstance(model, torch.nn.Linear) else model[1]
    print(json.dumps({"accumulation": plan.accumulation, "steps": engine.global_steps, "precision": precision,
                      "weight_dtype": str(linear.weight.dtype), "out_dtype": str(out.dtype),
                      "weight": linear.weight.detach().float().flatten().tolist(),
                      "bias": linear.bias.detach().float().tolist()}))
    return 0


if __name__ == "__main__":
    run_probe(main)
