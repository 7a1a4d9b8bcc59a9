"""The recipe's optimizers, schedules, linear lr scaling, and DeepSpeed's gradient accumulation and clipping."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from orchestrator.config import load_config
from orchestrator.train.engine import batch_plan, build_optimizer, deepspeed_config, lr_lambda, scaled_lr
from orchestrator.train.lamb import Lamb

REPO = Path(__file__).resolve().parents[1]


def cfg(*overrides: str):
    return load_config("digits", list(overrides))


def test_lr_scales_linearly_with_the_global_batch():
    c = cfg("optim.lr=0.1", "optim.reference_batch_size=256", "train.global_batch_size=1024")
    assert scaled_lr(c) == pytest.approx(0.4)


def test_warmup_then_cosine_to_the_floor():
    c = cfg("optim.schedule=cosine", "optim.warmup_epochs=2", "train.epochs=10", "optim.lr=0.1",
            "optim.min_lr=0.001", "train.global_batch_size=256", "optim.reference_batch_size=256")
    f = lr_lambda(c, steps_per_epoch=10)
    assert [f(s) for s in range(3)] == pytest.approx([0.05, 0.10, 0.15])  # linear warmup over 20 steps
    assert f(19) == pytest.approx(1.0) and f(20) == pytest.approx(1.0)
    mid = 20 + (100 - 20) // 2
    assert f(mid) == pytest.approx(0.01 + 0.99 * 0.5, abs=1e-9)  # half way down the cosine
    assert f(100) == pytest.approx(0.01) and f(150) == pytest.approx(0.01)  # min_lr / lr, held


def test_step_schedule_and_constant():
    c = cfg("optim.schedule=step", "optim.step_milestones=[2,4]", "optim.step_gamma=0.5", "optim.warmup_epochs=0")
    f = lr_lambda(c, steps_per_epoch=5)
    assert [f(s) for s in (0, 9, 10, 19, 20, 99)] == pytest.approx([1, 1, 0.5, 0.5, 0.25, 0.25])
    g = lr_lambda(cfg("optim.schedule=constant", "optim.warmup_epochs=0"), steps_per_epoch=5)
    assert g(0) == g(1000) == 1.0


def test_optimizers_and_no_decay_on_norms_and_biases():
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    sgd = build_optimizer(cfg("optim.name=sgd", "optim.momentum=0.9", "optim.nesterov=true",
                              "optim.weight_decay=5e-5"), net)
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["nesterov"] and sgd.defaults["momentum"] == 0.9
    decayed, plain = sgd.param_groups
    assert decayed["weight_decay"] == 5e-5 and [p.ndim for p in decayed["params"]] == [2]
    assert plain["weight_decay"] == 0.0 and all(p.ndim == 1 for p in plain["params"]) and len(plain["params"]) == 3
    assert isinstance(build_optimizer(cfg("optim.name=adamw"), net), torch.optim.AdamW)
    assert isinstance(build_optimizer(cfg("optim.name=lamb"), net), Lamb)


def test_lamb_step_is_adam_scaled_by_the_trust_ratio():
    w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))  # norm 5
    w.grad = torch.tensor([0.5, -1.0])
    Lamb([w], lr=0.1, betas=(0.9, 0.999), eps=0.0).step()
    update = torch.sign(torch.tensor([0.5, -1.0]))  # Adam's first bias-corrected step is grad / |grad|
    expected = torch.tensor([3.0, 4.0]) - 0.1 * (5.0 / update.norm()) * update
    assert torch.allclose(w.detach(), expected, atol=1e-6)


def test_deepspeed_config_carries_accumulation_clipping_and_precision():
    c = cfg("train.global_batch_size=64", "train.micro_batch_size=8", "train.grad_clip=1.5")
    ds = deepspeed_config(c, batch_plan(c, 2), "bf16")
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (64, 8, 4)
    assert ds["gradient_clipping"] == 1.5 and ds["bf16"]["enabled"] and ds["data_types"]["buffer_dtype"] == "bf16"
    assert deepspeed_config(c, batch_plan(c, 2), "fp16")["fp16"]["enabled"]


def _probe(port: int, *overrides: str, env: dict | None = None) -> dict:
    base = ["optim.name=sgd", "optim.momentum=0", "optim.schedule=constant", "optim.warmup_epochs=0",
            "optim.lr=0.5", "optim.reference_batch_size=16", "train.global_batch_size=16"]
    r = subprocess.run([sys.executable, str(REPO / "tests/helpers/engine_probe.py"), str(port), *base, *overrides],
                       capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})})
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads([ln for ln in r.stdout.splitlines() if ln.startswith("{")][-1])


def test_real_engine_accumulates_micro_batches_and_clips():
    one = _probe(29761, "train.micro_batch_size=16")
    four = _probe(29762, "train.micro_batch_size=4")
    assert one["accumulation"] == 1 and four["accumulation"] == 4 and one["steps"] == four["steps"] == 1
    # 4 micro-batches of 4 accumulate to the gradient of the batch of 16: the same step
    assert four["weight"] == pytest.approx(one["weight"], abs=1e-6) and four["bias"] == pytest.approx(one["bias"], abs=1e-6)
    clipped = _probe(29763, "train.micro_batch_size=16", "train.grad_clip=0.01")
    torch.manual_seed(0)
    w0 = torch.nn.Linear(6, 3)  # the probe's initial weights (same seed, same construction)
    start = torch.cat([w0.weight.detach().flatten(), w0.bias.detach()])
    moved = lambda r: torch.tensor(r["weight"] + r["bias"]) - start  # noqa: E731
    assert moved(clipped).norm() == pytest.approx(0.5 * 0.01, rel=1e-2)  # lr x the clipped gradient norm
    assert moved(one).norm() > 10 * moved(clipped).norm()
    assert math.isfinite(moved(one).norm())


def test_real_engine_trains_in_bf16_mixed_under_autocast():
    """train.precision=bf16-mixed: an fp32 DeepSpeed engine (fp32 weights, no bf16 block in its config, ZeRO 1's
    norm check off without clipping) and a bf16 forward under autocast; the step equals fp32's to bf16 resolution."""
    c = cfg("train.global_batch_size=64", "deepspeed.zero_stage=1")
    ds = deepspeed_config(c, batch_plan(c, 2), "bf16-mixed")
    assert "bf16" not in ds and "data_types" not in ds and ds["zero_optimization"]["compute_grad_norm"] is False
    # DeepSpeed autocasts its forward to bf16 itself (tests/test_presets.py: without it, off on a GPU), and no
    # module's gradients are reduced in bf16
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "torch.bfloat16", "lower_precision_safe_modules": []}
    assert "torch_autocast" not in deepspeed_config(c, batch_plan(c, 2), "fp32")
    assert ds["timers"] == {"throughput": {"enabled": False}}  # its timer synchronises the device per step
    assert deepspeed_config(c, batch_plan(c, 2), "bf16")["zero_optimization"].get("compute_grad_norm") is None
    ref = _probe(29766, "train.micro_batch_size=16", env={"PROBE_MODEL": "bn"})
    mixed = _probe(29767, "train.micro_batch_size=16", "train.precision=bf16-mixed", env={"PROBE_MODEL": "bn"})
    assert mixed["precision"] == "bf16-mixed" and mixed["weight_dtype"] == "torch.float32"
    assert mixed["out_dtype"] == "torch.bfloat16" and ref["out_dtype"] == "torch.float32" and mixed["steps"] == 1
    assert mixed["weight"] == pytest.approx(ref["weight"], abs=2e-2) and mixed["weight"] != ref["weight"]


def test_real_engine_trains_in_bf16_through_deepspeed():
    """train.precision=bf16: DeepSpeed's bf16 engine (weights bf16, BatchNorm buffers too), on CPU here as on GPUs."""
    ref = _probe(29764, "train.micro_batch_size=16", env={"PROBE_MODEL": "bn"})
    low = _probe(29765, "train.micro_batch_size=16", "train.precision=bf16", env={"PROBE_MODEL": "bn"})
    assert ref["precision"] == "fp32" and low["precision"] == "bf16" and low["weight_dtype"] == "torch.bfloat16"
    assert low["steps"] == 1
    # the same step to bf16 resolution (8 bits of mantissa)
    assert low["weight"] == pytest.approx(ref["weight"], abs=2e-2) and low["weight"] != ref["weight"]
