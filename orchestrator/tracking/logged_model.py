"""The run's best weights as an MLflow 3 logged model (the UI's Models column), registered when asked.

Cheap by construction: no pickling and no environment inference. The model folder holds the exported weights
file (a plain torch state dict, ``orchestrator/train/checkpoint.py``) and an ``MLmodel`` file whose
``danet_orchestrator`` flavor says how to rebuild the network (``models.create_model`` with the run's
``model.*`` params, then ``load_state_dict``). The model's metrics (val top-1) are logged against it, its params
are the run's ``model.*`` / ``data.name`` params. Runs as one upload in the tracker's uploader thread; each step
is done once, so a retry after a failure resumes where it stopped.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from . import util

log = logging.getLogger("orchestrator.tracking")

FLAVOR = "danet_orchestrator"
MODEL_FILE = "mlflow_model.json"  # in the run dir: the best-weights candidate, for a resumed process


class LoggedModelUpload:
    """``send(client, run_id)`` for the uploader: create, link, measure, upload, finalize, register."""

    def __init__(self, *, weights: Path, file_name: str, name: str, experiment_id: Callable[[], str | None],
                 metrics: dict[str, float],
                 step: int, params: dict[str, str], register_as: str = ""):
        self.weights, self.file_name, self.name = Path(weights), file_name, name
        self.experiment_id, self.metrics, self.step = experiment_id, metrics, int(step)
        self.params, self.register_as = params, register_as
        self.model_id: str | None = None
        self.done: set[str] = set()
        self.version: str | None = None

    def __call__(self, client, run_id: str) -> None:
        from mlflow.entities import LoggedModelOutput, LoggedModelStatus, Metric

        if self.model_id is None:
            experiment_id = self.experiment_id() or client.get_run(run_id).info.experiment_id
            model = client.create_logged_model(experiment_id, name=self.name, source_run_id=run_id,
                                               params=self.params, model_type="spiking-resnet",
                                               tags={"weights": self.file_name})
            self.model_id = model.model_id
        if "outputs" not in self.done:
            client.log_outputs(run_id, [LoggedModelOutput(self.model_id, step=self.step)])
            self.done.add("outputs")
        if "metrics" not in self.done and self.metrics:
            ts = int(time.time() * 1000)
            client.log_batch(run_id, metrics=[Metric(k, float(v), ts, self.step, model_id=self.model_id)
                                              for k, v in self.metrics.items()], synchronous=True)
            self.done.add("metrics")
        if "artifacts" not in self.done:
            with tempfile.TemporaryDirectory(prefix="mlflow-model-") as tmp:
                self._write_model_dir(Path(tmp), run_id)
                client.log_model_artifacts(self.model_id, tmp)
            self.done.add("artifacts")
        if "ready" not in self.done:
            client.finalize_logged_model(self.model_id, LoggedModelStatus.READY)
            self.done.add("ready")
        if self.register_as and self.version is None:
            self.version = register(client, self.register_as, self.model_id, run_id)
            log.info("MLflow: registered %s version %s (model %s)", self.register_as, self.version, self.model_id)

    def _write_model_dir(self, d: Path, run_id: str) -> None:
        from mlflow.models import Model

        try:
            (d / self.file_name).hardlink_to(self.weights)
        except OSError:
            shutil.copy2(self.weights, d / self.file_name)
        model_params = {k[len("model."):]: v for k, v in self.params.items() if k.startswith("model.")}
        m = Model(artifact_path=None, run_id=run_id, model_id=self.model_id, model_uuid=self.model_id)
        m.add_flavor(FLAVOR, weights=self.file_name, model_name=model_params.get("name", ""),
                     loader="models.create_model(model_name, **overrides).load_state_dict("
                            "torch.load(weights)['state_dict'])", overrides=model_params)
        m.save(str(d / "MLmodel"))


def register(client, name: str, model_id: str, run_id: str) -> str:
    """A new version of the registered model ``name`` (created when missing) from the logged model."""
    try:
        client.create_registered_model(name)
    except Exception as exc:  # noqa: BLE001
        if "already exists" not in str(exc).lower() and getattr(exc, "error_code", "") not in (
                "RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    mv = client.create_model_version(name, source=f"models:/{model_id}", run_id=run_id, model_id=model_id)
    return str(mv.version)


def model_params(params: dict[str, str]) -> dict[str, str]:
    """The params a logged model keeps: what the network is and what it was trained on."""
    keep = {k: v for k, v in params.items() if k.startswith("model.") or k in ("data.name", "preset")}
    return {util.sanitize_key(k): v[: util.MAX_PARAM_VAL_LENGTH] for k, v in keep.items()}
