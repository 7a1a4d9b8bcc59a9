"""One rank of a 2-rank probe of the job's plumbing, through the project's own code (tests/test_presets.py).

    python tests/helpers/job_probe.py PORT DATA_ROOT RUN_ROOT   (RANK/WORLD_SIZE/... in the environment; RUN_ROOT:
                                                                a folder both ranks share, for checkpoints)

Prints one JSON line per check, each {"check": NAME, "rank": R, ...}:
  collectives/<backend>   a process group made with that backend: which device types it serves, where
                          orchestrator.train.dist puts tensors, host and device reductions, the raw-CPU-tensor error
  zero/<stage>/<optim>    real DeepSpeed engines (gloo): a first step whose loss is NaN on rank 1 only (skipped
                          on the device), then 3 steps; against 2 steps + checkpoint + fresh engine + resume +
                          1 step. Parameter digests, to compare bitwise
  zero/1/lamb             the refusal
  channels_last           a ZeRO-1 SGD engine of the danet18_imagenet preset (channels_last true): the layout of
                          every convolution's output in a training step, and of the parameters
  loop                    the real loop and DALI loader on DATA_ROOT: host reads (item, tolist, bool, ...) and
                          DeepSpeed's device synchronisations between consecutive step ends, and which steps were
                          sync points; DeepSpeed sees autocast as it does on a GPU (as_on_a_gpu)
  loop/bf16-mixed, /bf16  the same under each low precision: also the dtypes of the output, weights and BN stats
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
import torch.distributed as tdist  # noqa: E402
from probe_exit import run_probe  # noqa: E402  (this folder: the script's own)
from torch.overrides import TorchFunctionMode  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from launch.env import rank_info  # noqa: E402
from orchestrator.config import load_config  # noqa: E402
from orchestrator.train import dist  # noqa: E402
from orchestrator.train.checkpoint import CheckpointManager  # noqa: E402
from orchestrator.train.engine import batch_plan, build_engine, prepare_model  # noqa: E402
from orchestrator.train.loop import loss_fn, to_device  # noqa: E402
from orchestrator.train.metrics import StepMetrics  # noqa: E402
from orchestrator.train.precision import Precision  # noqa: E402
from orchestrator.train.worker import build_model  # noqa: E402

INFO = rank_info()
RANK = INFO.rank
SMALL = ["model.width=4", "model.num_classes=4", "model.input_size=32", "data.image_size=32", "data.val_resize=32",
         "train.global_batch_size=8", "optim.schedule=constant", "optim.warmup_epochs=0"]


def emit(check: str, **fields) -> None:
    print(json.dumps({"check": check, "rank": RANK, **fields}), flush=True)


def error_line(fn) -> str | None:
    try:
        fn()
    except Exception as e:  # the message is the result
        return f"{type(e).__name__}: {str(e).splitlines()[0]}"
    return None


def collectives(backend: str, port: int) -> None:
    os.environ.update(INFO.torch_env(), MASTER_PORT=str(port))
    tdist.init_process_group(backend=backend, rank=RANK, world_size=INFO.world_size)
    dist.setup_host_group(60)
    from orchestrator.train.signals import REQUEUE, StopRequests

    stops = StopRequests()
    stops.local = REQUEUE if RANK == 1 else 0
    out = {"served": sorted(dist.served_device_types()), "device": str(dist.collective_device()),
           "device_for_cpu": str(dist.collective_device("cpu")), "host_max": dist.all_reduce_host([RANK], "max"),
           "host_sum": dist.all_reduce_host([RANK + 1.5], "sum"), "host_min": dist.all_reduce_host([RANK], "min"),
           "stop_agreed": stops.agreed(), "barrier": error_line(dist.barrier)}
    t = torch.tensor([RANK + 1.0])
    out["device_error"] = error_line(lambda: dist.all_reduce(t, "max"))
    out["device_max"] = t.tolist()
    out["raw_cpu_error"] = error_line(lambda: tdist.all_reduce(torch.ones(1)))
    emit(f"collectives/{backend}", **out)
    dist.shutdown()


def params_digest(engine) -> str:
    flat = torch.cat([p.detach().float().flatten() for p in engine.module.parameters()])
    return hashlib.sha256(flat.numpy().tobytes()).hexdigest()


def batch(i: int):
    g = torch.Generator().manual_seed(1000 * i + RANK)
    return torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 4, (4,), generator=g)


def make_engine(cfg, precision: str = "fp32"):
    torch.manual_seed(0)
    model = prepare_model(cfg, build_model(cfg), "cpu")
    return build_engine(cfg, model, batch_plan(cfg, INFO.world_size), steps_per_epoch=10, precision=precision)


def step(engine, cfg, i: int, nan_on_rank: int | None = None) -> float:
    """One optimizer step as the loop takes it (device verdict, all-reduced, then engine.step)."""
    rec = StepMetrics("cpu", engine.step_skip)
    x, y = to_device(*batch(i), "cpu", cfg.train.channels_last, torch.float32)
    loss = loss_fn(cfg, engine(x).float(), y)
    if nan_on_rank == RANK:
        loss = loss * float("nan")
    rec.micro_batch(loss)
    engine.backward(loss)
    rec.before_step()
    engine.step()
    return float(loss.detach())


def zero(stage: int, optim: str, run_root: Path) -> None:
    cfg = load_config("danet18_imagenet", [*SMALL, f"deepspeed.zero_stage={stage}", f"optim.name={optim}",
                                           "model.T=1"])
    if stage >= 1 and optim == "lamb":
        emit(f"zero/{stage}/{optim}", refused=error_line(lambda: make_engine(cfg)))
        return
    a = make_engine(cfg)
    start = params_digest(a)
    step(a, cfg, 0, nan_on_rank=1)  # the very first step: momentum buffers must survive a skip
    after_skip = params_digest(a)
    losses = [step(a, cfg, i) for i in range(3)]
    b = make_engine(cfg)
    for i in range(2):
        step(b, cfg, i)
    run_dir = run_root / f"z{stage}-{optim}"
    CheckpointManager(run_dir, RANK).save(b, 2, {"step": 2})
    c = make_engine(cfg)
    loaded = CheckpointManager(run_dir, RANK).load(c)
    c.step_skip.prepare()
    step(c, cfg, 2)
    emit(f"zero/{stage}/{optim}", start=start, after_skip=after_skip, skipped_then=params_digest(a),
         resumed=params_digest(c), loaded_step=loaded["step"],
         losses=losses, clipping=a.gradient_clipping(), optimizer=type(a.step_skip.optimizer).__name__,
         fused=[g.get("fused") for g in a.step_skip.optimizer.param_groups])


class ConvLayouts(TorchDispatchMode):
    """The layout of every convolution's output (forward) and input gradient (backward)."""

    def __init__(self):
        super().__init__()
        self.fwd, self.bwd = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten.convolution.default:
            self.fwd.append(_channels_last(out))
        elif func is torch.ops.aten.convolution_backward.default and out[0] is not None:
            self.bwd.append(_channels_last(out[0]))
        return out


