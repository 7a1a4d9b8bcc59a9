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
