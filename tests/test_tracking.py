"""The MLflow tracker against a REAL `mlflow server` (sqlite backend, own process group; tests/mlflow_server.py).

Covered: params / metrics / artifacts / tags / system metrics visible over HTTP; the server killed mid-run and
restarted on the same port (no call blocks, buffered metrics arrive); a stalled server; stop-and-resume into one
run with continuous steps and no duplicate-param error; terminal statuses; requeue leaving the run RUNNING;
metrics saved across a restart when the store is down at the end; `runs list` / `runs compare` / `ui`.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow_server import MlflowServer, free_port

from orchestrator.config.schema import Config
from orchestrator.tracking import MlflowTracker, NoopTracker, create_tracker, default_tags, util
from orchestrator.tracking import cli as tcli

if not hasattr(sys.modules.get("conftest"), "mlflow_server"):  # tests/conftest.py normally provides them
    from conftest_tracking import mlflow_server, mlflow_server_factory, mlflow_server_proc  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
RANK0 = SimpleNamespace(rank=0, world_size=1, num_nodes=1, local_world_size=1, job_id="")


def make_cfg(uri: str, experiment: str, **tracking) -> Config:
    cfg = Config()
    cfg.tracking.tracking_uri = uri
    cfg.tracking.experiment = experiment
    cfg.tracking.log_system_metrics = False
    for k, v in tracking.items():
        setattr(cfg.tracking, k, v)
    return cfg


def client(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def steps(uri, run_id, key):
    return sorted(m.step for m in client(uri).get_metric_history(run_id, key))


def timed_log(tr, metrics, step) -> float:
    t = time.perf_counter()
    tr.log_metrics(metrics, step=step)
    return time.perf_counter() - t


@pytest.fixture
def fast_retry(monkeypatch):
    monkeypatch.setattr(MlflowTracker, "MAX_BACKOFF", 1.0)


@pytest.fixture(scope="module")
def _outage_server(tmp_path_factory):
    """A private server the outage tests kill, stall and restart (shared by them: a cold start costs seconds)."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-outage"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def outage_server(_outage_server):
    if _outage_server.proc is None or not _outage_server.healthy(timeout=5):
        _outage_server.restart()
    yield _outage_server
    proc = _outage_server.proc
    if proc is not None:
        try:
            os.killpg(proc.pid, signal.SIGCONT)
        except ProcessLookupError:
            pass


# ---------------------------------------------------------------- no server needed


def test_noop_on_other_ranks_and_backend_none(tmp_path):
    cfg = Config()
    for r in (1, 3):
        tr = create_tracker(
            cfg, tmp_path, SimpleNamespace(rank=r, world_size=4, num_nodes=2, local_world_size=2, job_id="7")
        )
        assert isinstance(tr, NoopTracker) and not isinstance(tr, MlflowTracker)
        tr.start().log_params(cfg)
        tr.log_metrics({"loss": 1.0}, step=0)
        tr.log_artifact(tmp_path)
        tr.finish("completed")
        assert tr.run_id is None
    cfg.tracking.backend = "none"
    assert not isinstance(create_tracker(cfg, tmp_path, RANK0), MlflowTracker)
    assert not (tmp_path / "mlflow_run.json").exists()


