"""A one-rank DeepSpeed engine on a small real model, saving checkpoints through CheckpointManager.

Modes (used by test_reliability.py):
  crash RUN_DIR N     N trials: a forked child first loads the latest complete checkpoint (every file, then through
                      a fresh engine), reports it as one JSON line {"trial", "tag", "step", "error"}, then saves
                      checkpoints in a loop (each step twice) until the parent kills it with SIGKILL at a random
                      moment
  diskfull RUN_DIR [STEP]  save step 1, fill the disk, save STEP (default 2; 1: the same step again); print
                      JSON of what happened

The parent forks after the heavy imports and before any process group exists (gloo's threads don't survive a
fork), so each trial costs an engine build, not a Python + DeepSpeed start-up.
"""

from __future__ import annotations

import json
import os
import random
import select
import signal
import sys
import time

import deepspeed  # noqa: F401  (imported before the fork: each child would otherwise spend ~4 s importing it)
import torch
import torch._dynamo  # noqa: F401  (the optimizer's constructor imports it: ~3 s, also paid once here)
from probe_exit import run_probe  # (this folder: the script's own)

from launch.env import RankInfo
from orchestrator.config import load_config
from orchestrator.errors import UserError
from orchestrator.train.checkpoint import CheckpointManager
from orchestrator.train.engine import batch_plan, build_engine, init_distributed
from orchestrator.train.worker import build_model


def engine_and_manager(run_dir: str, port: int):
    cfg = load_config("digits", ["model.width=8", "train.global_batch_size=4"])
    init_distributed(RankInfo(master_port=port), "cpu", 60)
    torch.manual_seed(0)
    engine = build_engine(cfg, build_model(cfg), batch_plan(cfg, 1), 10, "fp32")
    # one real step so optimizer state exists and is saved
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    engine.backward(torch.nn.functional.cross_entropy(engine(x).mean(0), y))
    engine.step()
    return engine, CheckpointManager(run_dir, 0, keep_top_k=2)


def _child(run_dir: str, trial: int, port: int, w: int) -> None:
    engine, mgr = engine_and_manager(run_dir, port)
    out = {"trial": trial, "tag": mgr.latest_tag(), "step": 0, "error": None}
    try:
        if out["tag"]:
            for f in (mgr.dir / out["tag"]).glob("*.pt"):
                torch.load(f, weights_only=False)  # every file of the named checkpoint is whole
            out["step"] = mgr.load(engine)["step"]
    except Exception as e:  # reported to the test, which fails on it
        out["error"] = f"{type(e).__name__}: {e}"
    os.write(w, (json.dumps(out) + "\n").encode())
    step = out["step"]
    while True:
        step += 1
        # each step twice, as at an epoch's end after its step-interval save: a kill may land in either write
        for val_top1 in (None, step % 7 / 7):
            mgr.save(engine, step, {"step": step}, val_top1=val_top1)
            os.write(w, b"S\n")


def crash_trials(run_dir: str, trials: int, port: int) -> None:
    rng = random.Random(0)
    for trial in range(trials + 1):  # the last child only verifies what the last kill left
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            try:
                _child(run_dir, trial, port + trial, w)
            finally:
                os._exit(1)
        os.close(w)
        f = os.fdopen(r)
        ready, _, _ = select.select([f], [], [], 120)
        if not ready:
            os.kill(pid, signal.SIGKILL)
            raise SystemExit(f"trial {trial}: child reported nothing in 120 s")
        line = f.readline()
        print(line.strip() or json.dumps({"trial": trial, "error": "child died before reporting"}), flush=True)
        if trial < trials:
            time.sleep(rng.uniform(0.0, 1.0))  # mid-save or between saves
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        f.close()


def main() -> int:
    mode, run_dir = sys.argv[1], sys.argv[2]
    port = int(os.environ.get("MASTER_PORT", "29611"))
    if mode == "crash":
        crash_trials(run_dir, int(sys.argv[3]), port)
        return 0
    engine, mgr = engine_and_manager(run_dir, port)
    if mode == "diskfull":
        again = int(sys.argv[3]) if len(sys.argv) > 3 else 2  # the second save's step (1: the same step again)
        first = mgr.save(engine, 1, {"step": 1})
        free = os.statvfs(run_dir).f_bavail * os.statvfs(run_dir).f_frsize
        with open(os.path.join(run_dir, "filler"), "wb") as f:
            f.write(b"\0" * max(0, free - 64 * 1024))  # leave less than one checkpoint's worth
        try:
            mgr.save(engine, again, {"step": again})
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
    run_probe(main)
