"""Finding a training rank's process from a test, to signal it at a moment that does not race with its steps.

Local ranks and the local Slurm cluster's tasks all run on this machine, so /proc shows them."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path


def train_processes() -> Iterator[tuple[Path, list[str]]]:
    """(/proc/PID, argv) of every `python -m orchestrator train` process: the ranks themselves, not srun or the
    launchers that forward signals to them."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().decode().split("\0")
        except (OSError, UnicodeDecodeError):
            continue  # gone, or not ours
        if len(argv) > 3 and "python" in Path(argv[0]).name and argv[1:4] == ["-m", "orchestrator", "train"]:
            yield proc, argv


def training_catches(run_dir: str, sig: int) -> bool:
    """Whether a rank training into ``run_dir`` catches ``sig``: its stop handlers are installed, which happens
    before the heavy imports, seconds before its first step."""
    for proc, argv in train_processes():
        if run_dir not in argv:
            continue
        try:
            caught = next(ln for ln in (proc / "status").read_text().splitlines() if ln.startswith("SigCgt:"))
        except (OSError, StopIteration):
            continue
        if int(caught.split()[1], 16) >> (sig - 1) & 1:
            return True
    return False


def slurm_rank_pid(job: str, rank: int) -> int | None:
    """The pid of rank ``rank``'s training process in Slurm job ``job`` (by its SLURM_JOB_ID / SLURM_PROCID)."""
    want = {f"SLURM_JOB_ID={job}".encode(), f"SLURM_PROCID={rank}".encode()}
    found = []
    for proc, _ in train_processes():
        try:
            if want <= set((proc / "environ").read_bytes().split(b"\0")):
                found.append(int(proc.name))
        except OSError:
            continue
    return found[0] if len(found) == 1 else None


def batch_shell_pid(job_id: str) -> int | None:
    """The pid of a running Slurm job's batch shell (``scontrol listpids``: the batch step's task 0).

    The tests warn that shell with ``os.kill`` (what slurmd does for ``--signal=B:USR2@LEAD``) rather than
    ``scancel --batch --signal``: for a task of a job array that still has pending tasks, slurmctld answers
    "Job can not be altered now, try again later" and scancel keeps re-sending the signal every few seconds,
    into the task's requeued run as well."""
    p = subprocess.run(["scontrol", "listpids", str(job_id)], capture_output=True, text=True)
    for line in p.stdout.splitlines()[1:]:
        cols = line.split()
        if len(cols) >= 4 and cols[2] == "batch" and cols[3] == "0":
            return int(cols[0])
    return None