def test_store_resolution_and_run_name(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri, loc = util.resolve_store("", "", cwd=tmp_path)
    assert uri == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert loc == (tmp_path / "mlartifacts").resolve().as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    assert util.resolve_store("", "", cwd=tmp_path) == ("http://127.0.0.1:1", None)
    assert util.resolve_store("http://h:5000", "", cwd=tmp_path)[0] == "http://h:5000"
    cfg = Config()
    cfg.model.name, cfg.model.T, cfg.preset = "danet152", 4, "danet152_imagenet"
    tr = create_tracker(cfg, tmp_path, RANK0)
    assert tr.tracking_uri == "http://127.0.0.1:1"
    assert tr.experiment_name == "danet152_imagenet"
    assert tr.run_name.startswith("danet152-T4-") and len(tr.run_name) == len("danet152-T4-20260101-000000")


def test_flatten():
    flat = util.flatten({"a": {"b": 1, "c": [1, 2], "d": {}}, "e": None, "f": True})
    assert flat == {"a.b": "1", "a.c": "[1, 2]", "a.d": "{}", "e": "None", "f": "True"}
    flat = util.flatten(Config())
    assert flat["model.neuron.surrogate"] == "atan" and flat["model.da.domain"] == "membrane"
    assert flat["deepspeed.extra"] == "{}"


def test_default_tags(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "4240")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "2")
    ri = SimpleNamespace(rank=0, world_size=8, num_nodes=2, local_world_size=4, job_id="4242")
    tags = default_tags(Config(), ri)
    assert tags["slurm.job_id"] == "4242" and tags["slurm.array_job_id"] == "4240"
    assert tags["slurm.array_task_id"] == "2"
    assert tags["world_size"] == "8" and tags["nodes"] == "2" and tags["ranks_per_node"] == "4"
    for k in ("host", "command", "gpus_per_node", "version.torch", "version.python"):
        assert tags[k], k
    assert all(isinstance(v, str) for v in tags.values())


