"""The MLflow tracker: one run per job, written by global rank 0 only, never in the way of a training step.

Threads
-------
The caller (the training loop) only appends to in-memory queues under a lock that is held for a few list
operations, so ``log_metrics`` returns in microseconds whatever MLflow does. Two daemon threads talk to MLflow:

* the *worker* (this module) opens the run (``session.RunSession``), then sends params, tags, dataset inputs and
  metrics in batches (MLflow's limits: 100 params/tags, 1000 metrics per request) and finally the terminal
  status and the run's figures (``figures.run_figures``);
* the *uploader* (``uploader.Uploader``) sends artifacts and, at the end, the best weights as a logged model
  (``logged_model``): files can be large, a stalled upload must not hold metrics back.

While the store is unreachable both keep their queues and retry with exponential backoff (capped at
``MAX_BACKOFF`` s); metrics are kept up to ``tracking.buffer_size`` values, dropping the oldest beyond that
(``buffer.MetricBuffer``). One warning is logged when an outage starts and one when it ends (with what was
dropped). MLflow's own HTTP retries are shortened (see ``util.HTTP_ENV_DEFAULTS``) so a call fails fast and the
tracker's loop decides.

Resume
------
See ``session.py``: the run id lives in ``<run_dir>/mlflow_run.json`` and a later start reopens that run.
``finish("requeued")`` flushes but leaves the run RUNNING so the next start continues it. Metrics still buffered
when ``finish`` gives up waiting (the store down at the very end) are written to ``<run_dir>/mlflow_pending.jsonl``
and sent by the next start that resumes the same run.
"""

from __future__ import annotations

import atexit
import collections
import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from . import buffer, util
from .buffer import PENDING_FILE
from .logged_model import MODEL_FILE, LoggedModelUpload, model_params
from .session import RUN_FILE, STATUS_MAP, RunSession, SystemMetrics, read_json, write_json
from .uploader import STAGING_DIR, Upload, Uploader

log = logging.getLogger("orchestrator.tracking")

__all__ = ["NoopTracker", "MlflowTracker", "STATUS_MAP", "RUN_FILE", "PENDING_FILE", "STAGING_DIR"]
FIGURES_DIR = "figures"  # in the run directory, and the artifact folder the run's figures go to


class NoopTracker:
    """What every rank but global rank 0 gets (and every rank when tracking.backend is "none")."""

    run_id: str | None = None
    tracking_uri: str | None = None
    experiment_id: str | None = None
    enabled = False

    def start(self) -> NoopTracker:
        return self

    def log_params(self, params: Any) -> None:
        pass

    def set_tags(self, tags: dict) -> None:
        pass

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        pass

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        pass

    def log_checkpoint(self, path: str | os.PathLike, artifact_path: str | None = "checkpoints") -> None:
        pass

    def log_model(self, path: str | os.PathLike, metrics: dict | None = None, step: int | None = None) -> None:
        pass

    def flush(self, timeout: float = 30.0) -> bool:
        return True

    def finish(self, status: str = "completed", timeout: float = 30.0) -> None:
        pass

    def __enter__(self):
        return self.start()

    def __exit__(self, exc_type, exc, tb):
        self.finish("failed" if exc_type else "completed")
        return False


class _Abandoned(Exception):
    pass


