"""The data path: digits dataset, DALI loader sharding / epochs / exact resume, bad input."""

from __future__ import annotations

import io
import json
import multiprocessing as mp
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from orchestrator.config.schema import DataConfig
from orchestrator.data.dali import build_loader
from orchestrator.data.digits import ensure_digits_dataset
from orchestrator.data.ffrecord import FileReader, FileWriter
from orchestrator.data.records import decode_jpeg_label, encode_jpeg_label
from orchestrator.errors import UserError

VECTORS = Path(__file__).parent / "data" / "ffrecord-vectors"
N_TRAIN, N_VAL = 23, 11


def _jpeg(rng: np.random.Generator, w: int, h: int) -> bytes:
    from PIL import Image

    arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _write_split(folder: Path, count: int, rng: np.random.Generator, parts: int = 2) -> None:
    folder.mkdir(parents=True)
    bounds = np.linspace(0, count, parts + 1).astype(int)
    for p in range(parts):
        with FileWriter(folder / f"PART_{p:05d}.ffr", int(bounds[p + 1] - bounds[p])) as w:
            for i in range(bounds[p], bounds[p + 1]):
                width, height = int(rng.integers(18, 40)), int(rng.integers(18, 40))
                w.write_one(encode_jpeg_label(_jpeg(rng, width, height), i, width, height))


@pytest.fixture(scope="module")
def indexed(tmp_path_factory) -> Path:
    """A dataset whose label is the sample index, so batches reveal exactly which samples they hold."""
    root = tmp_path_factory.mktemp("indexed") / "ds"
    rng = np.random.default_rng(0)
    _write_split(root / "train.ffr", N_TRAIN, rng)
    _write_split(root / "val.ffr", N_VAL, rng, parts=1)
    meta = {
        "classes": [str(i) for i in range(N_TRAIN)],
        "num_classes": N_TRAIN,
        "counts": {"train": N_TRAIN, "val": N_VAL},
        "payload": "jpeg_label",
    }
    (root / "meta.json").write_text(json.dumps(meta))
    return root


def _cfg(root: Path, **kw) -> DataConfig:
    base = dict(
        name="custom",
        root=str(root),
        image_size=16,
        val_resize=16,
        rrc_scale_min=0.3,
        hflip=True,
        mean=[0.5] * 3,
        std=[0.5] * 3,
        num_threads=1,
        prefetch=2,
    )
    base.update(kw)
    return DataConfig(**base)


@pytest.mark.parametrize("world", [2, 3])
def test_train_every_sample_once_per_epoch(indexed, world):
    cfg = _cfg(indexed)
    loaders = [build_loader(cfg, "train", r, world, 4, seed=7) for r in range(world)]
    steps = {len(ld) for ld in loaders}
    assert len(steps) == 1, "ranks disagree on steps per epoch"
    orders = []
    for epoch in range(2):
        seen = []
        for ld in loaders:
            ld.set_epoch(epoch)
            batches = list(ld)
            assert len(batches) == len(ld) > 0
            for k, (x, y) in enumerate(batches):
                assert x.dtype == torch.float32 and y.dtype == torch.int64
                assert x.shape[1:] == (3, 16, 16) and x.shape[0] == y.shape[0] >= 1
                if k < len(batches) - 2:
                    assert y.shape[0] == 4  # full except at the end
            seen.extend(y.tolist() for _, y in batches)
        flat = sorted(i for b in seen for i in b)
        assert flat == list(range(N_TRAIN)), f"epoch {epoch}: not every sample exactly once"
        orders.append([i for b in seen for i in b])
    assert orders[0] != orders[1], "epochs should be shuffled differently"
    pipe = loaders[0]._pipe
    assert pipe is not None
    list(loaders[0])
    assert loaders[0]._pipe is pipe, "a finished pass should leave its pipeline reusable"


@pytest.mark.parametrize("world", [1, 2, 3])
def test_val_covers_every_sample_once(indexed, world):
    cfg = _cfg(indexed)
    loaders = [build_loader(cfg, "val", r, world, 4, seed=0) for r in range(world)]
    assert len({len(ld) for ld in loaders}) == 1
    labels = [y for ld in loaders for _, y in ld]
    assert all(len(y) > 0 for y in labels)
    assert sorted(torch.cat(labels).tolist()) == list(range(N_VAL))
    again = [y for ld in loaders for _, y in ld]  # a second pass is not empty either
    assert sorted(torch.cat(again).tolist()) == list(range(N_VAL))
    next(iter(loaders[0]))  # peeking at a batch does not shorten the next evaluation
    assert sum(len(y) for _, y in loaders[0]) == sum(len(y) for y in labels[: len(loaders[0])])


