"""Faults injected for real: Ctrl-C and exact resume, kill -9 during checkpoint writes, a dead rank, NaN loss,
a full disk. Each checks that nothing is lost."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from launch.local import free_port

REPO = Path(__file__).resolve().parents[1]
HELPER = str(REPO / "tests" / "helpers" / "ckpt_worker.py")
# Small and fast: a narrow DANet-18 on digits, a checkpoint every 2 steps.
SMALL = ["model.width=8", "train.epochs=2", "train.log_every_steps=1", "train.checkpoint_every_steps=2"]
EMA = "train.ema_decay=0.9"  # the runs compared bitwise also keep an EMA shadow, which must resume exactly too


def _env(**extra) -> dict:
    e = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    e.update(PYTHONPATH=str(REPO), **extra)
    return e


def launch(cwd: Path, run_dir: str, *args: str, env: dict | None = None, timeout: int = 600):
    return subprocess.run([sys.executable, "-m", "orchestrator", "launch", "--run-dir", run_dir,
                           f"data.root={REPO}/.cache/data/digits", *SMALL, *args], cwd=cwd, env=env or _env(),
                          capture_output=True, text=True, timeout=timeout)


def launch_until(cwd: Path, run_dir: str, pattern: str, *args: str, timeout: int = 300) -> subprocess.Popen:
    """Start a launch and return once its log shows ``pattern`` (the process keeps running)."""
    log = open(cwd / f"{Path(run_dir).name}.log", "w")
    p = subprocess.Popen([sys.executable, "-m", "orchestrator", "launch", "--run-dir", run_dir,
                          f"data.root={REPO}/.cache/data/digits", *SMALL, *args], cwd=cwd, env=_env(),
                         stdout=log, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + timeout
    while pattern not in (cwd / f"{Path(run_dir).name}.log").read_text():
        assert p.poll() is None, (cwd / f"{Path(run_dir).name}.log").read_text()[-3000:]
        assert time.monotonic() < deadline, f"never saw {pattern!r}"
        time.sleep(0.1)
    return p


def summary(cwd: Path, run_dir: str) -> dict:
    return json.loads((cwd / run_dir / "summary.json").read_text())


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The reference: 14 optimizer steps without interruption."""
    cwd = tmp_path_factory.mktemp("straight")
    r = launch(cwd, "runs/ref", "train.max_steps=14", EMA)
    assert r.returncode == 0, r.stderr[-4000:]
    return summary(cwd, "runs/ref")


def test_ctrl_c_then_resume_is_bitwise_identical(straight, tmp_path):
    p = launch_until(tmp_path, "runs/b", "step 5/", "train.max_steps=14", EMA)
    p.send_signal(signal.SIGINT)
    code = p.wait(timeout=120)
    s = summary(tmp_path, "runs/b")
    assert code != 0 and s["status"] == "interrupted", s
    k = s["steps"]
    assert 5 <= k < 14  # stopped mid-epoch (23 steps per epoch), after step 5
    r = launch(tmp_path, "runs/b", "train.max_steps=14", EMA)
    assert r.returncode == 0, r.stderr[-4000:]
    s2 = summary(tmp_path, "runs/b")
    assert s2["ema_weights_sha256"] == straight["ema_weights_sha256"]  # the EMA shadow resumed, not restarted
    assert s2["ema_weights_sha256"] != s2["weights_sha256"]
    assert s2["status"] == "completed" and s2["steps"] == 14 and s2["restarts"] == 1
    # data order, RNG and optimizer state restored: every step's loss bit for bit (the digest covers them all)
    assert s2["loss_digest"] == straight["loss_digest"] and s2["loss_tail"] == straight["loss_tail"]
    assert s2["weights_sha256"] == straight["weights_sha256"]  # bitwise identical final weights
    assert s2["mlflow_run_id"] == s["mlflow_run_id"]  # one MLflow run across the restart


