"""Local launcher: N training ranks as child processes on this machine, no torchrun needed: one rank per visible
GPU when the job trains on GPUs (NCCL), ``launch.local_ranks`` CPU ranks (gloo) otherwise.

The launcher owns the process group of its ranks: Ctrl-C / SIGTERM is forwarded to every rank (each saves its
checkpoint), and if one rank dies the others are given ``rank_timeout_s`` to notice and are then killed, so a
dead peer never leaves the job hanging.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

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


def run_local(argv: list[str], nprocs: int, run_dir: Path, rank_timeout_s: int = 60) -> int:
    """Run ``python -m orchestrator train ARGV`` on ``nprocs`` local ranks; returns the job's exit code
    (the first failing rank's code, else 0)."""
    port = free_port()
    run_dir.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen] = []
    for env_r in rank_envs(nprocs, port):
        env = {**os.environ, **env_r, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // nprocs))}
        procs.append(subprocess.Popen([sys.executable, "-m", "orchestrator", "train", *argv], env=env))

    def forward(signum, frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)}
    try:
        return _wait(procs, rank_timeout_s)
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _wait(procs: list[subprocess.Popen], rank_timeout_s: int) -> int:
    failed_at: float | None = None
    code = 0
    while True:
        codes = [p.poll() for p in procs]
        if all(c is not None for c in codes):
            break
        bad = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
        if bad and failed_at is None:
            failed_at = time.monotonic()
            code = bad[0][1]
            print(f"launch: rank {bad[0][0]} exited with code {bad[0][1]}; waiting up to {rank_timeout_s}s "
                  "for the other ranks", file=sys.stderr)
        if failed_at is not None and time.monotonic() - failed_at > rank_timeout_s:
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