class MlflowTracker(NoopTracker):
    """Rank 0's tracker. See the module docstring for the threading rules, ``session.py`` for resume."""

    enabled = True
    START_TIMEOUT = 20.0  # start() waits this long for the run to exist, then goes on in the background
    FLUSH_INTERVAL = 0.5  # the worker sends what accumulated at most this often
    MAX_BACKOFF = 10.0  # retry interval cap while the store is unreachable
    ARTIFACT_ATTEMPTS = 10  # per artifact, failures of a store that answers; an outage is waited out
    ARTIFACT_GRACE = 600.0  # finish() waits this much longer for an upload that is making progress

    def __init__(self, *, tracking_uri: str, artifact_location: str | None, experiment: str, run_name: str,
                 run_dir: str | os.PathLike, buffer_size: int = 10000, log_system_metrics: bool = True,
                 log_checkpoints: bool = True, tags: dict | None = None, parent_run_id: str = "",
                 register_model: str = "", datasets: list | None = None, unique_name: bool = False,
                 log_figures: bool = True):
        self.tracking_uri = tracking_uri
        self.artifact_location = artifact_location
        self.run_dir = Path(run_dir)
        self.buffer_size = max(int(buffer_size), 1)
        self.log_checkpoints_enabled = log_checkpoints
        self.register_model = register_model
        self.log_figures = log_figures
        self._datasets = list(datasets or [])
        self._session = RunSession(tracking_uri=tracking_uri, artifact_location=artifact_location,
                                   experiment=experiment, run_name=run_name, run_dir=self.run_dir,
                                   tags=dict(tags or {}), parent_run_id=parent_run_id, unique_name=unique_name)
        self._sysmon = SystemMetrics(tracking_uri, log_system_metrics)

        # re-entrant: finish() may run in a signal handler that interrupted log_metrics on the same thread
        self._lock = threading.RLock()
        self._buffer = buffer.MetricBuffer(buffer_size, self._lock)
        self._ops: collections.deque = collections.deque()  # ("params"|"tags"|"inputs", payload) | ("end", st)
        self._wake = threading.Event()
        self._run_ready = threading.Event()
        self._worker_done = threading.Event()
        self._uploads = Uploader(tracking_uri=tracking_uri, run_dir=self.run_dir, lock=self._lock,
                                 run_ready=self._run_ready, run_id=lambda: self.run_id,
                                 in_outage=lambda: self._outage_since is not None, max_backoff=self.MAX_BACKOFF,
                                 attempts=self.ARTIFACT_ATTEMPTS)
        self._closing = False
        self._abandoned = False
        self._disabled = False  # a permanent error opening the run: nothing more is sent
        self._started = False
        self._finished = False
        self._ended = False  # the terminal status reached the store (what remains: the figures)
        self._figures_sent = False
        self._figures_todo: list[Path] | None = None  # drawn, not uploaded yet

        self._logged_params: dict[str, str] = {}  # what log_params was given (the logged model keeps model.*)
        self._best: tuple | None = None  # (file to upload, file name, metrics, step, staged dir)
        self._outage_since: float | None = None
        self._bad_metric_warned: set[str] = set()
        self._backoff = 0.0
        self._worker: threading.Thread | None = None

    # what the session knows: the run as the store has it
    experiment_name = property(lambda self: self._session.experiment_name)
    run_name = property(lambda self: self._session.run_name)
    run_id = property(lambda self: self._session.run_id)
    experiment_id = property(lambda self: self._session.experiment_id)
    resume_index = property(lambda self: self._session.resume_index)

    # ------------------------------------------------------------------ caller side (never blocks long)

    def start(self) -> MlflowTracker:
        """Create the run, or reopen the one named in ``run_dir/mlflow_run.json``; wait at most START_TIMEOUT."""
        if self._started:
            return self
        self._started = True
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # the run id cannot be kept: tracking still works, a restart starts a new run
            log.warning("cannot create %s: %s", self.run_dir, exc)
        util.apply_http_env()
        self._worker = threading.Thread(target=self._worker_main, name="mlflow-tracker", daemon=True)
        self._worker.start()
        self._uploads.start()
        self._pid = os.getpid()
        atexit.register(self._at_exit)
        if self._datasets:
            self._enqueue_op(("inputs", self._datasets))
        if not self._run_ready.wait(self.START_TIMEOUT) and not self._disabled:
            log.warning("MLflow store %s not reachable yet; the run will be created when it is (metrics are "
                        "buffered, training goes on)", self.tracking_uri)
        return self

    def log_params(self, params: Any) -> None:
        """Flattened with dotted keys; on a resumed run, identical values are skipped and changed ones are logged
        as ``resume.<n>.<key>``."""
        try:
            flat = util.flatten(params)
        except TypeError as exc:
            log.warning("log_params ignored: %s", exc)
            return
        if flat:
            self._logged_params.update(flat)
            self._enqueue_op(("params", flat))

    def set_tags(self, tags: dict) -> None:
        if tags:
            self._enqueue_op(("tags", {util.sanitize_key(k): util.value_str(v) for k, v in tags.items()}))

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        """Queue metric values for ``step`` (timestamped now); returns at once. Non-numbers are skipped."""
        if self._finished or self._disabled or not metrics:
            return
        ts = int(time.time() * 1000)
        try:
            step = int(step) if step is not None else 0
            items = list(metrics.items())
        except (TypeError, ValueError, AttributeError) as exc:
            log.warning("log_metrics ignored: %s", exc)
            return
        rows = []
        for k, v in items:
            f = util.to_float(v)
            if f is None:
                if k not in self._bad_metric_warned:
                    self._bad_metric_warned.add(k)
                    log.warning("metric %r has a non-numeric value (%r): not logged", k, type(v).__name__)
                continue
            rows.append((util.sanitize_key(k), f, ts, step))
        if not rows:
            return
        n, first_drop = self._buffer.add(rows)
        if first_drop:
            log.warning("MLflow metric buffer full (%d values): dropping the oldest until the store catches up",
                        self.buffer_size)
        if n >= util.MAX_METRICS_PER_BATCH and self._outage_since is None:
            self._wake.set()

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Upload a file or folder in the background; retried, never raises. A file's content is the one at
        the time of this call (see ``Uploader.add_path``)."""
        if self._finished or self._disabled:
            log.warning("log_artifact(%s) after finish: ignored", path)
            return
        p = Path(path)
        if not p.exists():
            log.warning("artifact %s does not exist: not logged", p)
            return
        self._uploads.add_path(p, artifact_path)

    def log_checkpoint(self, path: str | os.PathLike, artifact_path: str | None = "checkpoints") -> None:
        """Upload a checkpoint (file or folder) as an artifact, retried, never fatal. Skipped when
        ``tracking.log_checkpoints`` is false."""
        if self.log_checkpoints_enabled:
            self.log_artifact(path, artifact_path)

    def log_model(self, path: str | os.PathLike, metrics: dict | None = None, step: int | None = None) -> None:
        """Keep the weights file ``path`` (the best so far, with its ``metrics``) as the run's model: when the run
        ends it is logged as an MLflow logged model (and registered under ``tracking.register_model``). Only the
        last call counts; its content is the one at the time of the call. Returns at once."""
        if self._finished or self._disabled:
            return
        p = Path(path)
        if not p.is_file():
            log.warning("model weights %s is not a file: not logged", p)
            return
        metrics = {util.sanitize_key(k): f for k, v in (metrics or {}).items() if (f := util.to_float(v)) is not None}
        staged = self._uploads.stage(p)
        with self._lock:
            old, self._best = self._best, (staged / p.name if staged else p, p.name, metrics, int(step or 0), staged)
        if old is not None and old[4] is not None:
            shutil.rmtree(old[4], ignore_errors=True)
        # a later process resuming this run (requeue) may never beat it: it finds the candidate here
        write_json(self.run_dir / MODEL_FILE, {"path": str(p.resolve()), "metrics": metrics, "step": int(step or 0)})

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until everything queued so far is sent (or timeout). True if the queues drained."""
        deadline = time.monotonic() + timeout
        self._wake.set()
        self._uploads.wake.set()
        while time.monotonic() < deadline:
            with self._lock:
                empty = not len(self._buffer) and not self._ops and self._uploads.idle()
            if empty and self._run_ready.is_set() and not self._buffer.inflight:
                return True
            if self._disabled:
                return False
            time.sleep(0.05)
        return False

    def finish(self, status: str = "completed", timeout: float = 30.0) -> None:
        """Flush and end the run: completed -> FINISHED, failed -> FAILED, interrupted -> KILLED;
        requeued -> flushed, left RUNNING. Waits at most ``timeout`` s (longer only for an upload in progress)."""
        if self._finished or not self._started:
            self._finished = True
            return
        atexit.unregister(self._at_exit)
        status = (status or "completed").lower()
        if status not in STATUS_MAP:
            log.warning("finish(%r): unknown status, treated as 'failed'", status)
            status = "failed"
        deadline = time.monotonic() + timeout
        # 1. artifacts (and the logged model) first, while the run is open; an upload in progress gets extra time
        if STATUS_MAP[status] is not None:
            self._queue_model()
        # no grace for a requeue: the batch script still has to run `scontrol requeue` before the time limit
        # (the signal comes only minutes ahead), and the run continues in the next start, which logs again
        grace = 0.0 if status == "requeued" else self.ARTIFACT_GRACE
        if not self._uploads.wait_idle(deadline, grace, lambda: self._disabled):
            log.warning("MLflow: %d artifact upload(s) not done after %.0f s: giving up on them",
                        self._uploads.pending(), timeout)
        # 2. system metrics monitor: stopped before the run ends (bounded: its flush may hit a dead server)
        self._sysmon.stop(timeout=5.0)
        # 3. metrics, params, tags, then the terminal status (and the run's figures)
        self._finished = True
        self._uploads.close()
        self._enqueue_op(("end", status), force=True)
        with self._lock:
            self._closing = True
        self._wake.set()
        remaining = max(deadline - time.monotonic(), min(timeout, 10.0))
        if not self._worker_done.wait(remaining):
            with self._lock:
                self._abandoned = True
                pending = self._buffer.drain()
                nops = len(self._ops)
            self._uploads.stop()
            if self._ended:
                log.warning("MLflow: run %s ended %s; its figures were not uploaded within %.0f s", self.run_id,
                            STATUS_MAP[status], timeout)
            else:
                spilled = buffer.spill(self.run_dir, self.run_id, pending)
                log.warning(
                    "MLflow store %s unreachable at finish: run %s not marked %s (%d buffered metric values %s, "
                    "%d param/tag updates lost); it stays RUNNING until a later start resumes it",
                    self.tracking_uri, self.run_id or "(not created)", STATUS_MAP[status] or "requeued",
                    len(pending), f"saved to {self.run_dir / PENDING_FILE}" if spilled else "lost", nops)
        if not self._abandoned and self._uploads.idle():
            self._uploads.clean_staging()

    def _queue_model(self) -> None:
        """The best weights (this process's, else a previous process's candidate not logged yet) as an upload."""
        with self._lock:
            best, self._best = self._best, None
        saved = read_json(self.run_dir / MODEL_FILE)
        if best is None:
            path = Path(saved.get("path", "")) if saved.get("path") and not saved.get("model_id") else None
            if path is None or not path.is_file():
                return
            staged = self._uploads.stage(path)
            best = (staged / path.name if staged else path, path.name, saved.get("metrics") or {},
                    int(saved.get("step", 0)), staged)
        weights, name, metrics, step, staged = best
        job = LoggedModelUpload(weights=weights, file_name=name, name=f"{self.run_name}-best",
                                experiment_id=lambda: self.experiment_id, metrics=metrics, step=step,
                                params=model_params(self._logged_params or self._session.params),
                                register_as=self.register_model)

        def send(client, run_id: str) -> None:
            job(client, run_id)
            write_json(self.run_dir / MODEL_FILE, {**read_json(self.run_dir / MODEL_FILE),
                                                   "model_id": job.model_id, "registered_version": job.version})

        label = f"logged model {job.name}" + (f" (registered as {self.register_model})" if self.register_model else "")
        self._uploads.add(Upload(label, send, staged))

    def _at_exit(self) -> None:
        """The process ends without finish(): send what is queued (briefly), save the rest; status untouched."""
        if self._finished or not self._started or self._disabled or os.getpid() != self._pid:
            return  # (a forked child, e.g. a data worker, has none of the threads: nothing to do there)
        if not self.flush(timeout=10.0):
            with self._lock:
                self._abandoned = True
                pending = self._buffer.drain()
            self._uploads.stop()
            if pending and buffer.spill(self.run_dir, self.run_id, pending):
                log.warning("MLflow: %d metric values not sent before exit saved to %s", len(pending),
                            self.run_dir / PENDING_FILE)

    # ------------------------------------------------------------------ worker thread

    def _enqueue_op(self, op: tuple, force: bool = False) -> None:
        if (self._finished and not force) or self._disabled:
            return
        with self._lock:
            self._ops.append(op)
        self._wake.set()

    def _worker_main(self) -> None:
        try:
            while True:
                try:
                    if self.run_id is None:
                        self._open()
                    self._drain()
                    self._recovered()
                except _Abandoned:
                    break
                except Exception as exc:  # noqa: BLE001 - anything from the store: keep training alive
                    if self.run_id is None and util.is_permanent(exc):
                        self._disabled = True
                        self._uploads.stop()
                        log.error("MLflow tracking disabled: cannot open a run in experiment %r at %s: %s",
                                  self.experiment_name, self.tracking_uri, exc)
                        self._run_ready.set()
                        break
                    self._failed(exc)
                with self._lock:
                    done = self._closing and not self._ops and not len(self._buffer)
                    abandoned = self._abandoned
                if done or abandoned:
                    break
                if self._outage_since is not None:
                    delay = self._backoff if not self._closing else min(self._backoff, 1.0)
                else:
                    delay = self.FLUSH_INTERVAL
                self._wake.wait(delay)
                self._wake.clear()
        finally:
            self._worker_done.set()

    def _open(self) -> None:
        self._session.open()
        rows = buffer.load_pending(self.run_dir, self.run_id)
        if rows:
            self._buffer.restore(rows)
            log.info("MLflow: %d metric values saved by the previous start are being sent", len(rows))
        self._run_ready.set()
        self._uploads.wake.set()
        if not self._finished:
            self._sysmon.start(self.run_id, resume=bool(self.resume_index))

    def _failed(self, exc: BaseException) -> None:
        self._backoff = min(max(self._backoff * 2, 1.0), self.MAX_BACKOFF)
        if self._outage_since is None:
            self._outage_since = time.monotonic()
            log.warning("MLflow store %s unreachable (%s); buffering metrics (%d now, up to %d) and retrying "
                        "every <= %.0f s", self.tracking_uri, util.short(exc), len(self._buffer), self.buffer_size,
                        self.MAX_BACKOFF)
        else:
            log.debug("MLflow still unreachable: %s", util.short(exc))

    def _recovered(self) -> None:
        self._backoff = 0.0
        if self._outage_since is not None:
            secs = time.monotonic() - self._outage_since
            self._outage_since = None
            dropped = self._buffer.reset_dropped()
            log.warning("MLflow store %s reachable again after %.0f s; buffered metrics sent%s",
                        self.tracking_uri, secs, f", {dropped} oldest values were dropped" if dropped else "")
            if not self._finished:
                self._sysmon.restart_if_dead(self.run_id)

    def _drain(self) -> None:
        """Send everything queued; raises on a transient failure (the unsent part stays queued)."""
        while True:
            if self._abandoned:
                raise _Abandoned()
            with self._lock:
                op = self._ops[0] if self._ops else None
            if op is not None and op[0] != "end":
                self._do_op(op)
                with self._lock:
                    self._ops.popleft()
                continue
            batch = self._buffer.take(util.MAX_METRICS_PER_BATCH)
            if batch:
                try:
                    self._session.send_metrics(batch)
                except BaseException:
                    with self._lock:
                        if self._abandoned:
                            buffer.spill(self.run_dir, self.run_id, batch)
                        else:
                            self._buffer.put_back(batch)
                    raise
                finally:
                    self._buffer.done()
                continue
            if op is not None:  # "end": only once every metric went out
                self._do_end(op[1])
                with self._lock:
                    self._ops.popleft()
                continue
            return

    def _do_op(self, op: tuple) -> None:
        kind, payload = op
        if kind == "params":
            self._session.send_params(payload)
        elif kind == "tags":
            self._session.send_tags(payload)
        elif kind == "inputs":
            self._session.send_inputs(payload)

    def _do_end(self, status: str) -> None:
        if not self._ended:
            terminated = self._session.end(status)
            self._ended = True
            if not terminated:
                self._figures_sent = True  # a requeued job: its continuation draws them
        if self.log_figures and not self._figures_sent:
            self._send_figures()
            self._figures_sent = True

    def _send_figures(self) -> None:
        """The run's curves and firing rates as PNGs in run_dir/figures, uploaded to the run's figures/."""
        client = self._session.client()
        if self._figures_todo is None:  # drawn once: a failed upload is retried without drawing again
            try:
                from . import figures

                self._figures_todo = figures.run_figures(client, self.run_id, self.run_dir / FIGURES_DIR)
            except Exception as exc:  # noqa: BLE001
                if util.is_unreachable(exc) or (util.http_status_of(exc) or 0) >= 500:
                    raise
                log.warning("MLflow: the run's figures could not be drawn: %s", util.short(exc))
                return
        while self._figures_todo:
            p = self._figures_todo[0]
            try:
                client.log_artifact(self.run_id, str(p), FIGURES_DIR)
                log.info("MLflow: uploaded %s to %s", p.name, FIGURES_DIR)
            except Exception as exc:  # noqa: BLE001
                if not util.is_permanent(exc):
                    raise
                log.warning("MLflow: upload of %s failed: %s", p.name, util.short(exc))
            self._figures_todo.pop(0)
