"""DeepSpeed engine construction: batch arithmetic, optimizer, learning-rate schedule, DeepSpeed JSON."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from datetime import timedelta

import torch

from launch.env import RankInfo
from orchestrator.config.schema import Config
from orchestrator.errors import UserError


@dataclass(frozen=True)
class BatchPlan:
    """How the global batch splits over ranks and accumulation steps."""

    global_batch: int
    micro_batch: int  # per rank per forward
    accumulation: int
    world_size: int


def batch_plan(cfg: Config, world_size: int) -> BatchPlan:
    """Global batch = micro batch x world size x accumulation; anything else is a user error."""
    gb = cfg.train.global_batch_size
    if gb % world_size:
        raise UserError(f"train.global_batch_size={gb} is not divisible by the world size {world_size}; "
                        f"use a multiple of {world_size}")
    per_rank = gb // world_size
    micro = cfg.train.micro_batch_size or per_rank
    if per_rank % micro:
        raise UserError(f"train.micro_batch_size={micro} does not divide the per-rank batch {per_rank} "
                        f"(global {gb} / world size {world_size})")
    return BatchPlan(global_batch=gb, micro_batch=micro, accumulation=per_rank // micro, world_size=world_size)


def resolve_device(cfg: Config) -> str:
    if cfg.train.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device=cuda but no CUDA device is visible; valid here: auto, cpu")
    return cfg.train.device


def resolve_precision(cfg: Config, device: str) -> str:
    if cfg.train.precision == "auto":
        return "bf16" if device == "cuda" else "fp32"
    return cfg.train.precision


def scaled_lr(cfg: Config) -> float:
    """Linear scaling rule: lr is stated at optim.reference_batch_size."""
    return cfg.optim.lr * cfg.train.global_batch_size / cfg.optim.reference_batch_size


def build_optimizer(cfg: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    """A torch optimizer (DeepSpeed's own would compile FusedAdam on first use). No decay on BN/bias/alpha."""
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    lr = scaled_lr(cfg)
    o = cfg.optim
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=o.momentum, nesterov=o.nesterov and o.momentum > 0)
    if o.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(o.betas))
    from orchestrator.train.lamb import Lamb

    return Lamb(groups, lr=lr, betas=tuple(o.betas))


def lr_lambda(cfg: Config, steps_per_epoch: int):
    """Multiplier of the scaled lr at an optimizer step: linear warmup, then cosine / step / constant."""
    # The schedule spans train.epochs; train.max_steps only stops early, so a run stopped by max_steps and
    # continued later follows exactly the same lr curve as one that never stopped.
    total = max(1, cfg.train.epochs * steps_per_epoch)
    warm = int(cfg.optim.warmup_epochs * steps_per_epoch)
    floor = cfg.optim.min_lr / scaled_lr(cfg)

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if cfg.optim.schedule == "cosine":
            t = (step - warm) / max(1, total - warm)
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
        if cfg.optim.schedule == "step":
            epoch = step // max(1, steps_per_epoch)
            return cfg.optim.step_gamma ** sum(epoch >= m for m in cfg.optim.step_milestones)
        return 1.0

    return f


def deepspeed_config(cfg: Config, plan: BatchPlan, precision: str) -> dict:
    ds: dict = {
        "train_batch_size": plan.global_batch,
        "train_micro_batch_size_per_gpu": plan.micro_batch,
        "gradient_accumulation_steps": plan.accumulation,
        "zero_optimization": {"stage": cfg.deepspeed.zero_stage},
        "steps_per_print": 10**9,  # the loop reports progress itself
        "wall_clock_breakdown": False,
    }
    if cfg.train.grad_clip > 0:
        ds["gradient_clipping"] = cfg.train.grad_clip
    if precision == "bf16":
        # BatchNorm buffers must be bf16 too, else DeepSpeed's bf16 forward fails in BN (STACK-NOTES).
        ds["bf16"] = {"enabled": True}
        ds["data_types"] = {"buffer_dtype": "bf16"}
    elif precision == "fp16":
        ds["fp16"] = {"enabled": True, "initial_scale_power": 16}
    ds.update(cfg.deepspeed.extra)
    return ds


def init_distributed(info: RankInfo, device: str, timeout_s: int) -> None:
    """Process group from the rank environment (no hostfile): gloo on CPU, NCCL on GPUs."""
    import importlib

    import deepspeed

    if device == "cpu":
        ds_torch = importlib.import_module("deepspeed.comm.torch")  # (attribute access would give torch itself)
        # DeepSpeed JIT-compiles a shared-memory all-reduce op on CPU; it serves only its inference all-reduce,
        # never training (gloo does that). Skipping it saves ~20-120 s per start and removes a hang: a process
        # killed mid-compile leaves torch's build lock behind and every later start waits on it forever.
        ds_torch.build_shm_op = lambda: None

    for k, v in info.torch_env().items():
        os.environ[k] = v
    if device == "cuda":
        torch.cuda.set_device(info.local_rank % max(1, torch.cuda.device_count()))
    deepspeed.init_distributed(dist_backend="nccl" if device == "cuda" else "gloo", auto_mpi_discovery=False,
                               verbose=False, timeout=timedelta(seconds=timeout_s), rank=info.rank,
                               world_size=info.world_size)


def build_engine(cfg: Config, model: torch.nn.Module, plan: BatchPlan, steps_per_epoch: int, precision: str):
    """deepspeed.initialize with our optimizer and scheduler; returns the engine."""
    import deepspeed

    optimizer = build_optimizer(cfg, model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, steps_per_epoch))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(cfg, plan, precision), dist_init_required=False)
    return engine
