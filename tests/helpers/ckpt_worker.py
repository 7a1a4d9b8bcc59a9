"""A one-rank DeepSpeed engine on a small real model, saving checkpoints through CheckpointManager.

Modes (used by test_reliability.py):
  loop RUN_DIR        save checkpoints forever, printing 'saving N' before each (killed with SIGKILL by the test)
  verify RUN_DIR      load the latest complete checkpoint; print JSON {"tag", "step"} (exit 1 if none/unloadable)
  diskfull RUN_DIR    save once, fill the disk, save again; print JSON of what happened
"""

from __future__ import annotations

import json
import os
import sys

import torch

from launch.env import RankInfo
from orchestrator.config import load_config
from orchestrator.errors import UserError
from orchestrator.train.checkpoint import CheckpointManager
from orchestrator.train.engine import batch_plan, build_engine, init_distributed
from orchestrator.train.worker import build_model


def engine_and_manager(run_dir: str):
    cfg = load_config("digits", ["model.width=8", "train.global_batch_size=4"])
    init_distributed(RankInfo(master_port=int(os.environ.get("MASTER_PORT", "29611"))), "cpu", 60)
    torch.manual_seed(0)
    engine = build_engine(cfg, build_model(cfg), batch_plan(cfg, 1), 10, "fp32")
    # one real step so optimizer state exists and is saved
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    engine.backward(torch.nn.functional.cross_entropy(engine(x).mean(0), y))
    engine.step()
    return engine, CheckpointManager(run_dir, 0, keep_top_k=2)


def main() -> int:
    mode, run_dir = sys.argv[1], sys.argv[2]
    engine, mgr = engine_and_manager(run_dir)
    if mode == "loop":
        step = 0
        while True:
            step += 1
            print(f"saving {step}", flush=True)
            mgr.save(engine, step, {"step": step}, val_top1=step % 7 / 7)
    if mode == "verify":
        tag = mgr.latest_tag()
        if tag is None:
            print(json.dumps({"tag": None}))
            return 1
        loop = mgr.load(engine)
        print(json.dumps({"tag": tag, "step": loop["step"]}))
        return 0
    if mode == "diskfull":
        first = mgr.save(engine, 1, {"step": 1})
        free = os.statvfs(run_dir).f_bavail * os.statvfs(run_dir).f_frsize
        with open(os.path.join(run_dir, "filler"), "wb") as f:
            f.write(b"\0" * max(0, free - 64 * 1024))  # leave less than one checkpoint's worth
        try:
            mgr.save(engine, 2, {"step": 2})
            result = {"second": "saved"}
        except UserError as e:
            result = {"second": "error", "message": str(e)}
        os.remove(os.path.join(run_dir, "filler"))
        loop = mgr.load(engine)
        result.update(first=first, latest=mgr.latest_tag(), loaded_step=loop["step"],
                      leftovers=sorted(p for p in os.listdir(mgr.dir) if p.startswith("step")))
        print(json.dumps(result))
        return 0
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
