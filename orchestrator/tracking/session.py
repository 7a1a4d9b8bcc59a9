"""One MLflow run's lifecycle, as the tracker's worker thread drives it: open (create or resume), send params,
tags, metrics and dataset inputs, end. Every call talks to the store synchronously and raises on failure; the
tracker decides what a failure means (``util.is_permanent``: drop and warn; otherwise retry later).

Resume: the run id lives in ``<run_dir>/mlflow_run.json``. A later start in the same run directory reopens that
run, sets it RUNNING and counts the resume. Params are immutable in MLflow: a param already logged with the same
value is skipped; one whose value changed is logged as ``resume.<n>.<key>`` (n = the resume count) and listed in
the tag ``resume.<n>.changed_params``; nothing raises.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from datetime import datetime
from pathlib import Path

from . import util

log = logging.getLogger("orchestrator.tracking")

RUN_FILE = "mlflow_run.json"
PARENT_TAG = "mlflow.parentRunId"
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
# the UI's "model training" experiment kind: it opens such an experiment on its runs table (not GenAI traces)
EXPERIMENT_KIND = "custom_model_development"

STATUS_MAP = {
    "completed": "FINISHED",
    "finished": "FINISHED",
    "failed": "FAILED",
    "interrupted": "KILLED",
    "killed": "KILLED",
    "requeued": None,  # stays RUNNING: the next start continues it
}


class RunSession:
    """The MLflow side of one tracked run (no threads of its own)."""

    def __init__(self, *, tracking_uri: str, artifact_location: str | None, experiment: str, run_name: str,
                 run_dir: Path, tags: dict[str, str], parent_run_id: str = "", unique_name: bool = False):
        self.tracking_uri = tracking_uri
        self.artifact_location = artifact_location
        self.experiment_name = experiment
        self.run_name = run_name
        self.unique_name = unique_name  # a default name: suffixed -2, -3 ... if the experiment has it already
        self.run_dir = run_dir
        self.initial_tags = dict(tags)
        if parent_run_id:
            self.initial_tags[PARENT_TAG] = parent_run_id
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.resume_index = 0  # 0 = a new run; n = the n-th resume of it
        self.params: dict[str, str] = {}  # what the run holds (fetched on resume)
        self.inputs: set[tuple[str, str]] = set()  # (dataset name, digest) the run has as inputs
        self.bad_metric_warned: set[str] = set()
        self._client = None

    def client(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    # open ---------------------------------------------------------------

    def open(self) -> None:
        """Create the run, or resume the one ``run_dir/mlflow_run.json`` names; write that file."""
        client = self.client()
        info = read_json(self.run_dir / RUN_FILE)
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
            self.params = dict(run.data.params)
            self.inputs = {(d.dataset.name, d.dataset.digest) for d in run.inputs.dataset_inputs}
            if run.info.status != "RUNNING":
                client.update_run(run.info.run_id, status="RUNNING")
            # this start's tags (Slurm job id and restart count, host, command, versions) replace the last ones;
            # the parent link is kept whether or not this start was given it
            tags = {**self.initial_tags, "resumes": str(self.resume_index)}
            if info.get("parent_run_id") and PARENT_TAG not in tags:
                tags[PARENT_TAG] = info["parent_run_id"]
            self.send_tags(tags, run.info.run_id)
            self.experiment_id = run.info.experiment_id
            self._ensure_experiment_kind(client.get_experiment(self.experiment_id))
            self.run_id = run.info.run_id
            log.info("MLflow: resuming run %s (resume %d) at %s", self.run_id, self.resume_index,
                     self.tracking_uri)
        else:
            self.experiment_id = self._experiment_id(client)
            if self.unique_name:
                self.run_name = self._free_name(client, self.run_name)
            tags = {k: v[: util.MAX_TAG_VAL_LENGTH] for k, v in self.initial_tags.items()}
            run = client.create_run(self.experiment_id, run_name=self.run_name, tags=tags)
            self.run_id = run.info.run_id
            self.resume_index = 0
            log.info("MLflow: run %s (%s) in experiment %r at %s", self.run_id, self.run_name,
                     self.experiment_name, self.tracking_uri)
        self.run_name = run.info.run_name
        now = datetime.now().isoformat(timespec="seconds")
        record = {
            "run_id": self.run_id, "experiment_id": self.experiment_id, "experiment": self.experiment_name,
            "tracking_uri": self.tracking_uri, "run_name": run.info.run_name,
            "resumes": self.resume_index, "created": info.get("created", now) if self.resume_index else now,
            "last_start": now,
        }
        parent = self.initial_tags.get(PARENT_TAG) or info.get("parent_run_id")
        if parent:
            record["parent_run_id"] = parent
        write_json(self.run_dir / RUN_FILE, record)

    def _experiment_id(self, client) -> str:
        exp = client.get_experiment_by_name(self.experiment_name)
        if exp is not None and exp.lifecycle_stage == "deleted":
            log.warning("MLflow experiment %r was deleted: restoring it", self.experiment_name)
            client.restore_experiment(exp.experiment_id)
        if exp is not None:
            self._ensure_experiment_kind(exp)
            return exp.experiment_id
        try:
            return client.create_experiment(self.experiment_name, artifact_location=self.artifact_location,
                                            tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except Exception as exc:  # noqa: BLE001 - another job created it meanwhile
            exp = client.get_experiment_by_name(self.experiment_name)
            if exp is None:
                raise exc from None
            self._ensure_experiment_kind(exp)
            return exp.experiment_id

    def _ensure_experiment_kind(self, exp) -> None:
        """Tag the experiment as model training unless it has a kind (a person's choice in the UI is kept)."""
        if exp is None or (exp.tags or {}).get(EXPERIMENT_KIND_TAG):
            return
        try:
            self.client().set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        except Exception as exc:  # noqa: BLE001
            if not util.is_permanent(exc):
                raise
            log.warning("MLflow refused the experiment tag %s: %s", EXPERIMENT_KIND_TAG, util.short(exc))

    def _free_name(self, client, name: str) -> str:
        """``name``, or ``name-2``, ``name-3`` ... when the experiment already has a run of that name."""
        if "'" in name:
            return name
        found = client.search_runs([self.experiment_id], filter_string=f"attributes.run_name LIKE '{name}%'",
                                   max_results=1000)
        taken = {r.info.run_name for r in found}
        if name not in taken:
            return name
        i = 2
        while f"{name}-{i}" in taken:
            i += 1
        return f"{name}-{i}"

    # params, tags, metrics, inputs ---------------------------------------

    def send_params(self, flat: dict[str, str]) -> None:
        from mlflow.entities import Param

        todo: dict[str, str] = {}
        changed: list[str] = []
        for k, v in flat.items():
            key = util.sanitize_key(k)
            val = v[: util.MAX_PARAM_VAL_LENGTH]
            have = self.params.get(key)
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
        client = self.client()
        for i in range(0, len(items), util.MAX_PARAMS_TAGS_PER_BATCH):
            chunk = items[i: i + util.MAX_PARAMS_TAGS_PER_BATCH]
            try:
                client.log_batch(self.run_id, params=[Param(k, v) for k, v in chunk], synchronous=True)
                self.params.update(chunk)
            except Exception as exc:  # noqa: BLE001
                if not util.is_permanent(exc):
                    raise
                for k, v in chunk:  # isolate the refused one(s)
                    self._send_one_param(client, k, v)
        if changed:
            tag = f"resume.{self.resume_index}.changed_params"
            self.send_tags({tag: ",".join(changed)[: util.MAX_TAG_VAL_LENGTH]})

    def _renamed(self, key: str, val: str) -> str | None:
        base = util.sanitize_key(f"resume.{self.resume_index}.{key}")
        for i in range(100):
            cand = base if i == 0 else f"{base}.{i}"
            have = self.params.get(cand)
            if have is None:
                return cand
            if have == val:
                return None
        return None

    def _send_one_param(self, client, key: str, val: str) -> None:
        for _attempt in range(3):
            try:
                client.log_param(self.run_id, key, val, synchronous=True)
                self.params[key] = val
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

    def send_tags(self, tags: dict[str, str], run_id: str | None = None) -> None:
        from mlflow.entities import RunTag

        run_id = run_id or self.run_id
        items = [(k, v[: util.MAX_TAG_VAL_LENGTH]) for k, v in tags.items()]
        client = self.client()
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
                        log.warning("MLflow refused tag %s: %s", k, util.short(exc2))

    def send_metrics(self, batch: list[tuple]) -> None:
        from mlflow.entities import Metric

        client = self.client()
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
                                util.short(exc), len(batch) - failed)
                    return
                try:
                    client.log_batch(self.run_id, metrics=[Metric(k, v, ts, s)], synchronous=True)
                    ok += 1
                except Exception as exc2:  # noqa: BLE001
                    if not util.is_permanent(exc2):
                        raise
                    failed += 1
                    if k not in self.bad_metric_warned:
                        self.bad_metric_warned.add(k)
                        log.warning("MLflow refused metric %s: %s", k, util.short(exc2))

    def send_inputs(self, datasets: list) -> None:
        """Dataset inputs (``datasets.DatasetInfo``) the run does not have yet (a resumed run keeps its own)."""
        from mlflow.entities import DatasetInput, InputTag

        todo = [d for d in datasets if (d.name, d.digest) not in self.inputs]
        if not todo:
            return
        try:
            self.client().log_inputs(self.run_id, datasets=[
                DatasetInput(d.entity(), tags=[InputTag("mlflow.data.context", d.context)]) for d in todo])
        except Exception as exc:  # noqa: BLE001
            if not util.is_permanent(exc):
                raise
            log.warning("MLflow refused the dataset inputs: %s", util.short(exc))
        self.inputs |= {(d.name, d.digest) for d in todo}

    def end(self, status: str) -> bool:
        """The end tags, then the terminal status (requeued: left RUNNING). True when the run was terminated."""
        client = self.client()
        mlflow_status = STATUS_MAP[status]
        tags = {"end_status": status}
        if mlflow_status is None:
            tags["requeues"] = str(self.resume_index + 1)
        self.send_tags(tags)
        if mlflow_status is not None:
            client.set_terminated(self.run_id, status=mlflow_status)
            log.info("MLflow: run %s ended %s", self.run_id, mlflow_status)
            return True
        log.info("MLflow: run %s left RUNNING for the requeued job to continue", self.run_id)
        return False


