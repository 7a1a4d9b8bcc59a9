"""The prepared GPU check (issue 3 item 9): ``python -m models.gpu_check [--dry-run]``; under 8 minutes on an H100.

1. danet152, T=4, bf16 autocast, 224x224, batch 32, forward + backward + SGD step: img/s (median of 5 steps after
   3 warm-up) and peak memory (``max_memory_allocated``) for each checkpointing policy given (default: none, block).
2. One LIF layer ``[T=4, 32, 256, 56, 56]`` fp32 forward + backward: our fused op (Triton kernel) against
   SpikingJelly's LIF with ``SJ_LIF_CUDA_IMPLEMENTATION=triton``, plus the max difference of their outputs.

Prints a short table last. ``--dry-run`` runs the same code on CPU at toy sizes (a smoke test of the script).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("SJ_LIF_CUDA_IMPLEMENTATION", "triton")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from .neurons import MultiStepNeuron, NeuronSpec  # noqa: E402
from .resnet import create_model  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def model_check(device, policy: str, batch: int, res: int, name: str, warmup: int, repeats: int) -> dict:
    torch.manual_seed(0)
    model = create_model(name, T=4, input_size=res, checkpointing=policy).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(batch, 3, res, res, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    loss_fn = nn.CrossEntropyLoss()
    dtype = torch.bfloat16

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype):
            loss = loss_fn(model(x).float().mean(0), y)
        loss.backward()
        opt.step()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    med = _timed(step, device, warmup, repeats)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")
    return {
        "what": f"{name} T=4 bf16 {res}px b{batch} ckpt={policy}",
        "img_per_s": batch / med,
        "peak_mb": peak,
    }


def lif_check(device, shape, warmup: int, repeats: int) -> list[dict]:
    torch.manual_seed(0)
    x = (torch.randn(shape, device=device) * 1.5 + 0.5).requires_grad_()
    g = torch.randn(shape, device=device)
    rows = []
    ours = MultiStepNeuron(NeuronSpec(backend="fused")).to(device)

    def run(layer, reset=None):
        def f():
            x.grad = None
            layer(x).backward(g)
            if reset is not None:
                reset(layer)

        return f

    rows.append(
        {"what": f"LIF fused (ours) {list(shape)}", "ms": _timed(run(ours), device, warmup, repeats) * 1e3}
    )
    try:
        from .bench import _torchvision_standin

        with _torchvision_standin():
            from spikingjelly.activation_based import functional, neuron, surrogate
        sj = neuron.LIFNode(
            tau=2.0,
            v_reset=0.0,
            surrogate_function=surrogate.ATan(alpha=2.0),
            detach_reset=True,
            step_mode="m",
        ).to(device)
        ms = _timed(run(sj, functional.reset_net), device, warmup, repeats) * 1e3
        with torch.no_grad():
            diff = (ours(x) - sj(x)).abs().max().item()
            functional.reset_net(sj)
        rows.append({"what": f"LIF SpikingJelly ({os.environ['SJ_LIF_CUDA_IMPLEMENTATION']})", "ms": ms})
        rows.append({"what": "LIF max |ours - SpikingJelly| spikes", "max_abs": diff})
    except Exception as exc:  # report, don't fail the whole check
        rows.append({"what": f"LIF SpikingJelly unavailable: {exc!r}"[:100], "ms": float("nan")})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dry-run", action="store_true", help="CPU, toy sizes: check that the script runs")
    parser.add_argument("--policies", default="none,block")
    args = parser.parse_args()
    cuda = torch.cuda.is_available() and not args.dry_run
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        from .lif_fused import _TRITON_STATE, _triton_ok

        print("triton kernels:", _triton_ok(), _TRITON_STATE.get("why", ""), flush=True)
        big = dict(batch=32, res=224, name="danet152", warmup=3, repeats=5)
        lif_shape = (4, 32, 256, 56, 56)
    else:
        big = dict(batch=2, res=32, name="danet18", warmup=1, repeats=2)
        lif_shape = (4, 2, 8, 8, 8)
    rows = []
    for policy in args.policies.split(","):
        rows.append(model_check(device, policy, **big))
        print(rows[-1], flush=True)
        if cuda:
            torch.cuda.empty_cache()
    rows += lif_check(device, lif_shape, warmup=3 if cuda else 1, repeats=10 if cuda else 2)
    name = torch.cuda.get_device_name() if cuda else "cpu (dry run)"
    print(f"\n== models.gpu_check on {name}, torch {torch.__version__} ==")
    for r in rows:
        vals = ", ".join(f"{k}={v:.2f}" for k, v in r.items() if k != "what")
        print(f"{r['what']:<48} {vals}")


if __name__ == "__main__":
    main()
