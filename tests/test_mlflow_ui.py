"""A real browser on the MLflow UI: Debian's chromium, headless, on the experiment's runs table and the compare page.

chromium comes from scripts/chromium-up.sh (``make test`` runs it first); without it these tests skip, saying so.
The runs: a sweep-like parent and two children made through the tracker (no training: a few logged steps),
``danet18-ui`` and ``danet34-ui``, each with the digits dataset as input and its best weights as a logged model.
``orchestrator ui --experiment`` prints the address the browser opens. The UI is a React app whose text exists only
once its scripts ran, so chromium renders with a virtual-time budget, then dumps the DOM and takes a screenshot
(kept in the test's tmp folder: what a person would see).
"""

from __future__ import annotations

import html
import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest

from orchestrator.config.schema import Config
from orchestrator.tracking import cli as tcli
from orchestrator.tracking import create_tracker

if not hasattr(sys.modules.get("conftest"), "mlflow_server"):  # tests/conftest.py normally provides them
    from conftest_tracking import mlflow_server, mlflow_server_proc  # noqa: F401

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed: scripts/chromium-up.sh installs Debian's (make test runs it)")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def page_text(dom: str) -> str:
    """The visible text of a dumped DOM, whitespace collapsed."""
    dom = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S | re.I)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", dom))).strip()


def render(url: str, out: Path, name: str, expect: list[str], tries: int = 2) -> str:
    """Load ``url`` in headless chromium; returns the page's text once every string of ``expect`` is in it (a
    loaded machine may need a second, longer try). The screenshot is ``out/<name>.png``."""
    text = ""
    for attempt in range(tries):
        shot = out / f"{name}.png"
        cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--hide-scrollbars", f"--user-data-dir={out / f'profile-{name}-{attempt}'}", "--window-size=1600,1000",
               f"--virtual-time-budget={30000 * (attempt + 1)}", f"--screenshot={shot}", "--dump-dom", url]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
        assert r.returncode == 0, r.stderr[-2000:]
        text = page_text(r.stdout)
        assert shot.read_bytes()[:8] == PNG_SIGNATURE
        if all(e in text for e in expect):
            return text
    missing = [e for e in expect if e not in text]
    raise AssertionError(f"{url}: {missing} not on the page; it shows: {text[:1500]}")


@pytest.fixture(scope="module")
def ui_runs(mlflow_server, tmp_path_factory, digits_dataset):  # noqa: F811
    from mlflow.tracking import MlflowClient

    tmp = tmp_path_factory.mktemp("ui-runs")
    c = MlflowClient(tracking_uri=mlflow_server)
    exp = f"ui-{uuid.uuid4().hex[:8]}"
    exp_id = c.create_experiment(exp)
    parent = c.create_run(exp_id, run_name="ui-sweep").info.run_id
    ids = {}
    for i, model in enumerate(("danet18", "danet34")):
        cfg = Config()
        cfg.model.name = model
        cfg.data.root = str(digits_dataset)
        t = cfg.tracking
        t.tracking_uri, t.experiment, t.run_name, t.parent_run_id = mlflow_server, exp, f"{model}-ui", parent
        t.log_system_metrics = False
        tr = create_tracker(cfg, tmp / model, SimpleNamespace(rank=0)).start()
        tr.log_params(cfg)
        for s in (1, 2, 3):
            tr.log_metrics({"loss": 2.0 / s, "lr": 0.01, "val_top1": 0.3 + 0.1 * s + 0.05 * i}, step=s)
        weights = tmp / f"{model}.pt"
        weights.write_bytes(b"weights")
        tr.log_model(weights, {"val_top1": 0.6 + 0.05 * i}, step=3)
        tr.finish("completed")
        ids[model] = tr.run_id
    c.set_terminated(parent)
    return SimpleNamespace(uri=mlflow_server, experiment=exp, experiment_id=exp_id, ids=ids, out=tmp)


def test_runs_table_lists_runs_with_dataset_source_and_model(ui_runs):
    """`orchestrator ui --experiment` gives the runs table's address; a browser there shows the runs by name, each
    with its dataset, source and logged model, in the model-training layout."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": ui_runs.uri}
    r = subprocess.run([sys.executable, "-m", "orchestrator", "ui", "--experiment", ui_runs.experiment],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    url = re.search(r"MLflow UI: (\S+)", r.stdout).group(1)
    assert url.startswith(f"{ui_runs.uri}/#/experiments/{ui_runs.experiment_id}/runs?workflowType=machine_learning")
    text = render(url, ui_runs.out, "runs-table", ["danet18-ui", "danet34-ui", "digits-train"])
    assert "Model training" in text and "Runs" in text and "Traces 0" not in text
    # the children are listed themselves (not folded under the parent), each with its dataset, source and model
    digest = re.search(r"digits-train \(([0-9a-f]{12})\)", text)
    assert digest, text[:1500]
    assert text.count(f"digits-train ({digest.group(1)})") >= 2
    assert "orchestrator train" in text
    assert "danet18-ui-best" in text and "danet34-ui-best" in text
    assert "ui-sweep" in text  # the parent, beside its children
    # best val top-1 first: danet34-ui (0.65) above danet18-ui (0.6)
    assert text.index("danet34-ui") < text.index("danet18-ui")


def test_compare_page_shows_the_param_that_differs(ui_runs):
    ids = [ui_runs.ids["danet18"], ui_runs.ids["danet34"]]
    url = tcli.compare_url(ui_runs.uri, ids, [ui_runs.experiment_id])
    text = render(url, ui_runs.out, "compare", ["Comparing 2 Runs", "model.name"])
    # the parallel-coordinates plot starts on the params that differ; the params table has both values
    assert re.search(r"Parameters: model\.name\b", text), text[:1500]
    assert re.search(r"model\.name danet18 danet34", text), text[:3000]
    assert "danet18-ui" in text and "danet34-ui" in text
