"""DANet's dense (learnable DA) backward: the stage-wide stash (models.connections._DenseAggregate) against plain
autograd's addcmul chain, on the same model: peak memory of one step (own process each) and step time
(interleaved on one model). Usage: python tools/bench_dense_aggregate.py [--model danet152 --T 4 --batch 8
--res 112 --rounds 5 --policy none]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def _use_plain(plain: bool) -> None:
    from models.connections import DenseWeights

    if not hasattr(DenseWeights, "_stash_aggregate"):
        DenseWeights._stash_aggregate = DenseWeights.aggregate
    stash = DenseWeights._stash_aggregate
    DenseWeights.aggregate = (lambda self, base, ys, s=None: stash(self, base, ys)) if plain else stash


def _setup(a):
    import torch

    from models import create_model

    torch.manual_seed(0)
    net = create_model(a.model, T=a.T, input_size=a.res, num_classes=1000, checkpointing=a.policy).train()
    x, y = torch.randn(a.batch, 3, a.res, a.res), torch.randint(0, 1000, (a.batch,))
    return net, lambda: torch.nn.functional.cross_entropy(net(x).mean(0), y).backward()


def memory(a, plain: bool) -> float:
    from orchestrator.bench_memory import _reset_hwm, _status_kb

    _use_plain(plain)
    net, step = _setup(a)
    step()
    net.zero_grad(set_to_none=False)
    _reset_hwm()
    base = _status_kb("VmRSS")
    step()
    return (_status_kb("VmHWM") - base) / 1024


def times(a) -> dict:
    net, step = _setup(a)
    out = {"plain": [], "stash": []}
    for plain in (True, False):
        _use_plain(plain)
        step()
    for _ in range(a.rounds):
        for name in ("plain", "stash"):
            _use_plain(name == "plain")
            net.zero_grad(set_to_none=False)
            t0 = time.perf_counter()
            step()
            out[name].append(time.perf_counter() - t0)
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="danet152")
    p.add_argument("--T", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--res", type=int, default=112)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--policy", default="none")
    p.add_argument("--child", choices=("plain", "stash", "time"))
    a = p.parse_args()
    if a.child == "time":
        print(json.dumps(times(a)))
        return 0
    if a.child:
        print(json.dumps({"peak_mb": memory(a, a.child == "plain")}))
        return 0
    args = sys.argv[1:]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
    res = {}
    for name in ("plain", "stash"):
        out = subprocess.run([sys.executable, __file__, *args, "--child", name], env=env, capture_output=True,
                             text=True, check=True).stdout
        res[name] = {"peak_mb": round(json.loads(out.splitlines()[-1])["peak_mb"], 1)}
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, __file__, *args, "--child", "time"], env=env, capture_output=True,
                         text=True, check=True).stdout
    for name, ts in json.loads(out.splitlines()[-1]).items():
        res[name].update(step_s=round(statistics.median(ts), 3), step_times=[round(t, 3) for t in ts])
    res["ratio_stash_over_plain"] = {
        "peak": round(res["stash"]["peak_mb"] / res["plain"]["peak_mb"], 3),
        "time": round(res["stash"]["step_s"] / res["plain"]["step_s"], 3),
    }
    print(json.dumps({"config": vars(a), **res}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
