"""`orchestrator sweep`: axes, run names and the array script as pure functions; a 2 x 2 sweep of tiny digits
runs locally (interrupted in its second run, relaunched: the run resumes; relaunched again: nothing re-runs) and
as one job array on the local Slurm cluster (one task requeued by its pre-timeout warning), each against a real
MLflow server: one parent run with the axes as params, four children named by what differs.

The runs are as small as training gets (width 4, T 1-2, 1 rank, 2-4 steps): their cost is start-up.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers.procs import batch_shell_pid, training_catches
from test_slurm import cluster  # noqa: F401 - the local 4-node cluster (module fixture)

from launch import slurm
from orchestrator.config import load_config
from orchestrator.errors import UserError
from orchestrator.sweep import axes as ax
from orchestrator.sweep import spec as sp

REPO = Path(__file__).resolve().parents[1]
DIGITS_ROOT = REPO / ".cache" / "data" / "digits"
EXPECTED_ARRAY = REPO / "tests" / "data" / "expected_sbatch_sweep.sh"
AXES = ["model.T=1,2", "model.connection=spiking,da"]
NAMES = ["danet18-T1-spiking", "danet18-T1-da_membrane_network", "danet18-T2-spiking",
         "danet18-T2-da_membrane_network"]
TINY = [f"data.root={DIGITS_ROOT}", "model.width=4", "train.global_batch_size=32", "train.log_every_steps=1",
        "launch.local_ranks=1", "tracking.log_system_metrics=false", "tracking.log_checkpoints=false"]


def _env() -> dict:
    return {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}


def _sweep(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator", "sweep", *args], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


# --- axes and names: pure -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,values", [
    ("1,2,4", ["1", "2", "4"]),
    ("[0.9,0.99]", ["[0.9,0.99]"]),  # brackets: one list value
    ("[0.9,0.99],[0.9,0.999]", ["[0.9,0.99]", "[0.9,0.999]"]),
    ("'a,b',c", ["'a,b'", "c"]),
    ("{a: 1, b: 2}", ["{a: 1, b: 2}"]),
    ("sew_add", ["sew_add"]),
])
def test_split_values(text, values):
    assert ax.split_values(text) == values


def test_parse_overrides_separates_axes_from_fixed_values():
    fixed, axes = ax.parse_overrides(["train.epochs=3", "model.T=1,2", "optim.betas=[0.9,0.99]",
                                      "model.connection=spiking,sew_add,da"])
    assert fixed == ["train.epochs=3", "optim.betas=[0.9,0.99]"]
    assert axes == [ax.Axis("model.T", ("1", "2")), ax.Axis("model.connection", ("spiking", "sew_add", "da"))]
    combos = ax.expand(axes)
    assert len(combos) == 6 and combos[0] == [("model.T", "1"), ("model.connection", "spiking")]
    assert combos[1] == [("model.T", "1"), ("model.connection", "sew_add")]  # the last axis varies fastest
    assert ax.expand([]) == [[]]


@pytest.mark.parametrize("overrides,match", [
    (["model.T=1,,2"], "empty value"),
    (["model.T=1,2,1"], "lists '1' twice"),
    (["model.T=1,2", "model.T=4"], "given twice"),
    (["model.T"], "not of the form key=value"),
])
def test_bad_axes_are_user_errors(overrides, match):
    with pytest.raises(UserError, match=match):
        ax.parse_overrides(overrides)


def test_short_values_say_what_differs():
    cfg = load_config("digits", ["model.T=4", "optim.lr=0.01", "model.checkpointing=none", "data.hflip=false",
                                 "model.connection=da", "model.da.weights=fixed", "optim.betas=[0.9,0.99]"])
    assert ax.short_value("model.T", cfg) == "T4"
    assert ax.short_value("optim.lr", cfg) == "lr0.01"
    assert ax.short_value("model.checkpointing", cfg) == "checkpointing_none"  # "none" alone says nothing
    assert ax.short_value("data.hflip", cfg) == "no_hflip"
    assert ax.short_value("model.connection", cfg) == "da_membrane_network_fixed"
    # With the DA settings as axes of their own, the connection is only "da" (they name themselves).
    assert ax.short_value("model.connection", cfg, {"model.da.span"}) == "da"
    assert ax.short_value("optim.betas", cfg) == "betas0.9_0.99"


def test_run_names_model_first_then_axis_values_unique():
    cfg = load_config("danet152_imagenet", ["model.connection=da", "model.T=4"])
    assert ax.run_name(cfg, [("model.connection", "da"), ("model.T", "4")]) == "danet152-da_membrane_network-T4"
    cfg = load_config("digits", ["model.name=sew_resnet34", "model.T=2"])
    assert ax.run_name(cfg, [("model.name", "sew_resnet34"), ("model.T", "2")]) == "sew_resnet34-T2"
    assert ax.unique_names(["a", "b", "a", "a", "a-2"]) == ["a", "b", "a-3", "a-4", "a-2"]


def test_build_names_every_run_and_reports_every_problem_at_once():
    spec = sp.build("digits", ["train.epochs=1", *AXES])
    assert [r.name for r in spec.runs] == NAMES and spec.fixed == ["train.epochs=1"]
    assert spec.runs[1].overrides == ["train.epochs=1", "model.T=1", "model.connection=da"]
    with pytest.raises(UserError) as e:
        sp.build("digits", ["model.T=0,2", "model.connection=spiking,dx", "train.epochz=3"])
    lines = str(e.value).splitlines()
    assert any("sweep runs with model.T=0" in ln and "'model.T' must be > 0" in ln for ln in lines), lines
    assert any("sweep runs with model.connection=dx" in ln and "model.connection" in ln for ln in lines), lines
    assert sum("train.epochz" in ln for ln in lines) == 1, lines  # a fixed override's problem: said once


def test_a_relaunch_must_be_the_same_sweep(tmp_path):
    from orchestrator.sweep import state as st

    state = st.SweepState(dir=str(tmp_path), config="digits", fixed=["a.b=1", "c.d=2"],
                          axes=[["model.T", ["1", "2"]]], runs=[])
    st.check_same_sweep(state, "digits", ["c.d=2", "a.b=1"], [["model.T", ["1", "2"]]])  # order of fixed: free
    for config, fixed, axes, what in [("danet18_imagenet", ["a.b=1", "c.d=2"], [["model.T", ["1", "2"]]], "config"),
                                      ("digits", ["a.b=1"], [["model.T", ["1", "2"]]], "overrides"),
                                      ("digits", ["a.b=1", "c.d=2"], [["model.T", ["1", "4"]]], "axes")]:
        with pytest.raises(UserError, match=f"holds another sweep: its {what}"):
            st.check_same_sweep(state, config, fixed, axes)


@pytest.mark.parametrize("overrides,match", [
    (["tracking.run_name=x", "model.T=1,2"], "set by the sweep"),
    (["tracking.experiment=a,b"], "cannot be an axis"),
])
def test_reserved_keys(overrides, match):
    with pytest.raises(UserError, match=match):
        sp.build("digits", overrides)


def test_cli_dry_run_lists_runs_and_writes_nothing(tmp_path):
    p = _sweep("--dry-run", "--run-dir", str(tmp_path / "s"), *AXES, "optim.betas=[0.9,0.99]", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    rows = [ln.split() for ln in p.stdout.splitlines()[1:]]
    assert [r[0] for r in rows] == NAMES and rows[1][1:] == ["model.T=1", "model.connection=da"]
    assert "4 runs = model.T (2) x model.connection (2)" in p.stdout and not (tmp_path / "s").exists()
    p = _sweep("--dry-run", "--nodes", "2", "--max-parallel", "2", "--time", "00:10:00", "--run-dir",
               str(tmp_path / "s"), *AXES, cwd=tmp_path)
    assert p.returncode == 0 and "one job array of 4 tasks (at most 2 at a time)" in p.stdout, p.stderr


@pytest.mark.parametrize("args,match", [
    (["model.T=0,1"], "sweep runs with model.T=0: 'model.T' must be > 0"),
    (["--max-parallel", "2", "model.T=1,2"], "--max-parallel 2 needs --nodes"),
    (["--nodes", "1", "--time", "00:10:00", "launch.cpus_per_task=1,2", "model.T=1,2"],
     "need different Slurm jobs"),
])
def test_cli_bad_sweeps_exit_2_before_writing(tmp_path, args, match):
    p = _sweep("--run-dir", str(tmp_path / "s"), *args, cwd=tmp_path)
    assert p.returncode == 2 and match in p.stderr, p.stderr
    assert all(ln.startswith("orchestrator: error: ") for ln in p.stderr.strip().splitlines()), p.stderr
    assert not (tmp_path / "s").exists()


def test_cli_slurm_sweep_without_sbatch(tmp_path):
    p = subprocess.run([sys.executable, "-m", "orchestrator", "sweep", "--nodes", "2", "--run-dir", str(tmp_path / "s"),
                        *AXES], cwd=tmp_path, env={**_env(), "PATH": str(tmp_path)}, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 2 and "sbatch is not on PATH" in p.stderr and not (tmp_path / "s").exists(), p.stderr


# --- the array script: pure, and its batch shell with stub srun / scontrol -----------------------------------------
def _array_script(sweep_dir: Path, home: Path | str = "/opt/danet-orchestrator") -> str:
    cfg = load_config("digits", ["launch.account=snn"])
    tasks = [(i, sweep_dir / n, ["train.epochs=1", f"tracking.run_name={n}", 'tracking.parent_run_id="12e45"'])
             for i, n in enumerate(NAMES[:3])]
    return slurm.render_array_sbatch(cfg, sweep_dir, "digits", tasks, "ablation", max_parallel=2, nodes=2,
                                     gpus_per_node=1, partition="debug", time="00:20:00", home=home)


def test_render_array_matches_expected_script():
    text = _array_script(Path("/scratch/sweeps/ablation"))
    if os.environ.get("UPDATE_EXPECTED") == "1":
        EXPECTED_ARRAY.write_text(text)
    assert text == EXPECTED_ARRAY.read_text(), "rendered array script changed; review it, rerun with UPDATE_EXPECTED=1"
    sb = [ln.split(None, 1)[1] for ln in text.splitlines() if ln.startswith("#SBATCH ")]
    assert sb[:3] == ["--job-name=ablation", "--array=0-2%2", "--nodes=2"]
    for opt in ("--signal=B:USR2@60", "--requeue", "--open-mode=append",
                "--output=/scratch/sweeps/ablation/slurm-%A_%a.out"):
        assert opt in sb
    assert text.endswith(slurm.BODY) and text == _array_script(Path("/scratch/sweeps/ablation"))
    assert slurm.task_ranges([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"


STUB_SRUN = r"""#!/bin/bash
args=("$@")
for i in "${!args[@]}"; do
  if [ "${args[$i]}" = --run-dir ]; then rd=${args[$((i + 1))]}; printf '%s\n' "${args[@]:$((i + 2))}" > "$rd/args"; fi
