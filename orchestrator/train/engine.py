"""DeepSpeed engine construction: batch arithmetic, optimizer, learning-rate schedule, DeepSpeed JSON."""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import torch

from orchestrator.config.schema import Config
from orchestrator.errors import UserError
from orchestrator.train import dist
from orchestrator.train.precision import Precision
from orchestrator.train.precision import resolve as precision_setting

# Joining the process group lives with the other collectives; the name stays importable from here.
init_distributed = dist.init

# torch's fused optimizer kernels (one kernel over every tensor, no per-parameter Python loop) on these devices;
# they also read a device flag that skips the whole step (`found_inf`), the non-finite policy's tool.
FUSED_DEVICES = ("cuda", "cpu")


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
    return precision_setting(cfg.train.precision, device)


def scaled_lr(cfg: Config) -> float:
    """Linear scaling rule: lr is stated at optim.reference_batch_size."""
    return cfg.optim.lr * cfg.train.global_batch_size / cfg.optim.reference_batch_size


def build_optimizer(cfg: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    """A torch optimizer (DeepSpeed's own would compile FusedAdam on first use), fused where torch has the kernel
    for the parameters' device. No decay on BN/bias/alpha."""
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    lr = scaled_lr(cfg)
    o = cfg.optim
    first = next(model.parameters(), None)
    fused = first is not None and first.device.type in FUSED_DEVICES
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=o.momentum, nesterov=o.nesterov and o.momentum > 0,
                               fused=fused or None, foreach=None if fused else True)
    if o.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(o.betas), fused=fused or None,
                                 foreach=None if fused else True)
    from orchestrator.train.lamb import Lamb

    return Lamb(groups, lr=lr, betas=tuple(o.betas))


def zero_problems(cfg: Config) -> list[str]:
    """Optimizer settings ZeRO cannot run as the recipe means them (one line each)."""
    if cfg.deepspeed.zero_stage >= 1 and cfg.optim.name == "lamb":
        # ZeRO 1/2 hand the optimizer one flat partition per parameter group and rank: LAMB's per-tensor trust
        # ratio would become one ratio over a rank's slice of many layers, another optimizer.
        return [f"optim.name=lamb with deepspeed.zero_stage={cfg.deepspeed.zero_stage}: ZeRO flattens parameters "
                "into per-rank partitions, so LAMB's per-layer trust ratio cannot be computed; use "
                "deepspeed.zero_stage=0 with lamb, or optim.name=sgd|adamw with ZeRO"]
    return []


