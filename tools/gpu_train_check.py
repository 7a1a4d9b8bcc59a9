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
3. Model step alone (no loader, no DeepSpeed): the baseline (today's configuration: ``models.gpu_check``'s
   eager step, channels_last weights, cudnn defaults, batch 32) and the variants in ``--variants``; the fastest
   one is ``model_step_img_per_s`` and its micro-batch is used by 4.
4. The job again (not deterministic), steady state: images per second between the progress lines of its
   second third and its last log point (each progress line is a sync point), read as the lines arrive.
5. torch.profiler over a few steps of the fastest model step: CUDA time per group (convolutions, BatchNorm,
   LIF, DA sums, casts/copies, elementwise, optimizer, other) and the host gaps (wall time the GPU was idle).
6. If time is left, the steady-state job of 4 once more with ``train.precision=bf16`` (DeepSpeed's bf16 engine,
   the job's precision before ``auto`` became bf16-mixed), side by side: ``end_to_end_by_precision``.

Writes ``OUT/gpu_train_<gpu>.json`` (see ``REQUIRED``) and prints a short table last.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REQUIRED = ("gpu", "torch", "model", "T", "resolution", "precision", "micro_batch", "world_size",
            "baseline_img_per_s", "model_step_img_per_s", "end_to_end_img_per_s", "peak_memory_gb",
            "job_status", "resumed")  # fmt: skip
STEP_LINE = re.compile(r"step (\d+)/(\d+) ")
PIECES = ("resume", "baseline", "throughput", "variants", "profile", "precision")


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


def run_job(cwd: Path, run_dir: str, overrides: list[str], env: dict, timeout: float,
            stop_after_step: int | None = None) -> dict:  # fmt: skip
    """``orchestrator launch --config danet152_imagenet`` with ``overrides``; SIGINT once a progress line shows
    ``stop_after_step``. Returns the exit code, the summary, the (step, arrival time) of every progress line."""
    cmd = [sys.executable, "-m", "orchestrator", "launch", "--config", "danet152_imagenet", "--run-dir", run_dir,
           *overrides]  # fmt: skip
    log_path = cwd / f"{Path(run_dir).name}.log"
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         bufsize=1)  # fmt: skip
    steps: list[tuple[int, float]] = []
    interrupted = threading.Event()
    timer = threading.Timer(timeout, p.kill)
    timer.start()
    with open(log_path, "w") as log:
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
    summary_path = cwd / run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    return {"rc": rc, "summary": summary, "steps": steps, "wall_s": round(time.monotonic() - t0, 1),
            "sigint": interrupted.is_set(), "log": str(log_path),
            "log_tail": log_path.read_text()[-1500:] if rc not in (0, 130) else ""}  # fmt: skip


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
               policy: str, warmup: int, repeats: int, compile_: bool = False, profile: bool = False) -> dict:  # fmt: skip
    """danet forward + backward + SGD step, bf16 autocast on CUDA (fp32 on CPU). ``layout``: 'model' (weights
    channels_last, images NCHW: today's models.gpu_check), 'input' (images channels_last, weights contiguous:
    the job's), 'none'. Either way every convolution runs NHWC."""
    import torch

    from models import create_model

    torch.backends.cudnn.benchmark = benchmark
    torch.manual_seed(0)
    model = create_model(name, T=4, input_size=res, width=width, checkpointing=policy).to(device)
    if layout == "model":
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(batch, 3, res, res, device=device)
    if layout == "input":
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), device=device)
    fn = torch.compile(model) if compile_ else model
    cuda = device.type == "cuda"

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = torch.nn.functional.cross_entropy(fn(x).float().mean(0), y)
        loss.backward()
        opt.step()

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


def model_step(device, **kw) -> dict:
    """``_model_step`` with its memory handed back afterwards (variants run one after another)."""
    import gc

    import torch

    try:
        return _model_step(device, **kw)
    finally:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


