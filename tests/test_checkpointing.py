"""Activation checkpointing: every policy x spike storage gives the gradients, outputs and BatchNorm running
statistics of ``none``; recompute never advances neuron state twice; ``auto`` picks and reports a policy; bf16;
DeepSpeed ZeRO 1 and 2 through the project's launcher (2 gloo ranks)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models import checkpointing as ckpt_mod
from models import create_model
from models import neurons as neurons_mod
from models.checkpointing import (
    BACKWARD_TRANSIENT,
    COST_ORDER,
    activation_bytes,
    choose_policy,
    saved_activation_bytes,
)

REPO = Path(__file__).resolve().parents[1]
POLICIES = ("block", "time", "block_time", "auto")
STORAGES = ("float", "byte", "bit")
# (model name, overrides, T): DANet in both domains (pre and sew branches) and a baseline (post branches)
CASES = [
    ("danet18", {}, 2),
    ("danet50", {"da": {"domain": "spike", "span": "stage", "weights": "learnable"}}, 3),
    ("spiking_resnet18", {"neuron": {"type": "plif"}}, 4),
]


def _step(name: str, overrides: dict, T: int, policy: str, storage: str, dtype=None):
    torch.manual_seed(0)
    m = create_model(name, num_classes=10, T=T, width=4, input_size=32, checkpointing=policy,
                     spike_storage=storage, **overrides)  # fmt: skip
    m.train()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([1, 7])
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
        out = m(x)
        loss = torch.nn.functional.cross_entropy(out.float().mean(0), labels)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in m.named_parameters() if p.grad is not None}
    bufs = {n: b.detach().clone() for n, b in m.named_buffers()}
    return m, out.detach().float(), grads, bufs


@pytest.mark.parametrize("name,overrides,T", CASES, ids=[c[0] + f"-T{c[2]}" for c in CASES])
def test_policies_match_none(name, overrides, T):
    _, out0, g0, b0 = _step(name, overrides, T, "none", "float")
    assert g0 and b0
    for policy in POLICIES:
        for storage in STORAGES if policy != "auto" else ("float",):  # auto probes 4 policies: once is enough
            m, out, g, b = _step(name, overrides, T, policy, storage)
            tag = f"{name} {policy}/{storage}"
            assert set(g) == set(g0), tag  # every parameter still gets a gradient (non-reentrant)
            torch.testing.assert_close(out, out0, rtol=0, atol=0, msg=tag)
            for k in g0:
                rel = ((g[k] - g0[k]).norm() / g0[k].norm().clamp_min(1e-30)).item()
                assert rel <= 1e-5, f"{tag}: grad {k} rel err {rel:.2e}"
            for k in b0:  # running mean/var and num_batches_tracked: updated exactly once
                assert torch.equal(b[k], b0[k]), f"{tag}: buffer {k}"
            if policy == "auto":
                assert m.checkpointing == "auto" and m.checkpointing_resolved in COST_ORDER


def test_recompute_never_advances_state(monkeypatch):
    """Every neuron call (first forward and each recompute) starts from the initial state and reproduces the
    first forward's spikes: a recompute cannot update the membrane a second time (SpikingJelly #629)."""
    entries: dict[int, list[bool]] = {}
    sums: dict[int, set[float]] = {}
    original = neurons_mod.MultiStepNeuron.forward_with_state

    def spy(self, x_seq, v=None):
        entries.setdefault(id(self), []).append(v is None)
        # a recompute may stop early inside the neuron (torch stops once the saved tensors are rebuilt)
        s, v_out = original(self, x_seq, v)
        sums.setdefault(id(self), set()).add(float(s.detach().double().sum()))
        return s, v_out

    monkeypatch.setattr(neurons_mod.MultiStepNeuron, "forward_with_state", spy)
    for policy in ("block", "time", "block_time"):
        entries.clear()
        sums.clear()
        _step("danet18", {}, 3, policy, "bit")
        assert any(len(c) > 1 for c in entries.values()), f"{policy}: nothing recomputed"
        assert all(all(c) for c in entries.values()), f"{policy}: a call started from a carried-over state"
        assert all(len(s) == 1 for s in sums.values()), f"{policy}: a recompute produced different spikes"


def test_auto_chooses_by_budget_and_logs(caplog):
    m = create_model("danet18", num_classes=10, T=2, width=4, input_size=32, checkpointing="auto")
    policy, est = choose_policy(m, batch=2, res=32, budget_gb=0.0)
    assert policy == "none" and set(est) == set(COST_ORDER)
    assert est["block_time"] < est["none"]
    assert choose_policy(m, 2, 32, budget_gb=1e-9)[0] == "block_time"  # nothing fits: the smallest
    assert est["block"] < est["time"] < est["none"]
    assert choose_policy(m, 2, 32, budget_gb=est["block"] * 1.001)[0] == "block"

    torch.manual_seed(0)  # the same weights and input as _step below, so the buffers can be compared
    tiny = create_model("danet18", num_classes=10, T=2, width=4, input_size=32, checkpointing="auto",
                        memory_budget_gb=1e-9)  # fmt: skip
    tiny.train()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with caplog.at_level(logging.INFO, logger="models.checkpointing"):
        tiny(x).mean().backward()
    assert tiny.checkpointing_resolved == "block_time"
    assert any("checkpointing=auto -> block_time" in r.getMessage() for r in caplog.records)
    # buffers untouched by probing: one step's update, as without auto
    _, _, _, b0 = _step("danet18", {}, 2, "none", "float")
    b = {n: x for n, x in tiny.named_buffers()}
    assert all(torch.equal(b[k], b0[k]) for k in b0)


