"""FFRecord reader/writer against the files HFAiLab's own library wrote (tests/data/ffrecord-vectors)."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

from orchestrator.data import ffrecord
from orchestrator.data.ffrecord import FFRecordError, FileReader, FileWriter
from orchestrator.data.records import RecordError, detect_payload, load_pickled

V = Path(__file__).parent / "data" / "ffrecord-vectors"
MANIFEST = json.loads((V / "v1_manifest.json").read_text())


def _sha(b) -> str:
    return hashlib.sha256(b).hexdigest()


def test_ffrecord_error_is_value_error():
    assert issubclass(FFRecordError, ValueError)


def test_bytes_vector():
    m = MANIFEST["v1_bytes.ffr"]
    with FileReader(V / "v1_bytes.ffr") as r:
        assert r.n == m["n"] == 8 and len(r) == 8
        recs = r.read(range(r.n))
        assert [len(b) for b in recs] == m["lengths"]
        assert [_sha(b) for b in recs] == m["sha256"]
        assert [zlib.crc32(b) for b in recs] == m["crc32"]
        assert recs[0] == b""
        assert r.read_one(5) == recs[5] and r.read_one(-1) == recs[7]
        assert r.read([7, 0, 7, 3]) == [recs[7], recs[0], recs[7], recs[3]]
        assert r.validate() == []
        with pytest.raises(IndexError):
            r.read_one(8)


def test_parts_folder_is_one_dataset():
    m = MANIFEST["v1_parts.ffr"]
    with FileReader(V / "v1_parts.ffr") as r:
        assert r.n == 8
        assert [FileReader(f).n for f in r.files] == m["parts"]
        assert [_sha(b) for b in r.read(range(8))] == m["sha256"]
        assert r.locate(3) == (str(V / "v1_parts.ffr" / "PART_00001.ffr"), 0)
    parts = sorted((V / "v1_parts.ffr").glob("*.ffr"))
    with FileReader([str(p) for p in parts]) as r:  # a list works the same
        assert [_sha(b) for b in r.read(range(8))] == m["sha256"]


def test_writer_is_byte_compatible(tmp_path):
    with FileReader(V / "v1_bytes.ffr") as r:
        recs = r.read(range(r.n))
    out = tmp_path / "same.ffr"
    with FileWriter(out, len(recs)) as w:
        for b in recs:
            w.write_one(b)
    assert out.read_bytes() == (V / "v1_bytes.ffr").read_bytes()
    # the parts too
    for part in sorted((V / "v1_parts.ffr").glob("*.ffr")):
        with FileReader(part) as r:
            recs = r.read(range(r.n))
        with FileWriter(tmp_path / part.name, len(recs)) as w:
            for b in recs:
                w.write_one(b)
        assert (tmp_path / part.name).read_bytes() == part.read_bytes()


def test_writer_is_atomic(tmp_path):
    out = tmp_path / "a.ffr"
    w = FileWriter(out, 3)
    w.write_one(b"x")
    assert not out.exists()
    with pytest.raises(ValueError, match="1 records written of the 3"):
        w.close()
    assert not out.exists() and not list(tmp_path.iterdir())
    with pytest.raises(RuntimeError):
        with FileWriter(out, 1) as w:
            w.write_one(b"y")
            raise RuntimeError("boom")
    assert not list(tmp_path.iterdir())
    with FileWriter(out, 0):
        pass
    with FileReader(out) as r:  # an empty file is valid (its meta crc is not 0)
        assert r.n == 0


def test_reader_pickles_by_file_names():
    r = FileReader(V / "v1_parts.ffr")
    state = pickle.dumps(r)
    assert len(state) < 1000  # names, not data or descriptors
    r2 = pickle.loads(state)
    assert r2.n == 8 and r2.read([4]) == r.read([4])
    r.close()
    r2.close()


def test_pickled_images_vector():
    m = MANIFEST["v1_pickled_images.ffr"]
    with FileReader(V / "v1_pickled_images.ffr") as r:
        assert r.n == m["n"]
        for i, b in enumerate(r.read(range(r.n))):
            assert detect_payload(b) == "pickle"
            img, label = load_pickled(b)
            assert label == m["labels"][i]
            assert list(img.size) == m["sizes"][i]
            assert _sha(img.tobytes()) == m["pixel_sha256"][i]


def test_restricted_unpickler_refuses_other_globals():
    evil = pickle.dumps((os.system, 1))
    with pytest.raises(RecordError, match="not allowed"):
        load_pickled(evil)
    with pytest.raises(RecordError, match="expected"):
        load_pickled(pickle.dumps(("not an image", 1)))


def test_corrupt_record_names_file_and_index():
    path = V / "v1_corrupt_record3.ffr"
    with FileReader(path) as r:
        for i in (0, 1, 2, 4, 5, 6, 7):
            r.read_one(i)
        with pytest.raises(FFRecordError, match=r"v1_corrupt_record3.ffr: record 3"):
            r.read_one(3)
        with pytest.raises(FFRecordError, match="record 3"):
            r.read([1, 3])
        bad = r.validate()
        assert len(bad) == 1 and "record 3" in bad[0]
    with FileReader(path, check_data=False) as r:
        assert len(r.read_one(3)) == 100


def test_corrupt_header_fails_to_open():
    with pytest.raises(FFRecordError, match="metadata checksum mismatch"):
        FileReader(V / "v1_corrupt_header.ffr")


def test_unfinished_file_rejected():
    with pytest.raises(FFRecordError, match="never finished"):
        FileReader(V / "v1_unfinished.ffr")


def test_truncated_file():
    with FileReader(V / "v1_truncated.ffr") as r:
        recs = r.read(range(7))
        assert [_sha(b) for b in recs] == MANIFEST["v1_bytes.ffr"]["sha256"][:7]
        with pytest.raises(FFRecordError, match="record 7"):
            r.read_one(7)
        bad = r.validate()
        assert len(bad) == 1 and "record 7" in bad[0]


def _with_offsets(tmp_path: Path, offsets: list[int]) -> Path:
    raw = bytearray((V / "v1_bytes.ffr").read_bytes())
    n = 8
    struct.pack_into(f"<{n}q", raw, 12 + 4 * n, *offsets)
    struct.pack_into("<I", raw, 0, zlib.crc32(bytes(raw[4 : 12 + 12 * n])))  # a consistent meta crc
    p = tmp_path / "x.ffr"
    p.write_bytes(bytes(raw))
    return p


def test_offsets_out_of_range_or_decreasing(tmp_path):
    good = [108, 108, 109, 116, 216, 4312, 69849, 69861]
    with pytest.raises(FFRecordError, match="record 5 offsets out of order"):
        FileReader(_with_offsets(tmp_path, good[:4] + [5000, 4312] + good[6:]))
    # an offset past the end (checksum intact) is a file cut short: it opens, the records it reaches fail
    with FileReader(_with_offsets(tmp_path, good[:7] + [10**9])) as r:
        assert [_sha(b) for b in r.read(range(6))] == MANIFEST["v1_bytes.ffr"]["sha256"][:6]
        with pytest.raises(FFRecordError, match="record 7: truncated"):
            r.read_one(7)
        assert [b.split(" [")[0].split(": ")[1] for b in r.validate()] == ["record 6", "record 7"]
    with pytest.raises(FFRecordError, match="into the header"):
        FileReader(_with_offsets(tmp_path, [4] + good[1:]))
    p = tmp_path / "short.ffr"
    p.write_bytes(b"\1\2\3")
    with pytest.raises(FFRecordError, match="too short"):
        FileReader(p)
    p.write_bytes(struct.pack("<Iq", 1, 10**6))
    with pytest.raises(FFRecordError, match="do not fit"):
        FileReader(p)
    with pytest.raises(FileNotFoundError):
        FileReader(tmp_path / "missing.ffr")
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(FFRecordError, match="no \\*.ffr"):
        FileReader(tmp_path / "emptydir")


def test_large_batch_parallel_read(tmp_path, monkeypatch):
    monkeypatch.setattr(ffrecord, "_PARALLEL_MIN_BYTES", 1000)
    monkeypatch.setattr(ffrecord, "_PARALLEL_MIN_CPUS", 1)
    rng = np.random.default_rng(0)
    recs = [rng.bytes(int(rng.integers(0, 3000))) for _ in range(200)]
    for k in range(2):
        with FileWriter(tmp_path / f"PART_{k:05d}.ffr", 100) as w:
            for b in recs[k * 100 : (k + 1) * 100]:
                w.write_one(b)
    with FileReader(tmp_path) as r:
        idx = rng.permutation(200)
        assert r.read(idx) == [recs[i] for i in idx]
        assert np.array_equal(r.sizes(), [len(b) for b in recs])


def test_legacy_file_without_checksums(tmp_path):
    raw = bytearray((V / "v1_bytes.ffr").read_bytes())
    raw[0:4] = b"\0\0\0\0"  # meta_crc 0 = a legacy file: readable, records unchecked
    p = tmp_path / "legacy.ffr"
    p.write_bytes(bytes(raw))
    with FileReader(p) as r:
        assert [_sha(b) for b in r.read(range(8))] == MANIFEST["v1_bytes.ffr"]["sha256"]
        assert r.validate() == []


# -- truncation: a file cut short reads as far as it is sound -------------------------------------------------
BYTES = V / "v1_bytes.ffr"
STARTS = [108, 108, 109, 116, 216, 4312, 69849, 69861]  # record offsets of v1_bytes.ffr (lengths 0,1,7,...)


def _cut(tmp_path: Path, source: Path, size: int) -> Path:
    p = tmp_path / f"cut{size}.ffr"
    p.write_bytes(source.read_bytes()[:size])
    return p


def _bad_indices(messages: list[str]) -> list[int]:
    return [int(m.split(": record ")[1].split(":")[0]) for m in messages]


@pytest.mark.parametrize(
    "size, first_bad",
    [
        (72861 - 10, 7),  # inside the last record (the vector v1_truncated.ffr is this cut)
        (69861, 7),  # exactly at the last record's start: it lost every byte
        (216, 4),  # exactly at a record boundary: records 4..7 are past the end
        (4312 + 100, 5),  # across several records: 5 is cut inside, 6 and 7 are past the end
        (108, 1),  # right after the tables: only the empty record 0 is whole
    ],
)
def test_truncated_reads_every_record_before_the_cut(tmp_path, size, first_bad):
    m = MANIFEST["v1_bytes.ffr"]
    path = _cut(tmp_path, BYTES, size)
    with FileReader(path) as r:
        assert r.n == 8
        assert [_sha(b) for b in r.read(range(first_bad))] == m["sha256"][:first_bad]
        for i in range(first_bad, 8):
            with pytest.raises(FFRecordError, match=rf"^{re.escape(str(path))}: record {i}: "):
                r.read_one(i)
        with pytest.raises(FFRecordError, match=rf"record {first_bad}\b"):
            r.read([0, first_bad])  # a batch holding a cut record fails as a whole
        bad = r.validate()
        assert _bad_indices(bad) == list(range(first_bad, 8)) and all(str(path) in b for b in bad)
        cut = r.truncated()  # what the sizes alone tell: records past the end (not a cut inside the last one)
        if first_bad < 7 or size < STARTS[7]:
            assert len(cut) == 1 and f"records {first_bad}..7 of 8" in cut[0] and str(path) in cut[0]
        else:
            assert cut == []
    if size == 72861 - 10:
        assert path.read_bytes() == (V / "v1_truncated.ffr").read_bytes()


def test_truncated_inside_the_tables_is_refused_at_open(tmp_path):
    for size in (12, 50, 107):  # the count is there, the crc/offset tables are not whole
        path = _cut(tmp_path, BYTES, size)
        with pytest.raises(
            FFRecordError, match=rf"^{re.escape(str(path))}: .*do not fit in the file's {size} bytes"
        ):
            FileReader(path)
    path = _cut(tmp_path, BYTES, 7)
    with pytest.raises(FFRecordError, match=rf"^{re.escape(str(path))}: too short"):
        FileReader(path)


def test_truncated_part_of_a_folder_names_the_part(tmp_path):
    m = MANIFEST["v1_parts.ffr"]
    folder = tmp_path / "parts.ffr"
    folder.mkdir()
    for part in sorted((V / "v1_parts.ffr").glob("*.ffr")):
        (folder / part.name).write_bytes(part.read_bytes())
    last = folder / "PART_00002.ffr"  # records 4..7 of the dataset, 4 in this file
    with FileReader(last) as r:
        boundary = int(r._files[0].starts[1])
    last.write_bytes(last.read_bytes()[:boundary])
    with FileReader(folder) as r:
        assert [_sha(b) for b in r.read(range(5))] == m["sha256"][:5]
        with pytest.raises(FFRecordError, match=rf"^{re.escape(str(last))}: record 1: truncated"):
            r.read_one(5)
        bad = r.validate()
        assert _bad_indices(bad) == [1, 2, 3] and [b.rsplit(" ", 1)[1] for b in bad] == ["5]", "6]", "7]"]
        assert r.truncated() == [
            f"{last}: truncated at byte {boundary}: records 1..3 of 4 lie past its end [dataset index 5..7]"
        ]


def test_every_cut_of_a_file_our_writer_makes(tmp_path):
    """Each cut from 0 bytes to the whole file: refused at open exactly while the tables are incomplete; after
    that, a record reads iff none of its bytes was cut, and validate() lists exactly the others."""
    rng = np.random.default_rng(3)
    recs = [rng.bytes(int(k)) for k in (5, 0, 9, 1, 0, 14, 3)]  # empty records on both sides of boundaries
    full = tmp_path / "full.ffr"
    with FileWriter(full, len(recs)) as w:
        for b in recs:
            w.write_one(b)
    raw = full.read_bytes()
    header = 12 + 12 * len(recs)
    ends = np.cumsum([header] + [len(b) for b in recs])[1:]
    path = tmp_path / "cut.ffr"
    for size in range(len(raw) + 1):
        path.write_bytes(raw[:size])
        if size < header:
            with pytest.raises(FFRecordError, match=rf"^{re.escape(str(path))}: "):
                FileReader(path)
            continue
        whole = [i for i in range(len(recs)) if ends[i] <= size]
        with FileReader(path) as r:
            for i in range(len(recs)):
                if i in whole:
                    assert r.read_one(i) == recs[i], (size, i)
                else:
                    with pytest.raises(FFRecordError, match=rf"^{re.escape(str(path))}: record {i}: "):
                        r.read_one(i)
            assert _bad_indices(r.validate()) == [i for i in range(len(recs)) if i not in whole], size
