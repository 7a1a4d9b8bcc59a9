"""The rank environment, in one place: torchrun / local-launcher variables or Slurm's SLURM_*.

Nothing else in the project reads rank variables; the tracker, the loop and the data path take a ``RankInfo``.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass

# Local runs and Slurm steps use ports from this range: high enough to avoid well-known services, below the
# Linux ephemeral range (32768+) so an outgoing connection never holds the port we need.
PORT_BASE = 20000
PORT_SPAN = 10000


@dataclass(frozen=True)
class RankInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    node_rank: int = 0
    num_nodes: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    job_id: str = ""
    array_id: str = ""
    source: str = "single"  # single | env (torchrun / local launcher) | slurm

    @property
    def is_primary(self) -> bool:
        return self.rank == 0

    def torch_env(self) -> dict[str, str]:
        """The variables torch.distributed's env:// init and DeepSpeed read."""
        return {
            "RANK": str(self.rank),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_RANK": str(self.local_rank),
            "LOCAL_WORLD_SIZE": str(self.local_world_size),
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
        }


def port_for_job(job_id: str | int) -> int:
    """A rendezvous port derived from the job id: two jobs sharing a host get different ports."""
    return PORT_BASE + int(job_id) % PORT_SPAN


def first_host(nodelist: str) -> str:
    """First host of a Slurm nodelist, expanded by `scontrol show hostnames` (handles node[1-4,7])."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=30, check=True).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    # No scontrol: the first entry is enough for the plain 'host' and 'prefix[N-M]' forms.
    head = nodelist.split(",")[0]
    if "[" in head:
        prefix, rng = head.split("[", 1)
        return prefix + rng.rstrip("]").split("-")[0].split(",")[0]
    return head


def rank_info(environ: dict[str, str] | None = None) -> RankInfo:
    """Rank, world size and rendezvous address of this process. RANK/WORLD_SIZE win over SLURM_*."""
    env = os.environ if environ is None else environ
    job_id = env.get("SLURM_JOB_ID", "")
    array_id = env.get("SLURM_ARRAY_TASK_ID", "")
    if "RANK" in env and "WORLD_SIZE" in env:
        world = int(env["WORLD_SIZE"])
        local_world = int(env.get("LOCAL_WORLD_SIZE", world))
        rank = int(env["RANK"])
        return RankInfo(rank=rank, world_size=world, local_rank=int(env.get("LOCAL_RANK", 0)),
                        local_world_size=local_world, node_rank=int(env.get("GROUP_RANK", rank // max(local_world, 1))),
                        num_nodes=max(1, world // max(local_world, 1)), master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
                        master_port=int(env.get("MASTER_PORT", 29500)), job_id=job_id, array_id=array_id, source="env")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        world = int(env["SLURM_NTASKS"])
        num_nodes = int(env.get("SLURM_JOB_NUM_NODES", env.get("SLURM_NNODES", 1)))
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "127.0.0.1")
        # SLURM_NTASKS_PER_NODE exists only with --ntasks-per-node; the step's own count is always set ("8(x4)").
        per_node = env.get("SLURM_NTASKS_PER_NODE") or env.get("SLURM_STEP_TASKS_PER_NODE") or "0"
        local_world = int(per_node.split("(")[0].split(",")[0] or 0) or max(1, world // num_nodes)
        return RankInfo(rank=int(env["SLURM_PROCID"]), world_size=world, local_rank=int(env.get("SLURM_LOCALID", 0)),
                        local_world_size=local_world, node_rank=int(env.get("SLURM_NODEID", 0)), num_nodes=num_nodes,
                        master_addr=env.get("MASTER_ADDR") or first_host(nodelist),
                        master_port=int(env.get("MASTER_PORT") or port_for_job(job_id or 0)),
                        job_id=job_id, array_id=array_id, source="slurm")
    return RankInfo(job_id=job_id, array_id=array_id)
