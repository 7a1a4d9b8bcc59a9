"""The real training job on a GPU, end to end, and where its time goes (issue 14): the ``train`` step of
tools/gpu_check.sh. ``--dry-run`` runs every piece on CPU at toy sizes (gloo, tiny width, 32 px, a few steps).

1. Dataset: an ImageNet-layout folder of JPEGs at ImageNet-like sizes (about 500x375, landscape or portrait),
   random crops / scales / flips / colour shifts of bundled photographs (scikit-learn's china.jpg and flower.jpg;
   on the GPU machine the copies tools/gpu_pack.sh put in the pack), one class per photo region; converted with
   ``orchestrator data convert``.
2. The job as configured: ``orchestrator launch --config danet152_imagenet`` (T=4, 224 px, bf16-mixed on a GPU, DALI
   'mixed' decode, DeepSpeed, MLflow on a local sqlite store, checkpoints); only sizes overridden (classes,
   batch, steps). With ``train.deterministic=true``: stopped with SIGINT mid-epoch, relaunched (resumes and
   completes), and an uninterrupted run to compare final weights with (run beside the first, in parallel: on
   one GPU both fit, and neither is timed).
   Beside them, ``orchestrator launch`` with no arguments (the embedded default: the digits preset, one rank per
   GPU, the CPU ranks otherwise): it must complete on the expected number of ranks and, on the GPU, learn (val
   top-1 above ``DEFAULT_MIN_TOP1``): ``default_launch``; then ``orchestrator train`` by hand, one rank and no
   launcher, for an epoch: ``direct_train``.
3. Model step alone (no loader, no DeepSpeed): the baseline (today's configuration: ``models.gpu_check``'s
   eager step, channels_last weights, cudnn defaults, batch 32).
4. The job again (not deterministic), steady state at the preset's micro-batch: images per second between the
   progress lines of its second third and its last log point (each progress line is a sync point), read as the
   lines arrive: ``end_to_end_img_per_s``.
5. The model-step variants in ``--variants`` (``VARIANTS``), side by side with the baseline; the fastest of all
   is ``model_step_img_per_s`` (``fastest_variant``, ``fastest_micro_batch``).
   Each variant that computes the same step another way (layout, fusions, compile) is then
   checked against the baseline: one fp32 forward + backward (TF32 off) at the job's width and a small batch
   and resolution, loss and gradients within ``LOSS_TOL`` / ``GRAD_TOL`` of the baseline's (``equivalence``). A variant
   that differs is not counted as the fastest and its fusion is not turned on in the jobs.
   ``graphs`` (GPU only) replays ``benchmark``'s step from one CUDA graph: the same kernels without the host's
   launches, a diagnostic beside the profile's host gaps (the job captures nothing), never the fastest: ``graphs``.
6. torch.profiler over a few steps of the fastest model step: CUDA time per group (convolutions, BatchNorm,
   LIF, fused BatchNorm + neuron, DA sums, casts/copies, elementwise, optimizer, other) and the host gaps (wall
   time the GPU was idle).
7. The steady-state job of 4 again with the fusions whose model-step variant beat the unfused one (``FUSIONS``:
   ``model.fuse_bn_neuron=true``, BatchNorm + neuron as one op; ``model.fuse_da=true``, DA's sums as kernels):
   ``end_to_end_by_fusion``.
8. The steady-state job of 4 again at the micro-batch ``orchestrator plan`` gives this card, if above the
   preset's 32 (with the fusion if 7 measured it faster): ``end_to_end_by_micro_batch``.
9. Memory per checkpointing policy on the fastest model step's settings: measured peak and rate against
   ``orchestrator plan``'s estimate at that micro-batch, the plan's ``auto`` choice for this card, and the
   fastest policy that fits it (``memory_by_policy``).
10. If time is left, the steady-state job of 4 once more with ``train.precision=bf16`` (DeepSpeed's bf16 engine,
    the job's precision before ``auto`` became bf16-mixed), side by side: ``end_to_end_by_precision``.

Each piece is skipped, with the reason in ``errors``, when the time budget (``--budget-s``) is spent; the JSON is
rewritten after each, so a timeout keeps what was measured. The model-step work (3, 5, 6, 9) runs in a child
process (``StepProcess``), stopped when the budget is spent: a kernel fault that poisons its CUDA context, a crash
or a hang costs that one measurement (in ``errors``), and the next gets a fresh process.

Writes ``OUT/gpu_train_<gpu>.json`` (see ``REQUIRED``) and prints a short table last.
"""

from __future__ import annotations

import argparse
import atexit
import json
import math
import os
import re
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REQUIRED = ("gpu", "torch", "model", "T", "resolution", "precision", "micro_batch", "world_size",
            "baseline_img_per_s", "model_step_img_per_s", "end_to_end_img_per_s", "peak_memory_gb",
            "job_status", "resumed")  # fmt: skip
STEP_LINE = re.compile(r"step (\d+)/(\d+) ")
PIECES = ("default", "resume", "baseline", "throughput", "variants", "equivalence", "profile", "fusion", "plan_batch",
          "memory", "precision")  # fmt: skip
DEFAULT_MIN_TOP1 = 0.6  # the embedded default's 8 epochs reach ~0.98 on CPU ranks; chance is 0.1
# how long the embedded default may still run once the resume check is done, on a GPU, before it is stopped: it
# must not share the card with the timed pieces (expected: ~1-2 minutes, within the resume check's shadow)
DEFAULT_GRACE_S = 90.0


# --------------------------------------------------------------------------------------------- dataset


def photo_paths(pack_dir: Path | None = None) -> list[Path]:
    """The bundled photographs: the pack's copies if present, else scikit-learn's (found without importing it)."""
    import importlib.util

    if pack_dir is not None and sorted(pack_dir.glob("*.jpg")):
        return sorted(pack_dir.glob("*.jpg"))
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("no photographs: scikit-learn is not installed and no pack photos were given")
    folder = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "images"
    found = sorted(folder.glob("*.jpg"))
    if not found:
        raise FileNotFoundError(f"no photographs in {folder}")
    return found


def _region(photo_size: tuple[int, int], k: int, regions: int) -> tuple[int, int, int, int]:
    """Region k of ``regions`` vertical strips of a photo (left, top, right, bottom)."""
    w, h = photo_size
    x0 = w * k // regions
    return x0, 0, w * (k + 1) // regions, h


