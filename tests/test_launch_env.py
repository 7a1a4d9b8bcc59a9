"""Rank environment: torchrun/launcher variables, Slurm's SLURM_*, and the single-process default."""

from __future__ import annotations

from launch.env import port_for_job, rank_info
from launch.local import rank_envs


def test_slurm_variables_map_to_ranks():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NODEID": "2",
           "SLURM_JOB_NUM_NODES": "4", "SLURM_JOB_NODELIST": "node[1-4]", "SLURM_JOB_ID": "1234",
           "SLURM_STEP_TASKS_PER_NODE": "2(x4)", "SLURM_ARRAY_TASK_ID": "3"}
    info = rank_info(env)
    assert (info.rank, info.world_size, info.local_rank, info.local_world_size) == (5, 8, 1, 2)
    assert (info.node_rank, info.num_nodes, info.job_id, info.array_id) == (2, 4, "1234", "3")
    assert info.master_addr == "node1" and info.master_port == port_for_job(1234)
    assert info.source == "slurm" and not info.is_primary
    assert info.torch_env()["RANK"] == "5" and info.torch_env()["WORLD_SIZE"] == "8"


def test_two_jobs_on_one_host_get_different_ports():
    assert port_for_job(1234) != port_for_job(1235)
    assert 20000 <= port_for_job(999999) < 30000


def test_explicit_rank_variables_win_over_slurm():
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "23456",
           "SLURM_PROCID": "7", "SLURM_NTASKS": "16"}
    info = rank_info(env)
    assert (info.rank, info.world_size, info.master_addr, info.master_port, info.source) == (1, 2, "10.0.0.1", 23456,
                                                                                           "env")


def test_no_variables_is_a_single_process():
    info = rank_info({})
    assert (info.rank, info.world_size, info.source) == (0, 1, "single") and info.is_primary


def test_local_launcher_environments():
    envs = rank_envs(3, 24000)
    assert [e["RANK"] for e in envs] == ["0", "1", "2"]
    assert all(e["WORLD_SIZE"] == "3" and e["MASTER_PORT"] == "24000" for e in envs)
    assert [rank_info(e).local_rank for e in envs] == [0, 1, 2]


# --- one job per run directory (launch/runlock.py) -------------------------------------------------------------
def _in_child(code: str, env: dict | None = None, pass_fds: tuple[int, ...] = ()) -> str:
    """Run ``code`` in another process (a flock is per open file: another process is another job)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = str(Path(__file__).resolve().parents[1])
    r = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": repo, **(env or {})},
                       capture_output=True, text=True, timeout=60, pass_fds=pass_fds)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_run_lock_names_its_holder_refuses_others_and_passes_to_ranks(tmp_path):
    import os

    from launch import runlock
    from launch.env import RankInfo

    run_dir = tmp_path / "run"
    assert runlock.holder(run_dir) is None and not run_dir.exists()  # a probe creates nothing
    probe = f"from launch import runlock; print(runlock.holder({str(run_dir)!r}))"
    with runlock.acquire(run_dir) as lock:
        assert _in_child(probe).startswith(f"pid {os.getpid()} on ")
        try:  # another job waits, then is refused with the holder named
            runlock.acquire(run_dir, wait_s=0.3)
            raise AssertionError("a held run dir was locked twice")
        except runlock.RunDirBusy as e:
            assert f"is in use by a running job (pid {os.getpid()} " in str(e)
        # A rank handed the descriptor is the holder's own job: nothing to refuse, nothing to take.
        ranked = ("from launch import runlock; from launch.env import rank_info; from orchestrator import preflight; "
                  f"d = {str(run_dir)!r}; print(runlock.inherited(d), runlock.taken_by_rank(d, rank_info()), "
                  "preflight.check_run_dir_free(d))")
        env = {runlock.ENV_FD: str(lock.fd), "RANK": "0", "WORLD_SIZE": "2"}
        assert _in_child(ranked, env, pass_fds=(lock.fd,)) == "True False []"
        # Without it, rank 0 of a hand-started job must take the lock itself, and is told who has it.
        out = _in_child(ranked, {"RANK": "0", "WORLD_SIZE": "2"})
        assert out.startswith("False True ['--run-dir ") and "is in use by a running job" in out, out
    assert _in_child(probe) == "None"  # released with its descriptor
    slurm_task = RankInfo(source="slurm")
    batch = {"SLURM_JOB_ID": "42", runlock.ENV_SLURM_JOB: "42"}
    assert not runlock.taken_by_rank(run_dir, slurm_task, batch)  # the project's batch shell holds it
    assert runlock.taken_by_rank(run_dir, slurm_task, {"SLURM_JOB_ID": "42"})  # a bare srun: rank 0 takes it
    assert runlock.taken_by_rank(run_dir, slurm_task, {**batch, "SLURM_JOB_ID": "43"})  # another job's mark
    assert not runlock.taken_by_rank(run_dir, RankInfo(rank=1, world_size=2, source="slurm"), {"SLURM_JOB_ID": "42"})
    assert not runlock.taken_by_rank(run_dir, RankInfo(rank=1, world_size=2, source="env"))
    assert runlock.taken_by_rank(run_dir, RankInfo())


def test_a_lock_held_past_its_taker_says_so(tmp_path):
    """A launcher killed outright leaves its ranks holding the lock while they save: the refusal says that the
    recorded process has ended and its ranks are still stopping, not just a pid that no longer exists."""
    import json
    import os
    import socket
    import subprocess
    import sys

    from launch import runlock

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    with runlock.acquire(tmp_path) as lock:
        mine = runlock.describe_holder(lock.path)
        assert mine.startswith(f"pid {os.getpid()} on ") and "ended" not in mine
        lock.path.write_text(json.dumps({"pid": gone.pid, "host": socket.gethostname(), "started": "T"}))
        line = runlock.holder(tmp_path)
    assert line == (f"pid {gone.pid} on {socket.gethostname()} since T; that process has ended, its ranks are still "
                    "stopping"), line