def test_unreachable_store_never_blocks_and_drops_oldest(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(MlflowTracker, "START_TIMEOUT", 0.5)
    cfg = make_cfg(f"http://127.0.0.1:{free_port()}", "nowhere", buffer_size=10)
    caplog.set_level(logging.WARNING, logger="orchestrator.tracking")
    t = time.monotonic()
    tr = create_tracker(cfg, tmp_path / "run", RANK0).start()
    tr.log_params(cfg)
    worst = max(timed_log(tr, {"loss": float(s), "acc": 0.5}, s) for s in range(25))
    assert worst < 1.0
    kept = [m[3] for m in tr._buffer.snapshot()]
    assert len(kept) == 10 and kept[-1] == 24  # the newest are kept
    deadline = time.monotonic() + 60  # the worker imports mlflow first (seconds on a loaded machine)
    while tr._outage_since is None and time.monotonic() < deadline:
        time.sleep(0.1)
    t = time.monotonic()
    tr.finish("failed", timeout=1.0)
    assert time.monotonic() - t < 15
    msgs = [r.getMessage() for r in caplog.records]
    assert sum("buffer full" in m for m in msgs) == 1
    assert sum("unreachable (" in m for m in msgs) == 1


def test_local_sqlite_default_store(tmp_path, monkeypatch):
    """No URI anywhere: ./mlflow.db with artifacts in ./mlartifacts, beside the working directory."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    cfg = make_cfg("", "local")
    tr = create_tracker(cfg, tmp_path / "run", RANK0).start()
    assert tr.run_id
    tr.log_params({"x": 1})
    tr.log_metrics({"loss": 0.5}, step=3)
    (tmp_path / "summary.json").write_text("{}")
    tr.log_artifact(tmp_path / "summary.json")
    tr.finish("completed")
    assert (tmp_path / "mlflow.db").exists()
    assert list((tmp_path / "mlartifacts").rglob("summary.json"))
    run = client(tr.tracking_uri).get_run(tr.run_id)
    assert run.info.status == "FINISHED" and run.data.params["x"] == "1" and run.data.metrics["loss"] == 0.5


def test_exit_without_finish_flushes_queued_metrics(tmp_path):
    """A process that ends without finish() (a crash path the loop missed) still sends what it queued."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    code = (
        "import sys; from types import SimpleNamespace as S\n"
        "from orchestrator.config.schema import Config\n"
        "from orchestrator.tracking import create_tracker\n"
        f"c = Config(); c.tracking.tracking_uri = {uri!r}; c.tracking.log_system_metrics = False\n"
        f"t = create_tracker(c, {str(tmp_path / 'run')!r}, S(rank=0)).start()\n"
        # a new sqlite store takes its migrations first: beyond START_TIMEOUT on a loaded machine
        "t._run_ready.wait(120)\n"
        "[t.log_metrics({'loss': float(s)}, step=s) for s in range(50)]\n"
        "print(t.run_id)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    run_id = out.stdout.split()[-1]
    assert steps(uri, run_id, "loss") == list(range(50))
    assert client(uri).get_run(run_id).info.status == "RUNNING"  # the status is the loop's to decide


# ---------------------------------------------------------------- real server


def test_logs_params_metrics_artifacts_over_http(mlflow_server, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")
    cfg = make_cfg(mlflow_server, "demo", log_system_metrics=True)
    cfg.model.name = "danet18"
    ri = SimpleNamespace(rank=0, world_size=2, num_nodes=1, local_world_size=2, job_id="99")
    tr = create_tracker(cfg, tmp_path / "run", ri).start()
    assert tr.run_id and tr.experiment_id
    tr.log_params(cfg)
    many = {f"extra.p{i:03d}": i for i in range(250)}  # > MLflow's 100 params per request
    many["extra.long"] = "x" * 7000  # > MLflow's 6000-character value limit
    tr.log_params(many)
    tr.set_tags({"note": "hello"})
    worst = 0.0
    for s in range(1, 301):
        worst = max(worst, timed_log(tr, {"train/loss": 1.0 / s, "lr": 0.1, "train/img_per_s": 100.0 + s}, s))
    assert worst < 1.0
    (tmp_path / "config.yaml").write_text("model:\n  name: danet18\n")
    tr.log_artifact(tmp_path / "config.yaml")
    ckpt = tmp_path / "best.pt"
    ckpt.write_bytes(b"weights-v1")
    tr.log_checkpoint(ckpt, "checkpoints")
    ckpt.unlink()  # rotated away right after the call: the staged copy is what gets uploaded
    time.sleep(2.5)  # a couple of system metrics samples
    tr.finish("completed")

    c = client(mlflow_server)
    run = c.get_run(tr.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name.startswith("danet18-T4-")
    p = run.data.params
    assert p["model.neuron.surrogate"] == "atan" and p["model.neuron.tau"] == "2.0"
    assert p["extra.p249"] == "249" and len(p["extra.long"]) == util.MAX_PARAM_VAL_LENGTH
    assert steps(mlflow_server, tr.run_id, "train/loss") == list(range(1, 301))
    t = run.data.tags
    assert t["note"] == "hello" and t["world_size"] == "2" and t["job_id"] == "99" and t["host"]
    assert any(k.startswith("system/") for k in run.data.metrics), sorted(run.data.metrics)
    arts = {a.path for a in c.list_artifacts(tr.run_id)} | {
        a.path for a in c.list_artifacts(tr.run_id, "checkpoints")
    }
    assert {"config.yaml", "checkpoints/best.pt"} <= arts
    local = c.download_artifacts(tr.run_id, "checkpoints/best.pt", str(tmp_path / "dl"))
    assert Path(local).read_bytes() == b"weights-v1"
    assert not (tmp_path / "run" / ".mlflow_staging").exists()


def test_resume_into_same_run_continuous_steps(mlflow_server, tmp_path, monkeypatch):  # noqa: F811
    run_dir = tmp_path / "run"
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    cfg = make_cfg(mlflow_server, "resume")
    tr = create_tracker(cfg, run_dir, RANK0).start()
    tr.log_params(cfg)
    for s in range(10):
        tr.log_metrics({"train/loss": 1.0 / (s + 1)}, step=s)
    tr.finish("requeued")
    run_id = tr.run_id
    assert client(mlflow_server).get_run(run_id).info.status == "RUNNING"

    cfg2 = make_cfg(mlflow_server, "resume")
    cfg2.train.epochs = 7  # changed on restart: must not raise, logged under a new key
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    tr2 = create_tracker(cfg2, run_dir, RANK0).start()
    assert tr2.run_id == run_id and tr2.resume_index == 1
    tr2.log_params(cfg2)
    for s in range(10, 20):
        tr2.log_metrics({"train/loss": 1.0 / (s + 1)}, step=s)
    tr2.finish("completed")

    c = client(mlflow_server)
    run = c.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert steps(mlflow_server, run_id, "train/loss") == list(range(20))
    assert run.data.params["train.epochs"] == "1" and run.data.params["resume.1.train.epochs"] == "7"
    assert run.data.tags["resume.1.changed_params"] == "train.epochs" and run.data.tags["resumes"] == "1"
    assert run.data.tags["slurm.restart_count"] == "1"  # this start's tags replace the previous ones
    assert len(c.search_runs([run.info.experiment_id])) == 1
    line = next(ln for ln in tcli.runs_compare([run_id], mlflow_server).splitlines() if "train.epochs" in ln)
    assert "7 (resume 1)" in line


@pytest.mark.parametrize(
    "status,expected",
    [("completed", "FINISHED"), ("failed", "FAILED"), ("interrupted", "KILLED"), ("requeued", "RUNNING")],
)
def test_terminal_status(mlflow_server, tmp_path, status, expected):  # noqa: F811
    tr = create_tracker(make_cfg(mlflow_server, "status"), tmp_path / "run", RANK0).start()
    tr.log_metrics({"loss": 1.0}, step=0)
    tr.finish(status)
    run = client(mlflow_server).get_run(tr.run_id)
    assert run.info.status == expected
    assert run.data.tags["end_status"] == status
    assert run.data.metrics["loss"] == 1.0


def test_server_killed_and_restarted(outage_server, tmp_path, fast_retry, caplog):
    server = outage_server
    caplog.set_level(logging.INFO, logger="orchestrator.tracking")
    tr = create_tracker(make_cfg(server.uri, "outage"), tmp_path / "run", RANK0).start()
    tr.log_params({"a": 1})
    for s in range(10):
        tr.log_metrics({"loss": float(s)}, step=s)
    assert tr.flush(30)

    server.stop()  # SIGKILL to the whole group, mid-run
    worst = 0.0
    for s in range(10, 40):
        worst = max(worst, timed_log(tr, {"loss": float(s), "lr": 0.01}, s))
        time.sleep(0.1)  # ~3 s of "training" while the store is down
    (tmp_path / "during.txt").write_text("logged during the outage")
    tr.log_artifact(tmp_path / "during.txt")
    t = time.monotonic()
    assert tr.flush(1.5) is False
    assert time.monotonic() - t < 2.5
    assert worst < 1.0

    server.start()  # same port, same store
    t = time.monotonic()
    tr.finish("completed", timeout=60)
    assert time.monotonic() - t < 30
    c = client(server.uri)
    run = c.get_run(tr.run_id)
    assert run.info.status == "FINISHED"
    assert steps(server.uri, tr.run_id, "loss") == list(range(40))
    assert steps(server.uri, tr.run_id, "lr") == list(range(10, 40))
    assert "during.txt" in {a.path for a in c.list_artifacts(tr.run_id)}
    msgs = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert sum("unreachable (" in m for m in msgs) == 1, msgs
    assert sum("reachable again" in m for m in msgs) == 1, msgs


def test_server_stalled(outage_server, tmp_path, fast_retry, monkeypatch):
    """A server that accepts connections but never answers (SIGSTOP): calls still return at once."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    server = outage_server
    tr = create_tracker(make_cfg(server.uri, "stall"), tmp_path / "run", RANK0).start()
    tr.log_metrics({"loss": 0.0}, step=0)
    assert tr.flush(30)
    os.killpg(server.proc.pid, signal.SIGSTOP)
    try:
        worst = 0.0
        for s in range(1, 30):
            worst = max(worst, timed_log(tr, {"loss": float(s)}, s))
            time.sleep(0.1)
        assert worst < 1.0
    finally:
        os.killpg(server.proc.pid, signal.SIGCONT)
    tr.finish("completed", timeout=60)
    assert steps(server.uri, tr.run_id, "loss") == list(range(30))
    assert client(server.uri).get_run(tr.run_id).info.status == "FINISHED"


def test_a_requeue_does_not_wait_for_an_upload_in_flight(outage_server, tmp_path, fast_retry, monkeypatch):
    """finish("requeued") runs between Slurm's warning and the time limit, and the batch script still has to
    requeue the job after it: an artifact upload hanging on a stalled server is given up at the timeout, not
    waited on for ARTIFACT_GRACE (600 s) as at a run's real end."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "300")
    server = outage_server
    tr = create_tracker(make_cfg(server.uri, "requeue-upload"), tmp_path / "run", RANK0).start()
    tr.log_metrics({"loss": 0.0}, step=0)
    assert tr.flush(30)
    big = tmp_path / "weights.bin"
    big.write_bytes(os.urandom(8 << 20))
    os.killpg(server.proc.pid, signal.SIGSTOP)
    try:
        tr.log_artifact(str(big), "weights")
        time.sleep(1.0)  # the upload is in flight, on a server that never answers
        t = time.monotonic()
        tr.finish("requeued", timeout=3)
        took = time.monotonic() - t
    finally:
        os.killpg(server.proc.pid, signal.SIGCONT)
    assert took < 30, took


def test_store_down_at_finish_then_resume_sends_saved_metrics(outage_server, tmp_path, fast_retry):
    server = outage_server
    run_dir = tmp_path / "run"
    cfg = make_cfg(server.uri, "spill")
    tr = create_tracker(cfg, run_dir, RANK0).start()
    for s in range(5):
        tr.log_metrics({"loss": float(s)}, step=s)
    assert tr.flush(30)
    server.stop()
    for s in range(5, 10):
        tr.log_metrics({"loss": float(s)}, step=s)
    t = time.monotonic()
    tr.finish("requeued", timeout=2)
    assert time.monotonic() - t < 10
    assert len((run_dir / "mlflow_pending.jsonl").read_text().splitlines()) == 5

    server.start()
    tr2 = create_tracker(cfg, run_dir, RANK0).start()
    assert tr2.run_id == tr.run_id
    for s in range(10, 12):
        tr2.log_metrics({"loss": float(s)}, step=s)
    tr2.finish("completed")
    assert steps(server.uri, tr.run_id, "loss") == list(range(12))
    assert not (run_dir / "mlflow_pending.jsonl").exists()


def test_runs_list_and_compare(mlflow_server, tmp_path):  # noqa: F811
    ids = []
    for i, epochs in enumerate((1, 3)):
        cfg = make_cfg(mlflow_server, "compare", run_name=f"cmp-{i}")
        cfg.train.epochs = epochs
        tr = create_tracker(cfg, tmp_path / f"run{i}", RANK0).start()
        tr.log_params(cfg)
        tr.log_metrics({"val/top1": 0.5 + i / 10, "train/loss": 1.0 - i / 10}, step=10)
        tr.finish("completed")
        ids.append(tr.run_id)
    listing = tcli.runs_list("compare", mlflow_server)
    assert all(r in listing for r in ids) and "cmp-0" in listing and "val/top1" in listing
    out = tcli.runs_compare(ids, mlflow_server)
    assert all(r in out for r in ids) and "cmp-0" in out and "cmp-1" in out
    line = next(ln for ln in out.splitlines() if "train.epochs" in ln)
    assert line.lstrip().startswith("*") and "1" in line and "3" in line
    assert "val/top1" in out and "0.6" in out and "model.neuron.surrogate" in out
    assert ids[1] in tcli.runs_compare(["cmp-1"], mlflow_server)  # by run name too
    from orchestrator.errors import UserError

    with pytest.raises(UserError):
        tcli.runs_compare(["0" * 32], mlflow_server)
    with pytest.raises(UserError):
        tcli.runs_list("no-such-experiment", mlflow_server)


def test_ui_serves_local_store_and_stops_cleanly(tmp_path):
    """`ui` against a sqlite store: prints its URL, answers, and Ctrl-C takes the whole group down."""
    port = free_port()
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    code = f"from orchestrator.tracking.cli import ui; ui({uri!r}, {port})"
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        start_new_session=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        # started as a background job of a script would be: SIGINT inherited as ignored, so Python installs no
        # Ctrl-C handler of its own; ui() must still stop on SIGINT
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    try:
        line = proc.stdout.readline()
        assert f"http://127.0.0.1:{port}" in line, line
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
            assert r.status == 200
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        import socket

        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0
    finally:
        if proc.poll() is None:  # SIGTERM lets ui() stop its server group (SIGKILL would orphan it)
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


# ---------------------------------------------------------------- MLflow as a user meets it, figures

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path) -> None:
    """A real, non-blank PNG: the signature, then decoded by PIL and by matplotlib."""
    import matplotlib.image as mpimg
    from PIL import Image

    data = Path(path).read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    with Image.open(path) as im:
        im.load()
        assert im.format == "PNG" and im.width >= 300 and im.height >= 200, (path, im.size)
    pixels = mpimg.imread(path)
    assert pixels.ndim == 3 and float(pixels.std()) > 0.01, path  # something is drawn


def fake_run(c, exp_id: str, name: str, params: dict, val_curve: list[float], tags: dict | None = None) -> str:
    """A finished run with params and a val_top1 curve, written straight through the client (no training)."""
    from mlflow.entities import Metric, Param

    run = c.create_run(exp_id, run_name=name, tags=tags or {})
    ts = int(time.time() * 1000)
    c.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in params.items()],
                metrics=[Metric("val_top1", v, ts + i, i + 1) for i, v in enumerate(val_curve)], synchronous=True)
    c.set_terminated(run.info.run_id)
    return run.info.run_id