def build_image_folder(root: Path, photos: list[Path], classes: int, train_per_class: int, val_per_class: int,
                       size: tuple[int, int] = (500, 375), seed: int = 0) -> dict:  # fmt: skip
    """``root/{train,val}/nXXXXXXXX/*.JPEG``: class c is a region of one photo (classes spread over the photos);
    each image a random crop of 35-100% of that region's area, resized so its longer side is about ``size[0]``
    (landscape or portrait, +-15%), maybe flipped, brightness-shifted, JPEG quality 85-95. Returns counts."""
    import random

    from PIL import Image, ImageEnhance

    rng = random.Random(seed)
    images = [Image.open(p).convert("RGB") for p in photos]
    per_photo = math.ceil(classes / len(images))
    counts = {"train": 0, "val": 0}
    for c in range(classes):
        img = images[c % len(images)]
        left, top, right, bottom = _region(img.size, c // len(images), per_photo)
        rw, rh = right - left, bottom - top
        for split, n in (("train", train_per_class), ("val", val_per_class)):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                area = rng.uniform(0.35, 1.0) * rw * rh
                aspect = rng.uniform(0.75, 1.333)
                cw = max(16, min(rw, int(round(math.sqrt(area * aspect)))))
                ch = max(16, min(rh, int(round(math.sqrt(area / aspect)))))
                x, y = left + rng.randint(0, rw - cw), top + rng.randint(0, rh - ch)
                crop = img.crop((x, y, x + cw, y + ch))
                long_side = int(size[0] * rng.uniform(0.85, 1.15))
                short_side = int(long_side * size[1] / size[0] * rng.uniform(0.9, 1.1))
                out_size = (long_side, short_side) if rng.random() < 0.75 else (short_side, long_side)
                crop = crop.resize(out_size, Image.BILINEAR)
                if rng.random() < 0.5:
                    crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
                crop = ImageEnhance.Brightness(crop).enhance(rng.uniform(0.8, 1.2))
                crop.save(folder / f"{split}_{c}_{i:04d}.JPEG", quality=rng.randint(85, 95))
                counts[split] += 1
    return counts


def convert_folder(src: Path, dst: Path, env: dict, workers: int) -> None:
    """``orchestrator data convert SRC DST`` (its own process, as a user runs it)."""
    r = subprocess.run([sys.executable, "-m", "orchestrator", "data", "convert", str(src), str(dst),
                        "--workers", str(workers)], env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    if r.returncode != 0:
        raise RuntimeError(f"orchestrator data convert failed ({r.returncode}): {r.stderr[-2000:]}")


# --------------------------------------------------------------------------------------------- jobs


def run_job(cwd: Path, run_dir: str | None, overrides: list[str], env: dict, timeout: float,
            stop_after_step: int | None = None, config: str | None = "danet152_imagenet",
            verb: str = "launch", on_start=None) -> dict:  # fmt: skip
    """``orchestrator launch --config danet152_imagenet`` with ``overrides``; SIGINT once a progress line shows
    ``stop_after_step``. Returns the exit code, the summary, the (step, arrival time) of every progress line.
    ``config=None, run_dir=None`` and no overrides: ``orchestrator launch`` with no arguments (the embedded default,
    in its own run folder under ``cwd/runs``); ``verb="train"``: one rank started by hand, no launcher. The job
    runs in a session of its own, so that a timeout (or ``on_start``'s caller, handed the process) stops its ranks
    with it (:func:`kill_job`)."""
    cmd = [sys.executable, "-m", "orchestrator", verb, *(["--config", config] if config else []),
           *(["--run-dir", run_dir] if run_dir else []), *overrides]  # fmt: skip
    log_path = cwd / f"{Path(run_dir).name if run_dir else 'default'}.log"
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         bufsize=1, start_new_session=True)  # fmt: skip
    if on_start is not None:
        on_start(p)
    steps: list[tuple[int, float]] = []
    interrupted = threading.Event()
    timer = threading.Timer(timeout, kill_job, (p,))
    timer.start()
    with open(log_path, "a") as log:  # appended: the interrupted and the resumed job share their run's log
        log.write(f"=== {time.strftime('%H:%M:%S')} {' '.join(cmd[1:])}\n")
        assert p.stdout is not None
        for line in p.stdout:
            log.write(line)
            log.flush()  # readable while the job runs
            m = STEP_LINE.search(line)
            if m:
                steps.append((int(m.group(1)), time.monotonic()))
                if stop_after_step is not None and int(m.group(1)) >= stop_after_step and not interrupted.is_set():
                    interrupted.set()
                    p.send_signal(signal.SIGINT)
    rc = p.wait()
    timer.cancel()
    found = [cwd / run_dir / "summary.json"] if run_dir else sorted((cwd / "runs").glob("*/summary.json"))
    summary = json.loads(found[-1].read_text()) if found and found[-1].is_file() else {}
    return {"rc": rc, "summary": summary, "steps": steps, "wall_s": round(time.monotonic() - t0, 1),
            "sigint": interrupted.is_set(), "log": str(log_path),
            "log_tail": log_path.read_text()[-1500:] if rc not in (0, 130) else ""}  # fmt: skip


def job_record(j: dict, *fields: str) -> dict:
    """A ``run_job`` result as the JSON keeps it: exit code, status, the named summary ``fields``, wall time, log
    and (when it failed) the log's tail."""
    s = j.get("summary", {})
    return {"rc": j.get("rc"), "status": s.get("status"), **{f: s.get(f) for f in fields},
            "wall_s": j.get("wall_s"), "log": j.get("log"), "log_tail": j.get("log_tail")}  # fmt: skip


def kill_job(p: subprocess.Popen) -> None:
    """A job and every rank it started (its session): a launcher killed alone leaves its ranks holding the GPU,
    and every later measurement shares the card with them."""
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:  # already gone
        pass


def steady_rate(steps: list[tuple[int, float]], images_per_step: int) -> float | None:
    """Images per second between the first progress line of the last two thirds of the run and the last one."""
    if len(steps) < 3:
        return None
    last_step = steps[-1][0]
    start = next((s for s in steps if s[0] >= last_step / 3), None)
    if start is None or start[0] >= last_step:
        return None
    return (last_step - start[0]) * images_per_step / max(steps[-1][1] - start[1], 1e-9)


def mlflow_peak_mb(db: Path, run_id: str | None = None) -> float | None:
    """The largest ``peak_memory_mb`` a job (``run_id``; None: any) logged to its sqlite store (read with sqlite3:
    no MLflow needed)."""
    if not db.is_file():
        return None
    query, params = "SELECT max(value) FROM metrics WHERE key = 'peak_memory_mb'", ()
    if run_id:
        query, params = query + " AND run_uuid = ?", (run_id,)
    with sqlite3.connect(db) as con:
        row = con.execute(query, params).fetchone()
    return float(row[0]) if row and row[0] is not None else None


# --------------------------------------------------------------------------------------------- model step


def _model_step(device, name: str, batch: int, res: int, width: int, layout: str, benchmark: bool,
               policy: str, warmup: int, repeats: int, compile_: bool = False, profile: bool = False,
               fuse: bool = False, fuse_da: bool = False, graphs: bool = False) -> dict:  # fmt: skip
    """danet forward + backward + SGD step, bf16 autocast on CUDA (fp32 on CPU). ``layout``: 'model' (weights
    channels_last, images NCHW: today's models.gpu_check), 'input' (images channels_last, weights contiguous:
    the job's), 'none'. Either way every convolution runs NHWC. ``fuse``: BatchNorm + neuron as one op;
    ``fuse_da``: learnable DA's sums as kernels; ``graphs``: the whole step captured once as a CUDA graph and
    replayed (what launch overhead costs: the kernels are the same)."""
    import torch

    model, x, y = _model_and_batch(device, name, batch, res, width, layout, benchmark, policy, fuse, fuse_da)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    fn = torch.compile(model) if compile_ else model
    cuda = device.type == "cuda"

    def body() -> None:
        # (a graph replays autocast's casts of the weights: its cache would hold tensors from outside the capture)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda, cache_enabled=not graphs):
            loss = torch.nn.functional.cross_entropy(fn(x).float().mean(0), y)
        loss.backward()
        opt.step()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        body()

    if graphs:
        step = _captured(body, opt)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    for _ in range(warmup):
        step()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    out = {"img_per_s": batch / med, "step_s": med,
           "peak_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}  # fmt: skip
    if profile:
        out["profile"] = profile_steps(step, sync, 3, cuda)
    return out


def _captured(body, opt):
    """``body`` (forward, backward, optimizer step on fixed input tensors) captured as one CUDA graph: warmed up on
    a side stream (cudnn's algorithm search, Triton's compiles and the momentum buffers happen outside the
    capture), captured with the gradients unset so that the graph allocates and overwrites them; returns replay."""
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("CUDA graphs need a GPU")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            body()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        body()
    return graph.replay


def _model_and_batch(device, name: str, batch: int, res: int, width: int, layout: str, benchmark: bool, policy: str,
                     fuse: bool, fuse_da: bool) -> tuple:  # fmt: skip
    """The model (seeded: the same weights for every configuration) and one batch of images and labels, laid
    out as ``layout`` says (see ``_model_step``)."""
    import torch

    from models import create_model

    torch.backends.cudnn.benchmark = benchmark
    torch.manual_seed(0)
    model = create_model(name, T=4, input_size=res, width=width, checkpointing=policy, fuse_bn_neuron=fuse,
                         fuse_da=fuse_da)
    model = model.to(device)
    if layout == "model":
        model = model.to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, res, res, device=device)
    if layout == "input":
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), device=device)
    return model, x, y


