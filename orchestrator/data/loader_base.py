"""What every loader shares: the dataset folder (meta.json, opening a split), the one line for a corrupt record,
and the sample plan with its exact position (epoch + batch index).

``dali.DaliLoader`` and ``torch_loader.TorchLoader`` both build on :class:`LoaderBase`; neither imports the other.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError
from .ffrecord import FFRecordError, FileReader
from .records import JPEG_LABEL, PICKLE, RecordError, detect_payload
from .sampling import ShardPlan

__all__ = ["LoaderBase", "SPLITS", "corrupt_message", "load_meta", "open_dataset"]

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


class LoaderBase:
    """One rank's batches of one split: the opened split, the augmentation settings, the plan and the position.

    Subclasses yield the batches (``__iter__``, starting from :meth:`_begin_pass`) and set ``_batch`` as they go.
    """

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
        accumulation: int = 1,
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
            # training epochs end on an optimizer step (sampling.ShardPlan): whole accumulations of micro-batches
            self.plan = ShardPlan(self.reader.n, rank, world_size, batch_size, self.seed, shuffle=self.train,
                                  multiple=accumulation if self.train else 1)
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
        self.prefetch = max(1, int(getattr(data_cfg, "prefetch", 2)))
        self._epoch = 0
        self._batch = 0
        self._restored = False

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

    def close(self) -> None:
        self.reader.close()
