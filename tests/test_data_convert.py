"""The converter (ImageNet layout -> FFRecord dataset), resume after a kill, verify and inspect."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from orchestrator.config.schema import DataConfig
from orchestrator.data import convert as conv
from orchestrator.data.dali import build_loader
from orchestrator.data.ffrecord import FileReader
from orchestrator.data.records import decode_jpeg_label
from orchestrator.errors import UserError

CLASSES = ["n001", "n002", "n003"]
REPO = Path(__file__).resolve().parents[1]


def _save(path: Path, rng, fmt="JPEG", mode="RGB", size=None):
    from PIL import Image

    w, h = size or (int(rng.integers(20, 48)), int(rng.integers(20, 48)))
    arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    im = Image.fromarray(arr).convert(mode)
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    path.write_bytes(buf.getvalue())


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    """train/<class>/*.JPEG (4 each, one CMYK, one PNG under a .JPEG name, one corrupt) + flat val with labels."""
    root = tmp_path_factory.mktemp("imagenet") / "src"
    rng = np.random.default_rng(1)
    for c in CLASSES:
        d = root / "train" / c
        d.mkdir(parents=True)
        for i in range(4):
            _save(d / f"{c}_{i}.JPEG", rng)
    _save(root / "train" / "n001" / "n001_cmyk.JPEG", rng, mode="CMYK")
    _save(root / "train" / "n002" / "n002_png.JPEG", rng, fmt="PNG")
    (root / "train" / "n003" / "n003_bad.JPEG").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    (root / "val").mkdir()
    lines = []
    for i in range(5):
        _save(root / "val" / f"VAL_{i:04d}.JPEG", rng)
        lines.append(f"VAL_{i:04d}.JPEG {CLASSES[i % 3]}")
    (root / "val_labels.txt").write_text("\n".join(lines) + "\n")
    return root


def _labels(folder: Path) -> list[int]:
    with FileReader(folder) as r:
        return [decode_jpeg_label(b)[1] for b in r.read(range(r.n))]


def test_convert_verify_inspect(src, tmp_path):
    dst = tmp_path / "ds"
    meta = conv.convert(src, dst, workers=2, parts=3, progress=False)
    assert meta["classes"] == CLASSES and meta["num_classes"] == 3
    assert meta["counts"] == {"train": 14, "val": 5}
    assert meta["skipped"] == 1 and meta["skipped_files"][0]["file"].endswith("n003_bad.JPEG")
    assert meta["payload"] == "jpeg_label"
    assert sorted(p.name for p in (dst / "train.ffr").iterdir()) == [f"PART_{k:05d}.ffr" for k in range(3)]
    assert sorted(_labels(dst / "train.ffr")) == [0] * 5 + [1] * 5 + [2] * 4
    assert _labels(dst / "val.ffr") == [0, 1, 2, 0, 1]
    assert meta["class_counts"]["train"] == [5, 5, 4]
    assert conv.verify(dst) == []
    info = conv.inspect(dst)
    assert info["counts"] == {"train": 14, "val": 5} and info["classes"] == CLASSES
    assert info["splits"]["train"]["parts"] == 3 and info["splits"]["train"]["records"] == 14
    # all records decode through the DALI pipeline (CMYK and PNG sources were re-encoded)
    cfg = DataConfig(name="x", root=str(dst), image_size=16, val_resize=16, num_threads=1)
    ys = torch.cat([y for _, y in build_loader(cfg, "train", 0, 1, 8, 0, expect_classes=3)])
    assert len(ys) == 14
    # a second run is a no-op
    mtime = (dst / "meta.json").stat().st_mtime_ns
    conv.convert(src, dst, workers=1, parts=3, progress=False)
    assert (dst / "meta.json").stat().st_mtime_ns == mtime


def test_convert_strict_is_fatal(src, tmp_path):
    with pytest.raises(UserError, match="n003_bad.JPEG"):
        conv.convert(src, tmp_path / "ds", workers=1, parts=2, strict=True, progress=False)
    assert not (tmp_path / "ds" / "meta.json").exists()


def test_convert_resumes_after_kill(src, tmp_path, monkeypatch):
    clean = tmp_path / "clean"
    conv.convert(src, clean, workers=1, parts=3, progress=False)

    dst = tmp_path / "ds"
    real = conv._write_part
    calls = []

    def dying(path, records):
        if len(calls) == 1:
            # simulate a kill in the middle of writing the second part
            (path.parent / f".{path.name}.tmp-999-1").write_bytes(b"\0" * 40)
            raise KeyboardInterrupt("killed")
        calls.append(path)
        real(path, records)

    monkeypatch.setattr(conv, "_write_part", dying)
    with pytest.raises(KeyboardInterrupt):
        conv.convert(src, dst, workers=1, parts=3, progress=False)
    monkeypatch.setattr(conv, "_write_part", real)
    assert not (dst / "meta.json").exists()
    first = dst / "train.ffr" / "PART_00000.ffr"
    assert first.is_file() and not (dst / "train.ffr" / "PART_00001.ffr").exists()
    mtime = first.stat().st_mtime_ns

    written = []
    monkeypatch.setattr(
        conv, "_write_part", lambda p, r: (written.append(f"{p.parent.name}/{p.name}"), real(p, r))
    )
    meta = conv.convert(src, dst, workers=1, parts=3, progress=False)
    assert first.stat().st_mtime_ns == mtime, "a finished part was redone"
    assert written == ["train.ffr/PART_00001.ffr", "train.ffr/PART_00002.ffr", "val.ffr/PART_00000.ffr"]
    assert meta["counts"] == {"train": 14, "val": 5}
    assert not list((dst / "train.ffr").glob(".PART_*"))
    for split in ("train.ffr", "val.ffr"):
        for part in sorted((clean / split).iterdir()):
            assert (dst / split / part.name).read_bytes() == part.read_bytes()
    assert conv.verify(dst) == []


def test_verify_reports_corruption(src, tmp_path):
    dst = tmp_path / "ds"
    conv.convert(src, dst, workers=1, parts=2, progress=False)
    part = dst / "train.ffr" / "PART_00001.ffr"
    with FileReader(part) as r:
        start = int(r._files[0].starts[2])
    raw = bytearray(part.read_bytes())
    raw[start + 40] ^= 0x55
    part.write_bytes(bytes(raw))
    problems = conv.verify(dst)
    assert len(problems) == 1 and "PART_00001.ffr: record 2" in problems[0]


def test_convert_bad_input(tmp_path, src):
    with pytest.raises(UserError, match="does not exist"):
        conv.convert(tmp_path / "nope", tmp_path / "out", progress=False)
    (tmp_path / "flat" / "train" / "a").mkdir(parents=True)
    _save(tmp_path / "flat" / "train" / "a" / "x.jpg", np.random.default_rng(0))
    (tmp_path / "flat" / "val").mkdir()
    _save(tmp_path / "flat" / "val" / "y.jpg", np.random.default_rng(0))
    with pytest.raises(UserError, match="labels file"):
        conv.convert(tmp_path / "flat", tmp_path / "out", progress=False)
    labels = tmp_path / "my_labels.csv"
    labels.write_text("ImageId,PredictionString\ny,a 1 2 3 4\n")  # the Kaggle LOC_val_solution layout
    meta = conv.convert(tmp_path / "flat", tmp_path / "out", workers=1, progress=False, val_labels=labels)
    assert meta["counts"] == {"train": 1, "val": 1}
    with pytest.raises(UserError, match="does not exist"):
        conv.convert(tmp_path / "flat", tmp_path / "out2", progress=False, val_labels=tmp_path / "none.txt")
    with pytest.raises(UserError, match="meta.json"):
        conv.verify(tmp_path / "flat")
    with pytest.raises(UserError, match="does not exist"):
        conv.inspect(tmp_path / "missing")
    # a DST holding another conversion
    dst = tmp_path / "ds"
    conv.convert(src, dst, workers=1, parts=2, progress=False)
    with pytest.raises(UserError, match="different converted dataset"):
        conv.convert(src, dst, workers=1, parts=3, progress=False)
    meta = json.loads((dst / "meta.json").read_text())
    assert meta["parts"] == {"train": 2, "val": 1}


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_truncated_part_verify_inspect_loaders_and_launch(src, tmp_path):
    """A train part cut exactly at a record boundary: `data verify` lists exactly the records past the cut and
    exits non-zero; inspect names the part; both loaders and the launch check give one line naming file and
    record; a cut inside a part's offset table is listed by verify as that part."""
    from orchestrator.train.worker import verify_dataset

    dst = tmp_path / "ds"
    conv.convert(src, dst, workers=1, parts=2, progress=False)
    part = dst / "train.ffr" / "PART_00001.ffr"  # the second half of the 14 train records
    with FileReader(part) as r:
        n, cut = r.n, int(r._files[0].starts[3])
    part.write_bytes(part.read_bytes()[:cut])

    r = _cli("data", "verify", str(dst), cwd=tmp_path)
    assert r.returncode == 1, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    assert [ln.split(": truncated")[0] for ln in lines] == [f"{part}: record {j}" for j in range(3, n)], lines
    assert r.stderr.strip().splitlines()[-1] == f"verify: {n - 3} bad records ({dst})"
    info = conv.inspect(dst)
    assert info["splits"]["train"]["records"] == 14 and len(info["splits"]["train"]["truncated"]) == 1
    assert info["splits"]["train"]["truncated"][0].startswith(
        f"{part}: truncated at byte {cut}: records 3..{n - 1}"
    )

    # mid-run: whichever loader meets a cut record ends with one line naming the part and the record
    cfg = DataConfig(name="x", root=str(dst), image_size=16, val_resize=16, num_threads=1)
    for loader in ("dali", "torch"):
        cfg.loader = loader
        with pytest.raises(
            UserError, match=rf"corrupt FFRecord dataset: {part}: record [3-9]: truncated"
        ) as e:
            list(build_loader(cfg, "train", 0, 1, 8, 0, expect_classes=3))
        assert "\n" not in str(e.value) and "data verify" in str(e.value)
    # at launch, even when only headers are checked (data.verify=header): the sizes show the cut
    for mode in ("header", "full"):
        with pytest.raises(UserError, match=rf"{part}: (truncated at byte {cut}|record 3: truncated)"):
            verify_dataset(dst, mode)
    r = _cli(
        "launch",
        "--run-dir",
        "runs/t",
        f"data.root={dst}",
        "data.name=custom",
        "model.num_classes=3",
        "data.verify=header",
        cwd=tmp_path,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert "corrupt FFRecord dataset" in last and f"{part}: truncated at byte {cut}" in last, last
    assert not (tmp_path / "runs").exists()

    # cut inside the offset table: that part does not open; verify names it (and the count it lacks)
    part.write_bytes(part.read_bytes()[: 12 + 12 * n - 5])
    r = _cli("data", "verify", str(dst), cwd=tmp_path)
    assert r.returncode == 1
    assert r.stdout.splitlines()[0].startswith(f"{part}: header declares {n} records"), r.stdout
    assert "do not fit" in r.stdout.splitlines()[0]
    # the loaders share loader_base and neither imports the other
    probe = "import sys, orchestrator.data.torch_loader; print('orchestrator.data.dali' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr[-2000:]
