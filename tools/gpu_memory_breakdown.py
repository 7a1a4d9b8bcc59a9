"""Where a training step's peak GPU memory goes, against what ``orchestrator plan`` counts (CUDA only).

``python tools/gpu_memory_breakdown.py [--model danet152] [--T 4] [--res 224] [--batches 16 32]
[--policies none block] [--json PATH]``

For each policy: the bf16-autocast step's peak (``max_memory_allocated`` above weights + gradients) at two batch
sizes, so the per-image slope and the batch-independent part separate; then, at the larger batch, the memory
history of one step replayed to the moment of the peak, with the live allocations grouped by the innermost
project frame (``models/``, ``orchestrator/``) that made them, and the saved-activation bytes the plan's CPU probe
counts for the same model. Each measurement runs in its own process (a second model built in one process after
a first one's block-checkpointed steps failed in backward with "SystemError: returned NULL without setting an
exception" on the H200, which a minimal script with the same sequence did not reproduce; left to investigate).
Takes ~1-2 minutes on an H100/H200.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import create_model  # noqa: E402
from models.checkpointing import saved_activation_bytes  # noqa: E402

MiB = 2**20


def _where(frames: list[dict]) -> str:
    """The innermost frame in the project (else the innermost Python frame) of an allocation's stack."""
    for f in frames:
        name = f.get("filename", "")
        if "/models/" in name or "/orchestrator/" in name:
            return f"{name.split('/')[-2]}/{name.split('/')[-1]}:{f.get('line')} {f.get('name')}"
    for f in frames:
        if f.get("filename", "").endswith(".py"):
            return f"{f['filename'].split('/')[-1]}:{f.get('line')} {f.get('name')}"
    return "(no python frame)"


def _live_at_peak(trace: list[dict]) -> tuple[int, dict[str, int]]:
    """Replay one device's allocator trace: the highest live total and what was live then, by place."""
    live: dict[int, tuple[int, str]] = {}
    total = peak = 0
    at_peak: dict[int, tuple[int, str]] = {}
    for ev in trace:
        action, addr, size = ev.get("action"), ev.get("addr"), int(ev.get("size", 0))
        if action == "alloc":
            live[addr] = (size, _where(ev.get("frames", [])))
            total += size
            if total > peak:
                peak, at_peak = total, dict(live)
        elif action in ("free_requested", "free_completed") and addr in live:
            total -= live.pop(addr)[0]
    groups: dict[str, int] = defaultdict(int)
    for size, where in at_peak.values():
        groups[where] += size
    return peak, dict(sorted(groups.items(), key=lambda kv: -kv[1]))


def _model(name: str, T: int, res: int, policy: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model(name, T=T, input_size=res, num_classes=1000, checkpointing=policy).cuda().train()


def _step(net, x, y) -> None:
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = torch.nn.functional.cross_entropy(net(x).float().mean(0), y)
    loss.backward()


def measure(name: str, T: int, res: int, policy: str, batch: int, history: bool) -> dict:
    net = _model(name, T, res, policy)
    x = torch.randn(batch, 3, res, res, device="cuda")
    y = torch.randint(0, 1000, (batch,), device="cuda")
    _step(net, x, y)  # warm-up: gradient buffers, cuDNN plans
    net.zero_grad(set_to_none=False)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    if history:
        torch.cuda.memory._record_memory_history(enabled="all", stacks="python", max_entries=1_000_000)
    _step(net, x, y)
    torch.cuda.synchronize()
    row = {"policy": policy, "batch": batch, "peak_mib": round((torch.cuda.max_memory_allocated() - base) / MiB, 1)}
    if history:
        snap = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
        peak, groups = _live_at_peak(snap["device_traces"][0])
        row["replayed_peak_mib"] = round(peak / MiB, 1)
        row["live_at_peak_mib"] = {k: round(v / MiB, 1) for k, v in list(groups.items())[:25]}
    del net, x, y
    gc.collect()
    torch.cuda.empty_cache()
    return row


def _in_process(args: argparse.Namespace, policy: str, batch: int, history: bool) -> dict:
    """``measure`` in a fresh Python process (see the module docstring)."""
    cmd = [sys.executable, __file__, "--one", policy, str(batch), str(int(history)), "--model", args.model,
           "--T", str(args.T), "--res", str(args.res)]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        return {"policy": policy, "batch": batch, "error": (r.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--one", nargs=3, metavar=("POLICY", "BATCH", "HISTORY"), help=argparse.SUPPRESS)
    ap.add_argument("--model", default="danet152")
    ap.add_argument("--T", type=int, default=4)
    ap.add_argument("--res", type=int, default=224)
    ap.add_argument("--batches", type=int, nargs=2, default=[16, 32])
    ap.add_argument("--policies", nargs="+", default=["none", "block"])
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_memory_breakdown: no CUDA device", file=sys.stderr)
        return 1
    if args.one:
        policy, batch, history = args.one
        print(json.dumps(measure(args.model, args.T, args.res, policy, int(batch), history == "1")))
        return 0
    out: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "model": args.model,
                 "T": args.T, "res": args.res, "rows": []}  # fmt: skip
    b1, b2 = args.batches
    for policy in args.policies:
        lo = _in_process(args, policy, b1, history=False)
        hi = _in_process(args, policy, b2, history=True)
        if "error" in lo or "error" in hi:
            out["rows"].append({"policy": policy, "peaks": [lo, hi]})
            print(json.dumps(out["rows"][-1]), flush=True)
            continue
        per_image = (hi["peak_mib"] - lo["peak_mib"]) / (b2 - b1)
        probe = create_model(args.model, T=args.T, input_size=args.res, num_classes=1000)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            a1 = saved_activation_bytes(probe, policy, 1, 64)
            a2 = saved_activation_bytes(probe, policy, 2, 64)
        plan_per_image = (a2 - a1) * (args.res / 64) ** 2 / MiB
        row = {"policy": policy, "peaks": [lo, hi], "measured_mib_per_image": round(per_image, 1),
               "measured_fixed_mib": round(hi["peak_mib"] - per_image * b2, 1),
               "plan_probe_mib_per_image": round(plan_per_image, 1)}  # fmt: skip
        out["rows"].append(row)
        print(json.dumps(row, indent=1), flush=True)
    text = json.dumps(out, indent=1)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