def _channels_last(t: torch.Tensor) -> bool:
    """NHWC order in memory (and not merely also NCHW-contiguous, as a 1x1 map or one channel would be)."""
    return t.is_contiguous(memory_format=torch.channels_last) and (not t.is_contiguous() or t.shape[1] == 1)


def channels_last() -> None:
    cfg = load_config("danet18_imagenet", SMALL)  # zero_stage 1, sgd, channels_last true, as shipped
    engine = make_engine(cfg)
    step(engine, cfg, 0)  # the first forward resolves checkpointing=auto (probe forwards of its own)
    with ConvLayouts() as seen:
        step(engine, cfg, 1)
    params = [p for p in engine.module.parameters() if p.ndim == 4]
    emit("channels_last", zero_stage=cfg.deepspeed.zero_stage, optimizer=cfg.optim.name, fwd=seen.fwd,
         bwd=seen.bwd, params_contiguous=all(p.is_contiguous() for p in params), conv_params=len(params))


class HostReads(TorchFunctionMode):
    """Counts the calls that read a tensor's value on the host (on a GPU each one waits for the device), except
    the CPU group's host-value reductions (orchestrator.train.dist.all_reduce_host: values that never were on a
    device)."""

    READS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy"}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.READS:
            caller = sys._getframe(1)
            if not (caller.f_code.co_name == "all_reduce_host" and caller.f_code.co_filename.endswith("dist.py")):
                self.count += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def as_on_a_gpu():
    """``torch.is_autocast_enabled()`` without a device answers for CUDA only, so on CPU it says False under the
    loop's autocast where on a GPU it says True; DeepSpeed asks it that way to decide whether to keep or switch
    off autocast in its forward. Here it answers for the CPU, so the engine takes the decision it takes on a GPU."""
    orig = torch.is_autocast_enabled
    torch.is_autocast_enabled = lambda *device: orig(*device) if device else orig("cpu")
    try:
        yield
    finally:
        torch.is_autocast_enabled = orig


