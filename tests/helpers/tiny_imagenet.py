"""A tiny dataset in ImageNet's folder layout (generated JPEGs of varying, non-square sizes), converted with
`orchestrator data convert`: what the cluster presets' tests train on (tests/test_presets.py, tests/test_slurm.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

CLASSES = 4  # a dataset size: the presets' model.num_classes is set to it


def build(parent: Path, classes: int = CLASSES, train_per_class: int = 16, val_per_class: int = 4) -> Path:
    """SRC under ``parent``/src, the FFRecord dataset folder at ``parent``/ffr (returned)."""
    import numpy as np
    from PIL import Image

    src, dst = parent / "src", parent / "ffr"
    rng = np.random.default_rng(0)
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        for c in range(classes):
            folder = src / split / f"n{c:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):  # sizes vary like photographs do; each class a shade brighter
                arr = rng.integers(0, 200, (40 + i % 7, 48 + i % 5, 3), dtype=np.uint8) + 10 * c
                Image.fromarray(arr.astype(np.uint8)).save(folder / f"img{i}.JPEG", quality=85)
    repo = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = str(repo)
    r = subprocess.run([sys.executable, "-m", "orchestrator", "data", "convert", str(src), str(dst), "--workers", "1"],
                       env=env, capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        raise RuntimeError(f"orchestrator data convert failed: {r.stderr[-3000:]}")
    assert json.loads((dst / "meta.json").read_text())["num_classes"] == classes
    return dst
