"""ImageNet folder layout -> FFRecord dataset folder; ``verify`` and ``inspect`` of such a folder.

Source layout::

    SRC/train/<class>/<image>          one folder per class (ImageNet: wnids), any of .jpeg .jpg .png ...
    SRC/val/<class>/<image>            class folders, or
    SRC/val/<image> + a labels file    flat: SRC/val_labels.txt (or val/labels.txt, or LOC_val_solution.csv),
                                       one "<file name> <class name or index>" per line (space or comma)

Classes are the sorted train folder names. Output: ``DST/train.ffr/PART_*.ffr``, ``DST/val.ffr/PART_*.ffr`` with
``jpeg_label`` records (``records.py``) and ``DST/meta.json``, written last, which marks a finished conversion.

Worker processes decode every image once (to reject unreadable files and record the size); JPEGs are stored as
they are, other formats and non-RGB/grey JPEGs (CMYK) are re-encoded as RGB JPEG quality 95. The parent writes
each part atomically (temporary file + rename) with a per-part stats file beside it, so a killed conversion
resumes with the finished parts kept and the rest redone. Unreadable images are counted, listed in meta.json and
skipped, or fatal with ``strict``.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import sys
from collections.abc import Iterator
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..fsutil import atomic_write
from .ffrecord import FFRecordError, FileReader, FileWriter
from .records import JPEG_LABEL, RecordError, decode_jpeg_label, encode_jpeg_label

__all__ = ["convert", "verify", "inspect", "scan_source"]

IMAGE_EXTS = {".jpeg", ".jpg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
LABEL_FILES = ("val_labels.txt", "val/labels.txt", "LOC_val_solution.csv")
RECORDS_PER_PART = 1024  # default part size
CHUNK = 32  # images per worker task
STATE_DIR = ".convert"


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)


def _read_labels_file(path: Path, class_index: dict[str, int]) -> dict[str, int]:
    labels: dict[str, int] = {}
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.lower().startswith("imageid"):
            continue
        fields = line.replace(",", " ").split()
        if len(fields) < 2:
            raise UserError(f"{path}:{lineno}: expected '<file name> <class>', got {line!r}")
        name, cls = fields[0], fields[1]
        if cls in class_index:
            label = class_index[cls]
        elif cls.isdigit() and int(cls) < len(class_index):
            label = int(cls)
        else:
            raise UserError(f"{path}:{lineno}: unknown class {cls!r} (not a train folder name or index)")
        labels[Path(name).stem] = label
    return labels


def scan_source(
    src: str | os.PathLike, val_labels: str | os.PathLike | None = None
) -> tuple[list[str], dict[str, list[tuple[str, int]]]]:
    """(classes, {split: [(file, label), ...]}) of an ImageNet-layout folder.

    ``val_labels``: the labels file of a flat val/ folder (default: the first of LABEL_FILES found in SRC).
    """
    src = Path(src)
    if val_labels is not None and not Path(val_labels).is_file():
        raise UserError(f"val labels file {val_labels} does not exist (expected '<file name> <class>' lines)")
    train = src / "train"
    if not train.is_dir():
        raise UserError(f"{src} has no train/ folder: expected SRC/train/<class>/<images> (ImageNet layout)")
    classes = sorted(p.name for p in train.iterdir() if p.is_dir())
    if not classes:
        raise UserError(f"{train} has no class folders: expected {train}/<class>/<images>")
    index = {c: i for i, c in enumerate(classes)}
    splits: dict[str, list[tuple[str, int]]] = {
        "train": [(str(f), index[c]) for c in classes for f in _images_in(train / c)]
    }
    val = src / "val"
    if val.is_dir():
        sub = sorted(p.name for p in val.iterdir() if p.is_dir())
        if sub:
            unknown = [c for c in sub if c not in index]
            if unknown:
                raise UserError(f"{val} has class folders not in train/: {', '.join(unknown[:5])}")
            splits["val"] = [(str(f), index[c]) for c in sub for f in _images_in(val / c)]
        else:
            label_file = (
                Path(val_labels)
                if val_labels is not None
                else next((src / n for n in LABEL_FILES if (src / n).is_file()), None)
            )
            if label_file is None:
                raise UserError(
                    f"{val} is flat but no labels file was found: add one of {', '.join(LABEL_FILES)} "
                    "with '<file name> <class>' lines, or use class folders"
                )
            labels = _read_labels_file(label_file, index)
            files = _images_in(val)
            missing = [f.name for f in files if f.stem not in labels]
            if missing:
                raise UserError(f"{label_file} has no label for {len(missing)} val images, e.g. {missing[0]}")
            splits["val"] = [(str(f), labels[f.stem]) for f in files]
    if not splits["train"]:
        raise UserError(f"{train} holds no images ({', '.join(sorted(IMAGE_EXTS))})")
    return classes, splits


def _encode_one(path: str, label: int) -> tuple[bytes | None, str | None]:
    """(record, None) or (None, reason) for one source image."""
    from PIL import Image

    try:
        data = Path(path).read_bytes()
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format
            im.load()  # full decode: truncated or corrupt files fail here
            w, h = im.size
            if fmt != "JPEG" or im.mode not in ("RGB", "L"):
                buf = io.BytesIO()
                im.convert("RGB").save(buf, format="JPEG", quality=95)
                data = buf.getvalue()
        if w <= 0 or h <= 0:
            return None, "empty image"
        return encode_jpeg_label(data, label, w, h), None
    except Exception as e:  # noqa: BLE001 - any failure means the image is unreadable
        return None, f"{type(e).__name__}: {e}".splitlines()[0][:200]


def _encode_chunk(task: tuple[int, list[tuple[str, int]]]):
    k, items = task
    return k, [_encode_one(p, lab) for p, lab in items]


def _part_bounds(n: int, parts: int) -> np.ndarray:
    return np.linspace(0, n, parts + 1).round().astype(np.int64)


def _write_part(path: Path, records: list[bytes]) -> None:
    with FileWriter(path, len(records)) as w:
        for r in records:
            w.write_one(r)


def _plan_parts(splits: dict[str, list], parts: int | None) -> dict[str, int]:
    n_train = len(splits["train"])
    if parts is None or parts <= 0:
        train_parts = max(1, math.ceil(n_train / RECORDS_PER_PART))
    else:
        train_parts = min(int(parts), n_train)
    out = {"train": train_parts}
    if "val" in splits and splits["val"]:
        out["val"] = max(1, min(len(splits["val"]), round(train_parts * len(splits["val"]) / n_train)))
    return out


def _fingerprint(classes: list[str], splits: dict[str, list], parts: dict[str, int]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([classes, parts]).encode())
    for s in sorted(splits):
        for p, lab in splits[s]:
            h.update(f"{s}\0{p}\0{lab}\n".encode())
    return h.hexdigest()


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    workers: int = 2,
    parts: int | None = None,
    strict: bool = False,
    progress: bool = True,
    val_labels: str | os.PathLike | None = None,
) -> dict:
    """Convert ``src`` (ImageNet layout) into the dataset folder ``dst``; returns meta.json's content.

    ``parts`` is the number of train parts (default: one per ~1024 images); val gets a proportional number.
    Rerunning after a kill keeps finished parts. Rerunning on a finished folder with the same source is a no-op.
    ``val_labels`` names the labels file of a flat val/ folder (default: looked up in SRC).
    """
    from tqdm import tqdm

    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise UserError(f"source folder {src} does not exist (expected SRC/train/<class>/<images>)")
    classes, splits = scan_source(src, val_labels)
    plan = _plan_parts(splits, parts)
    fp = _fingerprint(classes, splits, plan)
    meta_path = dst / "meta.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("source_fingerprint") == fp:
            return meta
        raise UserError(
            f"{dst} already holds a different converted dataset: choose an empty DST or remove it"
        )
    try:
        dst.mkdir(parents=True, exist_ok=True)
        state = dst / STATE_DIR
        state.mkdir(exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create output folder {dst}: {e.strerror}") from None
    plan_file = state / "plan.json"
    if plan_file.is_file() and json.loads(plan_file.read_text()).get("fingerprint") != fp:
        # the source or the part count changed since the interrupted run: its parts do not fit; start over
        for s in plan:
            for f in (dst / f"{s}.ffr").glob("PART_*.ffr"):
                f.unlink()
        for f in state.glob("*.json"):
            f.unlink()
    atomic_write(plan_file, json.dumps({"fingerprint": fp, "parts": plan}))

    # which parts still need doing
    todo: list[tuple[str, int, list[tuple[str, int]]]] = []
    total = 0
    for s, count in plan.items():
        folder = dst / f"{s}.ffr"
        folder.mkdir(exist_ok=True)
        for stale in folder.glob(".PART_*.tmp-*"):
            stale.unlink()  # a part interrupted mid-write
        bounds = _part_bounds(len(splits[s]), count)
        for k in range(count):
            done = (folder / f"PART_{k:05d}.ffr").is_file() and (state / f"{s}-PART_{k:05d}.json").is_file()
            if not done:
                items = splits[s][bounds[k] : bounds[k + 1]]
                todo.append((s, k, items))
                total += len(items)

    tasks: list[tuple[int, list[tuple[str, int]]]] = []
    owner: list[int] = []  # task -> index in todo
    first: list[int] = []  # todo -> its first task (a part's tasks are contiguous)
    for t, (_, _, items) in enumerate(todo):
        first.append(len(tasks))
        for c in range(0, max(len(items), 1), CHUNK):
            tasks.append((len(tasks), items[c : c + CHUNK]))
            owner.append(t)
    remaining = [0] * len(todo)
    for t in owner:
        remaining[t] += 1

    bar = tqdm(total=total, unit="img", desc=f"convert {src.name}", disable=not progress, file=sys.stderr)
    pool = get_context("fork").Pool(workers) if workers > 1 and len(tasks) > 1 else None
    try:
        results: Iterator = pool.imap(_encode_chunk, tasks) if pool is not None else map(_encode_chunk, tasks)
        chunk_results: dict[int, list] = {}
        for k, res in results:
            t = owner[k]
            chunk_results[k] = res
            bar.update(len(res))
            if strict:
                for (path, _), (_, err) in zip(tasks[k][1], res, strict=True):
                    if err is not None:
                        raise UserError(f"unreadable image {path}: {err} (--strict)")
            remaining[t] -= 1
            if remaining[t] == 0:
                s, part, items = todo[t]
                ks = range(first[t], first[t] + len(range(0, max(len(items), 1), CHUNK)))
                pairs = [r for j in ks for r in chunk_results.pop(j)]
                paths = [p for j in ks for p, _ in tasks[j][1]]
                records = [rec for rec, _ in pairs if rec is not None]
                skipped = [[p, err] for p, (rec, err) in zip(paths, pairs, strict=True) if rec is None]
                _write_part(dst / f"{s}.ffr" / f"PART_{part:05d}.ffr", records)
                labels = [lab for (rec, _), (_, lab) in zip(pairs, items, strict=True) if rec is not None]
                stats = {
                    "count": len(records),
                    "skipped": skipped,
                    "labels": np.bincount(labels, minlength=len(classes)).tolist()
                    if labels
                    else [0] * len(classes),
                }
                atomic_write(state / f"{s}-PART_{part:05d}.json", json.dumps(stats))
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()

    counts, skipped, class_counts = {}, [], {}
    for s, count in plan.items():
        per_class = np.zeros(len(classes), np.int64)
        n = 0
        for k in range(count):
            st = json.loads((state / f"{s}-PART_{k:05d}.json").read_text())
            n += st["count"]
            skipped.extend([s, p, e] for p, e in st["skipped"])
            per_class += np.asarray(st["labels"], np.int64)
        counts[s] = n
        class_counts[s] = per_class.tolist()
    meta = {
        "name": src.name,
        "version": 1,
        "classes": classes,
        "num_classes": len(classes),
        "counts": counts,
        "class_counts": class_counts,
        "parts": plan,
        "payload": JPEG_LABEL,
        "image_format": "jpeg",
        "skipped": len(skipped),
        "skipped_files": [{"split": s, "file": p, "error": e} for s, p, e in skipped],
        "source": str(src.resolve()),
        "source_fingerprint": fp,
    }
    atomic_write(meta_path, json.dumps(meta, indent=1) + "\n")
    return meta


def _split_dirs(dst: Path) -> tuple[dict, list[tuple[str, Path]]]:
    from .loader_base import load_meta

    meta = load_meta(dst)
    return meta, [(s, dst / f"{s}.ffr") for s in ("train", "val") if (dst / f"{s}.ffr").is_dir()]


def verify(dst: str | os.PathLike, sample_per_part: int = 1) -> list[str]:
    """Check every record's CRC and decode ``sample_per_part`` images per part; returns the problems found: one
    per bad record (a part cut short: each record the cut reaches), or one per part that does not open."""
    from PIL import Image

    dst = Path(dst)
    meta, splits = _split_dirs(dst)
    problems: list[str] = []
    for s, folder in splits:
        files = sorted(folder.glob("*.ffr"))
        if not files:
            problems.append(f"{folder}: no *.ffr parts")
            continue
        total = 0
        for f in files:
            try:
                r = FileReader(f)
            except FFRecordError as e:
                problems.append(str(e))
                continue
            with r:
                total += r.n
                problems.extend(r.validate())
                for i in np.linspace(0, r.n - 1, min(sample_per_part, r.n)).round().astype(int).tolist():
                    try:
                        img, label, _, _ = decode_jpeg_label(r.read_one(i))
                        if not 0 <= label < int(meta["num_classes"]):
                            raise RecordError(f"label {label} outside 0..{int(meta['num_classes']) - 1}")
                        with Image.open(io.BytesIO(img)) as im:
                            im.load()
                    except FFRecordError:
                        pass  # already reported by validate()
                    except Exception as e:  # noqa: BLE001
                        problems.append(f"{f}: record {i}: does not decode: {e}")
        expected = meta.get("counts", {}).get(s)
        if expected is not None and expected != total:
            problems.append(f"{folder}: {total} records but meta.json counts {expected}")
    return problems


def inspect(dst: str | os.PathLike) -> dict:
    """Counts, classes, parts and sizes of a dataset folder, and the parts cut short (``truncated``)."""
    dst = Path(dst)
    meta, splits = _split_dirs(dst)
    out = {
        "root": str(dst),
        "name": meta.get("name"),
        "payload": meta.get("payload"),
        "num_classes": meta["num_classes"],
        "classes": meta.get("classes", []),
        "counts": meta["counts"],
        "skipped": meta.get("skipped", 0),
        "splits": {},
    }
    for s, folder in splits:
        files = sorted(folder.glob("*.ffr"))
        records, truncated = 0, []
        for f in files:
            try:
                with FileReader(f, check_data=False) as r:
                    records += r.n
                    truncated.extend(r.truncated())  # from the header and the size: no record is read
            except FFRecordError as e:
                raise UserError(f"corrupt FFRecord dataset: {e}") from None
        out["splits"][s] = {
            "parts": len(files),
            "records": records,
            "bytes": sum(f.stat().st_size for f in files),
            "truncated": truncated,
        }
        if "class_counts" in meta and s in meta["class_counts"]:
            out["splits"][s]["class_counts"] = meta["class_counts"][s]
    return out
