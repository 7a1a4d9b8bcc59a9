"""Peak memory and step time of one training step per checkpointing policy (`orchestrator bench memory`).

Each configuration runs in its own subprocess (``python -m orchestrator.bench_memory --child ...``), so one
policy's allocations cannot lower or raise another's peak. In the child: build the model and a fixed batch, then

* one warm-up step first, so the model's baseline holds what persists between training steps: the weights and
  the parameter gradient buffers (DeepSpeed allocates those once; the loop zeroes them in place);
* CPU: ``MALLOC_MMAP_THRESHOLD_`` is fixed (set by the parent) so large tensors are mmapped and returned to the
  system when freed; the resident high-water mark is reset (``echo 5 > /proc/self/clear_refs``), the baseline is
  ``VmRSS``, one forward+backward runs, and ``peak_mb = VmHWM - baseline``: the activations, their gradients and
  every transient of the step;
* CUDA: ``peak_mb = max_memory_allocated - memory_allocated`` before the step;

``grad_mb`` (the gradient buffers) is reported beside it, and ``peak_with_grads_mb = peak_mb + grad_mb`` is the
figure for a first step that allocates them. Step times (``step_s``, the median of ``steps``): on CUDA from the same
process; on CPU from separate processes with the default allocator (the fixed mmap threshold above makes every
large allocation fault in fresh pages, which would inflate the policies that allocate more): our policies all on
ONE model in one process, alternating policy step by step (``interleaved_times``), so load drift on a shared
machine hits every policy alike; SpikingJelly's two rows each in their own process.
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


def parse_configs(text: str | None) -> list[tuple[str, str]] | None:
    """``"none,block,time/bit"`` -> [(policy, spike_storage), ...]; None or "" -> the default set."""
    if not text:
        return None
    from models.checkpointing import COST_ORDER, SPIKE_STORAGE

    out = []
    for item in text.split(","):
        policy, _, storage = item.strip().partition("/")
        storage = storage or "float"
        if policy not in COST_ORDER or storage not in SPIKE_STORAGE:
            from orchestrator.errors import UserError

            raise UserError(f"--configs: {item.strip()!r} is not POLICY[/STORAGE] with POLICY in "
                            f"{', '.join(COST_ORDER)} and STORAGE in {', '.join(SPIKE_STORAGE)}")
        out.append((policy, storage))
    return out


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


def child(model_name: str, policy: str, storage: str, T: int, batch: int, res: int, steps: int,
          measure: str = "both") -> dict:  # fmt: skip
    """One configuration: ``measure`` = memory (peak only), time (``steps`` timed steps only) or both."""
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

    step()  # warm-up: allocates the gradient buffers, which persist across training steps
    grad_mb = sum(p.grad.numel() * p.grad.element_size() for p in net.parameters() if p.grad is not None) / 2**20
    net.zero_grad(set_to_none=False)
    gc.collect()
    peak, how = None, None
    if measure == "time":
        pass
    elif cuda:
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
    for _ in range(steps if measure != "memory" else 0):
        net.zero_grad(set_to_none=False)
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    resolved = getattr(net, "checkpointing_resolved", None)
    row: dict[str, Any] = {
        "policy": policy,
        "spike_storage": storage,
        "model": "sew_resnet152 (SpikingJelly)" if policy.startswith("spikingjelly") else model_name,
        **({"resolved": resolved} if resolved and resolved != policy else {}),
    }
    if peak is not None:
        row.update(peak_mb=round(peak, 1), grad_mb=round(grad_mb, 1), peak_with_grads_mb=round(peak + grad_mb, 1),
                   measured_by=how)  # fmt: skip
    if times:
        row.update(step_s=round(statistics.median(times), 3), step_times=[round(t, 3) for t in times])
    return row


def interleaved_times(model_name: str, configs: list[tuple[str, str]], T: int, batch: int, res: int,
                      rounds: int) -> dict[tuple[str, str], list[float]]:  # fmt: skip
    """Step times of our policies on ONE model, alternating policies step by step for ``rounds`` rounds.

    Same weights, same input, and the machine's load drifts over all policies alike, so the ratios hold up on a
    shared machine where back-to-back processes would not. (The policy and spike storage switch per step.)
    """
    import torch

    from models import create_model
    from models.resnet import ConvBN

    torch.manual_seed(0)
    net = create_model(model_name, T=T, input_size=res, num_classes=CLASSES).train()
    x = torch.randn(batch, 3, res, res)
    labels = torch.randint(0, CLASSES, (batch,))
    loss_fn = torch.nn.CrossEntropyLoss()

    def step(policy: str, storage: str) -> float:
        net.checkpointing = policy
        for m in net.modules():
            if isinstance(m, ConvBN):
                m.spike_storage = storage
        net.zero_grad(set_to_none=False)
        t0 = time.perf_counter()
        loss_fn(net(x).mean(0), labels).backward()
        return time.perf_counter() - t0

    for cfg in configs:  # warm-up: gradient buffers, allocator, first-call costs
        step(*cfg)
    times: dict[tuple[str, str], list[float]] = {cfg: [] for cfg in configs}
    for _ in range(rounds):
        for cfg in configs:
            times[cfg].append(step(*cfg))
    return times


def run_memory_bench(
    model: str, T: int, batch: int, res: int, steps: int = 3, configs=None, spikingjelly: bool = True,
    timeout_s: float = 3600.0,
) -> dict:  # fmt: skip
    """Run every configuration in its own subprocess; ``{"results": [...], ...}`` with ratios against none."""
    configs = list(configs or CONFIGS)
    jobs = [(p, s) for p, s in configs] + ([(p, "float") for p in SJ_CONFIGS] if spikingjelly else [])
    # CPU: the peak is read with a fixed mmap threshold (freed tensors leave the RSS), which also makes every
    # large allocation fault in fresh pages; so step times come from a second process with the default
    # allocator, as training runs. CUDA: one process measures both.
    import torch

    cuda = torch.cuda.is_available()
    mmap = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
    results = []
    for policy, storage in jobs:
        row: dict[str, Any] = {"policy": policy, "spike_storage": storage}
        t0 = time.time()
        ours = not policy.startswith("spikingjelly")
        # CUDA: one process measures both. CPU: memory alone; our policies' times come interleaved afterwards
        passes = [("both", {})] if cuda else [("memory", mmap)] + ([] if ours else [("time", {})])
        for measure, extra in passes:
            cmd = [sys.executable, "-m", "orchestrator.bench_memory", "--child", "--measure", measure, "--model",
                   model, "--policy", policy, "--storage", storage, "--T", str(T), "--batch", str(batch), "--res",
                   str(res), "--steps", str(steps)]  # fmt: skip
            env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, env={**env, **extra}, timeout=timeout_s)
            except subprocess.TimeoutExpired:
                row["error"] = f"{measure}: timeout after {timeout_s:.0f} s"
                break
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            if proc.returncode != 0 or not lines:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
                row["error"] = f"{measure}: {tail[0][:300]}"
                break
            row.update(json.loads(lines[-1]))
        row["wall_s"] = round(time.time() - t0, 1)
        results.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    if not cuda and configs:
        print(f"timing {len(configs)} policies interleaved on one model, {steps} rounds", file=sys.stderr, flush=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
        cmd = [sys.executable, "-m", "orchestrator.bench_memory", "--interleave",
               ",".join(f"{p}/{s}" for p, s in configs), "--model", model, "--T", str(T), "--batch", str(batch),
               "--res", str(res), "--steps", str(steps)]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout_s)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        timed = json.loads(lines[-1]) if proc.returncode == 0 and lines else {}
        for row in results:
            key = f"{row['policy']}/{row['spike_storage']}"
            if key in timed:
                row.update(step_s=round(statistics.median(timed[key]), 3), step_times=[round(t, 3) for t in timed[key]],
                           timed_by="interleaved on one model")  # fmt: skip
            elif not row["policy"].startswith("spikingjelly"):
                row.setdefault("error", "timing: " + ((proc.stderr or "no output").strip().splitlines() or ["?"])[-1][:300])
    _ratios(results)
    return {"model": model, "T": T, "batch": batch, "res": res, "steps": steps, "machine": _machine(),
            "results": results}  # fmt: skip


def _ratios(results: list[dict]) -> None:
    def ref(name: str) -> dict | None:
        return next((r for r in results if r.get("policy") == name and "peak_mb" in r), None)

    ours, sj = ref("none"), ref("spikingjelly_none")
    for r in results:
        base = sj if r.get("policy", "").startswith("spikingjelly") else ours
        if base and "peak_mb" in r and "step_s" in r and base.get("peak_mb") and base.get("step_s"):
            r["peak_ratio"] = round(r["peak_mb"] / base["peak_mb"], 3)
            r["peak_with_grads_ratio"] = round(r["peak_with_grads_mb"] / base["peak_with_grads_mb"], 3)
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
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--measure", default="both", choices=("both", "memory", "time"))
    p.add_argument("--interleave", default=None, help="POLICY/STORAGE,...: time these on one model, alternating")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    if a.interleave:
        configs = parse_configs(a.interleave) or []
        times = interleaved_times(a.model, configs, a.T, a.batch, a.res, a.steps)
        print(json.dumps({f"{p}/{s}": t for (p, s), t in times.items()}), flush=True)
        return 0
    if a.child:
        print(json.dumps(child(a.model, a.policy, a.storage, a.T, a.batch, a.res, a.steps, a.measure)), flush=True)
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
