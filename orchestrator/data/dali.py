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

from typing import Any

import numpy as np

from ..errors import UserError
from .ffrecord import FFRecordError
from .loader_base import LoaderBase, corrupt_message, load_meta, open_dataset
from .records import JPEG_LABEL, RecordError, decode_jpeg_label, load_pickled
from .sampling import train_params

# load_meta, open_dataset and corrupt_message live in loader_base (shared with torch_loader); named here too
__all__ = ["build_loader", "DaliLoader", "corrupt_message", "load_meta", "open_dataset"]


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


class DaliLoader(LoaderBase):
    """Iterates one rank's batches of one split through a DALI pipeline; see the module docstring."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """The arguments of :class:`LoaderBase`; ``data.cpu_resample`` picks the CPU resize stage."""
        super().__init__(*args, **kwargs)
        resample = str(getattr(self.cfg, "cpu_resample", "torch"))
        if resample not in ("torch", "dali"):
            raise UserError(f"data.cpu_resample={resample!r} is not valid: expected one of torch, dali")
        # On the CPU torch resizes the crop windows inside the pipeline (see the module docstring).
        self.torch_resample = self.train and not self.cuda and resample == "torch"
        self._pool = None
        self._pipe = None
        self._source: _Source | None = None
        self._zero_copy = False

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
        super().close()


def build_loader(
    data_cfg: Any,
    split: str,
    rank: int,
    world_size: int,
    batch_size: int,
    seed: int,
    device: str = "cpu",
    expect_classes: int | None = None,
    accumulation: int = 1,
):
    """The loader of ``split`` for one rank: DALI (``data.loader=dali``) or the plain torch fallback; a training
    epoch is whole ``accumulation``s of micro-batches."""
    kind = getattr(data_cfg, "loader", "dali")
    args = (data_cfg, split, rank, world_size, batch_size, seed, device, expect_classes, accumulation)
    if kind == "torch":
        from .torch_loader import TorchLoader

        return TorchLoader(*args)
    if kind != "dali":
        raise UserError(f"data.loader={kind!r} is not valid: expected one of dali, torch")
    return DaliLoader(*args)