# A faster path computes the same thing: its fp32 loss and gradients against the baseline's. A spike is a
# threshold, so fp32 rounding that differs (another reduction order in a fused BatchNorm, another sum order in
# DA) flips the odd neuron whose membrane sits within rounding of it, and one flip moves the gradients near it
# by far more than rounding: so the verdict is on the whole step, the gradient difference's norm over all
# parameters against the gradient's (a wrong formula gives 1e-2 and more; the CPU tests, in fp64 where nothing
# flips, compare element by element). The largest per-parameter difference is recorded beside it.
GRAD_TOL = 1e-3  # ||g - g_ref|| / ||g_ref|| over every parameter
LOSS_TOL = 1e-4  # |loss - loss_ref| / |loss_ref|


def gradients(device, name: str, batch: int, res: int, width: int, layout: str, policy: str,
              compile_: bool = False, fuse: bool = False, fuse_da: bool = False, **_) -> tuple[float, dict]:  # fmt: skip
    """One fp32 forward + backward (TF32 off, no autocast, cudnn's deterministic algorithms: ``benchmark`` only
    chooses among algorithms, so it is not what is checked) of a configuration: (loss, {parameter: gradient on
    the CPU}). The other model_step arguments (warm-up, repeats) are accepted and unused."""
    import torch

    b = torch.backends
    saved = b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32, b.cudnn.deterministic
    b.cuda.matmul.allow_tf32 = b.cudnn.allow_tf32 = False
    b.cudnn.deterministic = True
    try:
        model, x, y = _model_and_batch(device, name, batch, res, width, layout, False, policy, fuse, fuse_da)
        fn = torch.compile(model) if compile_ else model
        loss = torch.nn.functional.cross_entropy(fn(x).float().mean(0), y)
        loss.backward()
        return loss.item(), {n: p.grad.detach().double().cpu() for n, p in model.named_parameters()
                             if p.grad is not None}  # fmt: skip
    finally:
        b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32, b.cudnn.deterministic = saved


def compare_gradients(ref: tuple[float, dict], got: tuple[float, dict]) -> dict:
    """How far one configuration's loss and gradients are from the baseline's, and whether within the tolerances
    above (``equal``)."""
    (ref_loss, ref_g), (loss, g) = ref, got
    if set(g) != set(ref_g):
        return {"equal": False, "why": f"gradients of different parameters: {sorted(set(g) ^ set(ref_g))[:4]}"}
    diff_sq = norm_sq = worst = 0.0
    where = None
    for k, r in ref_g.items():
        d = g[k] - r
        diff_sq += float(d.square().sum())
        norm_sq += float(r.square().sum())
        off = float(d.abs().max() / r.abs().max().clamp_min(1e-30))
        if not math.isnan(worst) and (math.isnan(off) or off > worst):  # a NaN is the worst
            worst, where = off, k
    rel = math.sqrt(diff_sq) / max(math.sqrt(norm_sq), 1e-30)
    loss_off = abs(loss - ref_loss) / max(abs(ref_loss), 1e-30)
    return {"equal": bool(rel <= GRAD_TOL and loss_off <= LOSS_TOL), "grad_rel_l2": rel, "loss_off": loss_off,
            "max_param_off": worst, "worst_parameter": where}  # fmt: skip


def model_step(device, **kw) -> dict:
    """``_model_step`` with its memory handed back afterwards (variants run one after another)."""
    import gc

    import torch

    try:
        out = _model_step(device, **kw)
        for flag, variant in (("fuse", "fused_bn_neuron"), ("fuse_da", "fused_da")):
            if kw.get(flag):  # (read where the step ran: a fallback to torch ops is recorded in that process)
                out["path"] = fused_path(device.type == "cuda", variant)
        return out
    finally:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


_REFERENCE: dict = {}  # the equivalence reference's gradients, once per measuring process: {"key", "grads"}


def equivalence_of(device, ref_kw: dict, kw: dict) -> dict:
    """``compare_gradients`` of ``kw``'s configuration against ``ref_kw``'s, both computed in this process (the
    reference once per process and set of arguments)."""
    key = json.dumps(ref_kw, sort_keys=True, default=str)
    if _REFERENCE.get("key") != key:
        _REFERENCE.clear()
        _REFERENCE.update(key=key, grads=gradients(device, **ref_kw))
    return compare_gradients(_REFERENCE["grads"], gradients(device, **kw))


def _serve(conn) -> None:
    """The measuring process: run each ``(fn, kwargs)`` received and send back ``("ok", result)`` or ``("err",
    message)``. After an error it exits: a fault can leave the CUDA context unusable (an illegal address is
    sticky, a failed graph capture can leave the stream capturing), so the next call gets a fresh process."""
    os.setsid()  # its own session: a timeout kills it with whatever it started (Triton's and inductor's workers)
    while True:
        try:
            msg = conn.recv()
        except EOFError:  # the parent is gone
            return
        if msg is None:
            return
        fn, kw = msg
        try:
            result = fn(**kw)
        except BaseException as exc:  # every failure is the caller's result; then this process ends
            import traceback

            traceback.print_exc()  # (into the check's log: the caller's error line has the message only)
            conn.send(("err", f"{type(exc).__name__}: {exc}"))
            return
        conn.send(("ok", result))


def _name(fn) -> str:
    return getattr(fn, "__name__", None) or getattr(getattr(fn, "func", None), "__name__", repr(fn))


class StepProcess:
    """Model-step work run in a child process that holds its own CUDA context, so that a measurement which
    faults (a kernel's illegal address poisons every later CUDA call of its process), crashes or hangs costs
    that measurement alone: the caller gets an exception, the child is gone, the next call starts a fresh one
    (seconds: torch's import and CUDA's start). ``inline``: in this process (the tests' planted defects)."""

    def __init__(self, inline: bool = False) -> None:
        self.inline = inline
        self._proc = None
        self._conn = None
        self._at_exit = False

    def __call__(self, fn, timeout: float | None = None, **kw):
        """``fn(**kw)`` in the child; ``TimeoutError`` after ``timeout`` seconds (the child and its own children
        killed), ``RuntimeError`` with the child's message if it raised or died."""
        if self.inline:
            return fn(**kw)
        if self._proc is None:
            import multiprocessing as mp

            ctx = mp.get_context("spawn")  # (fork: CUDA cannot start in a child forked after the parent's)
            self._conn, child = ctx.Pipe()
            # (not a daemon: those may not start processes, and torch.compile's workers are some)
            self._proc = ctx.Process(target=_serve, args=(child,), name="gpu-train-check-step")
            self._proc.start()
            child.close()
            if not self._at_exit:  # (after multiprocessing's import: its exit handler, which joins the child, runs
                atexit.register(self.close)  # after this one, last in first run)
                self._at_exit = True
        self._conn.send((fn, kw))
        if not self._conn.poll(timeout):
            self.close(kill=True)
            raise TimeoutError(f"{_name(fn)}: no result after {timeout:.0f} s (stopped with its processes)")
        try:
            status, value = self._conn.recv()
        except EOFError:
            code = self.close(kill=True)
            raise RuntimeError(f"{_name(fn)}: the measuring process died (exit code {code})") from None
        if status == "err":
            self.close()
        if status != "ok":
            raise RuntimeError(value)
        return value

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def close(self, kill: bool = False) -> int | None:
        """End the child (asked, or killed with its session); returns its exit code."""
        proc, self._proc = self._proc, None
        if proc is None:
            return None
        if kill:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):  # already gone, or not yet its own session leader
                proc.kill()
        else:
            try:
                self._conn.send(None)
            except (BrokenPipeError, OSError):
                pass
        proc.join(30)
        if proc.is_alive():
            proc.kill()
            proc.join(5)
        self._conn.close()
        return proc.exitcode


