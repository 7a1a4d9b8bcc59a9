"""Slurm: the rendered sbatch script (a pure function, checked against a stored expected script) and the same
machinery on a REAL local cluster (scripts/slurm-up.sh: 4 nodes in "multiple slurmd" mode, fake GPUs).

The cluster tests skip only when Slurm cannot be had at all (no sbatch, and slurm-up.sh could not install and
start it); a cluster that is installed but does not come up is a failure. They run 4 CPU ranks of a tiny digits
model (T=1, width 4) so the whole file fits in a few minutes on 2 cores. The requeue job trains in the background
while the later jobs run, because most of its time is spent waiting for the time-limit warning.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers.procs import slurm_rank_pid

from launch import slurm
from orchestrator.config import load_config, to_yaml
from orchestrator.errors import UserError

REPO = Path(__file__).resolve().parents[1]
EXPECTED = REPO / "tests" / "data" / "expected_sbatch_digits.sh"
DIGITS_ROOT = REPO / ".cache" / "data" / "digits"
# CPU-size overrides: a narrow DANet-18 over one time step, 4 ranks x 16 images. With several 4-rank jobs on 2
# shared cores, one rank can finish importing minutes after another: the rendezvous gets 4 minutes (a dead rank
# still ends the job at once through srun --kill-on-bad-exit).
TINY = ["model.width=4", "model.T=1", "train.global_batch_size=64", "train.log_every_steps=1",
        "tracking.log_system_metrics=false", "tracking.log_checkpoints=false", "launch.rank_timeout_s=240"]
# 4 nodes x 1 task, fake GPU each, 1 CPU per task: what every cluster test asks of sbatch.
SHAPE = ["--nodes=4", "--ntasks-per-node=1", "--gpus-per-node=1", "--cpus-per-task=1"]


# --- render: pure ------------------------------------------------------------------------------------------------
def _render(**kw) -> str:
    cfg = load_config("digits", ["launch.account=snn", "launch.extra_sbatch=[--exclusive]"])
    args = dict(run_dir="/scratch/runs/digits-test", config_arg="digits",
                overrides=["train.epochs=1", "model.T=2", "tracking.run_name=a b's $HOME"], nodes=4,
                gpus_per_node=1, partition="debug", time="00:20:00", home="/opt/danet-orchestrator")
    args.update(kw)
    return slurm.render_sbatch(cfg, **args)


def test_render_matches_expected_script():
    text = _render()
    if os.environ.get("UPDATE_EXPECTED") == "1":
        EXPECTED.write_text(text)
    assert text == EXPECTED.read_text(), "rendered script changed; review it and rerun with UPDATE_EXPECTED=1"
    assert text == _render()  # pure: same arguments, same text


def test_render_header_and_argument_quoting(tmp_path):
    text = _render()
    sb = [ln.split(None, 1)[1] for ln in text.splitlines() if ln.startswith("#SBATCH ")]
    assert sb[:3] == ["--job-name=digits", "--nodes=4", "--ntasks-per-node=1"]
    for opt in ("--gpus-per-node=1", "--cpus-per-task=1", "--time=00:20:00", "--partition=debug",
                "--account=snn", "--signal=B:USR2@60", "--requeue", "--open-mode=append",
                "--output=/scratch/runs/digits-test/slurm-%j.out", "--exclusive"):
        assert opt in sb
    # The overrides reach the ranks byte for byte, whatever they contain.
    preamble = text.split(slurm.BODY)[0]
    script = tmp_path / "pre.sh"
    script.write_text(preamble + '\nprintf "%s\\n" "$config" "$run_dir" "$@"\n')
    out = subprocess.run(["bash", str(script)], capture_output=True, text=True, check=True).stdout.splitlines()
    assert out == ["digits", "/scratch/runs/digits-test", "train.epochs=1", "model.T=2",
                   "tracking.run_name=a b's $HOME"]
    subprocess.run(["bash", "-n", "-c", text], check=True)


def test_cpu_device_requests_no_gpus():
    cfg = load_config("digits", ["train.device=cpu"])
    text = slurm.render_sbatch(cfg, "/r", "digits", [], nodes=2, gpus_per_node=3, home="/h")
    assert "--gpus-per-node" not in text and "#SBATCH --ntasks-per-node=3" in text


@pytest.mark.parametrize("limit,configured,lead", [
    ("2-00:00:00", 300, 300),  # the paper's run: the configured lead
    ("00:30:00", 60, 60),
    ("00:03:00", 300, 45),  # a quarter of a short limit
    ("00:02:00", 300, 30),  # never below 30 s
    ("INFINITE", 300, 300),
])
def test_signal_lead_shrinks_for_short_limits(limit, configured, lead):
    assert slurm.signal_lead(slurm.parse_time(limit), configured) == lead


@pytest.mark.parametrize("text,secs", [("30", 1800), ("05:30", 330), ("01:02:03", 3723), ("2-00", 172800),
                                       ("1-02:03", 93780), ("1-00:00:10", 86410), ("UNLIMITED", None)])
def test_parse_time(text, secs):
    assert slurm.parse_time(text) == secs


@pytest.mark.parametrize("limit", ["00:01:00", "soon", "0"])
def test_bad_or_too_short_limit_is_user_error(limit):
    with pytest.raises(UserError):
        _render(time=limit)


def test_danet152_script_is_the_shared_body_with_paper_defaults():
    text = (REPO / "slurm" / "danet152.sh").read_text()
    assert slurm.BODY in text, "slurm/danet152.sh must carry launch/slurm.py's BODY verbatim"
    sb = {ln.split()[1].split("=")[0]: ln.split()[1] for ln in text.splitlines() if ln.startswith("#SBATCH ")}
    assert sb["--nodes"] == "--nodes=4" and sb["--ntasks-per-node"] == "--ntasks-per-node=8"
    assert sb["--gpus-per-node"] == "--gpus-per-node=8" and sb["--signal"].startswith("--signal=B:USR2@")
    assert {"--requeue", "--open-mode", "--output"} <= set(sb) and sb["--output"] == "--output=%x-%j.out"
    assert "config=danet152_imagenet" in text
    # Counts come from the allocation, so sbatch's command-line flags win: srun must not repeat them.
    srun = [ln for ln in text.splitlines() if ln.lstrip().startswith("srun ")]
    assert len(srun) == 1 and "--kill-on-bad-exit=1" in srun[0]
    assert not re.search(r"\s(-n|-N|--ntasks|--nodes|--gpus)", srun[0])
    subprocess.run(["bash", "-n", str(REPO / "slurm" / "danet152.sh")], check=True)


def test_no_slurm_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch anywhere
    with pytest.raises(UserError, match="sbatch is not on PATH"):
        slurm.submit("#!/bin/bash\n", tmp_path / "run")
    env = {**os.environ, "PATH": str(tmp_path)}
    p = subprocess.run([sys.executable, "-m", "orchestrator", "launch", "--nodes", "2", "--config", "digits",
                        "--run-dir", str(tmp_path / "r")], capture_output=True, text=True, env=env, cwd=tmp_path,
                       timeout=300)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "sbatch" in p.stderr


def test_launch_dry_run_prints_the_script(tmp_path):
    p = subprocess.run([sys.executable, "-m", "orchestrator", "launch", "--nodes", "4", "--gpus-per-node", "1",
                        "--config", "digits", "--run-dir", str(tmp_path / "r"), "--time", "00:03:00", "--dry-run",
                        "train.epochs=1"], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("#!/bin/bash") and "#SBATCH --signal=B:USR2@45" in p.stdout
    assert slurm.BODY in p.stdout and not (tmp_path / "r").exists()


# --- the batch shell's decisions, with stub srun / scontrol (runs everywhere) -----------------------------------
STUB_SRUN = r"""#!/bin/bash
while [ $# -gt 0 ]; do [ "$1" = --run-dir ] && rd=$2; shift; done
printf '%s' "${DANET_RUN_LOCK_JOB:-}" > "$rd/.lock-job"  # what the tasks are told of the run lock
case $STUB in
  ok) exit 0 ;;
  requeue) echo 5 > "$rd/REQUEUE"; exit 3 ;;
  fail) echo "srun: error: node2: task 1: Killed"; exit 137 ;;
  wait) trap 'echo 7 > "$rd/REQUEUE"; exit 3' USR2; touch "$rd/started"; while :; do sleep 0.1; done ;;
