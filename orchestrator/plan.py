"""Before queueing for days: what a config costs. Memory per GPU for each checkpointing policy, the largest
micro-batch that fits, and the recipe's batch arithmetic and wall-time estimate.

Memory model (per GPU): weights + gradients + optimizer state (+ fp32 master copy under bf16/fp16, divided by the
data-parallel size under ZeRO 1/2) + activations saved for backward + a recompute/workspace term. Activations are
not guessed: one forward of the real model at batch 1 and a small resolution runs under
``torch.autograd.graph.saved_tensors_hooks`` with each policy switched on, counting the bytes autograd keeps
(distinct storages only), then scales by batch x (resolution / probe resolution)^2. Activations are proportional
to pixels for every layer of a ResNet, so this scaling is exact up to rounding of odd feature-map sizes.
What a step holds at its peak beyond the saved tensors (gradients in flight, the DA gradient stash, a recomputed
block) is added as a fraction of ``none``'s saved bytes measured on an H200 (``BACKWARD_TRANSIENT``); against
that GPU's measured peaks the estimate is within -1% to +12% per image (BENCHMARKS.md "## Memory", GPU).
"""

from __future__ import annotations

import functools
import json
from dataclasses import replace
from pathlib import Path

from orchestrator.config.schema import Config

# cheapest in recompute first (models.checkpointing.COST_ORDER): time recomputes elementwise ops, block convolutions
POLICIES = ("none", "time", "block", "block_time")
IMAGENET_TRAIN = 1_281_167
# Measured per-GPU training rate of a spiking ResNet-152 at T=4, 224 px: SEW-ResNet-152's authors' logs,
# ~300 img/s on 8x A100 (DANET.md). Other depths scale by GFLOPs. Replace with a measured figure when you have one.
# (One H200 ran danet152's bf16 step at 55.9 img/s at batch 32, compute only: no loader, no all-reduce.)
ASSUMED_IMG_S_PER_GPU_152 = 300 / 8
WORKSPACE_FRACTION = 0.10  # allocator fragmentation and cuDNN workspaces, on top of the estimate
PROBE_RES = 64


def _bytes_per_param(cfg: Config, precision: str, dp: int) -> float:
    """Weights + grads + optimizer state per parameter, in bytes, with ZeRO sharding of what it shards."""
    opt_states = {"sgd": 1 if cfg.optim.momentum > 0 else 0, "adamw": 2, "lamb": 2}[cfg.optim.name]
    low = precision in ("bf16", "fp16")  # DeepSpeed's low-precision engines; bf16-mixed keeps fp32 weights
    weights = 2 if low else 4
    grads = 2 if low else 4
    optim = 4 * opt_states + (4 if low else 0)  # fp32 master copy under mixed precision
    stage = cfg.deepspeed.zero_stage
    if stage >= 1:
        optim /= dp
    if stage >= 2:
        grads /= dp
    return weights + grads + optim


def activation_bytes(cfg: Config, res: int = PROBE_RES, batch: int = 1) -> tuple[dict[str, int], int]:
    """({policy: activation bytes of one step}, parameter count) for ``cfg.model``, from one build of the model.

    ``models.checkpointing.activation_bytes``: saved tensors (distinct storages) plus the inputs that checkpoints
    keep, parameters excluded, plus the backward transient measured on a GPU (``BACKWARD_TRANSIENT``).
    """
    from models import create_model
    from models.bn_neuron import AUTO_ON_CUDA
    from models.checkpointing import activation_bytes as measure
    from orchestrator.train.worker import model_kwargs

    kw = model_kwargs(cfg)
    kw.update(input_size=cfg.model.input_size, checkpointing="none")
    if kw.get("fuse_bn_neuron") == "auto":  # the probe runs here on CPU, where auto fuses: size what the GPU runs
        kw["fuse_bn_neuron"] = AUTO_ON_CUDA
    model = create_model(cfg.model.name, **kw)
    acts = measure(model, POLICIES, batch, res, cfg.model.in_channels)
    return acts, sum(p.numel() for p in model.parameters())


def _need(static: float, per_image: float, batch: int) -> float:
    return (static + batch * per_image) * (1 + WORKSPACE_FRACTION)