class StepSkip:
    """Skips an optimizer step where a device flag is set. torch's fused kernels read the flag on the device
    (``found_inf``, the attribute GradScaler sets): weights, moments and step counts stay as they were and nothing
    is read on the host. An optimizer without such a kernel (the project's LAMB) reads it on the host, once per
    step (LAMB reads its trust ratios there anyway)."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self.on_device = bool(optimizer.defaults.get("fused"))
        self._flag: torch.Tensor | None = None
        if not self.on_device:
            step = optimizer.step

            @functools.wraps(step)  # keeps the lr scheduler's marks on the wrapped step
            def gated(*args, **kwargs):
                if self._flag is not None and bool(self._flag):
                    return None
                return step(*args, **kwargs)

            optimizer.step = gated

    def prepare(self) -> None:
        """Call after the engine is built and after a checkpoint is loaded (which restores param-group options
        a checkpoint of another version may lack)."""
        for group in self.optimizer.param_groups:
            if self.on_device:
                group["fused"], group["foreach"] = True, None
            if group.get("momentum"):
                # torch's fused SGD takes "no momentum buffer yet" as its first step and fills the buffers with
                # the gradient inside the kernel, so a skipped first step would leave them uninitialised. Zeros
                # give the same first step exactly (0.9 * 0 + g = g) and make a skipped one harmless.
                for p in group["params"]:
                    state = self.optimizer.state[p]
                    if state.get("momentum_buffer") is None:
                        state["momentum_buffer"] = torch.zeros_like(p)

    def set(self, flag: torch.Tensor) -> None:
        """The next optimizer step is skipped where ``flag`` (a device scalar) is nonzero."""
        if self.on_device:
            self.optimizer.found_inf = flag.float()
        else:
            self._flag = flag


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
    """The DeepSpeed JSON; ``precision`` a resolved train.precision (bf16-mixed autocasts an fp32 engine)."""
    mode = Precision(precision)
    precision = mode.engine
    ds: dict = {
        "train_batch_size": plan.global_batch,
        "train_micro_batch_size_per_gpu": plan.micro_batch,
        "gradient_accumulation_steps": plan.accumulation,
        "zero_optimization": {"stage": cfg.deepspeed.zero_stage},
        "steps_per_print": 10**9,  # the loop reports progress itself
        "wall_clock_breakdown": False,
        # DeepSpeed's throughput timer (on by default) synchronises the device at every forward and every step:
        # two waits for the GPU per step, which the loop (no host round trip inside a step) never needs
        "timers": {"throughput": {"enabled": False}},
    }
    if mode.autocast_dtype is not None:
        # DeepSpeed runs its forward under torch.autocast(enabled=False) when CUDA autocast is on around it but
        # its config has no torch_autocast: the loop's bf16 autocast silently became fp32 on a GPU (not on CPU,
        # where the check it makes does not look). Told here, it autocasts to the same dtype itself; with no
        # module "lower precision safe", every gradient is still reduced in fp32.
        ds["torch_autocast"] = {"enabled": True, "dtype": str(mode.autocast_dtype),
                                "lower_precision_safe_modules": []}  # fmt: skip
    if cfg.deepspeed.zero_stage >= 1:
        if cfg.optim.name != "adamw":
            # DeepSpeed lists the optimizers it has tested ZeRO with (Adam/AdamW, Adagrad, Lion...), not SGD.
            # ZeRO 1/2 only split the optimizer state and the gradients into per-rank slices of flat buffers and
            # run the optimizer on each slice: sound for any elementwise update such as momentum SGD (LAMB's
            # per-tensor trust ratio is not elementwise: zero_problems refuses it).
            ds["zero_allow_untested_optimizer"] = True
        if cfg.train.grad_clip <= 0 and (precision != "bf16" or cfg.deepspeed.zero_stage == 2):
            # Without clipping the global gradient norm is only an overflow check, which reads it on the host
            # every step; the loop's device-side skip does that job (DeepSpeed refuses this for bf16 ZeRO 1).
            ds["zero_optimization"]["compute_grad_norm"] = False
    # Always stated: DeepSpeed's default is 1.0, so leaving it out clipped every step of a train.grad_clip=0 run.
    ds["gradient_clipping"] = max(cfg.train.grad_clip, 0.0)
    if precision == "bf16":
        # BatchNorm buffers must be bf16 too, else DeepSpeed's bf16 forward fails in BN (STACK-NOTES).
        ds["bf16"] = {"enabled": True}
        ds["data_types"] = {"buffer_dtype": "bf16"}
    elif precision == "fp16":
        ds["fp16"] = {"enabled": True, "initial_scale_power": 16}
    ds.update(cfg.deepspeed.extra)
    return ds


def prepare_model(cfg: Config, model: torch.nn.Module, device: str) -> torch.nn.Module:
    """The model on its device, compiled if asked. ``train.channels_last`` is not applied to the parameters:
    DeepSpeed broadcasts each one as ``p.data.view(torch.uint8)``, which a channels_last conv weight refuses, and
    ZeRO turns parameters into views of contiguous flat buffers anyway. The loop feeds channels_last images
    (``loop.to_device``); a convolution runs channels_last when its input or its weight is, so every
    convolution's output follows the input's layout (tests/test_presets.py checks it)."""
    model = model.to(device)
    if cfg.train.compile:  # in place: state_dict keys (checkpoints, exported weights) stay unprefixed
        model.compile(backend=os.environ.get("ORCHESTRATOR_COMPILE_BACKEND", "inductor"))
    return model


def build_engine(cfg: Config, model: torch.nn.Module, plan: BatchPlan, steps_per_epoch: int, precision: str):
    """deepspeed.initialize with our optimizer and scheduler; returns the engine, whose ``step_skip``
    (StepSkip) skips an optimizer step on the device."""
    import deepspeed

    problems = zero_problems(cfg)
    if problems:
        raise UserError(*problems)
    optimizer = build_optimizer(cfg, model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, steps_per_epoch))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(cfg, plan, precision), dist_init_required=False)
    engine.step_skip = StepSkip(optimizer)  # the object DeepSpeed steps (ZeRO swaps its params for partitions)
    engine.step_skip.prepare()
    return engine
