"""Stop requests from signals, agreed on by all ranks at a step boundary.

SIGINT / SIGTERM mean "stop": checkpoint, write summary status 'interrupted', exit non-zero.
SIGUSR2 is Slurm's pre-timeout warning (``--signal=USR2@lead``): checkpoint and ask for a requeue.
USR2 rather than USR1 because NCCL may install its own USR1 handler (submitit avoids USR1 for the same reason),
which would swallow the warning and let the job die at its time limit without a checkpoint.

A signal can reach ranks at different moments (or only some of them); each step every rank contributes its local
request to one tiny all-reduce (max), so all ranks stop after the same step and save one consistent checkpoint.
That all-reduce runs on the CPU group (orchestrator/train/dist.py): a host value agreed on without waiting for
the GPU.
"""

from __future__ import annotations

import signal

NONE, INTERRUPT, REQUEUE = 0, 1, 2
_NAMES = {NONE: "none", INTERRUPT: "interrupted", REQUEUE: "requeued"}


class StopRequests:
    """Created first thing in a rank (before the heavy imports), so a warning during start-up is not lost."""

    def __init__(self, requeue_signal: int = signal.SIGUSR2):
        self.local = NONE
        self.received: list[str] = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_stop)
        signal.signal(requeue_signal, self._on_requeue)

    def _on_stop(self, signum, frame) -> None:
        self.received.append(signal.Signals(signum).name)
        self.local = max(self.local, INTERRUPT)

    def _on_requeue(self, signum, frame) -> None:
        self.received.append(signal.Signals(signum).name)
        # A requeue wins over a plain stop: the job should come back.
        self.local = REQUEUE

    def agreed(self) -> int:
        """The strongest request of any rank (a collective: call it on every rank at the same point)."""
        import torch

        from orchestrator.train import dist  # here: this module is imported before torch, on purpose

        return int(dist.all_reduce_host([self.local], "max", torch.int32)[0])

    @staticmethod
    def name(code: int) -> str:
        return _NAMES[code]
