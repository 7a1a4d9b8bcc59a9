"""Finding a training rank's process from a test, to signal it at a moment that does not race with its steps."""

from __future__ import annotations

from pathlib import Path


def training_catches(run_dir: str, sig: int) -> bool:
    """Whether an `orchestrator train` process for ``run_dir`` catches ``sig`` (its stop handlers are installed,
    which happens before the heavy imports: seconds before its first step). srun and the launchers, which forward
    signals too, are not counted. Local ranks and the local Slurm cluster's tasks both run on this machine."""
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().decode().split("\0")
            if "python" not in Path(argv[0]).name or argv[1:4] != ["-m", "orchestrator", "train"] \
                    or run_dir not in argv:
                continue
            caught = next(ln for ln in (proc / "status").read_text().splitlines() if ln.startswith("SigCgt:"))
        except (OSError, IndexError, StopIteration, UnicodeDecodeError):
            continue  # gone, or not ours
        if int(caught.split()[1], 16) >> (sig - 1) & 1:
            return True
    return False


def batch_shell_pid(job_id: str) -> int | None:
    """The pid of a running Slurm job's batch shell (``scontrol listpids``: the batch step's task 0).

    The tests warn that shell with ``os.kill`` (what slurmd does for ``--signal=B:USR2@LEAD``) rather than
    ``scancel --batch --signal``: for a task of a job array that still has pending tasks, slurmctld answers
    "Job can not be altered now, try again later" and scancel keeps re-sending the signal every few seconds,
    into the task's requeued run as well."""
    import subprocess

    p = subprocess.run(["scontrol", "listpids", str(job_id)], capture_output=True, text=True)
    for line in p.stdout.splitlines()[1:]:
        cols = line.split()
        if len(cols) >= 4 and cols[2] == "batch" and cols[3] == "0":
            return int(cols[0])
    return None
