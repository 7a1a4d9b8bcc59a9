"""Throughput benchmarks against SpikingJelly 2.0.0 (``orchestrator bench models``); a command, not a test.

``run_models_bench(json_path)``: in one process, on the same inputs and thread count, forward + backward of our
``sew_resnet50`` and ``danet50`` and SpikingJelly's multi-step ``sew_resnet50`` (LIFNode tau 2, ATan(2), hard reset
0, detach_reset, the same neuron as ours; its CPU LIF op is its only and fastest CPU backend), T=4, batch 4,
112x112, 2 threads. The models are timed round-robin, one step each per round (``ROUNDS`` by default, each
announced on stderr), so load from other processes on a shared machine hits all of them alike; the median over
the rounds after warm-up is reported. Our sew_resnet50 is also timed in the same rounds with its C++ CPU kernels
switched off ("ours, torch ops": the fused LIF's vectorised torch path and torch's BatchNorm), which is what those
kernels give, and with BatchNorm and the neuron as two ops ("ours, unfused": ``fuse_bn_neuron`` off, kernels on),
which is what their fusion gives.

``run_lif_bench()``: one LIF layer ``[T=4, N=4, 256, 28, 28]`` forward + backward: our fused op (C++ kernel, and
its torch path), our reference loop (autograd through every step) and SpikingJelly's LIFNode; then PLIF the
same way against SpikingJelly's ParametricLIFNode.

``run_bn_neuron_bench()``: BatchNorm + LIF on the same shape, forward + backward in training mode, as one op
(``models.bn_neuron``) against BatchNorm then the neuron; and again on the last stage's small maps
(``[T, N, 512, 4, 4]`` at 112 px), where the per-call work around the kernels weighs most (JSON ``bn_neuron_late``).

SpikingJelly's model file imports one function from torchvision (``load_state_dict_from_url``, for pretrained
weights), and torchvision does not work beside this torch build (``operator torchvision::nms does not exist``,
even where pip pulled it in); a stand-in module that raises if called is placed in ``sys.modules`` only while
SpikingJelly is imported, unless a working torchvision is already imported.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import sys
import time
import types
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from . import _cpu_kernels
from .bn_neuron import bn_neuron, unfused
from .checkpointing import BatchNorm
from .neurons import MultiStepNeuron, NeuronSpec
from .resnet import create_model

T, BATCH, RES, THREADS, CLASSES = 4, 4, 112, 2, 1000
LATE_MAP = -(-RES // 32)  # the last stage's map side (stride 32, rounded up): 4 at 112 px
# Timed rounds: on a shared 2-core box single steps vary by 2x, and with 7 rounds three runs back to back gave
# 1.19, 1.71 and 1.56x on one machine; with 21 they gave 1.24-1.33x (BENCHMARKS.md)
ROUNDS = 15


@contextlib.contextmanager
def _torchvision_standin():
    """Provide ``torchvision.models.utils.load_state_dict_from_url`` while SpikingJelly's models import."""
    if "torchvision" in sys.modules:  # a working torchvision is already imported
        yield
        return

    def load_state_dict_from_url(*_a: Any, **_k: Any) -> Any:
        raise RuntimeError("pretrained weights are unavailable: torchvision stand-in (models/bench.py)")

    names = (
        "torchvision",
        "torchvision.models",
        "torchvision.models.utils",
        "torchvision._internally_replaced_utils",
    )
    mods = {n: types.ModuleType(n) for n in names}
    mods["torchvision.models.utils"].load_state_dict_from_url = load_state_dict_from_url  # type: ignore[attr-defined]
    mods["torchvision._internally_replaced_utils"].load_state_dict_from_url = load_state_dict_from_url  # type: ignore[attr-defined]
    mods["torchvision"].models = mods["torchvision.models"]  # type: ignore[attr-defined]
    mods["torchvision.models"].utils = mods["torchvision.models.utils"]  # type: ignore[attr-defined]
    sys.modules.update(mods)
    try:
        yield
    finally:
        for n in names:
            sys.modules.pop(n, None)