@contextlib.contextmanager
def device_syncs():
    """Counts DeepSpeed's device synchronisations (a no-op on CPU, a wait for the GPU on one), per step."""
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()

    class Syncs:
        def __init__(self):
            self.count, self.per_step = 0, []

        def step_end(self):
            self.per_step.append(self.count)
            self.count = 0

    syncs, orig = Syncs(), acc.synchronize

    def counted(*a, **kw):
        syncs.count += 1
        return orig(*a, **kw)

    acc.synchronize = counted
    try:
        yield syncs
    finally:
        acc.synchronize = orig


def loop(data_root: str, run_root: Path, precision: str = "fp32") -> None:
    from orchestrator.data.dali import build_loader
    from orchestrator.train.loop import LoopState, train
    from orchestrator.train.signals import StopRequests

    cfg = load_config("danet18_imagenet", [*SMALL, f"data.root={data_root}", "train.max_steps=5",
                                           "train.log_every_steps=3"])
    plan = batch_plan(cfg, INFO.world_size)
    loaders = tuple(build_loader(cfg.data, s, RANK, INFO.world_size, plan.micro_batch, 0, "cpu",
                                 expect_classes=cfg.model.num_classes) for s in ("train", "val"))
    engine = make_engine(cfg, precision)
    reads = HostReads()
    seen: dict = {}
    engine.module.register_forward_hook(lambda m, args, out: seen.update(out=str(out.dtype)))

    class Marks:
        def __init__(self):
            self.per_step, self.synced, self.logged = [], [], []

        def on_step_end(self, state, m):
            self.per_step.append(reads.count)
            reads.count = 0
            syncs.step_end()

        def on_log(self, state, rows):
            self.logged += [r["step"] for r in rows]
            self.synced.append(state.step)

        def on_epoch_end(self, state, m):
            pass

    marks = Marks()
    with reads, as_on_a_gpu(), device_syncs() as syncs:
        state = train(engine, loaders, cfg, LoopState(), [marks], StopRequests(), "cpu", Precision(precision),
                      INFO.world_size, plan.accumulation)
    emit("loop" if precision == "fp32" else f"loop/{precision}", reads_per_step=marks.per_step,
         device_syncs_per_step=syncs.per_step,
         synced_at=marks.synced, logged=marks.logged, steps=state.step, loss_tail=state.loss_tail,
         output_dtype=seen.get("out"), weight_dtype=str(next(engine.module.parameters()).dtype),
         bn_stats_dtype=str(next(b for n, b in engine.module.named_buffers() if n.endswith("running_var")).dtype))


def timed(name: str, fn, *args) -> None:
    t0 = time.perf_counter()
    fn(*args)
    print(f"probe: {name} {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)


def main() -> int:
    port, data_root, run_root = int(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    torch.set_num_threads(1)
    for i, backend in enumerate(("cuda:gloo", "cpu:gloo", "gloo")):
        timed(backend, collectives, backend, port + 1 + i)
    timed("init", dist.init, INFO, "cpu", 120)  # the job's own way in: DeepSpeed over gloo
    for stage, optim in ((1, "sgd"), (2, "sgd"), (1, "adamw"), (2, "adamw"), (0, "lamb"), (1, "lamb")):
        timed(f"zero {stage} {optim}", zero, stage, optim, run_root)
    timed("channels_last", channels_last)
    for precision in ("fp32", "bf16-mixed", "bf16"):
        timed(f"loop {precision}", loop, data_root, run_root, precision)
    dist.shutdown()
    return 0


if __name__ == "__main__":
    run_probe(main)