GROUPS = (  # (group, substrings of aten op / kernel names, lower case); the first match wins
    # NCCL's kernels name their reduction ("..._sum_bf16_ring_ll"), and cuDNN its layout transforms
    # ("cudnn::...::nchwToNhwcKernel"): both are matched before the groups those words would fall into
    ("communication", ("nccl", "all_reduce", "allreduce")),
    ("layout", ("nchwtonhwc", "nhwctonchw")),  # memory-format conversions, inside cuDNN or not
    ("memcpy", ("memcpy", "memset")),  # the profiler's copy/fill events: host <-> device transfers among them
    ("bn_neuron", ("_bn_lif_",)),  # the fused BatchNorm + neuron kernels (model.fuse_bn_neuron)
    ("lif", ("lif_forward", "lif_backward", "_lif_fwd", "_lif_bwd", "fusedlif")),
    ("batch_norm", ("batch_norm", "batchnorm", "bn_fw", "bn_bw", "welford")),
    ("convolution", ("conv", "cudnn", "xmma", "implicit_gemm", "dgrad", "wgrad", "fprop", "cutlass")),
    ("da_sums", ("addcmul", "aten::dot", "dot_kernel", "_weighted_sum")),  # torch ops, or models._da_triton
    ("casts_copies", ("copy", "_to_copy", "aten::to", "clone", "contiguous", "transpose", "cast", "convert")),
    ("optimizer", ("foreach", "multi_tensor", "sgd", "_fused_")),
    ("elementwise", ("elementwise", "aten::add", "aten::mul", "aten::sub", "aten::div", "reduce", "sum", "mean")),
)


def fused_path(cuda: bool, variant: str = "fused_bn_neuron") -> str:
    """Which implementation a fusion variant ran on: its Triton kernels, or torch ops (and why)."""
    from models import bn_neuron, connections

    state = bn_neuron._STATE if variant == "fused_bn_neuron" else connections._KERNEL_STATE
    failed = state.get("failed")
    if failed:
        return f"torch ops (the Triton kernels failed: {failed})"
    if not cuda:
        return "torch ops (CPU)"
    if variant == "fused_da":  # sums whose operands' dtypes or layouts differ take torch ops: say how many
        return "triton (" + ", ".join(f"{k} {v}" for k, v in sorted(connections.COUNTS.items())) + ")"
    return "triton"


def _group(name: str) -> str:
    low = name.lower()
    return next((g for g, keys in GROUPS if any(k in low for k in keys)), "other")


