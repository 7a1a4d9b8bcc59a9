"""DALI input pipelines over an FFRecord dataset folder, sharded by global rank, resumable mid-epoch.

``build_loader(data_cfg, split, rank, world_size, batch_size, seed, device)`` returns a loader with ``len()``
(steps per epoch, the same on every rank), ``set_epoch``, ``state_dict``/``load_state_dict`` (epoch + batch
index) and ``meta`` (the dataset's meta.json). Iterating yields ``(images float32 [N,C,H,W], labels int64 [N])``
torch tensors; images are on the GPU for ``device='cuda'``.

Python reads the records of each batch (positional reads from FFRecord) and draws the augmentation parameters from
(seed, epoch, sample index) (``sampling.py``); ``fn.external_source`` feeds bytes, labels, crop windows and flip
flags to DALI, which decodes only the crop window (``fn.decoders.image_slice``), resizes, flips and normalizes.
Because nothing random happens inside DALI, a resumed epoch produces bitwise the same batches.

The source runs in the calling thread, overlapped with DALI's decoding by the pipeline's prefetch queue: reading a
batch (one ``pread`` per record, CRC checked) costs ~0.05 ms per image against ~2 ms of decoding, so DALI's
parallel external source (worker processes, which also drop a last partial batch) would not pay.

Training: decode crop window -> resize to image_size^2 -> optional horizontal flip -> normalize -> CHW float.
Validation: decode -> resize shorter side to val_resize -> center crop image_size -> normalize -> CHW float.
Decoding runs on the GPU ('mixed', nvJPEG) when device is CUDA and the images are JPEG, else on the CPU.
On the CPU (``data.cpu_resample=torch``, the default) the resize is a ``fn.python_function`` stage of the pipeline
running torch's vectorized uint8 antialiased bilinear (the filter PIL and DALI's ``INTERP_LINEAR`` use when
shrinking), one crop per thread of a ``num_threads`` pool: DALI's CPU resampler costs ~1.3-1.6 ms per 224x224 crop
on this kind of core against ~0.3-0.5 ms for torch's, and it was the CPU pipeline's largest cost (BENCHMARKS.md
"## Data"). Flip and normalize stay in DALI. On a GPU DALI does every step.

The external source is declared with ``cycle="raise"`` (without it every epoch after the first is silently empty):
a finished pass ends with StopIteration and ``reset()``, and the pipeline is reused for the next pass. A pass
abandoned early (``max_steps``, a peeked batch) drops its pipeline, so no stale prefetched batch leaks into the
next one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError
from .ffrecord import FFRecordError, FileReader
from .records import JPEG_LABEL, PICKLE, RecordError, decode_jpeg_label, detect_payload, load_pickled
from .sampling import ShardPlan, train_params

__all__ = ["build_loader", "DaliLoader", "open_dataset", "load_meta"]

SPLITS = ("train", "val")


def corrupt_message(err: Exception | str, root: str | os.PathLike) -> str:
    """The one line for a corrupt record met anywhere (launch check, loader): what is bad and what lists it all."""
    return f"corrupt FFRecord dataset: {err}; `orchestrator data verify {root}` lists every bad record"


def load_meta(root: str | os.PathLike) -> dict:
    root = Path(root)
    if not root.is_dir():
        raise UserError(
            f"dataset folder {root} does not exist (data.root): point it at a folder holding meta.json, "
            "train.ffr/ and val.ffr/ (made by `orchestrator data convert`), or use data.name=digits"
        )
    meta_path = root / "meta.json"
    if not meta_path.is_file():
        raise UserError(
            f"{meta_path} is missing: {root} is not a dataset folder (expected meta.json, train.ffr/, val.ffr/)"
        )
    try:
        meta = json.loads(meta_path.read_text())
    except ValueError as e:
        raise UserError(f"{meta_path} is not valid JSON: {e}") from None
    for key in ("num_classes", "counts"):
        if key not in meta:
            raise UserError(f"{meta_path} lacks '{key}' (expected classes, num_classes, counts, payload)")
    return meta


def open_dataset(
    data_cfg: Any, split: str, expect_classes: int | None = None
) -> tuple[dict, FileReader, str]:
    """(meta, reader, payload) for a split; the digits set is built first if it is missing."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    root = Path(data_cfg.root)
    if getattr(data_cfg, "name", "") == "digits" and not (root / "meta.json").is_file():
        from .digits import ensure_digits_dataset

        ensure_digits_dataset(root)
    meta = load_meta(root)
    if expect_classes is not None and int(meta["num_classes"]) != int(expect_classes):
        raise UserError(
            f"dataset {root} has {meta['num_classes']} classes but model.num_classes is {expect_classes}: "
            f"set model.num_classes={meta['num_classes']}"
        )
    split_dir = root / f"{split}.ffr"
    if not split_dir.exists():
        raise UserError(f"{split_dir} is missing: dataset folder {root} has no '{split}' split")
    try:
        reader = FileReader(split_dir, check_data=True)
    except FFRecordError as e:
        raise UserError(corrupt_message(e, root)) from None
    if reader.n == 0:
        raise UserError(f"{split_dir} holds no records")
    payload = getattr(data_cfg, "payload", "auto")
    if payload == "auto":
        payload = meta.get("payload") or ""
        if payload not in (JPEG_LABEL, PICKLE):
            try:
                payload = detect_payload(reader.read_one(0))
            except (RecordError, FFRecordError) as e:
                raise UserError(f"{split_dir}: cannot tell the record payload: {e}") from None
    if payload == PICKLE and not getattr(data_cfg, "trust_pickle", False):
        raise UserError(
            f"{split_dir} stores pickled records (HFAiLab layout); unpickling runs code from the file, so it "
            "needs data.trust_pickle=true (read with a restricted unpickler), or convert it to jpeg_label"
        )
    return meta, reader, payload


