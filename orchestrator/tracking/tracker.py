"""The MLflow tracker: one run per job, written by global rank 0 only, never in the way of a training step.

Threads
-------
The caller (the training loop) only appends to in-memory queues under a lock that is held for a few list
operations, so ``log_metrics`` returns in microseconds whatever MLflow does. Two daemon threads talk to MLflow:

* the *worker* creates or resumes the run, then sends params, tags and metrics in batches (MLflow's limits:
  100 params/tags, 1000 metrics per request) and finally the terminal status;
* the *uploader* sends artifacts (files can be large: a stalled upload must not hold metrics back).

While the store is unreachable both keep their queues and retry with exponential backoff (capped at
``MAX_BACKOFF`` s); metrics are kept up to ``tracking.buffer_size`` values, dropping the oldest beyond that. One
warning is logged when an outage starts and one when it ends (with what was dropped). MLflow's own HTTP retries
are shortened (see ``util.HTTP_ENV_DEFAULTS``) so a call fails fast and the tracker's loop decides.

Resume
------
The run id lives in ``<run_dir>/mlflow_run.json``. A later start in the same run directory (a requeued Slurm job,
a manual restart) reopens that run, sets it RUNNING and counts the resume. Params are immutable in MLflow: a
param already logged with the same value is skipped; one whose value changed is logged as
``resume.<n>.<key>`` (n = the resume count) and listed in the tag ``resume.<n>.changed_params``; nothing raises.
``finish("requeued")`` flushes but leaves the run RUNNING so the next start continues it.

Metrics still buffered when ``finish`` gives up waiting (the store down at the very end) are written to
``<run_dir>/mlflow_pending.jsonl`` and sent by the next start that resumes the same run.
"""

from __future__ import annotations

import atexit
import collections
import json
import logging
import os
import shutil
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from . import util

log = logging.getLogger("orchestrator.tracking")

RUN_FILE = "mlflow_run.json"
PENDING_FILE = "mlflow_pending.jsonl"
STAGING_DIR = ".mlflow_staging"

