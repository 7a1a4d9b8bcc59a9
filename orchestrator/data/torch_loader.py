"""The plain torch fallback (``data.loader=torch``): same plan, positions and crops as the DALI loader, PIL decode.

Batches hold the same samples with the same crop windows and flips as the DALI loader's; pixel values differ
slightly (PIL's resampling is not DALI's). Decoding runs in ``data.num_threads`` DataLoader worker processes.
"""

from __future__ import annotations

import io

import numpy as np

from ..errors import UserError
from .ffrecord import FFRecordError
from .loader_base import LoaderBase, corrupt_message
from .records import JPEG_LABEL, RecordError, decode_jpeg_label, load_pickled
from .sampling import train_params

__all__ = ["TorchLoader"]


class _BatchDataset:
    """Item k = the collated batch k of one pass (so workers decode whole batches)."""

    def __init__(self, loader: TorchLoader, epoch: int, batches: list[np.ndarray]):
        self.reader = loader.reader
        self.root = loader.cfg.root
        self.payload = loader.payload
        self.train = loader.train
        self.seed, self.epoch, self.batches = loader.seed, epoch, batches
        self.scale, self.ratio, self.hflip = loader.scale, loader.ratio, loader.hflip
        self.size, self.val_resize = loader.image_size, loader.val_resize
        self.mean = np.asarray(loader.mean, np.float32).reshape(3, 1, 1)
        self.std = np.asarray(loader.std, np.float32).reshape(3, 1, 1)

    def __len__(self) -> int:
        return len(self.batches)

    def _image(self, rec):
        from PIL import Image

        if self.payload == JPEG_LABEL:
            img, label, _, _ = decode_jpeg_label(rec)
            im = Image.open(io.BytesIO(img)).convert("RGB")
        else:
            im, label = load_pickled(rec)
            im = im.convert("RGB")
        return im, label

    def __getitem__(self, k: int):
        import torch
        from PIL import Image

        idx = self.batches[k]
        try:
            records = self.reader.read(idx)
            pairs = [self._image(r) for r in records]
        except (FFRecordError, RecordError) as e:
            raise UserError(corrupt_message(e, self.root)) from None
        out = np.empty((len(idx), 3, self.size, self.size), np.float32)
        if self.train:
            anchors, shapes, flips = train_params(
                self.seed,
                self.epoch,
                idx,
                [im.width for im, _ in pairs],
                [im.height for im, _ in pairs],
                self.scale,
                self.ratio,
                self.hflip,
            )
        for j, (im, _) in enumerate(pairs):
            if self.train:
                x, y = (int(v) for v in anchors[j])
                w, h = (int(v) for v in shapes[j])
                im = im.resize((self.size, self.size), Image.BILINEAR, box=(x, y, x + w, y + h))
                if flips[j]:
                    im = im.transpose(Image.FLIP_LEFT_RIGHT)
            else:
                s = self.val_resize / min(im.width, im.height)
                nw, nh = max(self.size, round(im.width * s)), max(self.size, round(im.height * s))
                im = im.resize((nw, nh), Image.BILINEAR)
                left, top = (nw - self.size) // 2, (nh - self.size) // 2
                im = im.crop((left, top, left + self.size, top + self.size))
            out[j] = np.asarray(im, np.float32).transpose(2, 0, 1)
        out -= self.mean
        out /= self.std
        labels = torch.tensor([lab for _, lab in pairs], dtype=torch.int64)
        return torch.from_numpy(out), labels


class TorchLoader(LoaderBase):
    """Same interface and sample plan as ``dali.DaliLoader``, decoding with PIL in DataLoader workers."""

    def __iter__(self):
        import torch
        from torch.utils.data import DataLoader

        epoch, start, batches = self._begin_pass()
        if not batches:
            return
        workers = self.num_threads if self.num_threads > 1 else 0
        dl = DataLoader(
            _BatchDataset(self, epoch, batches),
            batch_size=None,
            shuffle=False,
            num_workers=workers,
            prefetch_factor=self.prefetch if workers else None,
        )
        dev = torch.device(self.device) if self.cuda else None
        batches_iter = iter(dl)
        for k in range(start, start + len(batches)):
            try:
                images, labels = next(batches_iter)
            except UserError as e:  # re-raised by the DataLoader with the worker's traceback: keep one line
                last = str(e).strip().splitlines()[-1]
                raise UserError(last.split("UserError: ", 1)[-1]) from None
            if dev is not None:
                images = images.to(dev, non_blocking=True)
            self._batch = k + 1
            yield images, labels
