"""The tracker's artifact uploader: its own thread, so a large or stalled upload never holds metrics back.

Each queued upload is a callable that sends one thing with an ``MlflowClient`` (a file, a folder, a logged model).
Uploads run in order, only once the run exists. A store that is unreachable is waited out (an outage uses up no
attempts); a store that answers with an error gets ``attempts`` tries per upload; a permanent error (a missing
file, a refused request) drops the upload at once with a warning. Nothing here raises into the caller.
"""

from __future__ import annotations

import collections
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import util

log = logging.getLogger("orchestrator.tracking")

STAGING_DIR = ".mlflow_staging"


@dataclass
class Upload:
    label: str  # for the log lines: what is sent and where
    send: Callable  # send(client, run_id); raises on failure (retried by the uploader)
    staged: Path | None = None  # the staging folder to remove once the upload is done or dropped


class Uploader:
    """Runs queued uploads in a daemon thread; see the module docstring for the retry rules."""

    def __init__(self, *, tracking_uri: str, run_dir: Path, lock: threading.RLock, run_ready: threading.Event,
                 run_id: Callable[[], str | None], in_outage: Callable[[], bool], max_backoff: float,
                 attempts: int):
        self.tracking_uri = tracking_uri
        self.staging = Path(run_dir) / STAGING_DIR
        self.lock = lock
        self.run_ready = run_ready
        self.run_id = run_id
        self.in_outage = in_outage
        self.max_backoff = max_backoff
        self.attempts = attempts
        self.queue: collections.deque[Upload] = collections.deque()
        self.busy = False  # an upload is in flight right now
        self.closing = False  # no more uploads will come: stop once the queue is empty
        self.stopped = False  # stop now, whatever is queued
        self.wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._seq = 0

    def start(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)  # uploads a previous process left behind
        self._thread = threading.Thread(target=self._main, name="mlflow-uploader", daemon=True)
        self._thread.start()

    # caller side ------------------------------------------------------

    def add(self, upload: Upload) -> None:
        with self.lock:
            self.queue.append(upload)
        self.wake.set()

    def add_path(self, path: Path, artifact_path: str | None) -> None:
        """Queue a file or folder as a run artifact. A file is hard-linked into the staging folder first (where the
        filesystem allows) so the upload sends the content as of this call, even if the file is replaced or
        deleted meanwhile (checkpoint rotation)."""
        staged = self.stage(path)
        src = str(staged / path.name) if staged else str(path)

        def send(client, run_id: str) -> None:
            if Path(src).is_dir():
                client.log_artifacts(run_id, src, artifact_path)
            else:
                client.log_artifact(run_id, src, artifact_path)

        self.add(Upload(f"{path.name} to {artifact_path or 'artifacts root'}", send, staged))

    def stage(self, path: Path) -> Path | None:
        """A private folder holding a hard link to the file ``path``, or None (a folder, or linking failed)."""
        if not path.is_file():
            return None
        with self.lock:
            self._seq += 1
            seq = f"{int(time.monotonic() * 1e6)}-{self._seq}"
        d = self.staging / seq
        try:
            d.mkdir(parents=True, exist_ok=True)
            os.link(path, d / path.name)
            return d
        except OSError:
            shutil.rmtree(d, ignore_errors=True)
            return None

    def idle(self) -> bool:
        with self.lock:
            return not self.queue and not self.busy

    def pending(self) -> int:
        with self.lock:
            return len(self.queue) + int(self.busy)

    def wait_idle(self, deadline: float, grace: float, stop_waiting: Callable[[], bool]) -> bool:
        """Wait until every upload is done: at most until ``deadline`` (monotonic), or ``grace`` s beyond it while
        an upload is in flight. False when it gave up (the uploader then stops)."""
        self.wake.set()
        while True:
            now = time.monotonic()
            if self.idle() or stop_waiting():
                return True
            if now > deadline and (not self.busy or now > deadline + grace):
                self.stopped = True
                return False
            time.sleep(0.05)

    def close(self) -> None:
        """No more uploads: the thread ends once the queue is empty."""
        self.closing = True
        self.wake.set()

    def stop(self) -> None:
        self.stopped = True
        self.wake.set()

    def clean_staging(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)

    # uploader thread --------------------------------------------------

    def _main(self) -> None:
        client = None
        attempts = 0
        backoff = 0.0
        warned = False
        while True:
            with self.lock:
                item = self.queue[0] if self.queue else None
                stop = (self.closing and item is None) or self.stopped
            if stop:
                return
            if item is None or not self.run_ready.is_set():
                self.wake.wait(1.0)
                self.wake.clear()
                continue
            with self.lock:
                self.busy = True
            drop = False
            try:
                if client is None:
                    from mlflow.tracking import MlflowClient

                    client = MlflowClient(tracking_uri=self.tracking_uri)
                item.send(client, self.run_id())
                drop, attempts, backoff, warned = True, 0, 0.0, False
                log.info("MLflow: uploaded %s", item.label)
            except Exception as exc:  # noqa: BLE001
                # an outage does not use up attempts: only failures of a store that answers (or of the file)
                if not (util.is_unreachable(exc) or self.in_outage()):
                    attempts += 1
                if util.is_permanent(exc) or attempts >= self.attempts:
                    log.warning("MLflow: upload of %s failed (%s), giving up after %d attempt(s)", item.label,
                                util.short(exc), attempts)
                    drop, attempts, backoff, warned = True, 0, 0.0, False
                else:
                    if not warned:
                        warned = True
                        log.warning("MLflow: upload of %s failed (%s); retrying in the background", item.label,
                                    util.short(exc))
                    backoff = min(max(backoff * 2, 1.0), self.max_backoff)
            finally:
                with self.lock:
                    self.busy = False
                    if drop and self.queue and self.queue[0] is item:
                        self.queue.popleft()
            if drop:
                if item.staged:
                    shutil.rmtree(item.staged, ignore_errors=True)
            else:
                self.wake.wait(backoff if not self.closing else min(backoff, 1.0))
                self.wake.clear()