STATUS_MAP = {
    "completed": "FINISHED",
    "finished": "FINISHED",
    "failed": "FAILED",
    "interrupted": "KILLED",
    "killed": "KILLED",
    "requeued": None,  # stays RUNNING: the next start continues it
}


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
    """Rank 0's tracker. See the module docstring for the threading and resume rules."""

    enabled = True
    START_TIMEOUT = 20.0  # start() waits this long for the run to exist, then goes on in the background
    FLUSH_INTERVAL = 0.5  # the worker sends what accumulated at most this often
    MAX_BACKOFF = 10.0  # retry interval cap while the store is unreachable
    ARTIFACT_ATTEMPTS = 10  # per artifact, failures of a store that answers; an outage is waited out
    ARTIFACT_GRACE = 600.0  # finish() waits this much longer for an upload that is making progress

    def __init__(self, *, tracking_uri: str, artifact_location: str | None, experiment: str, run_name: str,
                 run_dir: str | os.PathLike, buffer_size: int = 10000, log_system_metrics: bool = True,
                 log_checkpoints: bool = True, tags: dict | None = None):
        self.tracking_uri = tracking_uri
        self.artifact_location = artifact_location
        self.experiment_name = experiment
        self.run_name = run_name
        self.run_dir = Path(run_dir)
        self.buffer_size = max(int(buffer_size), 1)
        self.log_system_metrics = log_system_metrics
        self.log_checkpoints_enabled = log_checkpoints
        self._initial_tags = dict(tags or {})

        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.resume_index = 0  # 0 = a new run; n = the n-th resume of it

        # re-entrant: finish() may run in a signal handler that interrupted log_metrics on the same thread
        self._lock = threading.RLock()
        self._metrics: collections.deque = collections.deque()  # (key, value, timestamp_ms, step)
        self._ops: collections.deque = collections.deque()  # ("params", dict) | ("tags", dict) | ("end", st)
        self._artifacts: collections.deque = collections.deque()  # (path, artifact_path, staged_dir|None)
        self._wake = threading.Event()
        self._art_wake = threading.Event()
        self._run_ready = threading.Event()
        self._worker_done = threading.Event()
        self._closing = False
        self._abandoned = False
        self._disabled = False  # a permanent error opening the run: nothing more is sent
        self._started = False
        self._finished = False
        self._art_busy = False  # an upload is in flight right now
        self._art_abandoned = False  # finish() stopped waiting for uploads: the uploader stops too
        self._art_backoff_until = 0.0

        self._params: dict[str, str] = {}  # what the run holds (fetched on resume)
        self._outage_since: float | None = None
        self._dropped = 0
        self._drop_warned = False
        self._bad_metric_warned: set[str] = set()
        self._backoff = 0.0
        self._client = None
        self._sysmon = None
        self._pending_restored = 0
        self._worker: threading.Thread | None = None
        self._uploader: threading.Thread | None = None

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
        shutil.rmtree(self.run_dir / STAGING_DIR, ignore_errors=True)  # uploads a previous start left behind
        util.apply_http_env()
        self._worker = threading.Thread(target=self._worker_main, name="mlflow-tracker", daemon=True)
        self._uploader = threading.Thread(target=self._uploader_main, name="mlflow-uploader", daemon=True)
        self._worker.start()
        self._uploader.start()
        self._pid = os.getpid()
        atexit.register(self._at_exit)
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
        warn = False
        with self._lock:
            self._metrics.extend(rows)
            over = len(self._metrics) - self.buffer_size
            if over > 0:
                for _ in range(over):
                    self._metrics.popleft()
                self._dropped += over
                if not self._drop_warned:
                    self._drop_warned = warn = True
            n = len(self._metrics)
        if warn:
            log.warning("MLflow metric buffer full (%d values): dropping the oldest until the store catches up",
                        self.buffer_size)
        if n >= util.MAX_METRICS_PER_BATCH and self._outage_since is None:
            self._wake.set()

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Upload a file or folder in the background; retried, never raises.

        A file is hard-linked into a staging folder first (when the filesystem allows), so the upload sends the
        content as of this call even if the file is replaced or deleted meanwhile (checkpoint rotation)."""
        if self._finished or self._disabled:
            log.warning("log_artifact(%s) after finish: ignored", path)
            return
        p = Path(path)
        if not p.exists():
            log.warning("artifact %s does not exist: not logged", p)
            return
        staged = None
        if p.is_file():
            with self._lock:
                seq = len(self._artifacts) + int(time.monotonic() * 1e6)
            d = self.run_dir / STAGING_DIR / str(seq)
            try:
                d.mkdir(parents=True, exist_ok=True)
                os.link(p, d / p.name)
                staged = d
            except OSError:
                shutil.rmtree(d, ignore_errors=True)
                staged = None
        with self._lock:
            self._artifacts.append((str(staged / p.name) if staged else str(p), artifact_path, staged))
        self._art_wake.set()

    def log_checkpoint(self, path: str | os.PathLike, artifact_path: str | None = "checkpoints") -> None:
        """Upload a checkpoint (file or folder) as an artifact, retried, never fatal. Skipped when
        ``tracking.log_checkpoints`` is false."""
        if self.log_checkpoints_enabled:
            self.log_artifact(path, artifact_path)

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until everything queued so far is sent (or timeout). True if the queues drained."""
        deadline = time.monotonic() + timeout
        self._wake.set()
        self._art_wake.set()
        while time.monotonic() < deadline:
            with self._lock:
                empty = not self._metrics and not self._ops and not self._artifacts and not self._art_busy
            if empty and self._run_ready.is_set() and not self._inflight:
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
        # 1. artifacts first (the run must still be open for them); an upload in progress gets extra time
        self._art_wake.set()
        while True:
            with self._lock:
                idle = not self._artifacts and not self._art_busy
            now = time.monotonic()
            if idle or self._disabled:
                break
            if now > deadline and (not self._art_busy or now > deadline + self.ARTIFACT_GRACE):
                with self._lock:
                    n = len(self._artifacts) + int(self._art_busy)
                log.warning("MLflow: %d artifact upload(s) not done after %.0f s: giving up on them", n, timeout)
                self._art_abandoned = True
                break
            time.sleep(0.05)
        # 2. system metrics monitor: stopped before the run ends (bounded: its flush may hit a dead server)
        self._stop_sysmon(timeout=5.0)
        # 3. metrics, params, tags, then the terminal status
        self._finished = True
        self._enqueue_op(("end", status), force=True)
        with self._lock:
            self._closing = True
        self._wake.set()
        remaining = max(deadline - time.monotonic(), min(timeout, 10.0))
        if not self._worker_done.wait(remaining):
            with self._lock:
                self._abandoned = True
                pending = list(self._metrics)
                self._metrics.clear()
                nops = len(self._ops)
            spilled = self._spill(pending)
            log.warning(
                "MLflow store %s unreachable at finish: run %s not marked %s (%d buffered metric values %s, "
                "%d param/tag updates lost); it stays RUNNING until a later start resumes it",
                self.tracking_uri, self.run_id or "(not created)", STATUS_MAP[status] or "requeued",
                len(pending), f"saved to {self.run_dir / PENDING_FILE}" if spilled else "lost", nops)
        self._art_wake.set()
        with self._lock:
            uploads_left = bool(self._artifacts) or self._art_busy
        if not self._abandoned and not uploads_left:
            shutil.rmtree(self.run_dir / STAGING_DIR, ignore_errors=True)

    def _at_exit(self) -> None:
        """The process ends without finish(): send what is queued (briefly), save the rest; status untouched."""
        if self._finished or not self._started or self._disabled or os.getpid() != self._pid:
            return  # (a forked child, e.g. a data worker, has none of the threads: nothing to do there)
        if not self.flush(timeout=10.0):
            with self._lock:
                self._abandoned = True
                pending = list(self._metrics)
                self._metrics.clear()
            if pending and self._spill(pending):
                log.warning("MLflow: %d metric values not sent before exit saved to %s", len(pending),
                            self.run_dir / PENDING_FILE)

    # ------------------------------------------------------------------ internals

    _inflight = 0  # metric values popped by the worker and not yet confirmed

    def _enqueue_op(self, op: tuple, force: bool = False) -> None:
        if (self._finished and not force) or self._disabled:
            return
        with self._lock:
            self._ops.append(op)
        self._wake.set()

    def _get_client(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    # worker thread ----------------------------------------------------

    def _worker_main(self) -> None:
        try:
            while True:
                try:
                    if self.run_id is None:
                        self._open_run()
                    self._drain()
                    self._recovered()
                except _Abandoned:
                    break
                except Exception as exc:  # noqa: BLE001 - anything from the store: keep training alive
                    if self.run_id is None and util.is_permanent(exc):
                        self._disabled = True
                        log.error("MLflow tracking disabled: cannot open a run in experiment %r at %s: %s",
                                  self.experiment_name, self.tracking_uri, exc)
                        self._run_ready.set()
                        break
                    self._failed(exc)
                with self._lock:
                    done = self._closing and not self._ops and not self._metrics
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

    def _failed(self, exc: BaseException) -> None:
        self._backoff = min(max(self._backoff * 2, 1.0), self.MAX_BACKOFF)
        if self._outage_since is None:
            self._outage_since = time.monotonic()
            with self._lock:
                n = len(self._metrics)
            log.warning("MLflow store %s unreachable (%s); buffering metrics (%d now, up to %d) and retrying "
                        "every <= %.0f s", self.tracking_uri, _short(exc), n, self.buffer_size, self.MAX_BACKOFF)
        else:
            log.debug("MLflow still unreachable: %s", _short(exc))

    def _recovered(self) -> None:
        self._backoff = 0.0
        if self._outage_since is not None:
            secs = time.monotonic() - self._outage_since
            self._outage_since = None
            with self._lock:
                dropped, self._dropped = self._dropped, 0
                self._drop_warned = False
            log.warning("MLflow store %s reachable again after %.0f s; buffered metrics sent%s",
                        self.tracking_uri, secs, f", {dropped} oldest values were dropped" if dropped else "")
            self._restart_sysmon_if_dead()

    def _open_run(self) -> None:
        client = self._get_client()
        info = _read_json(self.run_dir / RUN_FILE)
        run = None
        if info.get("run_id"):
            try:
                run = client.get_run(info["run_id"])
            except Exception as exc:  # noqa: BLE001
                if not util.is_not_found(exc):
                    raise
                log.warning("MLflow run %s (from %s) not found at %s: starting a new run", info["run_id"],
                            self.run_dir / RUN_FILE, self.tracking_uri)
                run = None
            if run is not None and run.info.lifecycle_stage == "deleted":
                log.warning("MLflow run %s was deleted: starting a new run", run.info.run_id)
                run = None
        if run is not None:
            self.resume_index = int(info.get("resumes", 0)) + 1
            self._params = dict(run.data.params)
            if run.info.status != "RUNNING":
                client.update_run(run.info.run_id, status="RUNNING")
            # this start's tags (Slurm job id and restart count, host, command, versions) replace the last ones
            self._send_tags({**self._initial_tags, "resumes": str(self.resume_index)}, run.info.run_id)
            self.experiment_id = run.info.experiment_id
            self.run_id = run.info.run_id
            log.info("MLflow: resuming run %s (resume %d) at %s", self.run_id, self.resume_index,
                     self.tracking_uri)
        else:
            self.experiment_id = self._experiment_id(client)
            tags = {k: v[: util.MAX_TAG_VAL_LENGTH] for k, v in self._initial_tags.items()}
            run = client.create_run(self.experiment_id, run_name=self.run_name, tags=tags)
            self.run_id = run.info.run_id
            self.resume_index = 0
            log.info("MLflow: run %s (%s) in experiment %r at %s", self.run_id, self.run_name,
                     self.experiment_name, self.tracking_uri)
        now = datetime.now().isoformat(timespec="seconds")
        _write_json(self.run_dir / RUN_FILE, {
            "run_id": self.run_id, "experiment_id": self.experiment_id, "experiment": self.experiment_name,
            "tracking_uri": self.tracking_uri, "run_name": run.info.run_name,
            "resumes": self.resume_index, "created": info.get("created", now) if self.resume_index else now,
            "last_start": now,
        })
        self._restore_pending()
        self._run_ready.set()
        self._art_wake.set()
        self._start_sysmon()

    def _experiment_id(self, client) -> str:
        exp = client.get_experiment_by_name(self.experiment_name)
        if exp is not None and exp.lifecycle_stage == "deleted":
            log.warning("MLflow experiment %r was deleted: restoring it", self.experiment_name)
            client.restore_experiment(exp.experiment_id)
        if exp is not None:
            return exp.experiment_id
        try:
            return client.create_experiment(self.experiment_name, artifact_location=self.artifact_location)
        except Exception as exc:  # noqa: BLE001 - another job created it meanwhile
            exp = client.get_experiment_by_name(self.experiment_name)
            if exp is None:
                raise exc from None
            return exp.experiment_id

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
            with self._lock:
                batch = [self._metrics.popleft() for _ in range(min(len(self._metrics),
                                                                     util.MAX_METRICS_PER_BATCH))]
                self._inflight = len(batch)
            if batch:
                try:
                    self._send_metrics(batch)
                except BaseException:
                    with self._lock:
                        if self._abandoned:
                            self._spill(batch)
                        else:
                            self._metrics.extendleft(reversed(batch))
                            over = len(self._metrics) - self.buffer_size
                            for _ in range(max(over, 0)):
                                self._metrics.popleft()
                                self._dropped += 1
                    raise
                finally:
                    self._inflight = 0
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
            self._send_params(payload)
        elif kind == "tags":
            self._send_tags(payload)

    def _send_params(self, flat: dict[str, str]) -> None:
        from mlflow.entities import Param

        todo: dict[str, str] = {}
        changed: list[str] = []
        for k, v in flat.items():
            key = util.sanitize_key(k)
            val = v[: util.MAX_PARAM_VAL_LENGTH]
            have = self._params.get(key)
            if have is None:
                todo[key] = val
            elif have == val or (len(val) > util.LEGACY_PARAM_VAL_LENGTH
                                 and have == val[: util.LEGACY_PARAM_VAL_LENGTH]):
                continue
            else:
                new = self._renamed(key, val)
                if new is not None:
                    todo[new] = val
                    changed.append(key)
        if changed:
            log.warning("MLflow run %s already has different values for %d param(s) (%s): logged as "
                        "resume.%d.<key>", self.run_id, len(changed), ", ".join(changed[:5]) +
                        (" ..." if len(changed) > 5 else ""), self.resume_index)
        items = list(todo.items())
        client = self._get_client()
        for i in range(0, len(items), util.MAX_PARAMS_TAGS_PER_BATCH):
            chunk = items[i: i + util.MAX_PARAMS_TAGS_PER_BATCH]
            try:
                client.log_batch(self.run_id, params=[Param(k, v) for k, v in chunk], synchronous=True)
                self._params.update(chunk)
            except Exception as exc:  # noqa: BLE001
                if not util.is_permanent(exc):
                    raise
                for k, v in chunk:  # isolate the refused one(s)
                    self._send_one_param(client, k, v)
        if changed:
            tag = f"resume.{self.resume_index}.changed_params"
            self._send_tags({tag: ",".join(changed)[: util.MAX_TAG_VAL_LENGTH]})

    def _renamed(self, key: str, val: str) -> str | None:
        base = util.sanitize_key(f"resume.{self.resume_index}.{key}")
        for i in range(100):
            cand = base if i == 0 else f"{base}.{i}"
            have = self._params.get(cand)
            if have is None:
                return cand
            if have == val:
                return None
        return None

    def _send_one_param(self, client, key: str, val: str) -> None:
        for _attempt in range(3):
            try:
                client.log_param(self.run_id, key, val, synchronous=True)
                self._params[key] = val
                return
            except Exception as exc:  # noqa: BLE001
                if not util.is_permanent(exc):
                    raise
                if "already logged" in str(exc).lower() or "changing param values" in str(exc).lower():
                    new = self._renamed(key, val)  # the run has it with another value (not seen at resume)
                    if new is None:
                        return
                    key = new
                elif len(val) > util.LEGACY_PARAM_VAL_LENGTH:
                    val = val[: util.LEGACY_PARAM_VAL_LENGTH]  # an older server's limit
                else:
                    break
        log.warning("MLflow refused param %s=%r: not logged", key, val[:80])

    def _send_tags(self, tags: dict[str, str], run_id: str | None = None) -> None:
        from mlflow.entities import RunTag

        run_id = run_id or self.run_id
        items = [(k, v[: util.MAX_TAG_VAL_LENGTH]) for k, v in tags.items()]
        client = self._get_client()
        for i in range(0, len(items), util.MAX_PARAMS_TAGS_PER_BATCH):
            chunk = items[i: i + util.MAX_PARAMS_TAGS_PER_BATCH]
            try:
                client.log_batch(run_id, tags=[RunTag(k, v) for k, v in chunk], synchronous=True)
            except Exception as exc:  # noqa: BLE001
                if not util.is_permanent(exc):
                    raise
                for k, v in chunk:
                    try:
                        client.set_tag(run_id, k, v, synchronous=True)
                    except Exception as exc2:  # noqa: BLE001
                        if not util.is_permanent(exc2):
                            raise
                        log.warning("MLflow refused tag %s: %s", k, _short(exc2))

    def _send_metrics(self, batch: list[tuple]) -> None:
        from mlflow.entities import Metric

        client = self._get_client()
        try:
            client.log_batch(self.run_id, metrics=[Metric(k, v, ts, s) for k, v, ts, s in batch],
                             synchronous=True)
        except Exception as exc:  # noqa: BLE001
            if not util.is_permanent(exc):
                raise
            ok = failed = 0
            for k, v, ts, s in batch:  # isolate the refused value(s); transient errors still propagate
                if failed >= 5 and not ok:  # the run itself is refused (deleted?): not one request per value
                    log.warning("MLflow refuses metrics for run %s (%s): %d values dropped", self.run_id,
                                _short(exc), len(batch) - failed)
                    return
                try:
                    client.log_batch(self.run_id, metrics=[Metric(k, v, ts, s)], synchronous=True)
                    ok += 1
                except Exception as exc2:  # noqa: BLE001
                    if not util.is_permanent(exc2):
                        raise
                    failed += 1
                    if k not in self._bad_metric_warned:
                        self._bad_metric_warned.add(k)
                        log.warning("MLflow refused metric %s: %s", k, _short(exc2))

    def _do_end(self, status: str) -> None:
        client = self._get_client()
        mlflow_status = STATUS_MAP[status]
        tags = {"end_status": status}
        if mlflow_status is None:
            tags["requeues"] = str(self.resume_index + 1)
        self._send_tags(tags)
        if mlflow_status is not None:
            client.set_terminated(self.run_id, status=mlflow_status)
            log.info("MLflow: run %s ended %s", self.run_id, mlflow_status)
        else:
            log.info("MLflow: run %s left RUNNING for the requeued job to continue", self.run_id)

    # pending metrics across restarts --------------------------------

    def _spill(self, rows: list[tuple]) -> bool:
        if not rows or not self.run_id:
            return False
        try:
            with open(self.run_dir / PENDING_FILE, "a", encoding="utf-8") as f:
                for k, v, ts, s in rows:
                    f.write(json.dumps({"run_id": self.run_id, "k": k, "v": v, "t": ts, "s": s}) + "\n")
            return True
        except OSError as exc:
            log.warning("cannot save pending metrics: %s", exc)
            return False

    def _restore_pending(self) -> None:
        path = self.run_dir / PENDING_FILE
        if not path.exists():
            return
        rows = []
        try:
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    d = json.loads(line)
                except ValueError:
                    continue
                if d.get("run_id") == self.run_id:
                    rows.append((d["k"], float(d["v"]), int(d["t"]), int(d["s"])))
            path.unlink()
        except OSError as exc:
            log.warning("cannot read %s: %s", path, exc)
            return
        if rows:
            with self._lock:
                self._metrics.extendleft(reversed(rows[-self.buffer_size:]))
            self._pending_restored = len(rows)
            log.info("MLflow: %d metric values saved by the previous start are being sent", len(rows))

    # system metrics --------------------------------------------------

    def _start_sysmon(self, resume: bool | None = None) -> None:
        if not self.log_system_metrics or self._sysmon is not None or self._finished:
            return
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            mon = SystemMetricsMonitor(self.run_id, resume_logging=bool(self.resume_index) if resume is None
                                       else resume, tracking_uri=self.tracking_uri)
            mon.start()
            self._sysmon = mon
        except Exception as exc:  # noqa: BLE001 - psutil/pynvml missing, anything: not worth a failure
            log.warning("MLflow system metrics not available: %s", _short(exc))
            self.log_system_metrics = False

    def _restart_sysmon_if_dead(self) -> None:
        mon = self._sysmon
        proc = getattr(mon, "_process", None) if mon is not None else None
        if mon is not None and proc is not None and not proc.is_alive() and not self._finished:
            self._sysmon = None  # its loop ends when it cannot reach the store: start a new one
            self._start_sysmon(resume=True)

    def _stop_sysmon(self, timeout: float) -> None:
        mon, self._sysmon = self._sysmon, None
        if mon is None:
            return
        t = threading.Thread(target=_quiet(mon.finish), name="mlflow-sysmon-stop", daemon=True)
        t.start()
        t.join(timeout)

    # uploader thread -------------------------------------------------

    def _uploader_main(self) -> None:
        client = None
        attempts = 0
        backoff = 0.0
        warned = False
        while True:
            with self._lock:
                item = self._artifacts[0] if self._artifacts else None
                stop = (self._finished and item is None) or self._abandoned or self._art_abandoned
            if stop or self._disabled:
                return
            if item is None or not self._run_ready.is_set():
                self._art_wake.wait(1.0)
                self._art_wake.clear()
                continue
            path, artifact_path, staged = item
            with self._lock:
                self._art_busy = True
            drop = False
            try:
                if client is None:
                    from mlflow.tracking import MlflowClient

                    client = MlflowClient(tracking_uri=self.tracking_uri)
                p = Path(path)
                if p.is_dir():
                    client.log_artifacts(self.run_id, str(p), artifact_path)
                else:
                    client.log_artifact(self.run_id, str(p), artifact_path)
                drop, attempts, backoff, warned = True, 0, 0.0, False
                log.info("MLflow: uploaded %s to %s", Path(path).name, artifact_path or "artifacts root")
            except Exception as exc:  # noqa: BLE001
                # an outage does not use up attempts: only failures of a store that answers (or of the file)
                if not (util.is_unreachable(exc) or self._outage_since is not None):
                    attempts += 1
                if util.is_permanent(exc) or attempts >= self.ARTIFACT_ATTEMPTS:
                    log.warning("MLflow: upload of %s failed (%s), giving up after %d attempt(s)", path,
                                _short(exc), attempts)
                    drop, attempts, backoff, warned = True, 0, 0.0, False
                else:
                    if not warned:
                        warned = True
                        log.warning("MLflow: upload of %s failed (%s); retrying in the background", path,
                                    _short(exc))
                    backoff = min(max(backoff * 2, 1.0), self.MAX_BACKOFF)
            finally:
                with self._lock:
                    self._art_busy = False
                    if drop and self._artifacts and self._artifacts[0] is item:
                        self._artifacts.popleft()
            if drop:
                if staged:
                    shutil.rmtree(staged, ignore_errors=True)
            else:
                self._art_wake.wait(backoff if not self._finished else min(backoff, 1.0))
                self._art_wake.clear()


def _short(exc: BaseException, n: int = 200) -> str:
    s = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return s if len(s) <= n else s[: n - 3] + "..."


def _quiet(fn):
    def run():
        try:
            fn()
        except Exception as exc:  # noqa: BLE001
            log.debug("ignored: %s", exc)

    return run


def _read_json(path: Path) -> dict:
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
        return d if isinstance(d, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("cannot write %s: %s (a restart will start a new MLflow run)", path, exc)
