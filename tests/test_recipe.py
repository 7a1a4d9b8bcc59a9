"""Recipe options: mixup/cutmix, soft-target and per-time-step losses, EMA of weights, torch.compile, presets."""

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
from orchestrator.train.ema import EMA
from orchestrator.train.loop import LoopState, loss_fn
from orchestrator.train.mix import mix_batch

REPO = Path(__file__).resolve().parents[1]


def _batch(n=8, k=10):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, 16, 16, generator=g), torch.arange(n) % k


def test_mix_off_is_one_hot_and_unchanged():
    x, y = _batch()
    xm, t = mix_batch(x, y, 10, 0.0, 0.0, seed=0, step=3)
    assert xm is x and torch.equal(t.argmax(1), y) and torch.allclose(t.sum(1), torch.ones(8))


@pytest.mark.parametrize("mixup,cutmix", [(0.2, 0.0), (0.0, 1.0), (0.8, 1.0)])
def test_mix_is_deterministic_and_targets_are_distributions(mixup, cutmix):
    x, y = _batch()
    a = mix_batch(x, y, 10, mixup, cutmix, seed=1, step=5, micro=2)
    b = mix_batch(x, y, 10, mixup, cutmix, seed=1, step=5, micro=2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert torch.allclose(a[1].sum(1), torch.ones(8))
    assert a[1].shape == (8, 10) and a[0].shape == x.shape
    others = [mix_batch(x, y, 10, mixup, cutmix, seed=1, step=s)[1] for s in range(6, 12)]
    assert any(not torch.equal(a[1], o) for o in others), "draws must change with the step"


def test_mixup_is_the_convex_combination_its_targets_say():
    x, y = _batch()
    xm, t = mix_batch(x, y, 10, 0.4, 0.0, seed=0, step=0)
    lam = float(t[0, y[0]]) if y[0] != y[-1] else None
    assert lam is not None
    assert torch.allclose(xm, lam * x + (1 - lam) * x.flip(0), atol=1e-6)


def test_cutmix_pastes_a_box_of_the_area_its_targets_say():
    x, y = _batch()
    xm, t = mix_batch(x, y, 10, 0.0, 1.0, seed=3, step=7)
    changed = (xm != x).any(dim=1)[0]  # [H, W] for sample 0
    frac = float(changed.float().mean())
    assert abs((1 - float(t[0, y[0]])) - frac) < 1e-6
    assert torch.equal(xm[0][:, ~changed], x[0][:, ~changed])


@pytest.mark.parametrize("loss", ["mean_output", "per_timestep"])
def test_loss_takes_soft_targets(loss):
    cfg = load_config("digits", [f"train.loss={loss}", "train.label_smoothing=0.1"])
    out = torch.randn(4, 8, 10)
    y = torch.arange(8) % 10
    hard = loss_fn(cfg, out, y)
    soft = loss_fn(cfg, out, torch.nn.functional.one_hot(y, 10).float())
    assert torch.allclose(hard, soft, atol=1e-6)


def test_per_timestep_loss_is_the_mean_of_each_steps_loss():
    cfg = load_config("digits", ["train.loss=per_timestep"])
    out, y = torch.randn(4, 8, 10), torch.arange(8) % 10
    each = torch.stack([torch.nn.functional.cross_entropy(out[t], y) for t in range(4)]).mean()
    assert torch.allclose(loss_fn(cfg, out, y), each, atol=1e-6)


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)
        self.bn = torch.nn.BatchNorm1d(3)

    def forward(self, x):  # [T=1, N, K], as the models return
        return self.bn(self.fc(x))[None]


def test_ema_update_is_the_moving_average():
    torch.manual_seed(0)
    net = _Net()
    ema = EMA(net, 0.9)
    w0 = net.fc.weight.detach().clone()
    with torch.no_grad():
        net.fc.weight.add_(1.0)
        net.bn.running_mean.fill_(2.0)
    ema.on_step_end(LoopState(), {})
    assert torch.allclose(ema.shadow.fc.weight, 0.9 * w0 + 0.1 * (w0 + 1.0), atol=1e-6)
    assert torch.equal(ema.shadow.bn.running_mean, net.bn.running_mean)
    assert not any(p.requires_grad for p in ema.shadow.parameters())
    with pytest.raises(ValueError):
        EMA(net, 1.0)


