"""The bundled dataset: scikit-learn's digits (1797 8x8 scans, values 0..16) as an FFRecord dataset folder.

Each scan is scaled to 0..255, upscaled to 32x32 (bilinear), made RGB and stored as a lossless PNG in a
``jpeg_label`` record. A fixed stratified split (80/20, seed 0) gives 1437 train and 360 val images. The folder is
built once in a temporary sibling and renamed into place, under a lock file, so concurrent ranks are safe and a
second call is a no-op.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from .ffrecord import FileWriter
from .records import JPEG_LABEL, encode_jpeg_label

__all__ = ["ensure_digits_dataset", "DIGITS_SIZE", "DIGITS_VERSION"]

DIGITS_SIZE = 32
DIGITS_VERSION = 1
_SPLIT_SEED = 0
_VAL_FRACTION = 0.2


def _is_built(root: Path) -> bool:
    meta = root / "meta.json"
    if not meta.is_file():
        return False
    try:
        m = json.loads(meta.read_text())
    except (OSError, ValueError):
        return False
    return m.get("name") == "digits" and (root / "train.ffr").is_dir() and (root / "val.ffr").is_dir()


def _split(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split: per class, a fixed random 20% goes to val. Returns sorted index arrays."""
    rng = np.random.default_rng(_SPLIT_SEED)
    train, val = [], []
    for c in np.unique(labels):
        idx = np.nonzero(labels == c)[0]
        idx = idx[rng.permutation(idx.size)]
        k = int(round(idx.size * _VAL_FRACTION))
        val.append(idx[:k])
        train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def _encode(img8: np.ndarray) -> bytes:
    from PIL import Image

    gray = np.clip(np.rint(img8 * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    im = Image.fromarray(gray, mode="L").resize((DIGITS_SIZE, DIGITS_SIZE), Image.BILINEAR).convert("RGB")
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def _build(tmp: Path) -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.asarray(digits.images)
    labels = np.asarray(digits.target, dtype=np.int64)
    train, val = _split(labels)
    counts = {}
    for split, idx in (("train", train), ("val", val)):
        d = tmp / f"{split}.ffr"
        d.mkdir()
        with FileWriter(d / "PART_00000.ffr", len(idx)) as w:
            for i in idx.tolist():
                w.write_one(encode_jpeg_label(_encode(images[i]), int(labels[i]), DIGITS_SIZE, DIGITS_SIZE))
        counts[split] = int(len(idx))
    meta = {
        "name": "digits",
        "version": DIGITS_VERSION,
        "classes": [str(c) for c in range(10)],
        "num_classes": 10,
        "counts": counts,
        "payload": JPEG_LABEL,
        "image_format": "png",
        "image_size": [DIGITS_SIZE, DIGITS_SIZE],
        "source": "sklearn.datasets.load_digits, stratified 80/20 split, seed 0",
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")


def ensure_digits_dataset(root: str | os.PathLike) -> Path:
    """Build the digits dataset folder at ``root`` unless it is already there; returns the folder."""
    from ..errors import UserError

    root = Path(root)
    if _is_built(root):
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    lock = root.parent / f".{root.name}.lock"
    with open(lock, "a") as lf:
        fcntl.flock(lf, fcntl.LOCK_EX)  # a second rank waits here, then finds the folder built
        try:
            if _is_built(root):
                return root
            if root.exists() and any(root.iterdir()):
                raise UserError(
                    f"data.root {root} exists but is not a digits dataset folder (no valid meta.json); "
                    "remove it or point data.root at an empty or missing folder"
                )
            tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.build-", dir=root.parent))
            try:
                os.chmod(tmp, 0o755)
                _build(tmp)
                if root.exists():
                    root.rmdir()  # empty: checked above
                os.rename(tmp, root)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        finally:
            fcntl.flock(lf, fcntl.LOCK_UN)
    return root