def _spikingjelly_sew_resnet50() -> tuple[nn.Module, Callable[[nn.Module], None]]:
    with _torchvision_standin():
        from spikingjelly.activation_based import functional, neuron, surrogate
        from spikingjelly.activation_based.model import sew_resnet
    net = sew_resnet.sew_resnet50(
        cnf="ADD",
        spiking_neuron=neuron.LIFNode,
        tau=2.0,
        decay_input=True,
        v_threshold=1.0,
        v_reset=0.0,
        surrogate_function=surrogate.ATan(alpha=2.0),
        detach_reset=True,
        num_classes=CLASSES,
    )
    functional.set_step_mode(net, "m")
    return net, functional.reset_net


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    return (
        f"{cpu}, {os.cpu_count()} cores visible, {torch.get_num_threads()} threads, torch {torch.__version__}"
    )


def _rounds(
    what: str, steps: dict[str, Callable[[], None]], warmup: int, repeats: int
) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {k: [] for k in steps}
    for r in range(warmup + repeats):
        label = f"warm-up {r + 1}/{warmup}" if r < warmup else f"round {r + 1 - warmup}/{repeats}"
        print(f"bench models, {what}: {label} ({len(steps)} steps)", file=sys.stderr, flush=True)
        for key, step in steps.items():
            t0 = time.perf_counter()
            step()
            dt = time.perf_counter() - t0
            if r >= warmup:
                times[key].append(dt)
    return times


def run_models_bench(json_path: str | None = None, warmup: int = 2, repeats: int = ROUNDS) -> dict:
    """Benchmark ours vs SpikingJelly's sew_resnet50 (see the module docstring) over ``repeats`` timed rounds;
    write JSON when a path is given."""
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    images = torch.randn(BATCH, 3, RES, RES)
    labels = torch.randint(0, CLASSES, (BATCH,))
    loss_fn = nn.CrossEntropyLoss()

    def our_step(model: nn.Module) -> Callable[[], None]:
        def step() -> None:
            model.zero_grad(set_to_none=True)
            loss_fn(model(images).mean(0), labels).backward()

        return step

    sj_net, reset_net = _spikingjelly_sew_resnet50()
    sj_input = images.unsqueeze(0).repeat(T, 1, 1, 1, 1)

    def sj_step() -> None:
        sj_net.zero_grad(set_to_none=True)
        loss_fn(sj_net(sj_input).mean(0), labels).backward()
        reset_net(sj_net)

    ours = {
        name: create_model(name, T=T, num_classes=CLASSES, input_size=RES)
        for name in ("sew_resnet50", "danet50")
    }
    steps = {("ours", n): our_step(m) for n, m in ours.items()}
    sew_step = steps[("ours", "sew_resnet50")]

    def torch_ops_step() -> None:  # the same model on the torch paths its CPU kernels replace
        with _cpu_kernels.disabled():
            sew_step()

    steps[("ours, torch ops", "sew_resnet50")] = torch_ops_step

    def unfused_step() -> None:  # the same model with BatchNorm and the neuron as two ops (fuse_bn_neuron off)
        with unfused(ours["sew_resnet50"]):
            sew_step()

    steps[("ours, unfused", "sew_resnet50")] = unfused_step
    steps[("spikingjelly", "sew_resnet50")] = sj_step
    times = _rounds("networks", steps, warmup, repeats)  # type: ignore[arg-type]

    results = []
    for (impl, model), ts in times.items():  # type: ignore[misc]
        med = statistics.median(ts)
        results.append(
            {
                "impl": impl,
                "model": model,
                "img_per_s": BATCH / med,
                "step_s_median": med,
                "step_s_min": min(ts),
                "step_s": ts,
            }
        )
    by = {(r["impl"], r["model"]): r for r in results}
    out = {
        "config": {
            "T": T,
            "batch": BATCH,
            "res": RES,
            "threads": THREADS,
            "warmup": warmup,
            "repeats": repeats,
        },
        "machine": _machine(),
        "results": results,
        "ratio_ours_vs_spikingjelly": by[("ours", "sew_resnet50")]["img_per_s"]
        / by[("spikingjelly", "sew_resnet50")]["img_per_s"],
        # the same ratio from the fastest step of each: steadier where other processes share the cores
        "ratio_min_step": by[("spikingjelly", "sew_resnet50")]["step_s_min"]
        / by[("ours", "sew_resnet50")]["step_s_min"],
        # what the C++ CPU kernels (models/_cpu_kernels.py) give our own step
        "cpu_kernels": _cpu_kernels.library() is not None,
        "ratio_cpu_kernels_vs_torch_ops": by[("ours, torch ops", "sew_resnet50")]["step_s_median"]
        / by[("ours", "sew_resnet50")]["step_s_median"],
        # what BatchNorm + neuron as one op (model.fuse_bn_neuron: auto) gives our step, the kernels on both sides
        "ratio_fused_vs_unfused": by[("ours, unfused", "sew_resnet50")]["step_s_median"]
        / by[("ours", "sew_resnet50")]["step_s_median"],
        "lif": run_lif_bench(),
        "bn_neuron": run_bn_neuron_bench(),
        "bn_neuron_late": run_bn_neuron_bench(shape=(T, BATCH, 512, LATE_MAP, LATE_MAP), repeats=101),
    }
    if json_path:
        with open(json_path, "w") as f:
            json.dump(out, f, indent=2)
    return out