def test_ema_evaluates_alongside_at_epoch_end():
    torch.manual_seed(0)
    net = _Net()
    loader = [(torch.randn(6, 4), torch.arange(6) % 3) for _ in range(2)]
    cfg = load_config("digits", ["model.num_classes=3"])
    ema = EMA(net, 0.5, loader, cfg, "cpu")
    m = {"val_top1": 0.5}
    ema.on_epoch_end(LoopState(), m)
    assert {"ema_val_top1", "ema_val_top5", "ema_val_loss"} <= set(m) and 0.0 <= m["ema_val_top1"] <= 1.0
    empty: dict = {}
    ema.on_epoch_end(LoopState(), empty)  # no evaluation this epoch: nothing added
    assert empty == {}


def test_module_compile_keeps_state_dict_keys():
    net = _Net()
    keys = list(net.state_dict())
    net.compile(backend="eager")
    assert list(net.state_dict()) == keys
    assert net(torch.randn(5, 4)).shape == (1, 5, 3)


@pytest.mark.parametrize("name", ["danet18_imagenet", "danet152_imagenet", "digits"])
def test_presets_state_every_recipe_option(name):
    text = (REPO / "orchestrator/presets" / f"{name}.yaml").read_text()
    for key in ("name:", "lr:", "momentum:", "nesterov:", "weight_decay:", "schedule:", "warmup_epochs:",
                "label_smoothing:", "loss:", "mixup_alpha:", "cutmix_alpha:", "ema_decay:", "grad_clip:",
                "precision:", "channels_last:", "compile:", "global_batch_size:", "epochs:", "zero_stage:"):
        assert key in text, f"{name}.yaml does not state {key}"


@pytest.mark.slow  # one digits epoch + three evaluation passes: ~8 min wall on the busy 2-core machine
def test_worker_runs_with_mixup_cutmix_ema_and_compile(tmp_path):
    """One real `orchestrator train` rank (DeepSpeed, gloo): 2 steps = 1 epoch with every option on; the epoch's
    EMA evaluation and the mixed-target loss must run and the summary must be complete."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "ORCHESTRATOR_COMPILE_BACKEND": "eager",
           "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(29500 + os.getpid() % 2000)}
    env.pop("MLFLOW_TRACKING_URI", None)
    run_dir = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "orchestrator", "train", "--run-dir", str(run_dir),
                        f"data.root={REPO}/.cache/data/digits", "model.width=4", "train.epochs=1",
                        "train.global_batch_size=512", "train.ema_decay=0.9", "data.mixup_alpha=0.2",
                        "data.cutmix_alpha=1.0", "train.compile=true", "tracking.backend=none",
                        "train.log_every_steps=1"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["status"] == "completed" and s["steps"] >= 1 and s["val_top1"] is not None, s
    assert s["loss_tail"] and all(math.isfinite(v) for v in s["loss_tail"]) and len(s["loss_digest"]) == 64


def _dry_run(*args: str) -> str:
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    r = subprocess.run([sys.executable, "-m", "orchestrator", "launch", "--config", "danet152_imagenet", "--dry-run",
                        *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout + r.stderr  # with --nodes the plan goes to stderr, the sbatch script to stdout


def _check_plan(out: str, world: int) -> None:
    import re

    m = re.search(r"global (\d+) = (\d+) ranks x micro-batch (\d+) x accumulation (\d+)", out)
    assert m, out
    gb, ranks, micro, acc = map(int, m.groups())
    assert gb == 1024 and ranks == world and ranks * micro * acc == gb, out  # per-GPU batch = micro x acc
    assert re.search(r"-> 1252 steps per epoch", out), out  # ceil(1,281,167 / 1024)
    assert re.search(r"wall time\s+~[\d.]+ h for 200 epochs", out), out
    assert re.search(r"memory\s+per GPU", out), out
    for recipe in ("sgd lr 0.1 @ batch 256 -> 0.4 @ 1024", "cosine", "warmup 5.0", "label smoothing 0.1"):
        assert recipe in out, f"{recipe!r} missing from:\n{out}"


@pytest.mark.slow  # plan.describe's memory estimate builds DANet-152: minutes on a busy 2-core machine
def test_dry_run_prints_batches_steps_and_wall_time():
    """`launch --config danet152_imagenet --dry-run --nodes 4`: the plan for 4 x 8 GPUs (stderr) and the sbatch
    script (stdout). Without --nodes a cluster preset is described for its own allocation, the same 32 GPUs."""
    out = _dry_run("--nodes", "4")
    _check_plan(out, 32)
    assert out.startswith("#!/bin/bash")


def test_ema_of_a_compiled_model_runs_its_own_weights():
    net = _Net()
    net.compile(backend="eager")
    ema = EMA(net, 0.5)
    with torch.no_grad():
        for p in ema.shadow.parameters():
            p.zero_()
    ema.shadow.eval()
    assert float(ema.shadow(torch.randn(4, 4)).abs().sum()) < 1e-3  # BN of a zero layer, not the live weights
