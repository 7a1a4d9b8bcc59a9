"""A rank whose training stops moving says where it is stuck.

A hang at scale is a rank that never reaches its next step: a read stuck on a shared file system, a wedged
loader, a peer that died inside a collective. The others wait in their next all-reduce until the process group's
timeout ends the job, and every log then shows a collective timing out, not the rank or the line at fault.
``StallWatch`` is a watcher thread per rank: when no training step has finished for ``after_s`` seconds it prints
one line and every thread's Python stack to the rank's log, again every ``after_s`` while the stall
lasts, and carries on (a slow step that ends is only reported). ``after_s`` is below the process group's
timeout (300 s at least), so the stacks come before that timeout ends the job.

Steps only: the watch starts at the first finished step (the first one includes compilation and cuDNN's
autotuning) and is paused around evaluation and checkpoints (``paused``), which take as long as they take.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
import traceback
from collections.abc import Iterator

log = logging.getLogger("orchestrator.train")  # the rank's log: its lines carry the rank


class StallWatch:
    """``beat(step)`` after every finished step; ``with paused():`` around work that is not a step. A context
    manager: the thread ends with the block (or ``close``)."""

    def __init__(self, after_s: float, poll_s: float = 1.0):
        """``after_s`` <= 0: off (the same calls, no thread)."""
        self.after_s, self.poll_s = after_s, min(poll_s, max(after_s, 0.0) / 4)
        self._lock = threading.Lock()
        self._last: float | None = None  # when the last step finished (None: not started, or paused)
        self._step = 0
        self._reported = 0.0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="stall-watch", daemon=True)
        if after_s > 0:
            self._thread.start()

    def beat(self, step: int) -> None:
        with self._lock:
            self._last, self._step = time.monotonic(), step

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        with self._lock:
            was, self._last = self._last, None
        try:
            yield
        finally:
            with self._lock:
                self._last = time.monotonic() if was is not None else None

    def close(self) -> None:
        self._done.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def __enter__(self) -> StallWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _watch(self) -> None:
        while not self._done.wait(self.poll_s):
            with self._lock:
                last, step = self._last, self._step
            now = time.monotonic()
            if last is None or now - last < self.after_s or now - self._reported < self.after_s:
                continue
            self._reported = now
            log.warning("no training step has finished for %.0fs (the last was step %d); where every thread is:\n%s",
                        now - last, step, thread_stacks())


def thread_stacks() -> str:
    """Every thread's Python stack, innermost call last, each headed by the thread's name; the main thread
    (the training loop) first."""
    names = {t.ident: t.name for t in threading.enumerate()}
    me, main = threading.get_ident(), threading.main_thread().ident
    parts = []
    frames = sorted(sys._current_frames().items(), key=lambda kv: kv[0] != main)
    for ident, frame in frames:
        if ident == me:
            continue  # the watcher itself
        parts.append(f"  thread {names.get(ident, ident)}:\n" + "".join(traceback.format_stack(frame)))
    return "".join(parts)
