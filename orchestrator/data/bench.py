"""``orchestrator bench data``: the FFRecord + DALI training pipeline against a folder + PIL DataLoader.

A set of real JPEGs (>= 500, ~400 px) is cut from scikit-image's bundled photographs, saved as an ImageNet-layout
folder and converted to FFRecord. Both loaders run the same training transform (random-resized-crop 224,
horizontal flip, normalize, CHW float) at batch 32 with 2 threads (DALI) / 2 worker processes (DataLoader); the
figure is images per second over whole epochs, the median of a few repeats, loader start-up included. The
project loader (``ffrecord_dali``) resizes crop windows with torch inside the pipeline (``data.cpu_resample=torch``);
``ffrecord_dali_resample_dali`` is the same pipeline with DALI's CPU resize, reported beside it.
Also measured: random batch reads of FFRecord records against opening one file per image.
"""

from __future__ import annotations

import io
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

__all__ = ["run_data_bench", "make_photo_folder"]

_COLOR = ["astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina"]
_GREY = ["camera", "coins", "moon", "brick", "grass", "gravel"]
MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]


def make_photo_folder(root: Path, count: int = 512, seed: int = 0, quality: int = 90) -> Path:
    """``root/train/<photo>/*.JPEG`` (+ a small val): ``count`` crops of scikit-image's photos, longer side ~400."""
    import skimage.data
    from PIL import Image

    rng = np.random.default_rng(seed)
    sources = []
    for name in _COLOR + _GREY:
        arr = np.asarray(getattr(skimage.data, name)())
        if arr.ndim == 2:
            arr = np.stack([arr] * 3, axis=-1)
        sources.append((name, Image.fromarray(arr[..., :3].astype(np.uint8))))
    for split, n in (("train", count), ("val", max(len(sources), count // 10))):
        for i in range(n):
            name, im = sources[i % len(sources)]
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            w, h = im.size
            frac = rng.uniform(0.6, 1.0)
            cw, ch = int(w * np.sqrt(frac)), int(h * np.sqrt(frac))
            x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            long_side = int(rng.integers(360, 440))
            s = long_side / max(cw, ch)
            out = im.resize(
                (max(1, round(cw * s)), max(1, round(ch * s))), Image.BILINEAR, box=(x, y, x + cw, y + ch)
            )
            if rng.random() < 0.5:
                out = out.transpose(Image.FLIP_LEFT_RIGHT)
            out.save(d / f"{name}_{split}_{i:05d}.JPEG", format="JPEG", quality=quality)
    return root


class _FolderDataset:
    """The usual torchvision-style path: open the file with PIL, random-resized-crop, flip, to tensor, normalize."""

    def __init__(self, files: list[tuple[str, int]], size: int, seed: int):
        self.files, self.size, self.seed = files, size, seed
        self.mean = np.asarray(MEAN, np.float32).reshape(3, 1, 1)
        self.std = np.asarray(STD, np.float32).reshape(3, 1, 1)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        import torch
        from PIL import Image

        from .sampling import rrc_window

        path, label = self.files[i]
        rng = np.random.default_rng([self.seed, i, int(time.perf_counter_ns() & 0xFFFFFFFF)])
        with Image.open(path) as im:
            im = im.convert("RGB")
            x, y, w, h = rrc_window(rng, im.width, im.height, (0.08, 1.0), (3 / 4, 4 / 3))
            im = im.resize((self.size, self.size), Image.BILINEAR, box=(x, y, x + w, y + h))
        if rng.random() < 0.5:
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
        arr = np.asarray(im, np.float32).transpose(2, 0, 1) / 255.0
        arr = (arr - self.mean) / self.std
        return torch.from_numpy(np.ascontiguousarray(arr)), label


def _cpu_seconds() -> float:
    """CPU time of this process (all its threads) plus its finished children (DataLoader workers)."""
    import resource

    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + c.ru_utime + c.ru_stime


def _time_epochs(make_iter, epochs: int) -> tuple[float, int, float]:
    """(wall seconds, images, CPU seconds) of ``epochs`` whole passes."""
    n = 0
    c0, t0 = _cpu_seconds(), time.perf_counter()
    for e in range(epochs):
        for x, _ in make_iter(e):
            n += x.shape[0]
    return time.perf_counter() - t0, n, _cpu_seconds() - c0


def _dali_runner(dst: Path, batch: int, threads: int, epochs: int, resample: str = "torch"):
    from ..config.schema import DataConfig
    from .dali import build_loader

    cfg = DataConfig(
        name="bench", root=str(dst), image_size=224, num_threads=threads, prefetch=2, cpu_resample=resample
    )
    loader = build_loader(cfg, "train", 0, 1, batch, seed=0)
    list(loader)  # warm-up: page cache, DALI libraries
    counter = [0]

    def run(e):
        counter[0] += 1
        loader.set_epoch(100 + counter[0])
        return loader

    return lambda: _time_epochs(run, epochs)


def _folder_runner(src: Path, batch: int, workers: int, epochs: int):
    from torch.utils.data import DataLoader

    from .convert import scan_source

    _, splits = scan_source(src)
    ds = _FolderDataset(splits["train"], 224, 0)
    dl = DataLoader(
        ds, batch_size=batch, shuffle=True, num_workers=workers, drop_last=False, prefetch_factor=2
    )
    for _ in dl:  # warm-up
        pass
    return lambda: _time_epochs(lambda e: dl, epochs)


def _bench_reads(src: Path, dst: Path, batch: int, rounds: int) -> dict:
    from .convert import scan_source
    from .ffrecord import FileReader

    _, splits = scan_source(src)
    files = [p for p, _ in splits["train"]]
    rng = np.random.default_rng(0)
    with FileReader(dst / "train.ffr") as r:
        n = r.n
        r.read(range(n))  # both warm in the page cache
        for p in files:
            Path(p).read_bytes()
        ff, fu, fo = [], [], []
        for _ in range(rounds):
            idx = rng.integers(0, n, batch)
            t0 = time.perf_counter()
            r.read(idx)
            ff.append(batch / (time.perf_counter() - t0))
            r.check_data = False
            t0 = time.perf_counter()
            r.read(idx)
            fu.append(batch / (time.perf_counter() - t0))
            r.check_data = True
            t0 = time.perf_counter()
            for i in idx.tolist():
                with open(files[i % len(files)], "rb") as f:
                    f.read()
            fo.append(batch / (time.perf_counter() - t0))
    return {
        "ffrecord_batch_read_records_per_s": round(statistics.median(ff)),
        "ffrecord_batch_read_no_crc_records_per_s": round(statistics.median(fu)),
        "one_file_per_image_records_per_s": round(statistics.median(fo)),
        "batch": batch,
    }


def run_data_bench(
    json_path: str | os.PathLike | None = None,
    count: int = 512,
    batch: int = 32,
    threads: int = 2,
    epochs: int = 2,
    repeats: int = 5,
    workdir: str | os.PathLike | None = None,
) -> dict:
    """Run the benchmark; writes the JSON to ``json_path`` (when given) and returns it."""
    from .convert import convert

    tmp = Path(tempfile.mkdtemp(prefix="danet-bench-data-", dir=workdir))
    try:
        src = make_photo_folder(tmp / "photos", count=count)
        dst = tmp / "ffrecord"
        convert(src, dst, workers=threads, parts=4, progress=False)
        runners = {
            "ffrecord_dali": _dali_runner(dst, batch, threads, epochs),
            "folder_pil_dataloader": _folder_runner(src, batch, threads, epochs),
            # the same pipeline with DALI's own CPU resize (data.cpu_resample=dali), for comparison
            "ffrecord_dali_resample_dali": _dali_runner(dst, batch, threads, epochs, "dali"),
        }
        rates: dict[str, list[float]] = {k: [] for k in runners}
        cpu_ms: dict[str, list[float]] = {k: [] for k in runners}
        for _ in range(repeats):  # interleaved, so a busy spell on a shared machine hits both alike
            for k, run in runners.items():
                dt, n, cpu = run()
                rates[k].append(n / dt)
                cpu_ms[k].append(1000.0 * cpu / n)
        dali_rates, folder_rates = rates["ffrecord_dali"], rates["folder_pil_dataloader"]
        reads = _bench_reads(src, dst, 256, 20)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    d, f = statistics.median(dali_rates), statistics.median(folder_rates)
    result = {
        "results": [
            {
                "loader": k,
                "img_per_s": round(statistics.median(rates[k]), 1),
                "runs": [round(x, 1) for x in rates[k]],
                "cpu_ms_per_img": round(statistics.median(cpu_ms[k]), 2),
            }
            for k in runners
        ],
        "ratio": round(d / f, 3),
        # per-repeat ratios (each pair ran back to back): steadier than medians on a shared machine
        # CPU time per image (threads + worker processes): what the ratio tends to on an idle machine
        "cpu_ratio": round(
            statistics.median(cpu_ms["folder_pil_dataloader"]) / statistics.median(cpu_ms["ffrecord_dali"]), 3
        ),
        "paired_ratio_median": round(
            statistics.median(a / b for a, b in zip(dali_rates, folder_rates, strict=True)), 3
        ),
        "ratio_resample_dali": round(statistics.median(rates["ffrecord_dali_resample_dali"]) / f, 3),
        "reads": reads,
        "setup": {
            "images": count,
            "batch": batch,
            "threads_or_workers": threads,
            "epochs_per_run": epochs,
            "repeats": repeats,
            "transform": "random-resized-crop 224 (0.08-1, 3/4-4/3), hflip, normalize, CHW float32",
            "ffrecord_dali": "DALI decodes the crop window, torch resizes it in the pipeline (cpu_resample=torch)",
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        },
    }
    if json_path is not None:
        Path(json_path).write_text(json.dumps(result, indent=1) + "\n")
    return result


def _jpeg_bytes(im, quality: int = 90) -> bytes:  # pragma: no cover - helper for interactive use
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()