esac
"""


def _batch_shell(tmp_path: Path, stub: str, signal_after_start: bool = False, real_python: bool = False,
                 **env_extra: str) -> tuple[int, str, Path]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    python = (f'#!/bin/sh\nPYTHONPATH={REPO} exec {sys.executable} "$@"\n' if real_python
              else "#!/bin/sh\nexit 0\n")
    for name, text in (("srun", STUB_SRUN), ("python", python),
                       ("scontrol", '#!/bin/sh\necho "$@" >> "$STUB_LOG"\n')):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    run_dir = tmp_path / "run"
    script = tmp_path / "job.sh"
    script.write_text(slurm.render_sbatch(load_config("digits"), run_dir, "digits", ["train.epochs=1"], nodes=4,
                                          gpus_per_node=1, home=tmp_path))
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "STUB": stub, "STUB_LOG": str(tmp_path / "scontrol.log"),
           "SLURM_JOB_ID": "42", "SLURM_JOB_NAME": "digits", "SLURM_NTASKS": "4", "SLURM_JOB_NUM_NODES": "4",
           "SLURM_JOB_NODELIST": "node[1-4]", "SLURM_SUBMIT_DIR": str(tmp_path), **env_extra}
    p = subprocess.Popen(["bash", str(script)], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    if signal_after_start:
        deadline = time.monotonic() + 30
        while not (run_dir / "started").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        p.send_signal(signal.SIGUSR2)  # what --signal=B:USR2@lead does
    out, _ = p.communicate(timeout=60)
    return p.returncode, out, tmp_path / "scontrol.log"


def test_batch_shell_completes_fails_and_requeues(tmp_path):
    rc, out, calls = _batch_shell(tmp_path, "ok")
    assert rc == 0 and "training finished" in out and not calls.exists()
    rc, out, calls = _batch_shell(tmp_path, "fail")
    assert rc == 137 and "task 1: Killed" in out and "training step failed with exit code 137" in out
    assert not calls.exists()
    rc, out, calls = _batch_shell(tmp_path, "requeue")
    assert rc == 0 and calls.read_text() == "requeue 42\n" and "checkpoint at step 5" in out
    assert not (tmp_path / "run" / "REQUEUE").exists() and (tmp_path / "run" / ".requeued-at").read_text() == "5\n"
    # The same step again: no progress since the last requeue -> fail instead of looping.
    rc, out, calls = _batch_shell(tmp_path, "requeue")
    assert rc == 1 and "no progress since the previous requeue" in out and calls.read_text() == "requeue 42\n"


def test_batch_shell_forwards_the_warning_to_the_step(tmp_path):
    rc, out, calls = _batch_shell(tmp_path, "wait", signal_after_start=True)
    assert rc == 0 and "pre-timeout signal" in out and "checkpoint at step 7" in out
    assert calls.read_text() == "requeue 42\n"


def test_batch_shell_refuses_a_run_dir_in_use_and_a_requeued_start_waits(tmp_path):
    """The batch shell holds RUN_DIR/.run.lock for the job (launch/runlock.py): a job in a run directory another
    job is using is refused with the holder named, exit 2, before srun; a requeued start waits for the lock."""
    from launch import runlock

    run_dir = tmp_path / "run"
    with runlock.acquire(run_dir):  # another job: this process
        rc, out, _ = _batch_shell(tmp_path, "ok", real_python=True)
    assert rc == 2 and "training finished" not in out, out
    assert f"is in use by a running job (pid {os.getpid()} on " in out and "choose another --run-dir" in out, out
    rc, out, _ = _batch_shell(tmp_path, "ok")  # free again: it runs, and names itself as the holder
    assert rc == 0 and "training finished" in out, out
    assert json.loads((run_dir / runlock.LOCK_NAME).read_text())["slurm_job"] == "42"
    assert (run_dir / ".lock-job").read_text() == "42"  # so the tasks' rank 0 does not take it a second time
    lock = runlock.acquire(run_dir)
    threading.Timer(2.0, lock.release).start()  # the previous start's lock, gone 2 s into the requeued start
    t0 = time.monotonic()
    rc, out, _ = _batch_shell(tmp_path, "ok", SLURM_RESTART_COUNT="1")
    assert rc == 0 and "training finished" in out and time.monotonic() - t0 >= 1.5, out
    assert "is locked (by this job's previous start?); waiting up to 120 s" in out, out


# --- the real cluster --------------------------------------------------------------------------------------------
def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=kw.pop("timeout", 120), **kw)


def _nodes_up() -> int:
    try:
        p = _run(["sinfo", "-h", "-N", "-t", "idle,mixed,allocated", "-o", "%N"], timeout=20)
    except (OSError, subprocess.SubprocessError):
        return 0
    return len(set(p.stdout.split())) if p.returncode == 0 else 0


@pytest.fixture(scope="module")
def cluster():
    """The local 4-node cluster: already up (make test starts it), else started here and stopped after."""
    conf = Path("/tmp/danet-slurm/etc/slurm.conf")
    if not Path("/etc/slurm/slurm.conf").exists() and conf.exists() and "SLURM_CONF" not in os.environ:
        os.environ["SLURM_CONF"] = str(conf)
    started = False
    if not (shutil.which("sbatch") and _nodes_up() >= 4):
        had_sbatch = bool(shutil.which("sbatch"))
        p = _run(["bash", str(REPO / "scripts" / "slurm-up.sh")], timeout=900)
        if p.returncode != 0:
            reason = (p.stderr.strip().splitlines() or ["slurm-up.sh failed"])[-1]
            if had_sbatch:
                pytest.fail(f"Slurm is installed but the local cluster did not start: {reason}")
            pytest.skip(f"Slurm unavailable: not installed and scripts/slurm-up.sh could not install it: {reason}")
        m = re.search(r"export SLURM_CONF=(\S+)", p.stdout)
        if m:
            os.environ["SLURM_CONF"] = m.group(1)
        started = True
    assert _nodes_up() >= 4, "the local cluster has fewer than 4 nodes up"
    yield
    if started:
        _run(["bash", str(REPO / "scripts" / "slurm-down.sh")], timeout=120)


def _sbatch(args: list[str], cwd: Path, env: dict | None = None) -> str:
    p = _run(["sbatch", "--parsable", *args], cwd=cwd, env={**os.environ, **(env or {})})
    assert p.returncode == 0, p.stderr
    return p.stdout.strip().split(";")[0]


def _state(job: str) -> dict:
    return slurm.job_info(job)


def _wait(job: str, timeout: float, until=None) -> dict:
    """Poll until the job has ended (or ``until(info)`` holds); fails with the log's tail on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = _state(job)
        if (until(info) if until else info.get("JobState") in slurm.FINAL_STATES):
            return info
        time.sleep(1)
    info = _state(job)
    log = Path(info.get("StdOut", "/nonexistent"))
    tail = log.read_text()[-3000:] if log.is_file() else "(no log)"
    _run(["scancel", job])
    pytest.fail(f"job {job} still {info.get('JobState')} after {timeout:.0f} s; log tail:\n{tail}")


