"""Peak memory and step time of one training step per checkpointing policy (`orchestrator bench memory`).

Each configuration runs in its own subprocess (``python -m orchestrator.bench_memory --child ...``), so one
policy's allocations cannot lower or raise another's peak. In the child: build the model and a fixed batch, then

* CPU: ``MALLOC_MMAP_THRESHOLD_`` is fixed (set by the parent) so large tensors are mmapped and returned to the
  system when freed; the resident high-water mark is reset (``echo 5 > /proc/self/clear_refs``), the baseline is
  ``VmRSS``, one forward+backward runs, and ``peak_mb = VmHWM - baseline`` (this includes the parameter
  gradients, the same for every policy of a model);
* CUDA: ``peak_mb = max_memory_allocated - memory_allocated`` before the step;

then ``steps`` more steps are timed and the median is ``step_s`` (the first, measured step is not timed).
SpikingJelly's SEW-ResNet-152 (multi-step, LIF, ATan: the same neuron as ours) runs at the same size without and
with ``memopt.optimize_memory(net, (Bottleneck,), example, level=1)`` (levels >= 2 search on CUDA only).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

# (policy, spike_storage); the SpikingJelly rows are added after these
CONFIGS: tuple[tuple[str, str], ...] = (
    ("none", "float"),
    ("time", "float"),
    ("time", "bit"),
    ("block", "float"),
    ("block_time", "bit"),
)
SJ_CONFIGS = ("spikingjelly_none", "spikingjelly_memopt")
CLASSES = 1000


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _build(model_name: str, policy: str, storage: str, T: int, res: int, example: Any):
    """(module, input maker, after-step hook)."""

    if policy.startswith("spikingjelly"):
        from models.bench import _torchvision_standin

        with _torchvision_standin():
            from spikingjelly.activation_based import functional, memopt, neuron, surrogate
            from spikingjelly.activation_based.model import sew_resnet
        net = sew_resnet.sew_resnet152(
            cnf="ADD", spiking_neuron=neuron.LIFNode, tau=2.0, decay_input=True, v_threshold=1.0, v_reset=0.0,
            surrogate_function=surrogate.ATan(alpha=2.0), detach_reset=True, num_classes=CLASSES,
        )  # fmt: skip
        functional.set_step_mode(net, "m")
        seq = lambda x: x.unsqueeze(0).repeat(T, 1, 1, 1, 1)  # noqa: E731
        if policy == "spikingjelly_memopt":
            net = net.to(example.device)
            x = seq(example[:1])

            def fwd(m):
                out = m(x)
                functional.reset_net(m)
                return out

            memopt.optimize_memory(net, (sew_resnet.Bottleneck,), fwd, level=1)
        return net, seq, lambda: functional.reset_net(net)
    from models import create_model

    net = create_model(model_name, T=T, input_size=res, num_classes=CLASSES, checkpointing=policy,
                       spike_storage=storage)  # fmt: skip
    return net, (lambda x: x), (lambda: None)


def child(model_name: str, policy: str, storage: str, T: int, batch: int, res: int, steps: int) -> dict:
    import gc

    import torch

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(0)
    images = torch.randn(batch, 3, res, res, device=device)
    labels = torch.randint(0, CLASSES, (batch,), device=device)
    net, prep, after = _build(model_name, policy, storage, T, res, images)
    net = net.to(device).train()
    loss_fn = torch.nn.CrossEntropyLoss()
    x = prep(images)

    def step() -> None:
        with torch.autocast(
            "cuda", dtype=torch.bfloat16, enabled=cuda and os.environ.get("BENCH_BF16") == "1"
        ):
            out = net(x)
            loss = loss_fn(out.float().mean(0), labels)
        loss.backward()
        after()

    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        how = "cuda max_memory_allocated"
    else:
        reset = _reset_hwm()
        base = _status_kb("VmRSS")
        step()
        peak = (_status_kb("VmHWM") - base) / 1024
        how = "VmHWM - VmRSS" + ("" if reset else " (HWM not reset)")
    times = []
    for _ in range(steps):
        net.zero_grad(set_to_none=False)
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    resolved = getattr(net, "checkpointing_resolved", None)
    return {
        "policy": policy,
        "spike_storage": storage,
        "model": "sew_resnet152 (SpikingJelly)" if policy.startswith("spikingjelly") else model_name,
        "peak_mb": round(peak, 1),
        "step_s": round(statistics.median(times), 3) if times else None,
        "step_times": [round(t, 3) for t in times],
        "measured_by": how,
        **({"resolved": resolved} if resolved and resolved != policy else {}),
    }


def run_memory_bench(
    model: str, T: int, batch: int, res: int, steps: int = 2, configs=None, spikingjelly: bool = True,
    timeout_s: float = 3600.0,
) -> dict:  # fmt: skip
    """Run every configuration in its own subprocess; ``{"results": [...], ...}`` with ratios against none."""
    configs = list(configs or CONFIGS)
    jobs = [(p, s) for p, s in configs] + ([(p, "float") for p in SJ_CONFIGS] if spikingjelly else [])
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
    results = []
    for policy, storage in jobs:
        cmd = [sys.executable, "-m", "orchestrator.bench_memory", "--child", "--model", model, "--policy", policy,
               "--storage", storage, "--T", str(T), "--batch", str(batch), "--res", str(res), "--steps", str(steps)]  # fmt: skip
        t0 = time.time()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            results.append(
                {"policy": policy, "spike_storage": storage, "error": f"timeout after {timeout_s:.0f} s"}
            )
            continue
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode != 0 or not lines:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            results.append({"policy": policy, "spike_storage": storage, "error": tail[0][:300]})
        else:
            row = json.loads(lines[-1])
            row["wall_s"] = round(time.time() - t0, 1)
            results.append(row)
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    _ratios(results)
    return {"model": model, "T": T, "batch": batch, "res": res, "steps": steps, "machine": _machine(),
            "results": results}  # fmt: skip


def _ratios(results: list[dict]) -> None:
    def ref(name: str) -> dict | None:
        return next((r for r in results if r.get("policy") == name and "peak_mb" in r), None)

    ours, sj = ref("none"), ref("spikingjelly_none")
    for r in results:
        base = sj if r.get("policy", "").startswith("spikingjelly") else ours
        if base and "peak_mb" in r and base["peak_mb"] and base["step_s"]:
            r["peak_ratio"] = round(r["peak_mb"] / base["peak_mb"], 3)
            r["time_ratio"] = round(r["step_s"] / base["step_s"], 3)


def _machine() -> str:
    import platform

    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m orchestrator.bench_memory")
    p.add_argument("--child", action="store_true")
    p.add_argument("--model", default="danet152")
    p.add_argument("--policy", default="none")
    p.add_argument("--storage", default="float")
    p.add_argument("--T", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--res", type=int, default=112)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.model, a.policy, a.storage, a.T, a.batch, a.res, a.steps)), flush=True)
        return 0
    out = run_memory_bench(a.model, a.T, a.batch, a.res, a.steps)
    text = json.dumps(out, indent=2)
    if a.json:
        with open(a.json, "w") as f:
            f.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