def test_a_second_ctrl_c_stops_the_ranks_at_once_and_the_run_still_resumes(tmp_path):
    """A stop that does not end (here a rank frozen, as by a hung file system) is cut short by a second Ctrl-C:
    the launcher kills its ranks and exits 130 (an interrupt, as a sweep counts it); the checkpoint protocol is
    crash-safe, so the next launch resumes."""
    p = launch_until(tmp_path, "runs/k", "step 5/", "train.max_steps=12")
    ranks = [c for c in psutil.Process(p.pid).children(recursive=True) if "train" in " ".join(c.cmdline())]
    next(c for c in ranks if c.environ().get("RANK") == "1").suspend()  # SIGSTOP: the stop cannot be agreed
    p.send_signal(signal.SIGINT)
    time.sleep(3)
    assert p.poll() is None  # the first Ctrl-C waits for the ranks' checkpoint, which cannot come
    p.send_signal(signal.SIGINT)
    assert p.wait(timeout=60) == 130
    gone, alive = psutil.wait_procs(ranks, timeout=10)
    assert not alive, [a.pid for a in alive]
    log = (tmp_path / "k.log").read_text()
    assert "launch: SIGINT: every rank saves a checkpoint and stops" in log and "SIGINT again: killing" in log, log
    r = launch(tmp_path, "runs/k", "train.max_steps=12")
    assert r.returncode == 0, r.stderr[-4000:]
    s = summary(tmp_path, "runs/k")
    assert s["status"] == "completed" and s["steps"] == 12 and s["restarts"] == 1, s


def test_a_stop_in_progress_is_reported_until_the_ranks_end(capsys, monkeypatch):
    """The launcher says which ranks are still stopping, and since when, while a stop lasts (every 30 s; 0.2 s
    here): a long checkpoint never looks like a hang."""
    from launch import local

    monkeypatch.setattr(local, "STOP_REPORT_S", 0.2)
    procs = [subprocess.Popen([sys.executable, "-c", f"import time; time.sleep({d})"]) for d in (0.1, 1.0)]
    stops = local._Stops(procs)
    stops.first_at = time.monotonic()  # as the first Ctrl-C leaves it
    assert local._wait(procs, 60, stops) == 0
    err = capsys.readouterr().err
    assert "launch: rank(s) 1 still stopping" in err and "Ctrl-C again to stop them at once" in err, err
    assert "rank(s) 0" not in err  # rank 0 had ended


def test_a_crash_after_an_epoch_resumes_identically_with_gradient_accumulation(tmp_path):
    """Micro-batches of 16 accumulated in pairs (2 ranks, global 64; 719 train samples per rank): an epoch's
    micro-batches come in whole pairs, so it ends on an optimizer step, and a run killed after its epoch-end
    checkpoint resumes into the same steps as a straight run. (45 micro-batches left one over: its gradient was
    still in the engine, not in the checkpoint, and the straight run added it to the next epoch's first step.)"""
    acc = ("train.micro_batch_size=16", "train.max_steps=27", "train.checkpoint_every_steps=0")
    r = launch(tmp_path, "runs/ref", *acc)
    assert r.returncode == 0, r.stderr[-4000:]
    ref = summary(tmp_path, "runs/ref")
    p = launch_until(tmp_path, "runs/b", "epoch 1/2 done", *acc)
    ckpt = tmp_path / "runs/b/checkpoints"
    deadline = time.monotonic() + 60
    while not ((ckpt / "LATEST").is_file() and (ckpt / (ckpt / "LATEST").read_text().strip() / "COMPLETE").is_file()):
        assert p.poll() is None and time.monotonic() < deadline, "no epoch-end checkpoint"
        time.sleep(0.05)
    for proc in [*psutil.Process(p.pid).children(recursive=True), psutil.Process(p.pid)]:
        proc.kill()  # a node lost: no signal, nothing saved after the epoch's checkpoint
    p.wait(timeout=60)
    r = launch(tmp_path, "runs/b", *acc)
    assert r.returncode == 0, r.stderr[-4000:]
    s = summary(tmp_path, "runs/b")
    assert s["status"] == "completed" and s["steps"] == 27 and s["restarts"] == 1, s
    assert s["loss_digest"] == ref["loss_digest"] and s["weights_sha256"] == ref["weights_sha256"]


