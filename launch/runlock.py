"""One job per run directory: an exclusive lock on ``RUN_DIR/.run.lock``, held for the job's whole life.

Two jobs in one run directory write the same checkpoints, summary and MLflow run, and a resume may load a
checkpoint the other is half way through writing; on a GPU the second also meets the first's memory. So the
process that starts a job takes the lock before any rank exists:

* ``orchestrator launch`` (local) takes it and hands its descriptor to every rank (``ENV_FD``): the lock is held
  while the launcher *or any of its ranks* lives, so ranks outliving a killed launcher still hold it;
* the Slurm batch script takes it with ``flock`` in the batch shell (launch/slurm.py, BODY), for the allocation,
  and says so to its tasks (``ENV_SLURM_JOB``);
* ``orchestrator train`` started by hand, by torchrun, or by an ``srun`` of a batch script of the user's own
  (whose shell holds nothing) takes it on rank 0;
* ``orchestrator sweep`` holds its folder's own lock (``.sweep.lock``) while its runs train locally.

It is ``flock(2)``: the kernel drops it when the last process holding it ends, SIGKILL included, so a crashed job
never leaves a stale lock on a local disk. File systems without flock get a warning and no lock.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from launch.env import RankInfo

LOCK_NAME = ".run.lock"
ENV_FD = "DANET_RUN_LOCK_FD"  # the descriptor number a launcher passed down, holding its lock
ENV_SLURM_JOB = "DANET_RUN_LOCK_JOB"  # the Slurm job whose batch shell holds the lock (BODY exports it to srun)
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class RunDirBusy(Exception):
    """The lock is held by another process: ``holder`` says who; ``str(e)`` is a run directory's one line."""

    def __init__(self, line: str, holder: str):
        super().__init__(line)
        self.holder = holder


@dataclass
class RunLock:
    """A held lock. ``fd`` stays open (and locked) until ``release`` or the process's end."""

    path: Path
    fd: int

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the last descriptor of the open file releases the flock
            self.fd = -1

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_path(run_dir: str | os.PathLike, name: str = LOCK_NAME) -> Path:
    return Path(run_dir) / name


def describe_holder(path: Path) -> str:
    """What the holder wrote into the lock file: 'pid N on HOST (Slurm job J) since T', or a plain fallback."""
    try:
        owner = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        owner = {}
    if not isinstance(owner, dict) or "pid" not in owner:
        return "another job"
    job = f" (Slurm job {owner['slurm_job']})" if owner.get("slurm_job") else ""
    since = f" since {owner['started']}" if owner.get("started") else ""
    # The lock outlives its taker while the processes it was handed to live: a killed launcher's ranks, still
    # saving their checkpoint (launch.local.follow_launcher gives them ORPHAN_GRACE_S).
    ended = "; that process has ended, its ranks are still stopping" if _ended_here(owner) else ""
    return f"pid {owner['pid']} on {owner.get('host', '?')}{job}{since}{ended}"


def _ended_here(owner: dict) -> bool:
    """True when the holder's recorded process ran on this host and is gone."""
    if owner.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(owner["pid"]), 0)
    except ProcessLookupError:
        return True
    except (OSError, ValueError, TypeError):  # another user's process, or an unreadable pid: assume it lives
        return False
    return False


def busy_line(run_dir: str | os.PathLike, holder: str) -> str:
    return (f"--run-dir {run_dir} is in use by a running job ({holder}): wait for it to end, stop it, or "
            "choose another --run-dir")


def inherited(run_dir: str | os.PathLike, environ: dict[str, str] | None = None) -> bool:
    """True when this process was handed the lock of ``run_dir`` by its launcher (``ENV_FD``, same file)."""
    env = os.environ if environ is None else environ
    try:
        fd = int(env.get(ENV_FD, ""))
        mine, there = os.fstat(fd), os.stat(lock_path(run_dir))
    except (ValueError, OSError):
        return False
    return (mine.st_dev, mine.st_ino) == (there.st_dev, there.st_ino)


def taken_by_rank(run_dir: str | os.PathLike, info: RankInfo, environ: dict[str, str] | None = None) -> bool:
    """Whether a training rank takes the lock itself: rank 0 started by hand, by torchrun or by a bare ``srun``.
    Not a rank of ``orchestrator launch`` (it inherited its launcher's lock) nor a task of the project's batch
    script (its shell holds the lock for this job: ``ENV_SLURM_JOB``)."""
    env = os.environ if environ is None else environ
    if info.rank != 0 or inherited(run_dir, env):
        return False
    return not (info.source == "slurm" and env.get(ENV_SLURM_JOB, "") == env.get("SLURM_JOB_ID", "-"))


def holder(run_dir: str | os.PathLike, name: str = LOCK_NAME) -> str | None:
    """Who holds ``run_dir``'s lock now, or None when nobody does. Creates and writes nothing (a preflight).
    ``name``: the lock file (a sweep's folder has its own, ``.sweep.lock``)."""
    path = lock_path(run_dir, name)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None  # no lock file (or no run dir): nobody has locked it
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None
    except BlockingIOError:
        return describe_holder(path)
    except OSError as e:
        if e.errno in _NO_FLOCK:
            return None
        raise
    finally:
        os.close(fd)  # a shared lock taken by the probe goes with the descriptor


def acquire(run_dir: str | os.PathLike, wait_s: float = 0.0, name: str = LOCK_NAME) -> RunLock | None:
    """Take ``run_dir``'s lock (creating the folder and the file) and record this process as its holder.

    Waits up to ``wait_s`` for a holder to end, then raises ``RunDirBusy``. Returns None, with a warning on
    stderr, where the file system has no flock: the job runs unguarded rather than not at all."""
    path = lock_path(run_dir, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                who = describe_holder(path)
                raise RunDirBusy(busy_line(run_dir, who), who) from None
            time.sleep(0.2)
        except OSError as e:
            os.close(fd)
            if e.errno in _NO_FLOCK:
                print(f"warning: {path.parent} does not support flock ({e.strerror}); two jobs started in this "
                      "folder at once would not be refused", file=sys.stderr)
                return None
            raise
    owner = {"pid": os.getpid(), "host": socket.gethostname(), "slurm_job": os.environ.get("SLURM_JOB_ID", ""),
             "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(owner) + "\n").encode(), 0)
    return RunLock(path, fd)