def test_resume_mid_epoch_is_bitwise_identical(indexed):
    cfg = _cfg(indexed)
    ld = build_loader(cfg, "train", 1, 2, 3, seed=11)
    ld.set_epoch(1)
    full = []
    for k, b in enumerate(ld):
        full.append(b)
        if k == 1:
            state = ld.state_dict()
    assert state == {"epoch": 1, "batch": 2}
    assert ld.state_dict() == {"epoch": 2, "batch": 0}

    resumed = build_loader(cfg, "train", 1, 2, 3, seed=11)
    resumed.load_state_dict(state)
    resumed.set_epoch(1)  # the trainer's usual call keeps the restored position
    rest = list(resumed)
    assert len(rest) == len(full) - 2
    for (xa, ya), (xb, yb) in zip(full[2:], rest, strict=True):
        assert torch.equal(ya, yb)
        assert torch.equal(xa, xb)
    # the next pass of the resumed loader is the next epoch, from its start
    assert resumed.state_dict() == {"epoch": 2, "batch": 0}

    # restored at the very end of an epoch (stopped after its last step): that epoch yields nothing more
    resumed.load_state_dict({"epoch": 1, "batch": len(resumed)})
    resumed.set_epoch(1)
    assert list(resumed) == []
    resumed.set_epoch(2)
    assert len(list(resumed)) == len(resumed)

    # a pass abandoned mid-epoch (e.g. max_steps) continues where it stopped, with no stale prefetched batch
    ld.load_state_dict({"epoch": 1, "batch": 0})
    it = iter(ld)
    head = [next(it), next(it), next(it)]
    del it
    tail = list(ld)
    for (xa, ya), (xb, yb) in zip(full, head + tail, strict=True):
        assert torch.equal(ya, yb) and torch.equal(xa, xb)


def test_batches_outlive_the_pipeline(indexed):
    """Batches handed out without a copy stay intact while later batches are made and after the pipeline is gone."""
    ld = build_loader(_cfg(indexed), "train", 0, 1, 4, seed=5)
    first = list(ld)
    copies = [(x.clone(), y.clone()) for x, y in first]
    for _ in range(3):
        list(ld)
    it = iter(ld)
    next(it)
    del it, ld  # the pipeline is dropped
    import gc

    gc.collect()
    for (x, y), (xc, yc) in zip(first, copies, strict=True):
        assert torch.equal(x, xc) and torch.equal(y, yc)


def test_torch_fallback_same_plan(indexed):
    dali = build_loader(_cfg(indexed), "train", 0, 2, 4, seed=3)
    plain = build_loader(_cfg(indexed, loader="torch", num_threads=1), "train", 0, 2, 4, seed=3)
    assert len(dali) == len(plain)
    for (xa, ya), (xb, yb) in zip(dali, plain, strict=True):
        assert torch.equal(ya, yb)
        assert (xa - xb).abs().mean() < 0.05  # same crops and flips; resamplers differ slightly


def test_cpu_resample_torch_matches_dali(indexed):
    """The CPU pipeline's torch resize stage gives DALI's own resize result to within rounding, same samples."""
    threads = torch.get_num_threads()
    a = build_loader(_cfg(indexed, image_size=24, num_threads=2), "train", 0, 1, 5, seed=4)
    b = build_loader(_cfg(indexed, image_size=24, num_threads=2, cpu_resample="dali"), "train", 0, 1, 5, seed=4)
    assert a.torch_resample and not b.torch_resample
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert torch.equal(ya, yb) and xa.shape == xb.shape == (len(ya), 3, 24, 24)
        # normalized with std 0.5: 1/255 of a pixel is 0.0078; both are antialiased bilinear
        assert (xa - xb).abs().mean() < 0.02
        assert not torch.equal(xa, xb)  # really two resamplers
    assert torch.get_num_threads() == threads  # the resize threads' single-threaded torch stays theirs
    a.close()
    with pytest.raises(UserError, match="cpu_resample"):
        build_loader(_cfg(indexed, cpu_resample="pil"), "train", 0, 1, 5, seed=4)