GROUPS = (  # (group, substrings of aten op / kernel names, lower case); the first match wins
    ("lif", ("lif_forward", "lif_backward", "_lif_fwd", "_lif_bwd", "fusedlif")),
    ("batch_norm", ("batch_norm", "batchnorm", "bn_fw", "bn_bw", "welford")),
    ("convolution", ("conv", "cudnn", "xmma", "implicit_gemm", "dgrad", "wgrad", "fprop", "cutlass")),
    ("da_sums", ("addcmul", "aten::dot", "dot_kernel")),
    ("casts_copies", ("copy", "_to_copy", "aten::to", "clone", "contiguous", "nchwtonhwc", "nhwctonchw",
                      "transpose", "cast", "convert")),  # fmt: skip
    ("optimizer", ("foreach", "multi_tensor", "sgd", "_fused_")),
    ("elementwise", ("elementwise", "aten::add", "aten::mul", "aten::sub", "aten::div", "reduce", "sum", "mean")),
)


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
            groups[_group(ev.key)] = groups.get(_group(ev.key), 0.0) + dev_us / 1e3
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
            *[(f"end to end img/s, train.precision={k}", fmt(v))
              for k, v in (result.get("end_to_end_by_precision") or {}).items()],
            ("peak memory GB", fmt(result["peak_memory_gb"])),
            ("job status / resumed / weights = uninterrupted", f"{result['job_status']} / {result['resumed']} / "
                                                               f"{result.get('weights_equal_uninterrupted')}")]  # fmt: skip
    prof = result.get("profile") or {}
    if prof.get("groups_ms_per_step"):
        rows.append(("profile ms/step " + ("(device)" if prof.get("host_gap_ms_per_step") is not None else "(CPU)"),
                     ", ".join(f"{k} {v:.1f}" for k, v in prof["groups_ms_per_step"].items())
                     + (f", host gaps {prof['host_gap_ms_per_step']:.1f}" if prof.get("host_gap_ms_per_step")
                        is not None else "")))  # fmt: skip
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


# --------------------------------------------------------------------------------------------- main