def estimate(cfg: Config, gpu_mem_gb: float, world_size: int, precision: str = "bf16-mixed",
             probe: tuple[dict[str, int], int] | None = None) -> list[dict]:
    """Per-policy memory estimate at the config's micro-batch and the largest micro-batch that fits.
    ``probe``: ``activation_bytes(cfg)`` already measured (it builds the model), for estimates of one model at
    several micro-batches."""
    res = cfg.data.image_size
    micro = cfg.train.micro_batch_size or max(1, cfg.train.global_batch_size // world_size)
    act_scale = (res / PROBE_RES) ** 2 * (1.0 if precision == "fp32" else 0.5)  # every low precision: 2-byte activations
    acts, n_params = probe or activation_bytes(cfg)
    static = n_params * _bytes_per_param(cfg, precision, world_size)
    rows = []
    for policy in POLICIES:
        per_image = acts[policy] * act_scale
        budget = gpu_mem_gb * 2**30
        fits = int(max(0.0, budget / (1 + WORKSPACE_FRACTION) - static) // max(per_image, 1))
        need = _need(static, per_image, micro)
        rows.append({"policy": policy, "micro_batch": micro, "est_gb": round(need / 2**30, 2),
                     "act_mb_per_image": round(per_image / 2**20, 1), "static_gb": round(static / 2**30, 2),
                     "max_micro_batch": fits, "fits": need <= budget})  # fmt: skip
    return rows


def choose_auto(rows: list[dict]) -> dict:
    """`auto`: the cheapest policy (in recompute) that fits; the order of POLICIES is cheapest first."""
    for r in rows:
        if r["fits"]:
            return r
    return rows[-1]


def plan_memory(cfg: Config, gpu_mem_gb: float) -> str:
    world = cfg.launch.nodes * cfg.launch.gpus_per_node
    rows = estimate(cfg, gpu_mem_gb, world)
    auto = choose_auto(rows)
    out = [f"{cfg.model.name} T={cfg.model.T} {cfg.data.image_size}px bf16, world size {world}, "
           f"micro-batch {rows[0]['micro_batch']} per GPU, {gpu_mem_gb:g} GiB per GPU",
           f"{'policy':<11} {'est. GiB':>9} {'act MiB/img':>12} {'static GiB':>11} {'max micro-batch':>16}  fits"]
    for r in rows:
        out.append(f"{r['policy']:<11} {r['est_gb']:>9.2f} {r['act_mb_per_image']:>12.1f} {r['static_gb']:>11.2f} "
                   f"{r['max_micro_batch']:>16d}  {'yes' if r['fits'] else 'no'}")
    out.append(f"auto -> {auto['policy']}")
    return "\n".join(out)


def train_size(cfg: Config) -> int:
    meta = Path(cfg.data.root) / "meta.json"
    if meta.is_file():
        return int(json.loads(meta.read_text())["counts"]["train"])
    return IMAGENET_TRAIN if cfg.data.name == "imagenet" else 0


def describe(cfg: Config, nodes: int, gpus_per_node: int) -> str:
    """The resolved recipe and its arithmetic for a given allocation (printed by `launch --dry-run`)."""
    from orchestrator.train.engine import batch_plan, scaled_lr

    world = nodes * gpus_per_node
    plan = batch_plan(cfg, world)
    n = train_size(cfg)
    steps = -(-n // plan.global_batch) if n else 0
    o, t, m = cfg.optim, cfg.train, cfg.model
    lines = [
        f"model      {m.name} T={m.T} width={m.width} connection={m.connection} da={m.da.domain}/{m.da.span}/"
        f"{m.da.weights} neuron={m.neuron.type}(tau={m.neuron.tau}, v_th={m.neuron.v_threshold}, "
        f"surrogate={m.neuron.surrogate}:{m.neuron.surrogate_alpha})",
        f"optimizer  {o.name} lr {o.lr} @ batch {o.reference_batch_size} -> {scaled_lr(cfg):.4g} @ {plan.global_batch}, "
        f"momentum {o.momentum}, wd {o.weight_decay}, {o.schedule} schedule, warmup {o.warmup_epochs} epochs",
        f"loss       {t.loss}, label smoothing {t.label_smoothing}, precision {t.precision}, epochs {t.epochs}",
        f"batch      global {plan.global_batch} = {world} ranks x micro-batch {plan.micro_batch} x accumulation "
        f"{plan.accumulation}",
        f"data       {cfg.data.root}: {n or 'unknown'} training images -> {steps or '?'} steps per epoch",
    ]
    if n:
        gflops = _gflops(m.name)
        rate = ASSUMED_IMG_S_PER_GPU_152 * (_gflops("danet152") / gflops if gflops else 1.0) * world
        hours = n * t.epochs / rate / 3600
        lines.append(f"wall time  ~{hours:.1f} h for {t.epochs} epochs at ~{rate:.0f} img/s on {world} GPUs "
                     f"(assumed {ASSUMED_IMG_S_PER_GPU_152:.1f} img/s per GPU for a 152-layer spiking ResNet at "
                     "T=4, from SEW-ResNet-152's logs, scaled by GFLOPs)")
    try:
        rows = estimate(replace(cfg, launch=replace(cfg.launch, nodes=nodes, gpus_per_node=gpus_per_node)), 80.0, world)
        mem = ", ".join(f"{r['policy']} {r['est_gb']:.1f}" for r in rows)
        lines.append(f"memory     per GPU (GiB, 80 GiB card): {mem}; auto -> {choose_auto(rows)['policy']}")
    except Exception as e:  # the estimate needs the model registry; the plan above stands without it
        lines.append(f"memory     estimate unavailable ({type(e).__name__}: {e})")
    return "\n".join(lines)


@functools.lru_cache(maxsize=8)
def _gflops(name: str) -> float:
    """GFLOPs per time step at 224 px of one registered model (0 when unknown); one meta-device forward, not the
    whole catalogue (``models list`` builds all 20 models: ~12 s on a 2-core box)."""
    try:
        from models.registry import model_cost
        from models.resnet import REGISTRY
    except ImportError:
        return 0.0
    return float(model_cost(name)["gflops"]) if name in REGISTRY else 0.0