def profile_steps(step, sync, steps: int, cuda: bool) -> dict:
    """Device time per group over ``steps`` steps, the top ops, and the host gaps (wall minus device busy)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync()
    t = time.perf_counter()
    with profile(activities=acts) as prof:
        for _ in range(steps):
            step()
        sync()
    wall_ms = (time.perf_counter() - t) * 1e3
    groups: dict[str, float] = {}
    ops = []
    unnamed: list[tuple[float, str]] = []  # what "other" holds, largest first: where GROUPS needs a name next
    for ev in prof.key_averages():
        if cuda:
            # device events (kernels) carry the device time once; CPU ops are listed for the reader only
            on_device = str(getattr(ev, "device_type", "")).endswith("CUDA")
            dev_us = (getattr(ev, "self_device_time_total", None) or getattr(ev, "self_cuda_time_total", 0.0)
                      if on_device else 0.0)  # fmt: skip
            if not on_device and (getattr(ev, "device_time_total", 0.0) or 0.0) > 0:
                ops.append((ev.device_time_total / 1e3, ev.key, ev.count))
        else:
            dev_us = ev.self_cpu_time_total if not ev.key.startswith("ProfilerStep") else 0.0
            if dev_us > 0:
                ops.append((dev_us / 1e3, ev.key, ev.count))
        if dev_us > 0:
            group = _group(ev.key)
            groups[group] = groups.get(group, 0.0) + dev_us / 1e3
            if group == "other":
                unnamed.append((dev_us / 1e3, ev.key))
    busy = sum(groups.values())
    ops.sort(reverse=True)
    del torch
    return {
        "steps": steps, "wall_ms_per_step": wall_ms / steps, "device_ms_per_step": busy / steps,
        "host_gap_ms_per_step": max(wall_ms - busy, 0.0) / steps if cuda else None,
        "groups_ms_per_step": {k: round(v / steps, 3) for k, v in sorted(groups.items(), key=lambda kv: -kv[1])},
        # CUDA: ops by the device time of everything they launched (nested ops overlap); CPU: self time
        "top_ops": [{"op": k[:120], "ms_per_step": round(v / steps, 3), "calls_per_step": c / steps}
                    for v, k, c in ops[:15]],  # fmt: skip
        "other_top": [{"name": k[:120], "ms_per_step": round(v / steps, 3)} for v, k in sorted(unnamed, reverse=True)[:8]],
        "timing": "device (CUDA) self time" if cuda else "CPU self time (dry run)",
    }


# --------------------------------------------------------------------------------------------- results


def gpu_slug(name: str) -> str:
    """'NVIDIA H200' -> 'h200' (the file name's <gpu>)."""
    words = [w for w in re.split(r"[^a-z0-9]+", name.lower()) if w and w not in ("nvidia", "tesla", "geforce")]
    return "-".join(words) or "gpu"


def write_result(path: Path, result: dict) -> None:
    """The JSON, with every ``REQUIRED`` field present (None where a piece did not run, with its reason)."""
    missing = [k for k in REQUIRED if k not in result]
    if missing:
        raise ValueError(f"result lacks {missing}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, default=str) + "\n")


def table(result: dict) -> str:
    """The short table printed last."""
    def fmt(v) -> str:
        return "-" if v is None else (f"{v:.1f}" if isinstance(v, float) else str(v))

    rows = [("GPU", result["gpu"]), ("torch", result["torch"]),
            ("job", f"{result['model']} T={result['T']} {result['resolution']}px {result['precision']} "
                    f"micro-batch {result['micro_batch']} x {result['world_size']} rank(s)"),
            ("baseline model step img/s (today's config)", fmt(result["baseline_img_per_s"])),
            (f"fastest model step img/s ({result.get('fastest_variant')})", fmt(result["model_step_img_per_s"])),
            ("end to end img/s (real job, steady state)", fmt(result["end_to_end_img_per_s"])),
            *[(f"end to end img/s, micro-batch {k}", fmt(v))
              for k, v in (result.get("end_to_end_by_micro_batch") or {}).items() if len(result["end_to_end_by_micro_batch"]) > 1],
            *[(f"end to end img/s, train.precision={k}", fmt(v))
              for k, v in (result.get("end_to_end_by_precision") or {}).items()],
            *[(f"end to end img/s, fusions {k}" + (f" ({', '.join(result.get('fusion_overrides') or [])})"
                                                   if k == "on" else ""), fmt(v))
              for k, v in (result.get("end_to_end_by_fusion") or {}).items()],
            *[("model step img/s from one CUDA graph / eager", f"{fmt(g['img_per_s'])} / {fmt(g['eager_img_per_s'])} "
               f"(x{g['speedup']:.2f}: what launches cost)") for g in [result.get("graphs")] if g and "speedup" in g],
            ("peak memory GB", fmt(result["peak_memory_gb"])),
            *[("orchestrator launch, no arguments", f"{d['status']}, {d['world_size']} rank(s) (expected "
               f"{d['expected_world_size']}), val top-1 {fmt(d['val_top1'])}, {fmt(d['wall_s'])} s")
              for d in [result.get("default_launch")] if d],
            *[("orchestrator train, one rank, no launcher", f"{d['status']}, {fmt(d['wall_s'])} s")
              for d in [result.get("direct_train")] if d],
            ("job status / resumed / weights = uninterrupted", f"{result['job_status']} / {result['resumed']} / "
                                                               f"{result.get('weights_equal_uninterrupted')}")]  # fmt: skip
    eq = {k: v for k, v in (result.get("equivalence") or {}).items() if isinstance(v, dict)}
    if eq:
        rows.append((f"fp32 gradients vs baseline (|dg|/|g| tol {result['equivalence']['grad_tol']:g})",
                     ", ".join(f"{k} {'equal' if v.get('equal') else 'DIFFER' if v.get('equal') is False else '?'}"
                               + (f" ({v['grad_rel_l2']:.1g})" if "grad_rel_l2" in v else "") for k, v in eq.items())))
    mem = result.get("memory_by_policy") or {}
    if mem.get("policies"):
        rows.append((f"memory GB measured/plan, micro-batch {mem['micro_batch']}",
                     ", ".join(f"{p} {fmt(r['peak_gb'])}/{fmt(r['plan_gb'])}" for p, r in mem["policies"].items())
                     + f"; auto -> {mem['auto_policy']}, fastest that fits -> {mem['fastest_fitting_policy']}"))
    prof = result.get("profile") or {}
    if prof.get("groups_ms_per_step"):
        rows.append(("profile ms/step " + ("(device)" if prof.get("host_gap_ms_per_step") is not None else "(CPU)"),
                     ", ".join(f"{k} {v:.1f}" for k, v in prof["groups_ms_per_step"].items())
                     + (f", host gaps {prof['host_gap_ms_per_step']:.1f}" if prof.get("host_gap_ms_per_step")
                        is not None else "")))  # fmt: skip
    if result.get("skipped"):
        rows.append(("skipped (time budget; TRAIN_PIECES reruns)", ", ".join(x.split(":")[0] for x in result["skipped"])))
    if result.get("errors"):
        rows.append(("errors", f"{len(result['errors'])} (in the JSON)"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


# --------------------------------------------------------------------------------------------- main

# model-step variants beside the baseline (levers, side by side): overrides of the baseline's model_step arguments
VARIANTS = {
    "benchmark": {"benchmark": True},
    "job_layout": {"benchmark": True, "layout": "input"},
    "batch64": {"benchmark": True, "batch_factor": 2},  # twice the preset's micro-batch: 64 on a GPU
    "compile": {"benchmark": True, "compile_": True},
    "fused_bn_neuron": {"benchmark": True, "fuse": True},  # models.bn_neuron's Triton kernels
    "fused_da": {"benchmark": True, "fuse_da": True},  # models._da_triton's kernels for DA's sums
    # the same kernels as `benchmark`, replayed from one CUDA graph: what the host's launches cost. A diagnostic
    # (the job captures nothing yet), never the fastest; on a GPU only
    "graphs": {"benchmark": True, "graphs": True},
}
DIAGNOSTIC = {"graphs"}
# fusion variants, and the job override that turns each on (the fusion job takes those whose variant won)
FUSIONS = {"fused_bn_neuron": "model.fuse_bn_neuron=true", "fused_da": "model.fuse_da=true"}


@dataclass(frozen=True)
class Sizes:
    """What each piece runs at: the job's own sizes on a GPU (only data and steps shrunk), toy ones on CPU."""

    res: int
    width: int
    micro_batch: int
    classes: int
    per_class: int
    val_per_class: int
    image_size: tuple[int, int]
    resume_steps: int  # the interrupted/resumed job's steps ...
    stop_after: int  # ... and the step after which it is interrupted
    steady_steps: int
    warmup: int
    repeats: int
    workers: int
    job_timeout: float
    budget: float

    @classmethod
    def for_device(cls, cuda: bool, budget_s: float) -> Sizes:
        if cuda:
            return cls(224, 64, 32, 8, 128, 16, (500, 375), 16, 8, 30, 3, 6, min(16, os.cpu_count() or 1),
                       240.0, budget_s)  # fmt: skip
        # every piece runs, however long a loaded CPU takes: the dry run checks the script, not the speed
        return cls(32, 4, 2, 8, 4, 2, (160, 120), 4, 2, 6, 1, 1, 2, 1800.0, math.inf)


def _env(site: str | None, dry: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (site, str(REPO), env.get("PYTHONPATH")) if p)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    if dry:
        env["DS_ACCELERATOR"] = "cpu"
    return env


class TrainCheck:
    """The pieces in order (see the module docstring), sharing one result dict that is rewritten after each."""

    def __init__(self, args: argparse.Namespace, device, gpu: str) -> None:
        import torch

        self.args, self.device, self.cuda = args, device, device.type == "cuda"
        self.pieces = set(args.pieces.split(","))
        self.t_start = time.monotonic()
        self.z = Sizes.for_device(self.cuda, args.budget_s)
        # the jobs' folders (gigabytes, never under the OUT the device tool brings back), absolute: the jobs run in it
        self.work = args.work.resolve()
        self.work.mkdir(parents=True, exist_ok=True)
        self.env = _env(args.site, not self.cuda)
        self.out_json = args.out / f"gpu_train_{gpu_slug(gpu) if self.cuda else 'cpu-dry-run'}.json"
        self.result: dict = {
            "gpu": gpu, "torch": torch.__version__, "model": "danet152", "T": 4, "resolution": self.z.res,
            "precision": "bf16-mixed" if self.cuda else "fp32", "micro_batch": self.z.micro_batch, "world_size": 1,
            "baseline_img_per_s": None, "model_step_img_per_s": None, "end_to_end_img_per_s": None,
            "peak_memory_gb": None, "job_status": None, "resumed": None, "dry_run": not self.cuda, "errors": [],
            "skipped": [], "jobs": {}}  # fmt: skip
        self.base_kw = dict(name="danet152", batch=self.z.micro_batch, res=self.z.res, width=self.z.width,
                            layout="model", benchmark=False, policy="none", warmup=self.z.warmup,
                            repeats=self.z.repeats)  # fmt: skip
        self.variants: dict[str, dict] = {}
        self.ffr = self.work / "imagenet_ffr"
        self._plan_probe: tuple[dict[str, int], int] | None = None
        # written by the embedded default's thread, read after its join
        self._default_job: dict | None = None
        self._direct_job: dict | None = None
        self._default_procs: list[subprocess.Popen] = []
        self._procs: list[subprocess.Popen] = []  # every other job started, for on_sigterm
        # the in-process model-step pieces (baseline, variants, equivalence, profile, memory) run in a child
        self.measuring = StepProcess()

    # ---- bookkeeping
    def elapsed(self) -> float:
        return time.monotonic() - self.t_start

    def left(self) -> float:
        """Seconds of the time budget left (inf in the dry run)."""
        return self.z.budget - self.elapsed()

    def save(self) -> None:
        """Rewrite the JSON: a timeout later keeps what was measured so far."""
        self.result["wall_s"] = round(self.elapsed(), 1)
        write_result(self.out_json, self.result)

    def show(self) -> None:
        """The table, last; a result it cannot lay out loses the table only (the JSON is written)."""
        try:
            print(table(self.result), flush=True)
        except Exception as exc:  # (a field of an unforeseen shape: a defect of the table, not of the run)
            print(f"!! table: {type(exc).__name__}: {exc}; every figure is in {self.out_json}", flush=True)

    def note(self, msg: str) -> None:
        print(f"== [{self.elapsed():.0f}s] {msg}", flush=True)

    def attempt(self, label: str, fn):
        try:
            return fn()
        except Exception as exc:  # one piece failing must not lose the others' figures
            self.result["errors"].append(f"{label}: {type(exc).__name__}: {exc}"[:600])
            print(f"!! {label} failed: {exc!r}"[:600], flush=True)
            return None

    def measure(self, fn, **kw):
        """``fn(self.device, **kw)`` in the measuring process, stopped once the time budget is spent (a hang must
        not run into the script's own timeout, which would lose the table and the pieces after it)."""
        left = self.left()
        return self.measuring(fn, timeout=None if math.isinf(left) else max(left, 30.0), device=self.device, **kw)

    def within(self, fraction: float, label: str) -> bool:
        """Whether the time budget leaves room for ``label`` (else recorded in ``skipped``: not an error, what a
        rerun with TRAIN_PIECES can measure)."""
        if self.elapsed() < self.z.budget * fraction:
            return True
        self.result["skipped"].append(f"{label}: skipped (time budget)")
        return False

    def job_timeout(self) -> float:
        """A job's time limit: its own, or what the budget has left (at least a minute), whichever is less."""
        return min(self.z.job_timeout, max(60.0, self.left()))

    def job_args(self, batch: int, steps: int, every: int, deterministic: bool) -> list[str]:
        z = self.z
        common = [f"data.root={self.ffr}", f"model.num_classes={z.classes}", "launch.mode=local", "launch.nodes=1"]
        if not self.cuda:
            common += [f"model.width={z.width}", f"model.input_size={z.res}", f"data.image_size={z.res}",
                       f"data.val_resize={z.res + z.res // 7}", "launch.local_ranks=1", "data.num_threads=2"]  # fmt: skip
        return common + [f"train.global_batch_size={batch}", "train.micro_batch_size=0", f"train.max_steps={steps}",
                         "train.epochs=100", f"train.log_every_steps={every}",
                         f"train.deterministic={str(deterministic).lower()}"]  # fmt: skip

    # ---- the pieces
    def dataset(self) -> Path:
        """1. Photographs -> ImageNet-layout JPEG folder -> ``orchestrator data convert``."""
        self.note("dataset: photographs -> ImageNet-layout JPEG folder -> orchestrator data convert")
        if not (self.ffr / "meta.json").is_file():
            z = self.z
            counts = build_image_folder(self.work / "imagenet_src", photo_paths(self.args.pack_photos), z.classes,
                                        z.per_class, z.val_per_class, z.image_size)  # fmt: skip
            convert_folder(self.work / "imagenet_src", self.ffr, self.env, z.workers)
            self.result["dataset"] = {**counts, "classes": z.classes, "image_size_approx": list(z.image_size)}
        return self.ffr

    def resume(self) -> None:
        """2. Interrupted and resumed (deterministic), beside an uninterrupted reference run in parallel."""
        z, mb = self.z, self.z.micro_batch
        self.note(f"job: SIGINT after step {z.stop_after}, resume to {z.resume_steps}; uninterrupted reference beside it")
        det_env = {**self.env, "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}  # cuBLAS's deterministic workspace
        args = self.job_args(mb, z.resume_steps, 1, True)

        def both() -> dict:
            out: dict = {}
            # the reference in its own working directory: its own MLflow store (two writers on one sqlite file race)
            ref_cwd = self.work / "reference"
            for old in (self.work / "runs" / "resumed", ref_cwd / "runs" / "uninterrupted"):
                shutil.rmtree(old, ignore_errors=True)  # a rerun starts both from scratch
            ref_cwd.mkdir(exist_ok=True)
            ref = threading.Thread(target=lambda: out.update(
                reference=run_job(ref_cwd, "runs/uninterrupted", args, det_env, self.job_timeout(),
                                  on_start=self._procs.append)))  # fmt: skip
            ref.start()
            out["interrupted"] = run_job(self.work, "runs/resumed", args, det_env, self.job_timeout(),
                                         stop_after_step=z.stop_after, on_start=self._procs.append)  # fmt: skip
            if out["interrupted"]["rc"] == 130:  # (a job that failed or ran through: nothing to resume)
                out["resumed"] = run_job(self.work, "runs/resumed", args, det_env, self.job_timeout(),
                                         on_start=self._procs.append)  # fmt: skip
            ref.join()
            return out

        jobs = self.attempt("resume check", both) or {}
        s1, s2, sr = (jobs.get(k, {}).get("summary", {}) for k in ("interrupted", "resumed", "reference"))
        r = self.result
        r["job_status"] = s2.get("status")
        r["resumed"] = bool(s1.get("status") == "interrupted" and 0 < (s1.get("steps") or 0) < z.resume_steps
                            and s2.get("status") == "completed" and s2.get("steps") == z.resume_steps
                            and s2.get("restarts") == 1)  # fmt: skip
        if jobs and not r["resumed"]:  # named in errors too: the table's "resumed False" does not say why
            said = [f"{k} rc {j.get('rc')} status {j.get('summary', {}).get('status')}"
                    + (f" ({j['log_tail'].strip().splitlines()[-1][:200]})" if j.get("log_tail", "").strip() else "")
                    for k, j in jobs.items()]  # fmt: skip
            r["errors"].append("resume check: not interrupted and resumed to completion: " + "; ".join(said))
        for key, field in (("weights_equal_uninterrupted", "weights_sha256"), ("losses_equal_uninterrupted", "loss_digest")):
            r[key] = s2.get(field) == sr.get(field) if s2.get(field) and sr.get(field) else None
        r["jobs"].update({k: job_record(j, "steps", "restarts") for k, j in jobs.items()})

    def start_default(self) -> threading.Thread:
        """2b. ``orchestrator launch`` with no arguments, the embedded default (one rank per GPU, the CPU ranks
        otherwise), in a folder of its own, beside the resume check (neither is timed), then ``orchestrator train``
        by hand for an epoch; :meth:`join_default` waits for both before the first timed piece. The dry run adds
        ``train.epochs=1`` to the launch: it checks the path."""
        cwd = self.work / "default"
        shutil.rmtree(cwd, ignore_errors=True)  # a rerun must not resume the last one
        cwd.mkdir(parents=True)
        extra = [] if self.cuda else ["train.epochs=1"]
        self.note("job: the embedded default (orchestrator launch" + (f" {' '.join(extra)}" if extra else
                                                                      ", no arguments") + "), beside the resume check")

        def go() -> None:
            try:
                self._default_job = run_job(cwd, None, extra, self.env, self.job_timeout(), config=None,
                                            on_start=self._default_procs.append)  # fmt: skip
                # then one rank by hand, no launcher (deliverable 1: `orchestrator train` on the GPU as well)
                self._direct_job = run_job(cwd, "runs/direct", ["train.epochs=1"], self.env, self.job_timeout(),
                                           config=None, verb="train", on_start=self._default_procs.append)  # fmt: skip
            except Exception as exc:  # recorded by join_default: the main thread owns the result dict
                self._default_job = {**(self._default_job or {}), "error": f"{type(exc).__name__}: {exc}"}

        thread = threading.Thread(target=go, daemon=True)
        thread.start()
        return thread

    def join_default(self, thread: threading.Thread) -> None:
        """The embedded default's outcome: completed, on one rank per GPU, and learning (val top-1)."""
        import torch

        from launch.local import local_rank_count
        from orchestrator.config import load_config

        grace = DEFAULT_GRACE_S if self.cuda else 2 * self.z.job_timeout  # (the dry run checks the path)
        thread.join(grace)
        if thread.is_alive():
            for p in self._default_procs:
                kill_job(p)
            thread.join(30)
            self.result["errors"].append(f"default launch: still running {grace:.0f} s after the resume check, "
                                         "stopped (it must not share the GPU with the timed pieces)")
        j = self._default_job or {"error": "did not finish"}
        s = j.get("summary", {})
        cfg = load_config(None)
        want = local_rank_count(cfg.launch.local_ranks, cfg.train.device,
                                torch.cuda.device_count() if self.cuda else 0)  # fmt: skip
        self.result["default_launch"] = {**job_record(j, "world_size", "epochs", "val_top1", "images_per_sec"),
                                         "expected_world_size": want}  # fmt: skip
        problems = [j["error"]] if "error" in j else []
        if s.get("status") != "completed":
            problems.append(f"status {s.get('status')!r}, rc {j.get('rc')}")
        if s.get("world_size") != want:
            problems.append(f"{s.get('world_size')} rank(s), expected {want}")
        top1 = s.get("val_top1")
        if self.cuda and not (isinstance(top1, (int, float)) and top1 > DEFAULT_MIN_TOP1):
            problems.append(f"val top-1 {top1}, expected > {DEFAULT_MIN_TOP1}")
        if problems:
            self.result["errors"].append("default launch: " + "; ".join(problems))
        d = self.result["direct_train"] = job_record(self._direct_job or {}, "world_size")
        if d["status"] != "completed" or d["world_size"] != 1:
            self.result["errors"].append(f"orchestrator train (one rank, no launcher): status {d['status']!r}, "
                                         f"rc {d['rc']}, {d['world_size']} rank(s)")

    def baseline(self) -> None:
        """3. The model step alone as configured today (models.gpu_check's eager step, batch 32)."""
        self.note("model step: baseline (today's configuration)")
        got = self.attempt("baseline", lambda: self.measure(model_step, **self.base_kw))
        if got:
            self.variants["baseline"] = got
            self.result["baseline_img_per_s"] = got["img_per_s"]

    def steady_job(self, label: str, *extra: str, micro_batch: int | None = None) -> dict:
        """The job, not deterministic, inside its first epoch (no evaluation or epoch checkpoint in the window):
        its steady-state rate and peak memory (at the preset's micro-batch unless given)."""
        z, mb = self.z, micro_batch or self.z.micro_batch
        steps = max(3, min(z.steady_steps, (z.classes * z.per_class) // mb - 1))
        every = max(1, steps // 6)
        self.note(f"job {label}: steady state, micro-batch {mb}, {steps} steps, progress every {every}")
        shutil.rmtree(self.work / "runs" / label, ignore_errors=True)  # a rerun must not resume a finished run
        j = run_job(self.work, f"runs/{label}", self.job_args(mb, steps, every, False)
                    + ["train.checkpoint_every_steps=0", *extra], self.env, self.job_timeout(),
                    on_start=self._procs.append)  # fmt: skip
        peak = mlflow_peak_mb(self.work / "mlflow.db", j["summary"].get("mlflow_run_id"))
        out = {"rate": steady_rate(j["steps"], mb), "peak_gb": peak / 1024 if peak is not None and self.cuda else None}
        self.result["jobs"][label] = {**job_record(j, "steps", "forward_dtype"), "overrides": list(extra), "micro_batch": mb,
                                      "whole_run_img_per_s": j["summary"].get("images_per_sec"),
                                      "img_per_s": out["rate"], "peak_memory_gb": out["peak_gb"]}  # fmt: skip
        return out

    def throughput(self) -> None:
        """4. The real job's steady state at the preset's per-GPU micro-batch: ``end_to_end_img_per_s``."""
        if not self.within(0.7, "throughput job"):
            return
        got = self.attempt("throughput job", lambda: self.steady_job("throughput"))
        if got:
            self.result["end_to_end_img_per_s"] = got["rate"]
            self.result["peak_memory_gb"] = got["peak_gb"]
        # what the job's forward really ran in (DeepSpeed once switched bf16-mixed's autocast off on GPUs)
        dtype = self.result["jobs"].get("throughput", {}).get("forward_dtype")
        want = "torch.bfloat16" if self.cuda else "torch.float32"
        if got and dtype != want:
            self.result["errors"].append(f"throughput job: its forward ran in {dtype}, not {want} "
                                         f"({self.result['precision']})")  # fmt: skip

    def levers(self) -> None:
        """5. The model-step variants of ``--variants``, side by side with the baseline; the fastest of all is
        ``model_step_img_per_s``."""
        self.note("model step: variants")
        for name in [v for v in self.args.variants.split(",") if v]:  # (names checked by main)
            if VARIANTS[name].get("graphs") and not self.cuda:
                self.result["graphs"] = {"skipped": "CUDA graphs need a GPU (dry run)"}
            elif self.within(0.8, f"variant {name}"):
                got = self.attempt(f"variant {name}", lambda n=name: self.measure(model_step, **self.fastest_kw(n)))
                if got:
                    self.variants[name] = got
                if name in FUSIONS:
                    self.result[f"{name}_path"] = got.pop("path") if got else "unknown: the variant failed (errors)"

    def fastest_kw(self, variant: str | None = None) -> dict:
        """model_step's arguments for ``variant`` (default: the fastest measured so far)."""
        variant = variant or self.result.get("fastest_variant") or "baseline"
        kw = {**self.base_kw, **VARIANTS.get(variant, {})}
        kw["batch"] *= kw.pop("batch_factor", 1)
        return kw

    def summarise_variants(self) -> None:
        r, v = self.result, self.variants
        counted = [k for k in v if self.equivalent(k) and k not in DIAGNOSTIC]
        if v.get("graphs") and v.get("benchmark"):
            r["graphs"] = {"img_per_s": v["graphs"]["img_per_s"], "eager_img_per_s": v["benchmark"]["img_per_s"],
                           "speedup": round(v["graphs"]["img_per_s"] / v["benchmark"]["img_per_s"], 3)}
        if counted:
            best = max(counted, key=lambda k: v[k]["img_per_s"])
            r.update(model_step_img_per_s=v[best]["img_per_s"], fastest_variant=best,
                     fastest_micro_batch=self.fastest_kw(best)["batch"])
        r["model_step_variants"] = v
        if r["peak_memory_gb"] is None and v.get("baseline"):
            r["peak_memory_gb"] = v["baseline"]["peak_gb"]
            r["peak_memory_source"] = "model step (baseline)"

    def equivalence(self) -> None:
        """5b. Each measured variant that runs the baseline's step another way, against the baseline: fp32 loss
        and gradients within ``LOSS_TOL`` and ``GRAD_TOL`` (``equivalence``)."""
        # what only picks other cudnn algorithms (benchmark) or computes another step (a micro-batch) is left out
        # (nor what replays the same kernels from a graph)
        names = [n for n in self.variants if set(VARIANTS.get(n, {})) - {"benchmark"}
                 and "batch_factor" not in VARIANTS[n] and n not in DIAGNOSTIC]  # fmt: skip
        if not (names and self.within(0.8, "equivalence")):
            return
        small = {"batch": 2 if self.cuda else self.z.micro_batch, "res": 64 if self.cuda else self.z.res}
        self.note(f"equivalence: fp32 gradients of {', '.join(names)} against the baseline "
                  f"(batch {small['batch']}, {small['res']} px)")  # fmt: skip
        ref = {**self.base_kw, **small}
        out = self.result["equivalence"] = {"grad_tol": GRAD_TOL, "loss_tol": LOSS_TOL, **small}
        for name in names:
            got = self.attempt(f"equivalence {name}", lambda n=name: self.measure(
                equivalence_of, ref_kw=ref, kw={**self.fastest_kw(n), **small}))
            out[name] = got or {"equal": None, "why": "failed (see errors)"}
            if out[name]["equal"] is False:
                self.result["errors"].append(f"equivalence {name}: gradients differ from the baseline's "
                                             f"({json.dumps(out[name])[:300]}); left out of the fastest")

    def equivalent(self, name: str) -> bool:
        """Whether a variant may count: not shown to compute something else (unchecked counts)."""
        return (self.result.get("equivalence") or {}).get(name, {}).get("equal") is not False

    def profile(self) -> None:
        """6. torch.profiler over a few steps of the fastest model step."""
        if not (self.result.get("fastest_variant") and self.within(0.9, "profile")):
            return
        self.note("profile: a few steps of the fastest model step")
        got = self.attempt("profile", lambda: self.measure(model_step, **{**self.fastest_kw(), "warmup": 2,
                                                                          "repeats": 1, "profile": True}))
        self.result["profile"] = got.get("profile") if got else None

    def memory(self) -> None:
        """9. Per checkpointing policy, on the fastest model step's settings: the measured peak and step rate
        against ``orchestrator plan``'s estimate at that micro-batch, and whether ``auto`` (the plan's choice for
        this card) is the fastest policy that fits it."""
        from orchestrator.plan import POLICIES, choose_auto

        if not self.within(0.85, "memory"):  # (before the plan's probe, which builds the model)
            return
        kw = {**self.fastest_kw(), "warmup": 1, "repeats": 2}
        plan, card_gb = self.plan_rows(kw["batch"])
        rows: dict[str, dict] = {}
        for policy in POLICIES:
            if not self.within(0.85, f"memory {policy}"):
                break
            self.note(f"memory: policy {policy}, micro-batch {kw['batch']}")
            got = self.attempt(f"memory {policy}", lambda p=policy: self.measure(model_step, **{**kw, "policy": p}))
            rows[policy] = {"plan_gb": plan[policy]["est_gb"], "peak_gb": got["peak_gb"] if got else None,
                            "img_per_s": got["img_per_s"] if got else None}
            if got and got["peak_gb"]:
                rows[policy]["measured_over_plan"] = round(got["peak_gb"] / plan[policy]["est_gb"], 3)
        fitting = [p for p, r in rows.items() if r["img_per_s"] and (r["peak_gb"] or 0.0) <= card_gb]
        self.result["memory_by_policy"] = {
            "micro_batch": kw["batch"], "card_gb": round(card_gb, 1), "policies": rows,
            "auto_policy": choose_auto(list(plan.values()))["policy"],
            "fastest_fitting_policy": max(fitting, key=lambda p: rows[p]["img_per_s"]) if fitting else None}

    def plan_rows(self, micro_batch: int) -> tuple[dict[str, dict], float]:
        """``orchestrator plan``'s per-policy estimate for the danet152 preset at ``micro_batch`` on this card
        (CPU: a nominal 80 GiB card), and the card's memory in GiB."""
        import torch

        from orchestrator.config import load_config
        from orchestrator.plan import activation_bytes, estimate

        card_gb = torch.cuda.get_device_properties(0).total_memory / 2**30 if self.cuda else 80.0
        z = self.z
        cfg = load_config("danet152_imagenet", [f"model.width={z.width}", f"data.image_size={z.res}",
                                                f"model.input_size={z.res}", f"train.micro_batch_size={micro_batch}",
                                                "launch.nodes=1", "launch.gpus_per_node=1"])  # fmt: skip
        if self._plan_probe is None:  # the model's activation probe, once for every micro-batch asked about
            self._plan_probe = activation_bytes(cfg)
        return {r["policy"]: r for r in estimate(cfg, card_gb, 1, probe=self._plan_probe)}, card_gb

    def plan_batch(self) -> None:
        """8. The steady-state job again at the micro-batch ``orchestrator plan`` gives this card (the largest that
        fits under the policy ``auto`` picks; a multiple of 8, at most 128 and within the first epoch), beside
        the preset's: ``end_to_end_by_micro_batch``."""
        from orchestrator.plan import choose_auto

        z = self.z
        if not self.within(0.75, "plan micro-batch job"):  # (before the plan's probe, which builds the model)
            return
        rows, _ = self.plan_rows(z.micro_batch)
        cap = min(128, (z.classes * z.per_class) // 4) if self.cuda else 2 * z.micro_batch  # CPU: the path only
        micro = min(cap, choose_auto(list(rows.values()))["max_micro_batch"])
        micro = micro - micro % 8 if micro >= 8 else micro
        by = {str(z.micro_batch): self.result["end_to_end_img_per_s"]}
        self.result["end_to_end_by_micro_batch"] = by
        if micro <= z.micro_batch:
            self.result["plan_micro_batch_note"] = f"plan's micro-batch {micro} is not above the preset's"
            return
        if not self.within(0.75, f"plan micro-batch job ({micro})"):
            return
        extra = self.winning_overrides()
        self.result["plan_micro_batch_overrides"] = extra
        got = self.attempt("plan micro-batch job",
                           lambda: self.steady_job(f"throughput_mb{micro}", *extra, micro_batch=micro))
        by[str(micro)] = got["rate"] if got else None

    def winning_overrides(self) -> list[str]:
        """The job overrides measured faster end to end in this run (the fusion job), to carry into later jobs."""
        fusion = self.result.get("end_to_end_by_fusion") or {}
        won = (fusion.get("on") or 0) > (fusion.get("off") or 0)
        return list(self.result.get("fusion_overrides") or []) if won else []

    def fusion(self) -> None:
        """7. The steady-state job again with each fusion whose model-step variant beat its unfused twin
        (``benchmark``) turned on, beside the preset's (all off): ``end_to_end_by_fusion``."""
        v = self.variants
        plain = v.get("benchmark")
        measured = {name: v[name] for name in FUSIONS if name in v}
        if not (measured and plain and self.result["end_to_end_img_per_s"]):
            return
        self.result["end_to_end_by_fusion"] = by = {"off": self.result["end_to_end_img_per_s"]}
        won = [name for name, got in measured.items() if got["img_per_s"] > plain["img_per_s"] and self.equivalent(name)]
        lost = sorted(set(measured) - set(won))
        if lost:
            self.result["fusion_note"] = "; ".join(
                f"{n}: gradients differ from the unfused step's: left off" if not self.equivalent(n) else
                f"{n} model step {measured[n]['img_per_s']:.1f} img/s is not above unfused "
                f"{plain['img_per_s']:.1f}: left off" for n in lost)  # fmt: skip
        if not won or not self.within(0.7, "fusion job"):
            return
        self.result["fusion_overrides"] = extra = [FUSIONS[n] for n in won]
        got = self.attempt("fusion job", lambda: self.steady_job("throughput_fused", *extra))
        by["on"] = got["rate"] if got else None

    def precision(self) -> None:
        """10. If time is left, the steady-state job again on DeepSpeed's bf16 engine, beside bf16-mixed."""
        if not self.cuda:
            return
        if not self.result["end_to_end_img_per_s"]:
            self.result["skipped"].append("precision job: skipped (no bf16-mixed rate to compare with)")
            return
        if not self.within(0.8, "precision job"):
            return
        other = self.attempt("precision job", lambda: self.steady_job("throughput_bf16", "train.precision=bf16"))
        self.result["end_to_end_by_precision"] = {"bf16-mixed": self.result["end_to_end_img_per_s"],
                                                  "bf16": other["rate"] if other else None}

    def on_sigterm(self, signum=signal.SIGTERM, frame=None) -> None:
        """The script's own timeout (gpu_check.sh): its SIGTERM reaches this process only, the jobs and the
        measuring process each run in a session of their own. Stop them, keep what was measured, print the
        table, exit 1."""
        self.result["errors"].append(f"stopped by signal {signum} at {self.elapsed():.0f} s (the script's "
                                     "timeout): the pieces after this point did not run")  # fmt: skip
        for p in self._procs + self._default_procs:
            kill_job(p)
        self.measuring.close(kill=True)
        self.save()
        self.show()
        os._exit(1)

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self.on_sigterm)
        if self.attempt("dataset", self.dataset) is None:
            self.save()
            self.show()
            return 1
        self.save()  # from here on a JSON is there, whatever stops the run
        steps = [("resume", self.resume), ("baseline", self.baseline), ("throughput", self.throughput),
                 ("variants", self.levers), ("equivalence", self.equivalence), ("profile", self.profile),
                 ("fusion", self.fusion), ("plan_batch", self.plan_batch), ("memory", self.memory),
                 ("precision", self.precision)]
        default = self.attempt("default", self.start_default) if "default" in self.pieces else None
        try:
            for piece, fn in steps:
                if piece in self.pieces:
                    self.attempt(piece, fn)  # a piece's own defect (not only its jobs') must not lose the rest
                if piece == "resume" and default is not None:  # before anything is timed
                    self.attempt("default", lambda: self.join_default(default))
                if piece in ("variants", "equivalence"):
                    self.summarise_variants()
                self.save()
        finally:
            self.measuring.close()
        self.note(f"wrote {self.out_json}")
        self.show()
        ok = not self.result["errors"] and ("resume" not in self.pieces or self.result["job_status"] == "completed")
        return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT_DIR", "gpu_check_out")))
    parser.add_argument("--work", type=Path, default=REPO / ".cache" / "gpu_train_work",
                        help="the dataset and the jobs' folders (checkpoints: gigabytes on the GPU), outside --out")
    parser.add_argument("--dry-run", action="store_true", help="CPU, toy sizes (gloo, width 4, 32 px, few steps)")
    parser.add_argument("--pack-photos", type=Path, default=REPO / ".cache" / "gpu_pack" / "c00" / "photos")
    parser.add_argument("--site", default=os.environ.get("GPU_SITE"), help="unpacked packages (PYTHONPATH)")
    parser.add_argument("--variants", default="benchmark,job_layout,batch64,fused_bn_neuron,fused_da,graphs",
                        help=f"model-step variants beside the baseline: {', '.join(VARIANTS)}")
    parser.add_argument("--budget-s", type=float, default=450.0, help="skip later pieces past this")
    parser.add_argument("--pieces", default=",".join(PIECES), help=f"a subset of {', '.join(PIECES)}")
    args = parser.parse_args(argv)
    for flag, given, valid in (("--pieces", args.pieces, PIECES), ("--variants", args.variants, VARIANTS)):
        unknown = set(v for v in given.split(",") if v) - set(valid)
        if unknown:
            print(f"{flag}: unknown {sorted(unknown)}; valid: {', '.join(valid)}", file=sys.stderr)
            return 2
    if args.work.resolve().is_relative_to(args.out.resolve()):
        print(f"--work {args.work}: inside --out {args.out}, whose files the device tool brings back (8 at most); "
              "give a folder outside it", file=sys.stderr)
        return 2
    import torch

    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not args.dry_run:
        print("no CUDA device: use --dry-run on CPU", file=sys.stderr)
        return 2
    gpu = torch.cuda.get_device_name(0) if cuda else "cpu (dry run)"
    return TrainCheck(args, torch.device("cuda" if cuda else "cpu"), gpu).run()


if __name__ == "__main__":
    raise SystemExit(main())