def _dali():
    try:
        from nvidia import dali  # noqa: F401
        from nvidia.dali import fn, types
        from nvidia.dali.pipeline import Pipeline
    except ImportError as e:  # pragma: no cover - dali is a project dependency
        raise UserError(
            f"data.loader=dali needs nvidia-dali ({e}); install it or use data.loader=torch"
        ) from None
    return fn, types, Pipeline


class _Source:
    """The external source: yields the DALI inputs of the current pass's batches.

    ``__iter__`` is a generator, so ``epoch`` and ``batches`` are read at the first ``next()``: the pipeline's
    ``reset()`` (which calls ``iter()`` at once) can come before the loader knows the next pass.
    """

    def __init__(self, loader: DaliLoader):
        self.loader = loader
        self.epoch = 0
        self.batches: list[np.ndarray] = []

    def __iter__(self):
        epoch = self.epoch
        for idx in self.batches:
            yield self.loader._inputs(epoch, idx)


def _single_threaded_torch() -> None:
    """Pool-thread initializer: torch ops in this thread run on one thread. Only where the setting is per thread
    (the OpenMP backend); elsewhere it would change the caller's setting too, so it is left alone."""
    import torch

    if "parallel backend: OpenMP" in torch.__config__.parallel_info():
        torch.set_num_threads(1)


def _resize_crop(crop: np.ndarray, size: int) -> np.ndarray:
    """One decoded HWC uint8 crop window -> ``size`` x ``size`` HWC uint8, antialiased bilinear.

    The NCHW view of an HWC array is channels-last, which selects torch's vectorized uint8 kernel (no float copy).
    """
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(crop).permute(2, 0, 1).unsqueeze(0)
    y = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return y[0].permute(1, 2, 0).contiguous().numpy()


