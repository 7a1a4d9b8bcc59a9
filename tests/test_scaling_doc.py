"""docs/SCALING.md is rendered by tools/scaling_doc.py from one per-GPU rate r (issue 14, deliverable 6): the page
matches its rendering, a measured job check's rate moves every figure with it, and bad input writes nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

import scaling_doc as sd  # noqa: E402

MEASURED = {"gpu": "NVIDIA H200", "torch": "2.11.0+cu130", "precision": "bf16-mixed", "micro_batch": 32,
            "dry_run": False, "job_status": "completed", "end_to_end_img_per_s": 250.0, "baseline_img_per_s": 55.9}


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "tools" / "scaling_doc.py"), *args], capture_output=True,
                          text=True, timeout=60)


def test_the_page_is_what_the_rendering_says():
    r = run("--check")
    assert r.returncode == 0, r.stderr


def test_a_measured_rate_moves_every_figure(tmp_path):
    bench = tmp_path / "gpu_train_h200.json"
    bench.write_text(json.dumps(MEASURED))
    out = tmp_path / "SCALING.md"
    r = run("--bench", str(bench), "--out", str(out))
    assert r.returncode == 0, r.stderr
    page = " ".join(out.read_text().split())  # (prose is wrapped)
    assert "**r = 250.0 img/s** in steady state on one NVIDIA H200" in page and str(bench) in page
    # at 250 img/s per GPU: 32 / 250 = 0.128 s per step; 8 GPUs read 2,000 img/s x 110 KB = 220 MB/s and go
    # through ImageNet in 1,281,167 / 2,000 = 641 s
    assert "Step time = 32 / r = **0.13 s**" in page
    assert "| 1 (8) | 2,000 | 220 MB/s | 220 MB/s | 11 min |" in page
    assert "| 64 (512) | 128,000 | 14.1 GB/s | 220 MB/s | 10 s |" in page
    # a faster step makes the all-reduce a larger share: 24 ms of 128 ms across nodes over IB
    assert "| 4 (32) | 481 MB (240) | - | 24 ms (12) | 40 ms (20) | 19% / 31% |" in page
    assert "up to 4 nodes (880 MB/s) any parallel FS" in page  # 16 nodes would need 3.5 GB/s
    assumed = " ".join(sd.render(sd.Rate(37.5)).split())
    assert "Step time = 32 / r = **0.85 s**" in assumed and "| 1 (8) | 300 | 33 MB/s | 33 MB/s | 71 min |" in assumed
    assert "**assumption**" in assumed and "**assumption**" not in page


def test_a_measurement_in_docs_bench_is_the_default(tmp_path, monkeypatch):
    monkeypatch.setattr(sd, "BENCH", tmp_path)
    (tmp_path / "gpu_train_cpu-dry-run.json").write_text(json.dumps({**MEASURED, "dry_run": True}))
    assert sd.default_rate().measured is None  # a dry run does not count: the assumed rate
    (tmp_path / "gpu_train_h200.json").write_text(json.dumps(MEASURED))
    (tmp_path / "gpu_train_h100.json").write_text(json.dumps({**MEASURED, "end_to_end_img_per_s": 180.0}))
    got = sd.default_rate()  # one file per GPU kind: the fastest
    assert got.img_per_s == 250.0 and got.source.endswith("gpu_train_h200.json")


@pytest.mark.parametrize("content, says", [
    (None, "no such file"),
    ("not json", "cannot read it as JSON"),
    (json.dumps({**MEASURED, "dry_run": True}), "it is a CPU dry run"),
    (json.dumps({**MEASURED, "job_status": "failed"}), "its job status is 'failed', not 'completed'"),
    (json.dumps({**MEASURED, "end_to_end_img_per_s": None}), "it has no end_to_end_img_per_s"),
    (json.dumps([1, 2]), "not a job check's JSON object"),
])
def test_bad_bench_is_one_line_exit_2_and_writes_nothing(tmp_path, content, says):
    bench = tmp_path / "bench.json"
    if content is not None:
        bench.write_text(content)
    out = tmp_path / "SCALING.md"
    r = run("--bench", str(bench), "--out", str(out))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and says in lines[0], r.stderr
    assert not out.exists()