def test_activation_bytes_adds_the_backward_transient():
    """Saved bytes of the policy + the GPU-measured transient, a fraction of none's float-spike saved bytes; the
    model's spike storage is left as it was."""
    m = create_model("danet18", num_classes=10, T=2, width=4, input_size=32, spike_storage="bit")
    ref = create_model("danet18", num_classes=10, T=2, width=4, input_size=32, spike_storage="float")
    none_float = saved_activation_bytes(ref, "none", 1, 32)
    got = activation_bytes(m, ("none", "block"), 1, 32)
    for policy in ("none", "block"):
        assert got[policy] == saved_activation_bytes(m, policy, 1, 32) + int(BACKWARD_TRANSIENT * none_float)
    assert saved_activation_bytes(m, "none", 1, 32) < none_float  # bit storage is still in force
    assert all(c.spike_storage == "bit" for c in m.modules() if getattr(c, "spike_input", False))


def test_auto_resolves_on_a_bf16_model():
    """A model whose weights are bf16 (train.precision=bf16: DeepSpeed's bf16 engine) probes itself with a bf16
    image: an fp32 probe stopped every ImageNet preset (checkpointing: auto) at its first forward. Its activations
    are half fp32's, so the estimates are too."""
    m32 = create_model("danet18", num_classes=10, T=2, width=4, input_size=32, checkpointing="auto")
    m16 = create_model("danet18", num_classes=10, T=2, width=4, input_size=32, checkpointing="auto").bfloat16()
    m16.train()
    out = m16(torch.randn(2, 3, 32, 32).bfloat16())
    assert out.dtype == torch.bfloat16 and m16.checkpointing_resolved == "none"
    out.float().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in m16.parameters())
    half, full = choose_policy(m16, 2, 32, 0.0)[1], choose_policy(m32, 2, 32, 0.0)[1]
    static = sum(p.numel() for p in m32.parameters()) * 16 / 2**30
    assert all(0.4 < (half[k] - static) / (full[k] - static) < 0.6 for k in COST_ORDER), (half, full)


def test_bf16_autocast_every_policy(monkeypatch):
    # CUDA's convolution_backward refuses mixed dtypes (bf16 grad, fp32 weight) where the CPU one quietly
    # accepts them, so the spike-storage conv's backward is checked for one dtype per call here.
    seen = []
    original = ckpt_mod._conv_backward

    def same_dtypes(grad, x, weight, *args):
        seen.append((grad.dtype, x.dtype, weight.dtype))
        return original(grad, x, weight, *args)

    monkeypatch.setattr(ckpt_mod, "_conv_backward", same_dtypes)
    _, out0, g0, _ = _step("danet18", {}, 2, "none", "float", dtype=torch.bfloat16)
    for policy in ("block", "time", "block_time"):
        _, out, g, _ = _step("danet18", {}, 2, policy, "bit", dtype=torch.bfloat16)
        assert seen and all(len(set(d)) == 1 for d in seen), f"{policy}: mixed dtypes in conv backward {set(seen)}"
        seen.clear()
        assert all(v.dtype == torch.float32 for v in g.values())
        assert set(g) == set(g0)
        assert all(torch.isfinite(v).all() for v in g.values())
        torch.testing.assert_close(out, out0, rtol=0, atol=0)
        for k in g0:
            rel = ((g[k].float() - g0[k].float()).norm() / g0[k].float().norm().clamp_min(1e-30)).item()
            assert rel <= 1e-2, f"{policy} bf16 grad {k}: {rel:.2e}"


# ZeRO 1 with checkpointing=auto and bit spikes: every ImageNet preset in tests/test_presets.py.
@pytest.mark.parametrize("stage,policy", [(2, "block_time")])
def test_deepspeed_zero_launch(tmp_path, stage, policy):
    data = REPO / ".cache/data/digits"
    if not (data / "meta.json").is_file():
        pytest.skip("digits dataset not built (.cache/data/digits)")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.setdefault("DS_ACCELERATOR", "cpu")
    r = subprocess.run(
        [sys.executable, "-m", "orchestrator", "launch", "--run-dir", str(tmp_path / "run"), f"data.root={data}",
         "model.width=8", "train.max_steps=3", f"model.checkpointing={policy}", "model.spike_storage=bit",
         f"deepspeed.zero_stage={stage}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert summary["status"] == "completed", summary