def _env(site: str | None, dry: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (site, str(REPO), env.get("PYTHONPATH")) if p)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    if dry:
        env["DS_ACCELERATOR"] = "cpu"
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT_DIR", "gpu_check_out")))
    parser.add_argument("--dry-run", action="store_true", help="CPU, toy sizes (gloo, width 4, 32 px, few steps)")
    parser.add_argument("--pack-photos", type=Path, default=REPO / ".cache" / "gpu_pack" / "c00" / "photos")
    parser.add_argument("--site", default=os.environ.get("GPU_SITE"), help="unpacked packages (PYTHONPATH)")
    parser.add_argument("--variants", default="benchmark,job_layout,batch64",
                        help="model-step variants beside the baseline: benchmark, job_layout, batch64, compile")
    parser.add_argument("--budget-s", type=float, default=450.0, help="skip later pieces past this")
    parser.add_argument("--pieces", default=",".join(PIECES), help=f"a subset of {', '.join(PIECES)}")
    args = parser.parse_args(argv)
    pieces = set(args.pieces.split(","))
    if pieces - set(PIECES):
        print(f"--pieces: unknown {sorted(pieces - set(PIECES))}; valid: {', '.join(PIECES)}", file=sys.stderr)
        return 2
    t_start = time.monotonic()
    dry = args.dry_run
    import torch

    cuda = torch.cuda.is_available() and not dry
    if not cuda and not dry:
        print("no CUDA device: use --dry-run on CPU", file=sys.stderr)
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    gpu = torch.cuda.get_device_name(0) if cuda else "cpu (dry run)"
    # sizes: the job's own on a GPU (only data and steps shrunk); toy ones on CPU
    if cuda:
        res, width, mb, classes, per_class, val_per_class, img_size = 224, 64, 32, 8, 128, 16, (500, 375)
        steps_a, stop_a, steps_c, warmup, repeats, workers = 16, 8, 30, 3, 6, min(16, os.cpu_count() or 1)
        job_timeout, budget = 240.0, args.budget_s
    else:  # every piece runs, however long a loaded CPU takes: the dry run checks the script, not the speed
        res, width, mb, classes, per_class, val_per_class, img_size = 32, 4, 2, 8, 4, 2, (160, 120)
        steps_a, stop_a, steps_c, warmup, repeats, workers = 4, 2, 6, 1, 1, 2
        job_timeout, budget = 1800.0, math.inf
    work = args.out / "train_check"
    work.mkdir(parents=True, exist_ok=True)
    env = _env(args.site, dry)
    result: dict = {"gpu": gpu, "torch": torch.__version__, "model": "danet152", "T": 4, "resolution": res,
                    "precision": "bf16-mixed" if cuda else "fp32", "micro_batch": mb, "world_size": 1,
                    "baseline_img_per_s": None, "model_step_img_per_s": None, "end_to_end_img_per_s": None,
                    "peak_memory_gb": None, "job_status": None, "resumed": None, "dry_run": dry,
                    "errors": []}  # fmt: skip
    slug = gpu_slug(gpu) if cuda else "cpu-dry-run"
    out_json = args.out / f"gpu_train_{slug}.json"

    def save() -> None:
        result["wall_s"] = round(elapsed(), 1)
        write_result(out_json, result)

    def elapsed() -> float:
        return time.monotonic() - t_start

    def note(msg: str) -> None:
        print(f"== [{elapsed():.0f}s] {msg}", flush=True)

    def attempt(label: str, fn):
        try:
            return fn()
        except Exception as exc:  # one piece failing must not lose the others' figures
            result["errors"].append(f"{label}: {type(exc).__name__}: {exc}"[:600])
            print(f"!! {label} failed: {exc!r}"[:600], flush=True)
            return None

    # 1. dataset
    note("dataset: photographs -> ImageNet-layout JPEG folder -> orchestrator data convert")
    src, ffr = work / "imagenet_src", work / "imagenet_ffr"

    def dataset():
        if not (ffr / "meta.json").is_file():
            counts = build_image_folder(src, photo_paths(args.pack_photos), classes, per_class, val_per_class,
                                        img_size)  # fmt: skip
            convert_folder(src, ffr, env, workers)
            result["dataset"] = {**counts, "classes": classes, "image_size_approx": list(img_size)}
        return ffr

    if attempt("dataset", dataset) is None:
        write_result(out_json, result)
        print(table(result))
        return 1
    common = [f"data.root={ffr}", f"model.num_classes={classes}", "launch.mode=local", "launch.nodes=1"]
    if dry:
        common += [f"model.width={width}", f"model.input_size={res}", f"data.image_size={res}",
                   f"data.val_resize={res + res // 7}", "launch.local_ranks=1", "data.num_threads=2"]  # fmt: skip

    def job_args(batch: int, steps: int, every: int, deterministic: bool) -> list[str]:
        return common + [f"train.global_batch_size={batch}", "train.micro_batch_size=0", f"train.max_steps={steps}",
                         "train.epochs=100", f"train.log_every_steps={every}",
                         f"train.deterministic={str(deterministic).lower()}"]  # fmt: skip

    # 2. interrupted + resumed (deterministic), beside an uninterrupted reference
    det_env = {**env, "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}  # cuBLAS's deterministic workspace

    def resume_check():
        note(f"job: SIGINT after step {stop_a}, resume to {steps_a}; uninterrupted reference beside it")
        out: dict = {}
        # the reference in its own working directory: its own MLflow store (two writers on one sqlite file race)
        ref_cwd = work / "reference"
        ref_cwd.mkdir(exist_ok=True)
        ref = threading.Thread(target=lambda: out.update(reference=run_job(
            ref_cwd, "runs/uninterrupted", job_args(mb, steps_a, 1, True), det_env, job_timeout)))
        ref.start()
        out["interrupted"] = run_job(work, "runs/resumed", job_args(mb, steps_a, 1, True), det_env, job_timeout,
                                     stop_after_step=stop_a)  # fmt: skip
        out["resumed"] = run_job(work, "runs/resumed", job_args(mb, steps_a, 1, True), det_env, job_timeout)
        ref.join()
        return out

    jobs = (attempt("resume check", resume_check) or {}) if "resume" in pieces else {}
    a1, a2, ref = (jobs.get(k, {}) for k in ("interrupted", "resumed", "reference"))
    s1, s2, sr = (j.get("summary", {}) for j in (a1, a2, ref))
    result["job_status"] = s2.get("status")
    result["resumed"] = bool(s1.get("status") == "interrupted" and 0 < (s1.get("steps") or 0) < steps_a
                             and s2.get("status") == "completed" and s2.get("steps") == steps_a
                             and s2.get("restarts") == 1)  # fmt: skip
    result["weights_equal_uninterrupted"] = (s2.get("weights_sha256") == sr.get("weights_sha256")
                                             if s2.get("weights_sha256") and sr.get("weights_sha256") else None)
    result["losses_equal_uninterrupted"] = (s2.get("loss_digest") == sr.get("loss_digest")
                                            if s2.get("loss_digest") and sr.get("loss_digest") else None)
    result["jobs"] = {k: {"rc": j.get("rc"), "status": j.get("summary", {}).get("status"),
                          "steps": j.get("summary", {}).get("steps"), "wall_s": j.get("wall_s"),
                          "restarts": j.get("summary", {}).get("restarts"), "log": j.get("log"),
                          "log_tail": j.get("log_tail")} for k, j in jobs.items()}  # fmt: skip

    save()  # so far: a timeout later keeps what was measured
    # 3. model step: baseline and variants
    note("model step: baseline (today's configuration) and variants")
    variants: dict[str, dict] = {}
    base_kw = dict(name="danet152", batch=mb, res=res, width=width, layout="model", benchmark=False,
                   policy="none", warmup=warmup, repeats=repeats)  # fmt: skip
    got = attempt("baseline", lambda: model_step(device, **base_kw)) if "baseline" in pieces else None
    if got:
        variants["baseline"] = got
        result["baseline_img_per_s"] = got["img_per_s"]
    save()  # so far: a timeout later keeps what was measured
    # 4. the job's steady state (the preset's per-GPU micro-batch)
    spe = (classes * per_class) // mb
    steps_c = max(3, min(steps_c, spe - 1))  # inside the first epoch: no evaluation or epoch checkpoint in it
    every = max(1, steps_c // 6)

    def steady_job(label: str, *extra: str) -> dict:
        """The job, not deterministic, for steps_c steps: its steady-state rate and peak memory."""
        j = run_job(work, f"runs/{label}", job_args(mb, steps_c, every, False) + ["train.checkpoint_every_steps=0",
                                                                                 *extra], env, job_timeout)
        peak = mlflow_peak_mb(work / "mlflow.db", j["summary"].get("mlflow_run_id"))
        out = {"rate": steady_rate(j["steps"], mb), "peak_gb": peak / 1024 if peak is not None and cuda else None}
        result["jobs"][label] = {"rc": j["rc"], "status": j["summary"].get("status"), "overrides": list(extra),
                                 "steps": j["summary"].get("steps"), "wall_s": j["wall_s"],
                                 "whole_run_img_per_s": j["summary"].get("images_per_sec"),
                                 "img_per_s": out["rate"], "peak_memory_gb": out["peak_gb"],
                                 "log": j["log"], "log_tail": j["log_tail"]}  # fmt: skip
        return out
    note(f"job: steady state, micro-batch {mb}, {steps_c} steps, progress every {every}")
    if "throughput" not in pieces:
        pass
    elif elapsed() < budget * 0.7:
        tput = attempt("throughput job", lambda: steady_job("throughput"))
        if tput:
            result["end_to_end_img_per_s"] = tput["rate"]
            result["peak_memory_gb"] = tput["peak_gb"]
    else:
        result["errors"].append("throughput job: skipped (time budget)")

    save()  # so far: a timeout later keeps what was measured
    # 3b. model-step variants (levers, side by side with the baseline)
    options = {
        "benchmark": {"benchmark": True},
        "job_layout": {"benchmark": True, "layout": "input"},
        "batch64": {"benchmark": True, "batch": 2 * mb},
        "compile": {"benchmark": True, "compile_": True},
    }
    for name in [v for v in args.variants.split(",") if v and "variants" in pieces]:
        if name not in options:
            result["errors"].append(f"variant {name!r}: unknown; valid: {', '.join(options)}")
            continue
        if elapsed() > budget * 0.8:
            result["errors"].append(f"variant {name}: skipped (time budget)")
            continue
        got = attempt(f"variant {name}", lambda n=name: model_step(device, **{**base_kw, **options[n]}))
        if got:
            variants[name] = got
    if variants:
        best = max(variants, key=lambda k: variants[k]["img_per_s"])
        result["model_step_img_per_s"] = variants[best]["img_per_s"]
        result["fastest_variant"] = best
        result["fastest_micro_batch"] = {**base_kw, **options.get(best, {})}["batch"]
    result["model_step_variants"] = variants

    if result["peak_memory_gb"] is None and variants.get("baseline"):
        result["peak_memory_gb"] = variants["baseline"]["peak_gb"]
        result["peak_memory_source"] = "model step (baseline)"

    save()  # so far: a timeout later keeps what was measured
    # 5. profile of the fastest model step
    if "profile" in pieces and elapsed() < budget * 0.9 and result.get("fastest_variant"):
        note("profile: a few steps of the fastest model step")
        kw = {**base_kw, **options.get(result["fastest_variant"], {}), "warmup": 2, "repeats": 1, "profile": True}
        got = attempt("profile", lambda: model_step(device, **kw))
        result["profile"] = got.get("profile") if got else None
    save()  # so far: a timeout later keeps what was measured
    # 6. the same steady-state job on DeepSpeed's bf16 engine, beside bf16-mixed (auto on a GPU)
    if "precision" in pieces and cuda and result["end_to_end_img_per_s"] and elapsed() < budget * 0.8:
        note("job: steady state again with train.precision=bf16 (DeepSpeed's bf16 engine)")
        other = attempt("precision job", lambda: steady_job("throughput_bf16", "train.precision=bf16"))
        result["end_to_end_by_precision"] = {"bf16-mixed": result["end_to_end_img_per_s"],
                                             "bf16": other["rate"] if other else None}
    elif "precision" in pieces and cuda:
        result["errors"].append("precision job: skipped (time budget or no bf16-mixed rate)")
    save()
    note(f"wrote {out_json}")
    print(table(result))
    ok = not result["errors"] and ("resume" not in pieces or result["job_status"] == "completed")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