def _mlflow_runs(uri: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exps = [e.experiment_id for e in client.search_experiments()]
    return client, client.search_runs(exps)


def _check_completed(job: str, info: dict, run_dir: Path, uri: str) -> dict:
    log = Path(info["StdOut"])
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log.read_text()[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["world_size"] == 4
    client, runs = _mlflow_runs(uri)
    assert [r.info.run_id for r in runs] == [summary["mlflow_run_id"]]
    assert runs[0].info.status == "FINISHED"
    assert client.get_run(summary["mlflow_run_id"]).data.tags.get("slurm.job_id") == job
    return summary


def _digits_yaml(path: Path, overrides: list[str]) -> Path:
    path.write_text(to_yaml(load_config("digits", [f"data.root={DIGITS_ROOT}", *TINY, *overrides])))
    return path


@pytest.fixture(scope="module")
def requeue_job(cluster, tmp_path_factory):
    """Submitted after the first training job (DeepSpeed's op and the page cache are warm) and left running
    while the next ones run: `orchestrator launch --time 00:04:00` over a config that would train for hours.
    The warning (60 s lead: 120-180 s after the start) makes it checkpoint and requeue itself.
    To bound the test, a watcher cuts the config to 2 more steps and gives the job 10 minutes as soon as the
    requeue happened (before the restart, which waits ~10 s): the restarted job resumes, trains those 2 steps
    and completes, and a slow restart on a loaded machine is not warned again."""
    d = tmp_path_factory.mktemp("requeue")
    cfg = _digits_yaml(d / "requeue.yaml", ["train.epochs=100", "train.eval_every_epochs=100"])
    uri = f"sqlite:///{d}/mlflow.db"
    p = _run([sys.executable, "-m", "orchestrator", "launch", "--nodes", "4", "--gpus-per-node", "1",
              "--time", "00:04:00", "--config", str(cfg), "--run-dir", str(d / "run"),
              f"tracking.tracking_uri={uri}"], cwd=d, timeout=300)
    assert p.returncode == 0, p.stderr
    job = re.search(r"submitted job (\d+)", p.stdout).group(1)
    marker = d / "run" / ".requeued-at"
    found: dict = {}

    def watch():
        while "step" not in found and not found.get("stop"):
            if marker.is_file() and marker.read_text().strip():
                step = marker.read_text().strip()
                _digits_yaml(cfg, ["train.epochs=100", "train.eval_every_epochs=100",
                                   f"train.max_steps={int(step) + 2 if step.isdigit() else 2}"])
                _run(["scontrol", "update", f"JobId={job}", "TimeLimit=00:10:00"])
                found["step"] = step
            time.sleep(0.3)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    # Let it start training before the other jobs compete for the CPUs (its warning comes at a fixed time).
    log = d / "run" / f"slurm-{job}.out"
    _wait(job, 300, until=lambda i: i.get("JobState") in slurm.FINAL_STATES
          or (log.is_file() and re.search(r"step \d+/", log.read_text()) is not None))
    yield dict(job=job, dir=d, run_dir=d / "run", config=cfg, uri=uri, t0=time.monotonic(), found=found)
    found["stop"] = True
    if _state(job).get("JobState") not in slurm.FINAL_STATES:
        _run(["scancel", job])


@pytest.mark.slurm
def test_cluster_runs_a_4_node_job(cluster, tmp_path):
    p = _run(["srun", *SHAPE, "bash", "-c", 'echo "$SLURM_PROCID $SLURMD_NODENAME gpu=$CUDA_VISIBLE_DEVICES"'])
    assert p.returncode == 0, p.stderr
    assert sorted(p.stdout.splitlines()) == [f"{r} node{r + 1} gpu=0" for r in range(4)]
    job = _sbatch([*SHAPE, "--wrap", "srun printenv SLURMD_NODENAME", f"--output={tmp_path}/%j.out"], tmp_path)
    info = _wait(job, 60)
    assert info["JobState"] == "COMPLETED"
    assert sorted((tmp_path / f"{job}.out").read_text().split()) == ["node1", "node2", "node3", "node4"]


@pytest.mark.slurm
def test_a_cluster_started_from_a_deleted_folder_writes_clean_job_output(cluster, tmp_path):
    """slurm-up.sh started from a folder that is then deleted (a removed checkout, a test's tmp): the daemons run
    in the state directory, so no job step's slurmstepd inherits the deleted folder and writes 'Unable to get
    current working directory' into the job's output (seen in a job's output before)."""
    doomed = tmp_path / "checkout"
    doomed.mkdir()
    assert _run(["bash", str(REPO / "scripts" / "slurm-down.sh")], timeout=120).returncode == 0
    up = _run(["bash", str(REPO / "scripts" / "slurm-up.sh")], cwd=doomed, timeout=300)
    assert up.returncode == 0, up.stderr
    shutil.rmtree(doomed)
    assert _nodes_up() >= 4
    out = tmp_path / "out"
    out.mkdir()
    job = _sbatch([*SHAPE, "--wrap", "srun printenv SLURMD_NODENAME", f"--output={out}/%j.out"], out)
    assert _wait(job, 60)["JobState"] == "COMPLETED"
    assert sorted((out / f"{job}.out").read_text().split()) == ["node1", "node2", "node3", "node4"]


@pytest.mark.slurm
def test_sbatch_accepts_both_scripts(cluster, tmp_path):
    """--test-only: the paper defaults (4 x 8 GPUs) and a rendered script schedule on this cluster."""
    p = _run(["sbatch", "--test-only", str(REPO / "slurm" / "danet152.sh")], cwd=tmp_path)
    assert p.returncode == 0 and "node[1-4]" in p.stderr, p.stderr
    text = slurm.render_sbatch(load_config("digits"), tmp_path / "r", "digits", [], nodes=4, gpus_per_node=2)
    (tmp_path / "s.sh").write_text(text)
    p = _run(["sbatch", "--test-only", str(tmp_path / "s.sh")], cwd=tmp_path)
    assert p.returncode == 0 and "using 8 processors" in p.stderr and "node[1-4]" in p.stderr, p.stderr


@pytest.mark.slurm
def test_status_logs_and_cancel(cluster, tmp_path):
    job = _sbatch(["--job-name=probe", f"--output={tmp_path}/%x-%j.out", "--wrap",
                   "echo first; sleep 3; echo second"], tmp_path)
    buf = io.StringIO()
    slurm.logs(job, follow=True, out=buf, poll_s=0.3)  # returns once the job has ended
    assert buf.getvalue().split() == ["first", "second"]
    p = _run([sys.executable, "-m", "orchestrator", "status", job], cwd=tmp_path)
    assert p.returncode == 0 and f"job {job} probe: COMPLETED" in p.stdout, p.stdout + p.stderr
    job = _sbatch(["--wrap", "sleep 300", f"--output={tmp_path}/%j.out"], tmp_path)
    _wait(job, 60, until=lambda i: i.get("JobState") == "RUNNING")
    assert job in slurm.status()
    p = _run([sys.executable, "-m", "orchestrator", "cancel", job], cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert _wait(job, 60)["JobState"] == "CANCELLED"
    with pytest.raises(UserError, match="not a Slurm job id"):
        slurm.cancel("12; rm -rf /")


@pytest.mark.slurm
def test_a_bare_srun_job_takes_the_run_lock(cluster, tmp_path):
    """A batch script of the user's own (`srun orchestrator train`; no batch shell holds the lock): its rank 0
    takes the run directory's lock itself, so a run directory in use is refused there too, exit 2, the holder
    named, nothing trained."""
    from launch import runlock

    run_dir = tmp_path / "run"
    train = [sys.executable, "-m", "orchestrator", "train", "--config", "digits", "--run-dir", str(run_dir),
             f"data.root={DIGITS_ROOT}", *TINY, "tracking.backend=none"]
    with runlock.acquire(run_dir):  # another job: this process
        job = _sbatch(["--nodes=1", "--ntasks=1", f"--output={tmp_path}/%j.out", "--wrap",
                       "srun " + " ".join(train)], tmp_path)
        info = _wait(job, 180)
    text = (tmp_path / f"{job}.out").read_text()
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", text[-3000:]
    assert f"is in use by a running job (pid {os.getpid()} on " in text, text[-3000:]
    assert not (run_dir / "summary.json").exists()


@pytest.mark.slurm
def test_danet152_script_trains_on_4_nodes(cluster, tmp_path):
    """`sbatch slurm/danet152.sh` with its own preset (danet152_imagenet: ZeRO 1, SGD, channels_last, auto
    checkpointing, bit spike storage) and only sizes shrunk, on a tiny ImageNet-layout dataset; resource flags
    override the #SBATCH defaults, DATA_ROOT and RUN_DIR come from the environment, submitted from outside the
    repository."""
    from helpers import tiny_imagenet

    data = tiny_imagenet.build(tmp_path / "data")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    sizes = ["model.width=4", f"model.num_classes={tiny_imagenet.CLASSES}", "data.image_size=32",
             "data.val_resize=36", "train.global_batch_size=8", "train.max_steps=2"]
    job = _sbatch([*SHAPE, "--time=00:15:00", "--signal=B:USR2@60", str(REPO / "slurm" / "danet152.sh"),
                   *sizes, f"tracking.tracking_uri={uri}"], tmp_path,
                  env={"DATA_ROOT": str(data), "RUN_DIR": str(tmp_path / "run")})
    info = _wait(job, 420)
    assert Path(info["StdOut"]) == tmp_path / f"danet152-{job}.out"
    summary = _check_completed(job, info, tmp_path / "run", uri)
    assert summary["steps"] == 2 and summary["preset"] == "danet152_imagenet" and summary["model"] == "danet152"
    ran = (tmp_path / "run" / "config.yaml").read_text()
    assert f"root: {data}" in ran and "zero_stage: 1" in ran and "channels_last: true" in ran, ran
    assert summary["latest_checkpoint"] == "step00000002"  # a ZeRO-1 checkpoint written by the 4 ranks


@pytest.mark.slurm
def test_orchestrator_launch_trains_on_4_nodes(cluster, requeue_job, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_dir = tmp_path / "run"
    p = _run([sys.executable, "-m", "orchestrator", "launch", "--nodes", "4", "--gpus-per-node", "1",
              "--time", "00:10:00", "--config", "digits", "--run-dir", str(run_dir), f"data.root={DIGITS_ROOT}",
              *TINY, "train.max_steps=2", f"tracking.tracking_uri={uri}"], cwd=tmp_path, timeout=300)
    assert p.returncode == 0, p.stderr
    job = re.search(r"submitted job (\d+)", p.stdout).group(1)
    assert f"{run_dir}/slurm-{job}.out" in p.stdout and str(run_dir / "checkpoints") in p.stdout
    info = _wait(job, 420)
    assert Path(info["StdOut"]) == run_dir / f"slurm-{job}.out"
    _check_completed(job, info, run_dir, uri)
    assert f"job {job} " in slurm.status(job) and "COMPLETED" in slurm.status(job)


@pytest.mark.slurm
def test_killing_one_rank_fails_the_job_promptly(cluster, requeue_job, tmp_path):
    job = _sbatch([*SHAPE, "--time=00:15:00", "--signal=B:USR2@60", f"--output={tmp_path}/%j.out",
                   str(REPO / "slurm" / "danet152.sh"),
                   "--config", "digits", "--run-dir", str(tmp_path / "run"), f"data.root={DIGITS_ROOT}", *TINY,
                   "train.epochs=100", f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db"], tmp_path)
    log = tmp_path / f"{job}.out"
    _wait(job, 420, until=lambda i: i.get("JobState") in slurm.FINAL_STATES
          or (log.is_file() and re.search(r"step \d+/", log.read_text()) is not None))
    pid = slurm_rank_pid(job, 1)
    assert pid, f"rank 1 of job {job} not found"
    os.kill(pid, signal.SIGKILL)
    t_kill = time.monotonic()
    info = _wait(job, 120)
    elapsed = time.monotonic() - t_kill
    text = log.read_text()
    assert info["JobState"] == "FAILED", text[-3000:]
    assert elapsed < 45, f"job took {elapsed:.0f} s to fail after a rank died"
    assert "task 1: Killed" in text and "training step failed with exit code" in text


@pytest.mark.slurm
def test_time_limit_checkpoints_requeues_and_resumes(requeue_job):
    """The warning arrives, every rank checkpoints, the job requeues itself (SLURM_RESTART_COUNT >= 1), resumes
    from that checkpoint into the same MLflow run and completes (see the requeue_job fixture)."""
    job, run_dir = requeue_job["job"], requeue_job["run_dir"]
    left = 480 - (time.monotonic() - requeue_job["t0"])
    info = _wait(job, max(left, 60), until=lambda i: i.get("JobState") in slurm.FINAL_STATES
                 and (int(i.get("Restarts", 0)) >= 1 or "step" not in requeue_job["found"]))
    step = requeue_job["found"].get("step")
    assert step is not None, "the job ended without being requeued: " + info.get("JobState", "?")
    assert step.isdigit() and int(step) >= 1, f"requeued without a checkpoint (marker {step!r})"
    summary = _check_completed(job, info, run_dir, requeue_job["uri"])
    text = Path(info["StdOut"]).read_text()
    assert int(info["Restarts"]) >= 1 and summary["slurm_restart_count"] >= 1 and summary["restarts"] >= 1
    assert "pre-timeout signal" in text and f"requeueing (checkpoint at step {step};" in text
    assert f"resumed from step{int(step):08d}" in text and summary["steps"] == int(step) + 2
    # One MLflow run whose step metrics continue across the restart: every step once, no gap.
    client, runs = _mlflow_runs(requeue_job["uri"])
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "loss")]
    assert sorted(steps) == list(range(1, int(step) + 3)), steps