def run_lif_bench(
    shape: tuple[int, ...] = (T, BATCH, 256, 28, 28), warmup: int = 2, repeats: int = 9
) -> dict:
    """LIF layer forward + backward: fused vs reference loop vs SpikingJelly's LIFNode (median ms); the same for
    PLIF (SpikingJelly's ParametricLIFNode), whose rate's gradient the fused op sums too."""
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    x = (torch.randn(shape) * 1.5 + 0.5).requires_grad_()
    grad = torch.randn(shape)
    fused = MultiStepNeuron(NeuronSpec(backend="fused"))
    reference = MultiStepNeuron(NeuronSpec(backend="reference"))
    plif_fused = MultiStepNeuron(NeuronSpec(type="plif", backend="fused"))
    plif_reference = MultiStepNeuron(NeuronSpec(type="plif", backend="reference"))
    with _torchvision_standin():
        from spikingjelly.activation_based import functional, neuron, surrogate
    sj = neuron.LIFNode(
        tau=2.0, v_reset=0.0, surrogate_function=surrogate.ATan(alpha=2.0), detach_reset=True, step_mode="m"
    )
    sj_plif = neuron.ParametricLIFNode(
        init_tau=2.0, v_reset=0.0, surrogate_function=surrogate.ATan(alpha=2.0), detach_reset=True, step_mode="m"
    )

    def run(layer: nn.Module, reset: Callable[[nn.Module], None] | None = None) -> Callable[[], None]:
        def step() -> None:
            x.grad = None
            layer(x).backward(grad)
            if reset is not None:
                reset(layer)

        return step

    def fused_torch_ops() -> None:
        with _cpu_kernels.disabled():
            run(fused)()

    times = _rounds(
        "LIF layer",
        {"fused": run(fused), "fused, torch ops": fused_torch_ops, "reference": run(reference),
         "spikingjelly": run(sj, functional.reset_net), "plif fused": run(plif_fused),
         "plif reference": run(plif_reference), "plif spikingjelly": run(sj_plif, functional.reset_net)},
        warmup,
        repeats,
    )
    ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    return {
        "shape": list(shape),
        "median_ms": ms,
        "speedup_fused_vs_reference": ms["reference"] / ms["fused"],
        "speedup_fused_vs_spikingjelly": ms["spikingjelly"] / ms["fused"],
        "plif_speedup_fused_vs_reference": ms["plif reference"] / ms["plif fused"],
        "plif_speedup_fused_vs_spikingjelly": ms["plif spikingjelly"] / ms["plif fused"],
    }


def run_bn_neuron_bench(
    shape: tuple[int, ...] = (T, BATCH, 256, 28, 28), warmup: int = 3, repeats: int = 21
) -> dict:
    """BatchNorm + LIF forward + backward in training mode: as one op (``models.bn_neuron``, the C++ kernels on
    CPU) against BatchNorm then the neuron (each on its own kernel), median ms, round robin."""
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    x = (torch.randn(shape) * 1.5 + 0.5).requires_grad_()
    grad = torch.randn(shape)
    bn, neuron = BatchNorm(shape[2]), MultiStepNeuron(NeuronSpec())

    def step(fused: bool) -> Callable[[], None]:
        def run() -> None:
            x.grad = None
            out = bn_neuron(x, bn, neuron) if fused else neuron(bn(x.flatten(0, 1)).unflatten(0, shape[:2]))
            out.backward(grad)

        return run

    times = _rounds("BatchNorm + LIF layer", {"fused": step(True), "pair": step(False)}, warmup, repeats)
    ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    return {"shape": list(shape), "median_ms": ms, "speedup_fused_vs_pair": ms["pair"] / ms["fused"],
            "cpu_kernels": _cpu_kernels.bn_neuron_applies(x.detach())}


if __name__ == "__main__":
    print(json.dumps(run_models_bench(sys.argv[1] if len(sys.argv) > 1 else None), indent=2))