def test_loader_bad_input(indexed, tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        build_loader(_cfg(tmp_path / "nope"), "train", 0, 1, 4, 0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="meta.json"):
        build_loader(_cfg(tmp_path / "empty"), "train", 0, 1, 4, 0)
    with pytest.raises(UserError, match="num_classes"):
        build_loader(_cfg(indexed), "train", 0, 1, 4, 0, expect_classes=1000)
    with pytest.raises(UserError, match="ranks"):
        build_loader(_cfg(indexed), "val", 0, 12, 4, 0)
    # a corrupt record: the error names the file and the index
    bad = tmp_path / "bad"
    shutil.copytree(indexed, bad)
    part = sorted((bad / "val.ffr").iterdir())[0]
    with FileReader(part) as r:
        start = int(r._files[0].starts[5])
    raw = bytearray(part.read_bytes())
    raw[start + 30] ^= 0xFF
    part.write_bytes(bytes(raw))
    for loader in ("dali", "torch"):
        with pytest.raises(UserError, match=r"PART_00000.ffr: record 5") as err:
            list(build_loader(_cfg(bad, loader=loader, num_threads=2), "val", 0, 1, 4, 0))
        assert "\n" not in str(err.value) and "data verify" in str(err.value)


def test_pickled_records_need_trust(tmp_path):
    root = tmp_path / "hfai"
    for split in ("train", "val"):
        (root / f"{split}.ffr").mkdir(parents=True)
        shutil.copy(VECTORS / "v1_pickled_images.ffr", root / f"{split}.ffr" / "PART_00000.ffr")
    meta = {"classes": [str(i) for i in range(1000)], "num_classes": 1000, "counts": {"train": 6, "val": 6}}
    (root / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="trust_pickle"):
        build_loader(_cfg(root), "train", 0, 1, 4, 0)
    manifest = json.loads((VECTORS / "v1_manifest.json").read_text())["v1_pickled_images.ffr"]
    cfg = _cfg(root, trust_pickle=True, image_size=8, val_resize=8)
    for split in ("train", "val"):
        labels = torch.cat([y for _, y in build_loader(cfg, split, 0, 1, 4, 0)]).tolist()
        assert sorted(labels) == sorted(manifest["labels"])


def test_digits_dataset(tmp_path):
    root = tmp_path / "digits"
    assert ensure_digits_dataset(root) == root
    meta = json.loads((root / "meta.json").read_text())
    assert meta["num_classes"] == 10 and meta["counts"]["train"] + meta["counts"]["val"] == 1797
    assert meta["payload"] == "jpeg_label"
    mtime = (root / "meta.json").stat().st_mtime_ns
    ensure_digits_dataset(root)  # cached: a no-op
    assert (root / "meta.json").stat().st_mtime_ns == mtime
    with FileReader(root / "val.ffr") as r:
        assert r.n == meta["counts"]["val"]
        img, label, w, h = decode_jpeg_label(r.read_one(0))
        assert (w, h) == (32, 32) and 0 <= label < 10 and bytes(img[:4]) == b"\x89PNG"
        val_labels = [decode_jpeg_label(b)[1] for b in r.read(range(r.n))]
    assert np.bincount(val_labels, minlength=10).min() >= 30  # stratified
    cfg = DataConfig(
        root=str(root),
        image_size=32,
        val_resize=32,
        hflip=False,
        rrc_scale_min=0.5,
        mean=[0.5] * 3,
        std=[0.5] * 3,
        num_threads=1,
    )
    ld = build_loader(cfg, "val", 0, 1, 64, 0, expect_classes=10)
    x, y = next(iter(ld))
    assert x.shape == (64, 3, 32, 32) and ld.meta["num_classes"] == 10
    assert -1.01 <= float(x.min()) and float(x.max()) <= 1.01


def _build_digits(root: str) -> str:
    return str(ensure_digits_dataset(root))


def test_digits_concurrent_ranks(tmp_path):
    root = tmp_path / "c" / "digits"
    ctx = mp.get_context("fork")
    with ctx.Pool(2) as pool:
        assert pool.map(_build_digits, [str(root)] * 2) == [str(root)] * 2
    assert sorted(p.name for p in root.parent.iterdir() if not p.name.startswith(".")) == ["digits"]
    assert not [p for p in root.parent.iterdir() if ".build-" in p.name]
    with FileReader(root / "train.ffr") as r:
        assert not r.validate()


def test_digits_missing_root_built_by_loader(tmp_path):
    cfg = DataConfig(name="digits", root=str(tmp_path / "d"), image_size=32, val_resize=32, num_threads=1)
    ld = build_loader(cfg, "train", 0, 2, 128, 0)
    assert ld.meta["counts"]["train"] == ld.num_samples and len(ld) == 6


def test_data_bench_smoke(tmp_path):
    from orchestrator.data.bench import run_data_bench

    out = run_data_bench(tmp_path / "b.json", count=40, batch=8, epochs=1, repeats=1, workdir=tmp_path)
    saved = json.loads((tmp_path / "b.json").read_text())
    assert saved == out
    assert [r["loader"] for r in out["results"]] == [
        "ffrecord_dali", "folder_pil_dataloader", "ffrecord_dali_resample_dali"
    ]
    assert all(r["img_per_s"] > 0 for r in out["results"]) and out["ratio"] > 0
    assert out["reads"]["ffrecord_batch_read_records_per_s"] > 0
    assert [p.name for p in tmp_path.iterdir()] == ["b.json"]  # the generated images are removed


@pytest.mark.parametrize("n", [1797, 1438, 640])
def test_resume_with_another_world_size_reads_the_same_samples(n):
    """A position saved by 2 ranks x 32 maps to 4 x 16 and 1 x 64: the remaining global steps hold the same
    samples (each step = the next 64 of the epoch's order), and the epoch is still covered exactly once."""
    from orchestrator.data.sampling import ShardPlan, translate_position

    def global_steps(world, batch, start):
        plans = [ShardPlan(n, r, world, batch, seed=3, shuffle=True) for r in range(world)]
        per_rank = [p.batches(epoch=1)[start:] for p in plans]
        return [np.sort(np.concatenate(step)) for step in zip(*per_rank, strict=True)]

    done = 5
    ref = global_steps(2, 32, done)
    for layout in ((4, 16), (1, 64)):
        k = translate_position(n, (2, 32), layout, done)
        assert k == done  # same global batch: the same optimizer step
        steps = global_steps(*layout, k)
        full = [i for i, s in enumerate(ref) if len(s) == 64]  # the epoch's tail is shaped per layout
        for i in full[:-1]:
            assert np.array_equal(steps[i], ref[i]), (layout, i)
        seen = np.concatenate(steps)
        assert np.array_equal(np.sort(seen), np.sort(np.concatenate(ref)))  # the rest of the epoch, once each
    with pytest.raises(ValueError, match="not a batch boundary"):
        translate_position(n, (2, 32), (3, 48), 1)  # 64 samples in: not a multiple of 144


@pytest.mark.parametrize("multiple", [2, 3])
def test_an_epoch_is_whole_accumulations_of_micro_batches(multiple):
    """With gradient accumulation the plan's micro-batches per epoch are a multiple of it (an epoch ends on an
    optimizer step), still reading every sample once, with no empty batch; positions translate across layouts
    counted the same way (a layout saved without accumulation has 1)."""
    from orchestrator.data.sampling import ShardPlan, translate_position

    for n in (1437, 1438, 640):
        plans = [ShardPlan(n, r, 2, 16, seed=3, shuffle=True, multiple=multiple) for r in range(2)]
        plain = ShardPlan(n, 0, 2, 16, seed=3, shuffle=True)
        assert len(plans[0]) % multiple == 0 and len(plain) <= len(plans[0]) < len(plain) + multiple
        seen = np.concatenate([b for p in plans for b in p.batches(epoch=2)])
        assert np.array_equal(np.sort(seen), np.arange(n)) and min(map(len, plans[0].batches(2))) >= 1
    assert translate_position(1437, (2, 32), (2, 32, 1), 5) == 5
    assert translate_position(1437, (2, 16, 2), (1, 32, 2), 10) == 10  # the same samples per optimizer step