def log_tiny_training(tr, steps: int = 6, best: float = 0.8) -> None:
    """The metrics the loop and the Telemetry callback log, for a few steps (two "epochs")."""
    for s in range(1, steps + 1):
        tr.log_metrics({"loss": 2.0 / s, "lr": 0.01 * s / steps, "train_top1": 0.1 * s}, step=s)
        if s % (steps // 2) == 0:
            rates = {f"telemetry/firing_rate/layer/stages.{i // 2}.branches.0.neurons.{i % 2}": 0.05 + i / 50
                     for i in range(8)}
            tr.log_metrics({"val_top1": best * s / steps, "telemetry/firing_rate/mean": 0.12, **rates}, step=s)


def test_run_in_mlflow_parent_dataset_source_model_figures_and_resume(mlflow_server, tmp_path, digits_dataset):  # noqa: F811
    """A child run (mlflow.parentRunId), its dataset inputs, source tags, the experiment's kind, the best weights
    as a logged + registered model, and its figures; a requeue and two more starts keep one run, one parent link,
    two inputs and one model."""
    import hashlib
    import json
    import uuid

    c = client(mlflow_server)
    exp_name = f"structure-{uuid.uuid4().hex[:8]}"
    exp_id = c.create_experiment(exp_name)  # made by someone else, without a kind: the tracker adds it
    parent = c.create_run(exp_id, run_name="sweep-parent").info.run_id
    model_name = f"danet-test-{uuid.uuid4().hex[:8]}"
    cfg = make_cfg(mlflow_server, exp_name, parent_run_id=parent, register_model=model_name)
    cfg.data.root = str(digits_dataset)
    run_dir = tmp_path / "run"
    weights = tmp_path / "best.pt"
    weights.write_bytes(b"best weights, epoch 2")

    tr = create_tracker(cfg, run_dir, RANK0).start()
    tr.log_params(cfg)
    log_tiny_training(tr)
    tr.log_model(weights, {"val_top1": 0.8}, step=6)
    tr.finish("requeued")  # no model and no figures yet: the run goes on in the next job
    run_id = tr.run_id
    assert not c.search_logged_models([exp_id]) and not c.list_artifacts(run_id, "figures")

    cfg2 = make_cfg(mlflow_server, exp_name, register_model=model_name)  # the requeued job: no parent given
    cfg2.data.root = str(digits_dataset)
    tr2 = create_tracker(cfg2, run_dir, RANK0).start()
    assert tr2.run_id == run_id
    tr2.log_metrics({"loss": 0.1}, step=7)  # never beats the best: the candidate saved by the first job counts
    tr2.finish("completed")
    tr3 = create_tracker(cfg2, run_dir, RANK0).start()  # a relaunch of the finished run: nothing duplicated
    tr3.finish("completed")

    run = c.get_run(run_id)
    t = run.data.tags
    assert t["mlflow.parentRunId"] == parent
    assert t["mlflow.source.type"] == "LOCAL" and t["mlflow.source.name"] == "orchestrator train"
    assert c.get_experiment(exp_id).tags["mlflow.experimentKind"] == "custom_model_development"
    assert {r.info.run_id for r in c.search_runs([exp_id])} == {parent, run_id}

    meta = (digits_dataset / "meta.json").read_bytes()
    counts = json.loads(meta)["counts"]
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert sorted(inputs) == ["digits-train", "digits-val"]
    for split, context in (("train", "training"), ("val", "validation")):
        d = inputs[f"digits-{split}"]
        assert d.dataset.digest == hashlib.sha256(meta).hexdigest()[:12]
        assert json.loads(d.dataset.profile)["num_records"] == counts[split]
        assert {(x.key, x.value) for x in d.tags} == {("mlflow.data.context", context)}

    models = c.search_logged_models([exp_id])
    assert len(models) == 1
    m = models[0]
    assert m.source_run_id == run_id and str(m.status).endswith("READY")
    assert [(x.key, x.value, x.step) for x in m.metrics] == [("val_top1", 0.8, 6)]
    assert m.params["model.name"] == "danet18" and m.params["data.name"] == "digits"
    assert [o.model_id for o in run.outputs.model_outputs] == [m.model_id]
    arts = {a.path for a in c.list_logged_model_artifacts(m.model_id)}
    assert {"best.pt", "MLmodel"} <= arts, arts
    import mlflow.artifacts

    got = mlflow.artifacts.download_artifacts(artifact_uri=f"{m.artifact_location}/best.pt",
                                              dst_path=str(tmp_path / "model"), tracking_uri=mlflow_server)
    assert Path(got).read_bytes() == b"best weights, epoch 2"
    versions = c.search_model_versions(f"name='{model_name}'")
    assert len(versions) == 1 and versions[0].run_id == run_id and versions[0].source == f"models:/{m.model_id}"

    figs = sorted(a.path for a in c.list_artifacts(run_id, "figures"))
    assert figs == ["figures/curves.png", "figures/firing_rate.png"]
    for f in figs:
        assert_png(c.download_artifacts(run_id, f, str(tmp_path / "dl")))
        assert_png(run_dir / f)


def test_default_run_name_made_unique_explicit_name_kept(mlflow_server, tmp_path):  # noqa: F811
    import uuid

    exp = f"names-{uuid.uuid4().hex[:8]}"
    names = []
    for i, unique in enumerate((True, True, False)):
        tr = MlflowTracker(tracking_uri=mlflow_server, artifact_location=None, experiment=exp, run_name="danet18-T4-x",
                           run_dir=tmp_path / f"r{i}", log_system_metrics=False, unique_name=unique)
        tr.start().finish("completed")
        names.append(client(mlflow_server).get_run(tr.run_id).info.run_name)
    assert names == ["danet18-T4-x", "danet18-T4-x-2", "danet18-T4-x"]  # an explicit name is used as given


def test_architecture_and_varying_params():
    from orchestrator.tracking import figures

    assert figures.architecture({"model.name": "danet34", "model.connection": "default", "model.da.domain": "spike",
                                 "model.da.span": "stage"}) == (34, "DA (spike, stage)")
    assert figures.architecture({"model.name": "sew_resnet50"}) == (50, "SEW (ADD)")
    assert figures.architecture({"model.name": "danet18", "model.connection": "membrane"}) == (18, "membrane shortcut")
    assert figures.architecture({"model.name": "danet152", "model.da.weights": "fixed"})[1] == "DA (membrane, network, fixed)"
    runs = [{"model.name": "danet18", "tracking.run_name": "a", "optim.lr": "0.1", "derived.device": "cpu"},
            {"model.name": "danet34", "tracking.run_name": "b", "optim.lr": "0.1", "derived.device": "cuda"}]
    assert figures.varying_params(runs) == ["model.name"]


def test_comparison_figures_and_runs_compare_out(mlflow_server, tmp_path):  # noqa: F811
    """Depth x connection runs give the val-top-1-against-depth figure; other varying params give bars; both with
    the overlaid curves; `runs compare --out` writes the same."""
    import uuid

    from orchestrator.errors import UserError
    from orchestrator.tracking.figures import comparison_figures

    c = client(mlflow_server)
    exp_id = c.create_experiment(f"cmpfig-{uuid.uuid4().hex[:8]}")
    grid = []
    for depth in (18, 34):
        for conn in ("default", "sew_add"):
            grid.append(fake_run(c, exp_id, f"danet{depth}-{conn}", {
                "model.name": f"danet{depth}", "model.connection": conn, "tracking.run_name": f"{depth}{conn}",
                "train.epochs": 2}, [0.3, 0.5 + depth / 200 - (conn == "sew_add") * 0.1]))
    out = comparison_figures(mlflow_server, grid, tmp_path / "grid")
    assert [p.name for p in out] == ["val_top1_vs_depth.png", "val_top1_curves.png"]
    for p in out:
        assert_png(p)

    other = [fake_run(c, exp_id, f"lr{lr}", {"model.name": "danet18", "optim.lr": lr}, [0.2, 0.4 + lr])
             for lr in (0.1, 0.2)]
    text = tcli.runs_compare(other, mlflow_server, out=tmp_path / "bars")
    assert [p.name for p in sorted((tmp_path / "bars").iterdir())] == ["val_top1_by_param.png", "val_top1_curves.png"]
    for p in (tmp_path / "bars").iterdir():
        assert_png(p)
        assert str(p) in text  # listed beside the table
    with pytest.raises(UserError, match="--out"):
        tcli.runs_compare(other, mlflow_server, out="/proc/no-such-dir")
    with pytest.raises(UserError, match="no run"):
        comparison_figures(mlflow_server, ["0" * 32], tmp_path / "x")


def test_training_launch_in_mlflow(mlflow_server, tmp_path, digits_dataset):  # noqa: F811
    """A tiny real training launch (digits, width 4, one epoch, one rank): the loop's best weights become the run's
    logged model with its val top-1, the telemetry its firing-rate figure, the dataset folder its inputs."""
    import json
    import uuid

    exp = f"launch-{uuid.uuid4().hex[:8]}"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    r = subprocess.run([sys.executable, "-m", "orchestrator", "launch", "--run-dir", str(tmp_path / "run"),
                        f"data.root={digits_dataset}", "train.epochs=1", "train.global_batch_size=128",
                        "launch.local_ranks=1", "model.width=4", f"tracking.tracking_uri={mlflow_server}",
                        f"tracking.experiment={exp}", "tracking.log_system_metrics=false"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    c = client(mlflow_server)
    run = c.get_run(s["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["mlflow.source.type"] == "LOCAL"
    # the tracker created this experiment: tagged as model training at creation
    assert c.get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    assert sorted(d.dataset.name for d in run.inputs.dataset_inputs) == ["digits-train", "digits-val"]
    (model,) = c.search_logged_models([run.info.experiment_id])
    assert model.source_run_id == run.info.run_id
    assert [(m.key, round(m.value, 6)) for m in model.metrics] == [("val_top1", round(s["best_val_top1"], 6))]
    assert "best.pt" in {a.path for a in c.list_logged_model_artifacts(model.model_id)}
    assert {a.path for a in c.list_artifacts(run.info.run_id, "figures")} == {"figures/curves.png",
                                                                              "figures/firing_rate.png"}
    for name in ("curves.png", "firing_rate.png"):
        assert_png(tmp_path / "run" / "figures" / name)