done
echo 5 > "$rd/REQUEUE"; exit 3
"""


def test_array_task_runs_its_own_run_and_requeues_as_array_task(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", STUB_SRUN), ("python", "#!/bin/sh\nexit 0\n"),
                       ("scontrol", '#!/bin/sh\necho "$@" >> "$STUB_LOG"\n')):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    script = tmp_path / "array.sh"
    script.write_text(_array_script(tmp_path, home=tmp_path))
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "STUB_LOG": str(tmp_path / "scontrol.log"), "SLURM_JOB_ID": "57",
           "SLURM_ARRAY_JOB_ID": "50", "SLURM_ARRAY_TASK_ID": "1", "SLURM_JOB_NAME": "ablation",
           "SLURM_NTASKS": "2", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "node[1-2]",
           "SLURM_SUBMIT_DIR": str(tmp_path)}
    p = subprocess.run(["bash", str(script)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    assert (tmp_path / "scontrol.log").read_text() == "requeue 50_1\n"  # the task, not the whole array
    args = (tmp_path / NAMES[1] / "args").read_text().splitlines()
    assert args == ["train.epochs=1", f"tracking.run_name={NAMES[1]}", 'tracking.parent_run_id="12e45"']
    assert not (tmp_path / NAMES[0]).exists() and not (tmp_path / NAMES[2]).exists()
    p = subprocess.run(["bash", str(script)], env={**env, "SLURM_ARRAY_TASK_ID": "7"}, cwd=tmp_path,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "array task '7' is not a run of this sweep" in p.stdout


# --- a real 2 x 2 sweep, locally -----------------------------------------------------------------------------------
def _read_stream(stream, lines: list[str]) -> None:
    for line in stream:
        lines.append(line)


def _mlflow(uri: str, experiment: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return client, (client.search_runs([exp.experiment_id]) if exp else [])


@pytest.fixture(scope="module")
def local_sweep(tmp_path_factory, mlflow_server):
    """The sweep interrupted (SIGINT to `orchestrator sweep`) while its second run trains, relaunched (the
    second run resumes, the last two run), then relaunched once more (all completed: nothing runs)."""
    d = tmp_path_factory.mktemp("sweep-local")
    args = ["--run-dir", str(d / "s"), *AXES, *TINY, "train.max_steps=3", f"tracking.tracking_uri={mlflow_server}",
            "tracking.experiment=sweep-local"]
    cmd = [sys.executable, "-m", "orchestrator", "sweep", *args]
    proc = subprocess.Popen(cmd, cwd=d, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    err: list[str] = []
    reader = threading.Thread(target=_read_stream, args=(proc.stderr, err), daemon=True)
    reader.start()
    deadline = time.monotonic() + 600
    # Interrupted once the second run's rank has its stop handlers (before its first step), however fast its steps.
    while time.monotonic() < deadline and proc.poll() is None:
        if training_catches(str(d / "s" / NAMES[1]), signal.SIGUSR2):
            break
        time.sleep(0.2)
    assert proc.poll() is None, "".join(err)[-3000:]
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=300)
    reader.join(timeout=10)
    before_kill = json.loads((d / "s" / NAMES[1] / "mlflow_run.json").read_text())["run_id"]  # the first attempt's
    first = dict(rc=proc.returncode, out=out, err="".join(err),
                 state=json.loads((d / "s" / "sweep.json").read_text()), killed_run_id=before_kill)
    second = subprocess.run(cmd, cwd=d, env=_env(), capture_output=True, text=True, timeout=900)
    third = subprocess.run(cmd, cwd=d, env=_env(), capture_output=True, text=True, timeout=600)
    return dict(dir=d / "s", cwd=d, args=args, uri=mlflow_server, first=first, second=second, third=third)


def test_local_sweep_interrupted_then_resumed(local_sweep):
    first, second = local_sweep["first"], local_sweep["second"]
    assert first["rc"] == 130, first["err"][-3000:]
    assert [r["status"] for r in first["state"]["runs"]] == ["completed", "interrupted", "pending", "pending"]
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"sweep: {NAMES[0]}: completed before" in second.stderr
    assert f"run 1/3 {NAMES[1]} (resuming)" in second.stderr and "resumed from step" in second.stderr
    state = json.loads((local_sweep["dir"] / "sweep.json").read_text())
    assert [r["name"] for r in state["runs"]] == NAMES and all(r["status"] == "completed" for r in state["runs"])
    assert all(isinstance(r["val_top1"], float) for r in state["runs"])
    resumed = json.loads((local_sweep["dir"] / NAMES[1] / "summary.json").read_text())
    assert resumed["steps"] == 3 and resumed["restarts"] == 1
    # The resumed run continued its own MLflow run.
    assert state["runs"][1]["mlflow_run_id"] == first["killed_run_id"] == resumed["mlflow_run_id"]
    assert state["mlflow_parent_run_id"] == first["state"]["mlflow_parent_run_id"]


def test_local_sweep_parent_and_children_in_mlflow(local_sweep):
    client, runs = _mlflow(local_sweep["uri"], "sweep-local")
    state = json.loads((local_sweep["dir"] / "sweep.json").read_text())
    parent_id = state["mlflow_parent_run_id"]
    by_id = {r.info.run_id: r for r in runs}
    assert len(runs) == 5 and parent_id in by_id, [r.info.run_name for r in runs]  # no duplicates after relaunches
    parent = by_id[parent_id]
    assert parent.info.run_name == "s" and parent.info.status == "FINISHED"
    assert parent.data.params["model.T"] == "1,2" and parent.data.params["model.connection"] == "spiking,da"
    children = [r for r in runs if r.info.run_id != parent_id]
    assert sorted(r.info.run_name for r in children) == sorted(NAMES)
    assert all(r.data.tags.get("mlflow.parentRunId") == parent_id for r in children)
    assert all(r.info.status == "FINISHED" for r in children)
    assert {r.info.run_id for r in children} == {r["mlflow_run_id"] for r in state["runs"]}
    # The comparison figures are on the parent (their content is tests/test_tracking's business).
    figures = [f.path for f in client.list_artifacts(parent_id, "figures")]
    assert figures and all(f.endswith(".png") for f in figures), figures
    assert all(Path(f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for f in state["figures"])


def test_relaunch_of_a_finished_sweep_runs_nothing(local_sweep):
    third = local_sweep["third"]
    assert third.returncode == 0, third.stderr[-3000:]
    assert third.stderr.count(": completed before (val top-1") == 4 and "launch: " not in third.stderr
    _, runs = _mlflow(local_sweep["uri"], "sweep-local")
    assert len(runs) == 5


def test_sweep_status_and_a_different_sweep_in_the_same_dir(local_sweep):
    d = local_sweep["dir"]
    p = _sweep("status", str(d), cwd=local_sweep["cwd"])
    assert p.returncode == 0, p.stderr
    rows = {ln.split()[0]: ln.split() for ln in p.stdout.splitlines() if ln.split() and ln.split()[0] in NAMES}
    assert set(rows) == set(NAMES) and all(r[1] == "completed" for r in rows.values())
    mtime = (d / "sweep.json").stat().st_mtime_ns
    args = [a if a != "model.T=1,2" else "model.T=1,2,4" for a in local_sweep["args"]]
    p = _sweep(*args, cwd=local_sweep["cwd"])
    assert p.returncode == 2 and "holds another sweep: its axes are model.T=1,2" in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and (d / "sweep.json").stat().st_mtime_ns == mtime


def test_a_sweep_running_in_its_folder_refuses_a_second(local_sweep):
    """A second `orchestrator sweep` in a folder whose sweep is running is refused, naming the holder, before it
    writes anything (the two would train the same runs twice and overwrite each other's sweep.json)."""
    from launch import runlock
    from orchestrator.sweep.local import LOCK

    d = local_sweep["dir"]
    mtime = (d / "sweep.json").stat().st_mtime_ns
    with runlock.acquire(d, name=LOCK):  # the running sweep: this process
        p = _sweep(*local_sweep["args"], cwd=local_sweep["cwd"])
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1, p.stderr[-3000:]
    assert f"another `orchestrator sweep` is running in {d} (pid {os.getpid()} on " in lines[0], lines
    assert (d / "sweep.json").stat().st_mtime_ns == mtime


# --- the same sweep as one job array on the local Slurm -------------------------------------------------------------
def _wait_job(job: str, timeout: float, until) -> dict:
    deadline = time.monotonic() + timeout
    info: dict = {}
    while time.monotonic() < deadline:
        info = slurm.job_info(job)
        if until(info):
            return info
        time.sleep(1)
    subprocess.run(["scancel", job], capture_output=True)
    pytest.fail(f"job {job}: still {info.get('JobState')} after {timeout:.0f} s")


@pytest.mark.slurm
def test_sweep_as_one_job_array(cluster, tmp_path, mlflow_server):  # noqa: F811
    """4 array tasks (at most 2 at a time), task 0 warned mid-run (USR2 to its batch shell, as --signal does):
    it checkpoints, requeues itself as <array>_0 and resumes. The finishing job logs the figures; a relaunch
    submits nothing."""
    args = ["--nodes", "1", "--gpus-per-node", "1", "--max-parallel", "2", "--time", "00:10:00", "--run-dir",
            str(tmp_path / "s"), *AXES, *TINY, "train.max_steps=4", "launch.rank_timeout_s=240",
            f"tracking.tracking_uri={mlflow_server}", "tracking.experiment=sweep-slurm"]
    p = _sweep(*args, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    job = re.search(r"submitted job array (\d+)", p.stdout).group(1)
    finish = re.search(r"after it\s+job (\d+)", p.stdout).group(1)
    assert "#SBATCH --array=0-3%2" in (tmp_path / "s" / "sbatch.sh").read_text()
    p = _sweep(*args, cwd=tmp_path)  # the same sweep again while its array is queued or running: refused
    assert p.returncode == 2 and f"job array {job} of sweep" in p.stderr, p.stderr[-3000:]
    log0 = tmp_path / "s" / f"slurm-{job}_0.out"
    # Warn task 0 as soon as its training process catches USR2 (its handler is installed before the heavy
    # imports): seconds before its first step, so the warning is mid-run however fast the 4 steps are.
    run0 = str(tmp_path / "s" / NAMES[0])
    info = _wait_job(f"{job}_0", 420, lambda i: i.get("JobState") in slurm.FINAL_STATES
                     or training_catches(run0, signal.SIGUSR2))
    assert info.get("JobState") not in slurm.FINAL_STATES, f"task 0 ended before it was warned: {info}"
    shell = batch_shell_pid(info["JobId"])
    assert shell, f"no batch shell for task 0 (job {info['JobId']})"
    os.kill(shell, signal.SIGUSR2)  # once, as slurmd warns it
    info = _wait_job(finish, 900, lambda i: i.get("JobState") in slurm.FINAL_STATES)
    assert info["JobState"] == "COMPLETED", (tmp_path / "s").glob("slurm-finish-*.out")
    state = json.loads((tmp_path / "s" / "sweep.json").read_text())
    assert state["slurm_array_job_id"] == job and state["finalized"] and state["figures"]
    assert [r["status"] for r in state["runs"]] == ["completed"] * 4, state["runs"]
    text = log0.read_text()
    assert "requeueing (checkpoint at step" in text and "resumed from step" in text, text[-3000:]
    assert text.count("pre-timeout signal") == 1, text[-3000:]  # warned once, requeued once
    s0 = json.loads((tmp_path / "s" / NAMES[0] / "summary.json").read_text())
    assert s0["steps"] == 4 and s0["slurm_restart_count"] >= 1
    client, runs = _mlflow(mlflow_server, "sweep-slurm")
    parent_id = state["mlflow_parent_run_id"]
    assert len(runs) == 5 and client.get_run(parent_id).info.status == "FINISHED"
    children = [r for r in runs if r.info.run_id != parent_id]
    assert sorted(r.info.run_name for r in children) == sorted(NAMES)
    assert all(r.data.tags.get("mlflow.parentRunId") == parent_id for r in children)
    assert {r.data.tags.get("slurm.array_job_id") for r in children} == {job}
    # Relaunching the finished sweep submits nothing and makes no run.
    p = _sweep(*args, cwd=tmp_path)
    assert p.returncode == 0 and "nothing to submit" in p.stderr, p.stderr[-3000:]
    assert json.loads((tmp_path / "s" / "sweep.json").read_text())["slurm_array_job_ids"] == [job]
    assert len(_mlflow(mlflow_server, "sweep-slurm")[1]) == 5