def test_stop_at_max_steps_then_continue_is_identical(straight, tmp_path):
    r = launch(tmp_path, "runs/c", "train.max_steps=9", EMA)
    assert r.returncode == 0, r.stderr[-4000:]
    r = launch(tmp_path, "runs/c", "train.max_steps=14", EMA)
    assert r.returncode == 0, r.stderr[-4000:]
    s = summary(tmp_path, "runs/c")
    assert s["loss_digest"] == straight["loss_digest"] and s["weights_sha256"] == straight["weights_sha256"]
    assert s["loss_tail"] == straight["loss_tail"] and len(s["loss_tail"]) == 14 and "loss_history" not in s
    assert s["ema_weights_sha256"] == straight["ema_weights_sha256"]
    # the checkpoint's loop state holds the same digest and tail, no per-step list
    import torch

    loop = torch.load(tmp_path / "runs/c/checkpoints" / s["latest_checkpoint"] / "rank0.pt", weights_only=False)["loop"]
    assert "history" not in loop and loop["loss_digest"] == s["loss_digest"] and loop["loss_tail"] == s["loss_tail"]
    # the whole curve is in MLflow: its per-step "loss" values chain to the same digest
    from mlflow.tracking import MlflowClient

    from orchestrator.train.loop import chain_loss_digest

    points = MlflowClient(straight["mlflow_tracking_uri"]).get_metric_history(straight["mlflow_run_id"], "loss")
    assert [p.step for p in sorted(points, key=lambda p: p.step)] == list(range(1, 15))
    digest = ""
    for p in sorted(points, key=lambda p: p.step):
        digest = chain_loss_digest(digest, p.value)
    assert digest == straight["loss_digest"]


def test_loop_state_and_summary_do_not_grow_with_steps():
    """A checkpoint's loop state (torch.save, as CheckpointManager writes it) and summary.json's loss fields are
    the same size after 150 steps and after 50,000; the digest still tells the two curves apart."""
    import io
    import random

    import torch

    from orchestrator.train.loop import LOSS_TAIL, LoopState

    rng = random.Random(0)
    last = [rng.uniform(0.1, 3.0) for _ in range(LOSS_TAIL)]  # the same tail, so JSON float widths match
    sizes, digests = [], []
    for steps in (150, 50_000):
        state = LoopState(step=steps, samples=steps * 64, epoch=steps // 23)
        for _ in range(steps - LOSS_TAIL):
            state.record_loss(rng.uniform(0.1, 3.0))
        for v in last:
            state.record_loss(v)
        buf = io.BytesIO()
        torch.save({"loop": state.to_dict()}, buf)
        sizes.append((len(buf.getvalue()), len(json.dumps(state.loss_summary(), indent=2))))
        digests.append(state.loss_digest)
        assert state.loss_tail == last and state.loss_summary()["final_train_loss"] == last[-1]
    (ckpt_a, summ_a), (ckpt_b, summ_b) = sizes
    assert summ_a == summ_b and abs(ckpt_a - ckpt_b) <= 8, sizes  # ints of another width: a byte or two
    assert digests[0] != digests[1]
    # a loop state saved before the digest (every loss in "history") resumes into the same digest and tail
    old = {**state.to_dict(), "history": [0.5, 0.25, 1.0]}
    del old["loss_digest"], old["loss_tail"]
    fresh = LoopState()
    for v in (0.5, 0.25, 1.0):
        fresh.record_loss(v)
    restored = LoopState(**old)
    assert restored.loss_digest == fresh.loss_digest and restored.loss_tail == [0.5, 0.25, 1.0]


def test_resume_with_another_number_of_ranks(tmp_path):
    r = launch(tmp_path, "runs/w", "train.max_steps=5")  # 2 ranks x 32, stops mid-epoch
    assert r.returncode == 0, r.stderr[-4000:]
    r = launch(tmp_path, "runs/w", "train.max_steps=8", "launch.local_ranks=1")  # 1 rank x 64: same global batch
    assert r.returncode == 0, r.stderr[-4000:]
    assert "resuming with 1 ranks x micro-batch 64 (was 2 x 32): epoch position 5 -> 5 batches" in r.stderr
    s = summary(tmp_path, "runs/w")
    assert s["status"] == "completed" and s["steps"] == 8 and s["restarts"] == 1 and s["world_size"] == 1
    # Under ZeRO > 0 another world size is refused before any rank starts: tests/test_cli_contract.py (the CLI,
    # nothing written) and tests/test_presets.py (preflight on the real ZeRO-1 checkpoints of the presets' runs).


def _corrupt_one_record(root: Path) -> tuple[Path, int]:
    """Flip a byte inside the payload of one train record (headers stay valid); returns (file, record)."""
    from orchestrator.data.ffrecord import FileReader

    with FileReader(root / "train.ffr") as r:
        path, j = r.locate(r.n // 2)
        spans = r._files[r.files.index(path)]
        offset = int(spans.starts[j]) + (int(spans.ends[j]) - int(spans.starts[j])) // 2
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))
    return Path(path), j


