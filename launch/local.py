"""Local launcher: N training ranks as child processes on this machine, no torchrun needed: one rank per visible
GPU when the job trains on GPUs (NCCL), ``launch.local_ranks`` CPU ranks (gloo) otherwise.

The launcher owns the process group of its ranks: Ctrl-C / SIGTERM is forwarded to every rank (each saves its
checkpoint; a stop still running is reported every 30 s, and a second Ctrl-C kills the ranks at once, the
checkpoints being crash-safe), and if one rank dies the others are given ``rank_timeout_s`` to notice and are then killed, so a
dead peer never leaves the job hanging. A launcher that dies without forwarding anything (SIGKILL, the OOM killer)
takes its ranks with it: each rank follows its launcher (``follow_launcher``), stops as if Ctrl-C'd, and exits
``ORPHAN_GRACE_S`` later at the latest, so no orphan keeps the GPU or the run directory.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from launch import runlock
from launch.env import RankInfo


def local_rank_count(configured: int, device: str, gpus: int | None = None) -> int:
    """How many ranks to start here. ``device``: train.device (auto, cuda or cpu); ``gpus``: the visible GPUs
    (counted when not given). On GPUs it is one rank per GPU: NCCL refuses two ranks on one device, and a GPU left
    without a rank is idle (CUDA_VISIBLE_DEVICES chooses the GPUs). ``configured`` (launch.local_ranks) counts
    CPU ranks."""
    if device == "cpu":
        return configured
    if gpus is None:
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return gpus if gpus > 0 else configured


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_envs(nprocs: int, port: int) -> list[dict[str, str]]:
    return [RankInfo(rank=r, world_size=nprocs, local_rank=r, local_world_size=nprocs, master_addr="127.0.0.1",
                     master_port=port, source="env").torch_env() for r in range(nprocs)]


def run_local(argv: list[str], nprocs: int, run_dir: Path, rank_timeout_s: int = 60,
              lock_fd: int | None = None) -> int:
    """Run ``python -m orchestrator train ARGV`` on ``nprocs`` local ranks; returns the job's exit code
    (the first failing rank's code, else 0). ``lock_fd``: the run directory's lock (launch/runlock.py), handed
    to every rank so that it stays held until the last of them ends."""
    port = free_port()
    run_dir.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen] = []
    shared = {LAUNCHER_ENV: str(os.getpid()), "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // nprocs))}
    if lock_fd is not None:
        shared[runlock.ENV_FD] = str(lock_fd)
    for env_r in rank_envs(nprocs, port):
        procs.append(subprocess.Popen([sys.executable, "-m", "orchestrator", "train", *argv],
                                      env={**os.environ, **env_r, **shared},
                                      pass_fds=() if lock_fd is None else (lock_fd,)))

    stops = _Stops(procs)
    old = {s: signal.signal(s, stops) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)}
    try:
        code = _wait(procs, rank_timeout_s, stops)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    return 130 if stops.killed else code  # killed on a second stop: still an interrupt, as a sweep counts it


class _Stops:
    """The stop signals reaching the launcher. The first SIGINT / SIGTERM goes to every rank (each checkpoints
    and stops); a second kills the ranks at once, for a stop that takes too long: the checkpoint protocol is
    crash-safe, so the run resumes from its last complete checkpoint. SIGUSR2 (checkpoint, requeue) always goes
    to the ranks."""

    def __init__(self, procs: list[subprocess.Popen]):
        self.procs = procs
        self.first_at: float | None = None
        self.killed = False

    def __call__(self, signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        live = [p for p in self.procs if p.poll() is None]
        if signum != signal.SIGUSR2 and self.first_at is not None:
            print(f"launch: {name} again: killing the ranks without a checkpoint; launching again resumes from "
                  "the last complete one", file=sys.stderr, flush=True)
            self.killed = True
            for p in live:
                p.kill()
            return
        if signum != signal.SIGUSR2:
            self.first_at = time.monotonic()
            print(f"launch: {name}: every rank saves a checkpoint and stops ({name} again: stop at once, "
                  "without one)", file=sys.stderr, flush=True)
        for p in live:
            p.send_signal(signum)


STOP_REPORT_S = 30.0  # a stop still in progress is reported this often: a long save never looks like a hang


def _wait(procs: list[subprocess.Popen], rank_timeout_s: int, stops: _Stops) -> int:
    failed_at: float | None = None
    reported_at: float | None = None
    code = 0
    while True:
        codes = [p.poll() for p in procs]
        if all(c is not None for c in codes):
            break
        now = time.monotonic()
        if stops.first_at is not None and now - (reported_at or stops.first_at) >= STOP_REPORT_S:
            reported_at = now
            running = ", ".join(str(r) for r, c in enumerate(codes) if c is None)
            print(f"launch: rank(s) {running} still stopping, {now - stops.first_at:.0f}s after the stop "
                  "(saving their checkpoint); Ctrl-C again to stop them at once", file=sys.stderr, flush=True)
        bad = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
        if bad and failed_at is None:
            failed_at = now
            code = bad[0][1]
            print(f"launch: rank {bad[0][0]} exited with code {bad[0][1]}; waiting up to {rank_timeout_s}s "
                  "for the other ranks", file=sys.stderr)
        if failed_at is not None and now - failed_at > rank_timeout_s:
            for r, p in enumerate(procs):
                if p.poll() is None:
                    print(f"launch: rank {r} still running {rank_timeout_s}s after a peer failed; killing it",
                          file=sys.stderr)
                    p.kill()
        time.sleep(0.2)
    codes = [p.returncode for p in procs]
    if code == 0:
        code = next((c for c in codes if c != 0), 0)
    # A rank killed by a signal reports -SIG; report it the shell's way.
    return 128 - code if code < 0 else code


LAUNCHER_ENV = "DANET_LAUNCHER_PID"  # set by run_local in each rank: the process the rank must not outlive
# A rank whose launcher died gets this long to checkpoint and flush after the stop, then exits regardless: a
# save stuck on a dead peer must not keep the GPU. (A danet152 checkpoint with ZeRO state to a slow shared file
# system takes tens of seconds; a tracker flush to a slow server is cut short, its spill file keeps the rest.)
ORPHAN_GRACE_S = 300.0
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def follow_launcher(grace_s: float = ORPHAN_GRACE_S, environ: dict[str, str] | None = None,
                    poll_s: float = 0.5) -> bool:
    """In a rank ``run_local`` started: end with the launcher. Returns whether there is a launcher to follow.

    When the launcher goes, even by SIGKILL (which forwards nothing), the rank gets SIGTERM: the stop Ctrl-C
    gives (checkpoint, summary 'interrupted', exit). Linux sends it at once (PR_SET_PDEATHSIG); a watcher thread
    notices within ``poll_s`` elsewhere, or when the launcher died before the rank could ask. From then on the
    rank has ``grace_s``: faulthandler's timer, which needs no GIL, prints every thread's stack and exits."""
    env = os.environ if environ is None else environ
    try:
        launcher = int(env.get(LAUNCHER_ENV, ""))
    except ValueError:
        return False
    # The kernel's signal covers a launcher that dies from now on; one gone already needs the watcher's.
    signalled = _ask_kernel(signal.SIGTERM) and os.getppid() == launcher

    def watch() -> None:
        while os.getppid() == launcher:
            time.sleep(poll_s)
        print(f"rank {env.get('RANK', '?')}: its launcher (pid {launcher}) is gone; stopping, and exiting in "
              f"{grace_s:.0f}s at the latest", file=sys.stderr, flush=True)
        faulthandler.dump_traceback_later(grace_s, exit=True)
        if not signalled:
            os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="follow-launcher", daemon=True).start()
    return True


def _ask_kernel(sig: int) -> bool:
    """Ask Linux to send ``sig`` to this process when its parent ends; False where that is not available."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False
