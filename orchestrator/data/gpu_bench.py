"""GPU check of the data path: images/s of the training pipeline with 'mixed' (nvJPEG) decoding.

``python -m orchestrator.data.gpu_bench [--json PATH] [--seconds S]`` builds the benchmark photo set (as
``bench.py``), converts it, checks that a CUDA batch equals the CPU pipeline's crop plan (same labels, same shape),
then times the training pipeline on the GPU (batch 256, 4 threads) and on the CPU for reference. Runs in well under
8 minutes; meant to be called from ``tools/gpu_check.sh``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path


def _rate(loader, seconds: float) -> tuple[float, int]:
    import torch

    n, epoch = 0, 1000
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        loader.set_epoch(epoch)
        for x, _ in loader:
            n += x.shape[0]
        epoch += 1
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0), n


def main(argv: list[str] | None = None) -> int:
    import torch

    from ..config.schema import DataConfig
    from .bench import make_photo_folder
    from .convert import convert
    from .dali import build_loader

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--json", default=None)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--images", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--threads", type=int, default=4)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_bench: no CUDA device", file=sys.stderr)
        return 1
    tmp = Path(tempfile.mkdtemp(prefix="danet-gpu-bench-"))
    try:
        src = make_photo_folder(tmp / "photos", count=args.images)
        dst = tmp / "ffrecord"
        convert(src, dst, workers=args.threads, parts=8, progress=False)
        cfg = DataConfig(name="bench", root=str(dst), image_size=224, num_threads=args.threads, prefetch=2)
        gpu = build_loader(cfg, "train", 0, 1, args.batch, seed=0, device="cuda")
        cpu = build_loader(cfg, "train", 0, 1, args.batch, seed=0, device="cpu")
        (xg, yg), (xc, yc) = next(iter(gpu)), next(iter(cpu))
        assert xg.is_cuda and xg.dtype == torch.float32 and xg.shape == xc.shape, (xg.shape, xc.shape)
        assert torch.equal(yg, yc), "GPU and CPU pipelines disagree on the samples"
        mean_abs = float((xg.cpu() - xc).abs().mean())
        val = build_loader(cfg, "val", 0, 1, args.batch, seed=0, device="cuda")
        nval = sum(y.shape[0] for _, y in val)
        assert nval == val.num_samples
        gpu_rate, gpu_n = _rate(gpu, args.seconds)
        cpu_rate, cpu_n = _rate(cpu, min(args.seconds, 20.0))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out = {
        "device": torch.cuda.get_device_name(0),
        "results": [
            {"loader": "ffrecord_dali_mixed", "img_per_s": round(gpu_rate, 1), "images": gpu_n},
            {"loader": "ffrecord_dali_cpu", "img_per_s": round(cpu_rate, 1), "images": cpu_n},
        ],
        "batch": args.batch,
        "threads": args.threads,
        "gpu_vs_cpu_mean_abs_diff": round(mean_abs, 4),
    }
    text = json.dumps(out, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
