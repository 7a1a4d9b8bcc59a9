"""How the test helpers that join a process group (engine_probe, ckpt_worker, job_probe) end: as a rank does.

They run as scripts (this folder is first on sys.path)."""

from __future__ import annotations

from collections.abc import Callable
from typing import NoReturn

from orchestrator.cli import exit_rank
from orchestrator.train import dist


def run_probe(main: Callable[[], int]) -> NoReturn:
    """Run ``main``, leave the process group without a barrier (a failed probe's peer may be in another
    collective), then end as ``orchestrator train`` ends (``exit_rank``: flush, ``os._exit``). The interpreter's
    own teardown of gloo's threads aborted a probe now and then after it had printed its results ("terminate
    called without an active exception", rc -6), even after leaving the process group."""
    try:
        code = main()
    finally:
        dist.shutdown(sync=False)
    exit_rank(code)