class DaliLoader:
    """Iterates one rank's batches of one split; see the module docstring."""

    def __init__(
        self,
        data_cfg: Any,
        split: str,
        rank: int,
        world_size: int,
        batch_size: int,
        seed: int,
        device: str = "cpu",
        expect_classes: int | None = None,
    ):
        self.cfg = data_cfg
        self.split = split
        self.train = split == "train"
        self.rank, self.world_size, self.batch_size, self.seed = rank, world_size, batch_size, int(seed)
        self.meta, self.reader, self.payload = open_dataset(data_cfg, split, expect_classes)
        self.image_size = int(data_cfg.image_size)
        self.val_resize = int(data_cfg.val_resize)
        if not self.train and self.val_resize < self.image_size:
            raise UserError(
                f"data.val_resize ({self.val_resize}) must be >= data.image_size ({self.image_size})"
            )
        try:
            self.plan = ShardPlan(self.reader.n, rank, world_size, batch_size, self.seed, shuffle=self.train)
        except ValueError as e:
            raise UserError(f"{split} split of {data_cfg.root}: {e}") from None
        self.device = str(device)
        self.cuda = self.device.startswith("cuda")
        if self.cuda:
            import torch

            self.device_id = (
                int(self.device.split(":")[1]) if ":" in self.device else torch.cuda.current_device()
            )
        else:
            self.device_id = None
        self.scale = (float(data_cfg.rrc_scale_min), 1.0)
        self.ratio = (float(data_cfg.rrc_ratio_min), float(data_cfg.rrc_ratio_max))
        self.hflip = bool(data_cfg.hflip)
        self.mean = [float(m) * 255.0 for m in data_cfg.mean]
        self.std = [float(s) * 255.0 for s in data_cfg.std]
        self.num_threads = max(1, int(getattr(data_cfg, "num_threads", 2)))
        resample = str(getattr(data_cfg, "cpu_resample", "torch"))
        if resample not in ("torch", "dali"):
            raise UserError(f"data.cpu_resample={resample!r} is not valid: expected one of torch, dali")
        # On the CPU torch resizes the crop windows inside the pipeline (see the module docstring).
        self.torch_resample = self.train and not self.cuda and resample == "torch"
        self._pool = None
        self.prefetch = max(1, int(getattr(data_cfg, "prefetch", 2)))
        self._epoch = 0
        self._batch = 0
        self._restored = False
        self._pipe = None
        self._source: _Source | None = None
        self._zero_copy = False

    # -- position --------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.plan)

    @property
    def num_samples(self) -> int:
        """Samples in the split (all ranks)."""
        return self.reader.n

    @property
    def epoch(self) -> int:
        return self.state_dict()["epoch"]

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch of the next pass. Keeps a restored mid-epoch position when ``epoch`` is that one."""
        if int(epoch) != self._epoch:
            self._epoch, self._batch, self._restored = int(epoch), 0, False

    def state_dict(self) -> dict:
        """Exact position: the epoch and how many of its batches were already handed out."""
        if self._batch >= len(self):
            return {"epoch": self._epoch + 1, "batch": 0}
        return {"epoch": self._epoch, "batch": self._batch}

    def load_state_dict(self, state: dict) -> None:
        epoch, batch = int(state["epoch"]), int(state["batch"])
        if not 0 <= batch <= len(self):
            raise ValueError(f"batch index {batch} out of range for {len(self)} steps per epoch")
        self._epoch, self._batch, self._restored = epoch, batch, True

    def _begin_pass(self) -> tuple[int, int, list[np.ndarray]]:
        """(epoch, first batch, batches left) of the pass that starts now.

        Training continues from the current position (a restored one, or where an abandoned pass stopped); a
        restored position at the end of an epoch gives an empty pass (that epoch is done), while a pass that ran
        to the end is followed by the next epoch.
        Validation always makes a whole pass, unless a position was explicitly restored: peeking at its first
        batch must not shorten the next evaluation.
        """
        if self._restored and self._batch >= len(self):
            epoch, start = self._epoch, len(self)  # restored at the very end of an epoch: nothing left in it
        elif self.train or self._restored:
            state = self.state_dict()  # a pass that ran to the end moves on to the next epoch
            epoch, start = state["epoch"], state["batch"]
        else:
            epoch, start = self._epoch, 0
        self._restored = False
        self._epoch, self._batch = epoch, start
        return epoch, start, self.plan.batches(epoch)[start:]

    # -- data ------------------------------------------------------------------------------------------------
    def _inputs(self, epoch: int, idx: np.ndarray):
        try:
            records = self.reader.read(idx)
        except FFRecordError as e:
            raise UserError(corrupt_message(e, self.cfg.root)) from None
        datas, labels, widths, heights = [], [], [], []
        for i, rec in zip(idx.tolist(), records, strict=True):
            try:
                if self.payload == JPEG_LABEL:
                    img, label, w, h = decode_jpeg_label(rec)
                    datas.append(np.frombuffer(img, dtype=np.uint8))
                else:
                    pil, label = load_pickled(rec)
                    arr = np.asarray(pil.convert("RGB"))
                    h, w = arr.shape[:2]
                    datas.append(arr)
            except RecordError as e:
                f, j = self.reader.locate(i)
                raise UserError(f"bad record in {f} at index {j}: {e}") from None
            labels.append(label)
            widths.append(w)
            heights.append(h)
        labels = np.asarray(labels, dtype=np.int64)
        if not self.train:
            return datas, labels
        anchors, shapes, flips = train_params(
            self.seed, epoch, idx, widths, heights, self.scale, self.ratio, self.hflip
        )
        return datas, labels, anchors, shapes, flips

    def _resampler(self):
        """The batch function of the CPU pipeline's resize stage: torch, one crop per thread of a small pool."""
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            # One crop per thread; torch's intra-op threads would only oversubscribe the cores DALI also uses
            # (with OpenMP the setting is per thread, so the caller's torch keeps its own).
            self._pool = ThreadPoolExecutor(
                self.num_threads, thread_name_prefix="dali-resample", initializer=_single_threaded_torch
            )
        pool, size = self._pool, self.image_size

        def resample(crops: list[np.ndarray]) -> list[np.ndarray]:
            return list(pool.map(lambda c: _resize_crop(c, size), crops))

        return resample

    def _pipeline(self, source: _Source):
        fn, types, Pipeline = _dali()
        raw = self.payload != JPEG_LABEL
        # nvJPEG ('mixed') only pays for JPEG; other formats (the digits PNGs) decode on the CPU, then move.
        mixed = self.cuda and str(self.meta.get("image_format", "jpeg")).lower() in ("jpeg", "jpg")
        decode_device = "mixed" if mixed else "cpu"
        to_gpu = self.cuda and not mixed
        pipe = Pipeline(
            batch_size=self.batch_size,
            num_threads=self.num_threads,
            device_id=self.device_id,
            prefetch_queue_depth=self.prefetch,
            seed=self.seed & 0x7FFFFFFF,
        )
        common = {"dtype": types.FLOAT, "output_layout": "CHW", "mean": self.mean, "std": self.std}
        with pipe:
            if self.train:
                data, labels, anchors, shapes, flips = fn.external_source(
                    source=source, num_outputs=5, batch=True, cycle="raise"
                )
                if raw:
                    images = data.gpu() if self.cuda else data
                    images = fn.slice(
                        images,
                        anchors,
                        shapes,
                        axis_names="WH",
                        normalized_anchor=False,
                        normalized_shape=False,
                    )
                else:
                    images = fn.decoders.image_slice(
                        data,
                        anchors,
                        shapes,
                        device=decode_device,
                        output_type=types.RGB,
                        axis_names="WH",
                        normalized_anchor=False,
                        normalized_shape=False,
                    )
                    images = images.gpu() if to_gpu else images
                if self.torch_resample:
                    images = fn.python_function(
                        images, function=self._resampler(), batch_processing=True, num_outputs=1
                    )
                else:
                    images = fn.resize(
                        images,
                        resize_x=self.image_size,
                        resize_y=self.image_size,
                        interp_type=types.INTERP_LINEAR,
                    )
                images = fn.crop_mirror_normalize(images, mirror=flips, **common)
                pipe.set_outputs(images, labels)
            else:
                data, labels = fn.external_source(source=source, num_outputs=2, batch=True, cycle="raise")
                if raw:
                    images = data.gpu() if self.cuda else data
                else:
                    images = fn.decoders.image(data, device=decode_device, output_type=types.RGB)
                    images = images.gpu() if to_gpu else images
                images = fn.resize(images, resize_shorter=self.val_resize, interp_type=types.INTERP_LINEAR)
                images = fn.crop_mirror_normalize(images, crop=(self.image_size, self.image_size), **common)
                pipe.set_outputs(images, labels)
        pipe.build()
        self._zero_copy = bool(getattr(pipe, "_exec_dynamic", False))
        return pipe

    def _to_torch(self, images, labels):
        import torch

        labels_t = torch.from_numpy(np.array(labels.as_tensor(), dtype=np.int64).reshape(-1))
        if self.cuda:
            from nvidia.dali.plugin.pytorch import feed_ndarray

            t = images.as_tensor()
            out = torch.empty(t.shape(), dtype=torch.float32, device=torch.device("cuda", self.device_id))
            feed_ndarray(t, out, cuda_stream=torch.cuda.current_stream(self.device_id))
            return out, labels_t
        arr = np.asarray(images.as_tensor())
        if not self._zero_copy:
            arr = arr.copy()  # the classic executors reuse output buffers on the next run
        # With the dynamic executor (DALI's default) an output buffer is reference counted: the array keeps it
        # alive and DALI never writes to it again, so the batch is handed over without copying ~600 KB/image.
        return torch.from_numpy(arr), labels_t

    def __iter__(self):
        epoch, start, batches = self._begin_pass()
        if not batches:
            return
        if self._pipe is None:
            self._source = _Source(self)
            self._pipe = self._pipeline(self._source)
        self._source.epoch, self._source.batches = epoch, batches
        pipe, clean = self._pipe, False
        try:
            for k in range(start, len(self)):
                images, labels = pipe.run()
                out = self._to_torch(images, labels)
                self._batch = k + 1
                yield out
            # The source is exhausted: DALI answers the next run with StopIteration; reset() then rearms it
            # for the next pass, which reuses this pipeline.
            try:
                pipe.run()
            except StopIteration:
                pipe.reset()
                clean = True
        finally:
            if (
                not clean
            ):  # abandoned mid-pass (or failed): prefetched batches are stale, build anew next time
                self._pipe = None
                del pipe

    def close(self) -> None:
        self._pipe = None
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None
        self.reader.close()


def build_loader(
    data_cfg: Any,
    split: str,
    rank: int,
    world_size: int,
    batch_size: int,
    seed: int,
    device: str = "cpu",
    expect_classes: int | None = None,
):
    """The loader of ``split`` for one rank: DALI (``data.loader=dali``) or the plain torch fallback."""
    kind = getattr(data_cfg, "loader", "dali")
    args = (data_cfg, split, rank, world_size, batch_size, seed, device, expect_classes)
    if kind == "torch":
        from .torch_loader import TorchLoader

        return TorchLoader(*args)
    if kind != "dali":
        raise UserError(f"data.loader={kind!r} is not valid: expected one of dali, torch")
    return DaliLoader(*args)