class SystemMetrics:
    """MLflow's system-metrics monitor for the run, restarted after an outage; failures only warn."""

    def __init__(self, tracking_uri: str, enabled: bool):
        self.tracking_uri = tracking_uri
        self.enabled = enabled
        self._mon = None

    def start(self, run_id: str, resume: bool) -> None:
        if not self.enabled or self._mon is not None:
            return
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            mon = SystemMetricsMonitor(run_id, resume_logging=resume, tracking_uri=self.tracking_uri)
            mon.start()
            self._mon = mon
        except Exception as exc:  # noqa: BLE001 - psutil/pynvml missing, anything: not worth a failure
            log.warning("MLflow system metrics not available: %s", util.short(exc))
            self.enabled = False

    def restart_if_dead(self, run_id: str) -> None:
        mon = self._mon
        proc = getattr(mon, "_process", None) if mon is not None else None
        if mon is not None and proc is not None and not proc.is_alive():
            self._mon = None  # its loop ends when it cannot reach the store: start a new one
            self.start(run_id, resume=True)

    def stop(self, timeout: float) -> None:
        """Stop the monitor, waiting at most ``timeout`` s (its last flush may hit a dead server)."""
        mon, self._mon = self._mon, None
        self.enabled = False
        if mon is None:
            return
        t = threading.Thread(target=_quiet(mon.finish), name="mlflow-sysmon-stop", daemon=True)
        t.start()
        t.join(timeout)


def _quiet(fn):
    def run():
        try:
            fn()
        except Exception as exc:  # noqa: BLE001
            log.debug("ignored: %s", exc)

    return run


def read_json(path: Path) -> dict:
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
        return d if isinstance(d, dict) else {}
    except (OSError, ValueError):
        return {}


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("cannot write %s: %s (a restart will start a new MLflow run)", path, exc)