def test_corrupt_record_is_named_at_launch_or_mid_run_and_nothing_is_lost(tmp_path):
    import shutil

    data = tmp_path / "digits"
    shutil.copytree(REPO / ".cache" / "data" / "digits", data)
    original = {p: p.read_bytes() for p in (data / "train.ffr").glob("*.ffr")}
    path, record = _corrupt_one_record(data)
    where = [f"data.root={data}"]

    # launch checks every CRC of a small dataset (data.verify=auto): one line, exit 2, nothing written
    r = subprocess.run([sys.executable, "-m", "orchestrator", "launch", "--run-dir", "runs/x", *SMALL, *where],
                       cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert "corrupt FFRecord dataset" in last and path.name in last and f"record {record}" in last, last
    assert not (tmp_path / "runs").exists()

    # headers only: the run meets the record mid-epoch; exit 2 with the same one line, checkpoints kept
    r = subprocess.run([sys.executable, "-m", "orchestrator", "launch", "--run-dir", "runs/y", *SMALL, *where,
                        "data.verify=header"], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                       timeout=600)  # fmt: skip
    assert r.returncode == 2, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("orchestrator: error: corrupt FFRecord dataset") and f"record {record}" in last, last
    s = summary(tmp_path, "runs/y")
    assert s["status"] == "failed" and f"record {record}" in s["error"], s
    # repaired data: the same --run-dir resumes from what was kept
    for p, content in original.items():
        p.write_bytes(content)
    target = s["steps"] + 2
    r = launch(tmp_path, "runs/y", f"train.max_steps={target}", *where)
    assert r.returncode == 0, r.stderr[-4000:]
    s2 = summary(tmp_path, "runs/y")
    assert s2["status"] == "completed" and s2["steps"] == target
    assert s2["restarts"] == (1 if s["steps"] >= 2 else 0)  # resumed when a checkpoint had been written


def test_kill_9_during_checkpoint_writes_never_leaves_a_partial_latest(tmp_path):
    r = subprocess.run([sys.executable, HELPER, "crash", str(tmp_path / "run"), "20"], env=_env(MASTER_PORT="29700"),
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    reports = [json.loads(ln) for ln in r.stdout.splitlines() if ln.startswith("{")]
    assert len(reports) == 21  # 20 kills, each followed by a check of what it left
    for t in reports:
        assert t["error"] is None, t
        if t["tag"] is not None:  # (a step saved again goes to its twin, stepN.1)
            assert t["tag"] in (f"step{t['step']:08d}", f"step{t['step']:08d}.1"), t
    steps = [t["step"] for t in reports]
    assert steps == sorted(steps) and steps[-1] >= 10  # progress survives the kills, never goes back


def test_dead_rank_ends_the_job_promptly_and_relaunch_resumes(tmp_path):
    p = launch_until(tmp_path, "runs/d", "step 5/", "launch.rank_timeout_s=30")
    ranks = [c for c in psutil.Process(p.pid).children(recursive=True) if "train" in " ".join(c.cmdline())]
    victim = next(c for c in ranks if "RANK" in c.environ() and c.environ()["RANK"] == "1")
    t0 = time.monotonic()
    victim.send_signal(signal.SIGKILL)
    code = p.wait(timeout=120)
    elapsed = time.monotonic() - t0
    assert code != 0 and elapsed < 60, elapsed
    log = (tmp_path / "d.log").read_text()
    assert "rank 1 exited" in log
    r = launch(tmp_path, "runs/d", "train.max_steps=8")
    assert r.returncode == 0, r.stderr[-4000:]
    s = summary(tmp_path, "runs/d")
    assert s["status"] == "completed" and s["restarts"] >= 1 and s["steps"] == 8


def test_a_run_dir_in_use_is_refused_and_a_killed_launcher_takes_its_ranks_with_it(tmp_path):
    """One job per run directory (launch/runlock.py), and no orphans: a second `launch` or a hand-started
    `train` in a running job's run directory is refused in one line (exit 2); the launcher SIGKILLed (nothing
    forwarded) leaves ranks that checkpoint, exit, and resume on the next launch."""
    p = launch_until(tmp_path, "runs/o", "step 3/")
    ranks = [c for c in psutil.Process(p.pid).children(recursive=True) if "train" in " ".join(c.cmdline())]
    assert len(ranks) == 2
    second = launch(tmp_path, "runs/o")
    direct = subprocess.run([sys.executable, "-m", "orchestrator", "train", "--run-dir", "runs/o",
                             f"data.root={REPO}/.cache/data/digits", *SMALL], cwd=tmp_path, env=_env(),
                            capture_output=True, text=True, timeout=300)
    for r in (second, direct):
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1, r.stderr[-3000:]
        assert f"--run-dir runs/o is in use by a running job (pid {p.pid} on " in lines[0], lines
    assert not (tmp_path / "runs/o/ERROR").exists() and p.poll() is None  # the refusals wrote and stopped nothing
    p.kill()  # the launcher alone, by SIGKILL: it forwards nothing
    p.wait(timeout=30)
    gone, alive = psutil.wait_procs(ranks, timeout=120)
    assert not alive, [a.pid for a in alive]
    s = summary(tmp_path, "runs/o")
    assert s["status"] == "interrupted" and 3 <= s["steps"] < 46, s  # stopped as by Ctrl-C, mid-run
    assert "its launcher (pid" in (tmp_path / "o.log").read_text()
    r = launch(tmp_path, "runs/o")
    assert r.returncode == 0, r.stderr[-4000:]
    s2 = summary(tmp_path, "runs/o")
    assert s2["status"] == "completed" and s2["steps"] == 46 and s2["restarts"] == 1, s2


def test_an_orphaned_rank_that_does_not_stop_exits_after_its_grace(tmp_path):
    """follow_launcher's deadline: a rank that ignores the stop (a save stuck on a dead peer) still exits
    grace_s after its launcher died, with every thread's stack on stderr."""
    rank = ("import signal, sys, time; from launch.local import follow_launcher; "
            "signal.signal(signal.SIGTERM, signal.SIG_IGN); assert follow_launcher(grace_s=1.0, poll_s=0.1); "
            "print('ready', flush=True); time.sleep(600)")
    launcher = ("import os, subprocess, sys, time; "
                f"c = subprocess.Popen([sys.executable, '-c', {rank!r}], env={{**os.environ, "
                "'DANET_LAUNCHER_PID': str(os.getpid())}, stdout=sys.stdout, stderr=open(sys.argv[1], 'w')); "
                "print(c.pid, flush=True); time.sleep(600)")
    p = subprocess.Popen([sys.executable, "-c", launcher, str(tmp_path / "rank.err")], env=_env(),
                         stdout=subprocess.PIPE, text=True)
    child = psutil.Process(int(p.stdout.readline()))
    assert p.stdout.readline().strip() == "ready"
    p.kill()
    p.wait(timeout=30)
    t0 = time.monotonic()
    child.wait(timeout=30)  # (not our child: its exit code is its reaper's)
    assert time.monotonic() - t0 < 15
    err = (tmp_path / "rank.err").read_text()
    assert f"its launcher (pid {p.pid}) is gone" in err and "most recent call first" in err, err


def test_a_stalled_step_is_reported_with_where_every_thread_is(tmp_path):
    """A step that does not finish (here step 5 sleeps 5 s on every rank, as on a hung read) is reported by each
    rank after train.stall_report_s, with every thread's stack pointing at the stall; the run then goes on."""
    r = launch(tmp_path, "runs/st", "train.max_steps=8", "train.stall_report_s=2",
               env=_env(ORCHESTRATOR_FAULT_STALL="5:5"))
    assert r.returncode == 0, r.stderr[-4000:]
    out = r.stdout + r.stderr
    for rank in (0, 1):
        assert re.search(rf"\[rank {rank}\] no training step has finished for [2-4]s \(the last was step 4\); "
                         "where every thread is:", out), out[-4000:]
    report = out[out.index("no training step has finished"):]
    assert report.splitlines()[1].strip() == "thread MainThread:", report[:3000]  # the loop's thread first
    assert "in _injected_stall" in report, report[:3000]
    assert "the last was step" not in out.replace("the last was step 4", ""), "only the stalled step is reported"
    assert summary(tmp_path, "runs/st")["steps"] == 8


def test_the_stall_watch_counts_steps_only(caplog):
    """Not before the first step (compilation, autotuning), not while paused (evaluation, checkpoints)."""
    import logging

    from orchestrator.train.stall import StallWatch

    caplog.set_level(logging.WARNING, logger="orchestrator.train")
    with StallWatch(0.3, poll_s=0.05) as watch:
        time.sleep(0.8)  # no step yet
        watch.beat(1)
        with watch.paused():
            time.sleep(0.8)  # an evaluation
        assert not caplog.records
        time.sleep(0.6)  # then a stall
    assert caplog.records and "(the last was step 1)" in caplog.records[0].getMessage()
    n = len(caplog.records)
    time.sleep(0.5)
    assert len(caplog.records) == n  # closed with its block
    with StallWatch(0) as off:  # train.stall_report_s=0
        off.beat(1)
        time.sleep(0.3)
    assert len(caplog.records) == n


@pytest.mark.parametrize("policy", ["skip", "stop"])
def test_nan_loss_policy(policy, tmp_path):
    r = subprocess.run([sys.executable, "-m", "orchestrator", "launch", "--run-dir", "runs/n",
                        f"data.root={REPO}/.cache/data/digits", *SMALL, "train.max_steps=6",
                        "launch.local_ranks=1", f"train.nan_policy={policy}"], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                       env=_env(ORCHESTRATOR_FAULT_NAN_STEPS="5"))
    s = summary(tmp_path, "runs/n")
    if policy == "skip":
        assert r.returncode == 0 and s["status"] == "completed" and s["nan_skipped"] == 1, r.stderr[-3000:]
        assert "micro-batch skipped" in r.stderr
    else:
        assert r.returncode != 0 and s["status"] == "failed" and "non-finite loss at step 5" in s["error"]
        assert s["latest_checkpoint"] == "step00000004"  # the last good checkpoint is kept
    from mlflow.tracking import MlflowClient

    run = MlflowClient(s["mlflow_tracking_uri"]).get_run(s["mlflow_run_id"])
    assert run.info.status == ("FINISHED" if policy == "skip" else "FAILED")


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
@pytest.mark.parametrize("again", [2, 1], ids=["next-step", "same-step-again"])
def test_disk_full_during_checkpoint_keeps_the_previous_one(tmp_path, again):
    """A full disk in the next checkpoint, or in the same step saved again (an epoch's end after its
    step-interval save): the error names the kept one, which is whole and loads (a same-step save never writes
    over the checkpoint LATEST names)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], check=True)
    try:
        r = subprocess.run([sys.executable, HELPER, "diskfull", str(mnt), str(again)],
                           env=_env(MASTER_PORT=str(free_port())), capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        got = json.loads(r.stdout.strip().splitlines()[-1])
    finally:
        subprocess.run(["umount", "-l", str(mnt)])
    assert got["second"] == "error" and f"checkpoint step{again:08d}{'.1' if again == 1 else ''} could not" in got["message"]
    assert "no space left on device" in got["message"] and "previous checkpoint step00000001 kept" in got["message"]
    assert got["latest"] == got["first"] == "step00000001" and got["loaded_step"] == 1
    assert got["leftovers"] == ["step00000001"]  # the partial tag was removed


RAISE_AFTER_JOIN = """
import sys, torch.distributed as tdist
from orchestrator.errors import UserError
from orchestrator.train import worker
def bad(*a):  # what a rank meets after joining: a dataset that fails to open, say
    assert tdist.is_initialized()
    raise UserError("bad input after joining")
worker._loaders = bad
try:
    worker.run(None, sys.argv[1], sys.argv[2:])
except UserError as e:
    print("raised:", e, "| process group still joined:", tdist.is_initialized())
"""


def test_rank_that_fails_in_setup_leaves_the_process_group(tmp_path):
    """A rank whose setup raises after joining leaves the group before it exits: a gloo group still joined at the
    interpreter's teardown can abort the process (SIGABRT), turning bad input's exit 2 into a crash."""
    env = _env(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()), DS_ACCELERATOR="cpu")
    r = subprocess.run([sys.executable, "-c", RAISE_AFTER_JOIN, str(tmp_path / "run"),
                        f"data.root={REPO}/.cache/data/digits", *SMALL], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "raised: bad input after joining | process group still joined: False" in r.stdout, r.stdout + r.stderr[-2000:]



FAIL_AFTER_START = """
import json, sys
from orchestrator.errors import UserError
from orchestrator.train import worker
def fit(job):  # what a stop's checkpoint on a full disk raises, after the tracker started
    raise UserError("checkpoint step00000003 could not be written (no space left on device)")
worker.fit = fit
try:
    worker.run(None, sys.argv[1], sys.argv[2:])
except UserError as e:
    print("raised:", e)
"""


def test_a_failure_after_tracking_started_ends_the_run_failed(tmp_path):
    """An exception out of training or its end (a stop's checkpoint on a full disk, the final evaluation, the
    weights' export) leaves summary.json saying failed with the error, and the MLflow run FAILED, not RUNNING."""
    from mlflow.tracking import MlflowClient

    env = _env(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()), DS_ACCELERATOR="cpu")
    r = subprocess.run([sys.executable, "-c", FAIL_AFTER_START, str(tmp_path / "run"),
                        f"data.root={REPO}/.cache/data/digits", *SMALL], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "raised: checkpoint step00000003" in r.stdout, r.stdout + r.stderr[-3000:]
    s = summary(tmp_path, "run")
    assert s["status"] == "failed" and "no space left on device" in s["error"] and s["mlflow_run_id"], s
    run = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(s["mlflow_run_id"])
    assert run.info.status == "FAILED", run.info.status
