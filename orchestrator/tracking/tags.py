"""Run tags: where and how a run ran (Slurm ids, nodes, GPUs, git state, host, command line, versions)."""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

_SLURM_TAGS = {
    "slurm.job_id": "SLURM_JOB_ID",
    "slurm.array_job_id": "SLURM_ARRAY_JOB_ID",
    "slurm.array_task_id": "SLURM_ARRAY_TASK_ID",
    "slurm.restart_count": "SLURM_RESTART_COUNT",
    "slurm.nodelist": "SLURM_JOB_NODELIST",
    "slurm.partition": "SLURM_JOB_PARTITION",
    "slurm.cluster": "SLURM_CLUSTER_NAME",
}


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        r = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


@lru_cache(maxsize=4)
def git_state(path: str | None = None) -> tuple[str | None, bool | None]:
    """(commit, dirty) of the repository holding ``path`` (default: this package's source, else the cwd)."""
    candidates = [Path(path)] if path else [Path(__file__).resolve().parents[2], Path.cwd()]
    for cwd in candidates:
        if not cwd.is_dir():
            continue
        commit = _git(["rev-parse", "HEAD"], cwd)
        if commit:
            status = _git(["status", "--porcelain", "--untracked-files=no"], cwd)
            return commit, (bool(status) if status is not None else None)
    return None, None


def _dist_version(*names: str, prefix: str | None = None) -> str | None:
    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    if prefix:  # e.g. nvidia-dali-cuda110 / -cuda120 / -cuda130
        try:
            for dist in metadata.distributions():
                n = (dist.metadata.get("Name") or "").lower().replace("_", "-")
                if n.startswith(prefix):
                    return dist.version
        except Exception:
            return None
    return None


def _gpus_per_node(rank_info: Any) -> int:
    """CUDA devices this node's ranks use: one per local rank when CUDA is present, else 0.

    torch is only consulted when the process already imported it (the training worker has)."""
    torch = sys.modules.get("torch")
    try:
        if torch is not None and torch.cuda.is_available():
            if rank_info is not None:
                return max(int(getattr(rank_info, "local_world_size", 1) or 1), 1)
            return torch.cuda.device_count()
    except Exception:
        pass
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    if visible and torch is None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    return 0


def source_tags() -> dict[str, str]:
    """MLflow's source tags (the UI's Source column): a Slurm job is a JOB named by its job id (array jobs as
    ``<array id>_<task>``), anything else the LOCAL program ``orchestrator train``."""
    job = os.environ.get("SLURM_JOB_ID")
    if job:
        array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
        ident = f"{array}_{task}" if array and task else job
        return {"mlflow.source.type": "JOB", "mlflow.source.name": f"slurm job {ident}: orchestrator train"}
    return {"mlflow.source.type": "LOCAL", "mlflow.source.name": "orchestrator train"}


def default_tags(cfg: Any = None, rank_info: Any = None) -> dict[str, str]:
    """The tags every run gets. Values missing here (no Slurm, no git, no DeepSpeed) are left out."""
    tags: dict[str, Any] = {}
    for tag, var in _SLURM_TAGS.items():
        if os.environ.get(var):
            tags[tag] = os.environ[var]
    if rank_info is not None:
        for name in ("world_size", "num_nodes", "local_world_size"):
            v = getattr(rank_info, name, None)
            if v is not None:
                tags[{"num_nodes": "nodes", "local_world_size": "ranks_per_node"}.get(name, name)] = v
        job = getattr(rank_info, "job_id", None)
        if job:
            tags["job_id"] = job
        arr = getattr(rank_info, "array_id", None)
        if arr:
            tags.setdefault("slurm.array_task_id", arr)
        src = getattr(rank_info, "source", None)
        if src:
            tags["launcher"] = src
    tags["gpus_per_node"] = _gpus_per_node(rank_info)
    commit, dirty = git_state()
    if commit:
        tags["git.commit"] = commit
        tags["mlflow.source.git.commit"] = commit  # MLflow's own tag: shown in the UI's run page
        tags["git.dirty"] = str(dirty).lower() if dirty is not None else "unknown"
    tags["host"] = socket.gethostname()
    argv = getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv]
    tags["command"] = shlex.join(str(a) for a in argv)
    tags.update(source_tags())
    tags["version.python"] = sys.version.split()[0]
    for tag, names, prefix in (
        ("version.torch", ("torch",), None),
        ("version.deepspeed", ("deepspeed",), None),
        ("version.dali", ("nvidia-dali-cuda120", "nvidia-dali-cuda110", "nvidia-dali-cuda130"), "nvidia-dali"),
        ("version.mlflow", ("mlflow", "mlflow-skinny"), None),
        ("version.orchestrator", ("danet-orchestrator",), None),
    ):
        v = _dist_version(*names, prefix=prefix)
        if v:
            tags[tag] = v
    torch = sys.modules.get("torch")
    cuda = getattr(getattr(torch, "version", None), "cuda", None) if torch is not None else None
    if cuda:
        tags["version.cuda"] = cuda
    if cfg is not None:
        preset = getattr(cfg, "preset", None)
        if preset:
            tags["preset"] = preset
        model = getattr(cfg, "model", None)
        if model is not None:
            tags["model"] = getattr(model, "name", "")
            tags["T"] = getattr(model, "T", "")
    return {k: str(v) for k, v in tags.items()}
