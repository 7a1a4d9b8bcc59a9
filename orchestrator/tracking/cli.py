"""`orchestrator runs list`, `orchestrator runs compare`, `orchestrator ui`: the functions behind them.

They resolve the store like the tracker does (explicit URI, else $MLFLOW_TRACKING_URI, else ./mlflow.db), so
they see exactly the runs training wrote. ``runs_list`` and ``runs_compare`` return text; ``ui`` blocks.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Any

from . import util

# Params shown by `runs compare` even when equal across the runs: what a DANet run is at a glance.
KEY_PARAMS = (
    "preset", "model.name", "model.T", "model.connection", "model.da.domain", "model.da.span",
    "model.da.weights", "model.neuron.type", "model.neuron.tau", "model.neuron.surrogate",
    "model.neuron.surrogate_alpha", "model.width", "model.input_size", "model.num_classes", "data.name",
    "data.image_size", "train.epochs", "train.global_batch_size", "train.loss", "train.precision",
    "train.seed", "optim.name", "optim.lr", "optim.weight_decay", "optim.schedule", "deepspeed.zero_stage",
)
# Metric columns `runs list` prefers (first match of each pattern), the rest are in `runs compare`.
LIST_METRIC_PATTERNS = (r"val.*top.?1|top.?1.*val", r"val.*loss", r"^(train.?)?loss$|train.*loss")
CELL = 36
VAL_METRIC = "val_top1"


def _user_error(msg: str) -> Exception:
    try:
        from orchestrator.errors import UserError

        return UserError(msg)
    except ImportError:  # pragma: no cover - the package always has it
        return ValueError(msg)


# URI schemes MLflow's tracking client opens (mlflow.tracking._tracking_service.utils); others fail in its
# constructor with a message about the model registry
STORE_SCHEMES = ("", "file", "sqlite", "http", "https", "postgresql", "mysql", "mssql", "databricks",
                 "databricks-uc", "uc")


def _client(tracking_uri: str | None):
    util.apply_http_env()
    uri, _ = util.resolve_store(tracking_uri)
    origin = "MLFLOW_TRACKING_URI=" if os.environ.get("MLFLOW_TRACKING_URI", "").strip() == uri else "store "
    # checked before mlflow is imported (seconds): a wrong store is refused at once
    scheme = uri.split(":", 1)[0].lower() if "://" in uri else ""
    if scheme.split("+", 1)[0] not in STORE_SCHEMES:
        raise _user_error(f"{origin}{uri}: not an MLflow store URI; valid: sqlite:///PATH/mlflow.db, "
                          "http(s)://HOST:PORT, or a database URI (postgresql://, mysql://)")
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        if not db.exists():
            raise _user_error(f"no MLflow store at {uri} (no run was tracked here yet; run from the folder training "
                              f"ran in, or set MLFLOW_TRACKING_URI to its store)")
    from mlflow.tracking import MlflowClient

    try:
        return MlflowClient(tracking_uri=uri), uri
    except Exception as exc:  # noqa: BLE001 - a store MLflow refuses to open (e.g. a file store)
        raise _user_error(f"{origin}{uri}: MLflow cannot open it ({str(exc).strip().splitlines()[0][:200]}); "
                          "valid: sqlite:///PATH/mlflow.db or http(s)://HOST:PORT") from None


def _call(fn, uri: str, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001
        if util.is_permanent(exc) or util.is_not_found(exc):
            raise
        raise _user_error(f"MLflow store {uri} not reachable: {str(exc).splitlines()[0][:200]}") from None


def _fmt_time(ms: int | None) -> str:
    if not ms:
        return "-"
    return datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M")


def _fmt_duration(start: int | None, end: int | None, status: str) -> str:
    if not start:
        return "-"
    if not end or status == "RUNNING":
        end = int(time.time() * 1000)
    s = max(int((end - start) / 1000), 0)
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _fmt_value(v: Any) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.4e}"
    s = "-" if v is None else str(v)
    return s if len(s) <= CELL else s[: CELL - 3] + "..."


def table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[_fmt_value(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join(out)


def _pick_metrics(keys: set[str], n: int = 3) -> list[str]:
    chosen: list[str] = []
    user = sorted(k for k in keys if not k.startswith("system/"))
    for pat in LIST_METRIC_PATTERNS:
        rx = re.compile(pat, re.IGNORECASE)
        for k in user:
            if rx.search(k) and k not in chosen:
                chosen.append(k)
                break
    return chosen[:n]


def runs_list(experiment: str | None = None, tracking_uri: str | None = None, max_results: int = 100) -> str:
    """A table of runs (newest first): id, experiment, name, status, start, duration, a few final metrics."""
    client, uri = _client(tracking_uri)
    if experiment:
        exp = _call(client.get_experiment_by_name, uri, experiment)
        if exp is None:
            names = [e.name for e in _call(client.search_experiments, uri)]
            raise _user_error(f"no experiment {experiment!r} at {uri}; experiments: {', '.join(names) or 'none'}")
        exps = [exp]
    else:
        exps = _call(client.search_experiments, uri)
    if not exps:
        return f"no experiments at {uri}"
    names = {e.experiment_id: e.name for e in exps}
    runs = _call(client.search_runs, uri, list(names), order_by=["attributes.start_time DESC"],
                 max_results=max_results)
    if not runs:
        return f"no runs at {uri}" + (f" in experiment {experiment!r}" if experiment else "")
    metric_cols = _pick_metrics({k for r in runs for k in r.data.metrics})
    headers = ["RUN ID", "EXPERIMENT", "NAME", "STATUS", "START", "DURATION", *metric_cols]
    rows = []
    for r in runs:
        i = r.info
        rows.append([i.run_id, names.get(i.experiment_id, i.experiment_id), i.run_name, i.status,
                     _fmt_time(i.start_time), _fmt_duration(i.start_time, i.end_time, i.status),
                     *[r.data.metrics.get(k) for k in metric_cols]])
    return f"store: {uri}\n" + table(headers, rows)


def _find_run(client, uri: str, ref: str):
    """A run by id, else by run name (unique across experiments)."""
    try:
        return _call(client.get_run, uri, ref)
    except Exception as exc:  # noqa: BLE001
        if not (util.is_not_found(exc) or util.is_permanent(exc)):
            raise
    if "'" not in ref:
        exps = [e.experiment_id for e in _call(client.search_experiments, uri)]
        found = _call(client.search_runs, uri, exps, filter_string=f"attributes.run_name = '{ref}'",
                      max_results=2) if exps else []
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise _user_error(f"several runs are named {ref!r} at {uri}: give the run id")
    raise _user_error(f"no run {ref!r} at {uri} (see `orchestrator runs list`)")


def runs_compare(run_ids: list[str], tracking_uri: str | None = None, all_params: bool = False,
                 out: str | os.PathLike | None = None) -> str:
    """Key params (and every param that differs, marked *) and final metrics of the runs, side by side.
    Runs are given by id or by (unique) run name. With ``out``, the comparison figures
    (``figures.comparison_figures``) are written into that folder and listed after the table."""
    if not run_ids:
        raise _user_error("runs compare needs at least one run id")
    out_dir = _output_dir(out) if out is not None else None
    client, uri = _client(tracking_uri)
    runs = [_find_run(client, uri, rid) for rid in run_ids]
    exp_names: dict[str, str] = {}
    for r in runs:
        eid = r.info.experiment_id
        if eid not in exp_names:
            try:
                exp_names[eid] = client.get_experiment(eid).name
            except Exception:  # noqa: BLE001
                exp_names[eid] = eid
    heads = ["", *[r.info.run_name or r.info.run_id[:8] for r in runs]]
    info_rows = [
        ["run id", *[r.info.run_id for r in runs]],
        ["experiment", *[exp_names[r.info.experiment_id] for r in runs]],
        ["status", *[r.info.status for r in runs]],
        ["start", *[_fmt_time(r.info.start_time) for r in runs]],
        ["duration", *[_fmt_duration(r.info.start_time, r.info.end_time, r.info.status) for r in runs]],
    ]
    for tag in ("resumes", "slurm.job_id", "git.commit"):
        vals = [r.data.tags.get(tag) for r in runs]
        if any(vals):
            info_rows.append([tag, *[(v[:12] if tag == "git.commit" and v else v) for v in vals]])
    out = [f"store: {uri}", table(heads, info_rows)]

    params = [util.effective_params(r.data.params) for r in runs]
    all_keys = sorted({k for p in params for k in p})
    differ = {k for k in all_keys if len({p.get(k) for p in params}) > 1}
    if all_params:
        keys = all_keys
    else:
        keys = [k for k in KEY_PARAMS if k in all_keys] + [k for k in all_keys if k in differ
                                                           and k not in KEY_PARAMS]
    if keys:
        prow = [[("* " if k in differ else "  ") + k, *[p.get(k) for p in params]] for k in keys]
        hidden = len(all_keys) - len(keys)
        title = "params (* = differs)" + (f"; {hidden} equal params not shown (all_params)" if hidden else "")
        out += ["", title, table(["param", *heads[1:]], prow)]
    mkeys = sorted({k for r in runs for k in r.data.metrics if not k.startswith("system/")})
    if mkeys:
        mrow = [[k, *[r.data.metrics.get(k) for r in runs]] for k in mkeys]
        out += ["", "metrics (last value)", table(["metric", *heads[1:]], mrow)]
    if out_dir is not None:
        from .figures import comparison_figures

        pngs = _call(comparison_figures, uri, uri, [r.info.run_id for r in runs], out_dir)
        out += ["", f"figures ({out_dir}):" if pngs else f"figures: none (no run has {VAL_METRIC})",
                *[f"  {p}" for p in pngs]]
    return "\n".join(out)



def _output_dir(out: str | os.PathLike) -> Path:
    """``--out DIR``, created; a UserError naming the flag when it cannot be."""
    d = Path(out)
    try:
        d.mkdir(parents=True, exist_ok=True)
        probe = d / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise _user_error(f"--out {out}: cannot write figures there ({exc.strerror or exc}); give a folder "
                          "this user can create or write") from None
    return d


# MLflow 3.17's UI picks its GenAI or model-training layout from a global toggle (default GenAI, kept in the
# browser's local storage) that this query parameter overrides; the experiment's mlflow.experimentKind tag (set by
# the tracker) is what older and other views read.
UI_WORKFLOW = "machine_learning"
# Sorted by final val top-1, best first: the table then lists every run flat (in its default date order it folds a
# sweep's children under their parent, collapsed).
RUNS_TABLE_QUERY = f"workflowType={UI_WORKFLOW}&orderByKey=metrics.%60{VAL_METRIC}%60&orderByAsc=false"


def experiment_page(tracking_uri: str | None = None, experiment: str | None = None) -> str:
    """The UI route of ``experiment``'s runs table in the model-training layout, best val top-1 first (by name;
    default: the experiment of the newest run), e.g. ``#/experiments/3/runs?workflowType=machine_learning&...``;
    "" when the store has no run yet. An unknown name is a UserError."""
    from urllib.parse import quote

    uri, _ = util.resolve_store(tracking_uri)
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).exists():
        if experiment:
            raise _user_error(f"--experiment {experiment}: the store {uri} has no experiments yet")
        return ""
    client, uri = _client(uri)
    if experiment:
        exp = _call(client.get_experiment_by_name, uri, experiment)
        if exp is None:
            names = [e.name for e in _call(client.search_experiments, uri)]
            raise _user_error(f"--experiment {experiment}: no such experiment at {uri}; experiments: "
                              f"{', '.join(names) or 'none'}")
        exp_id = exp.experiment_id
    else:
        exps = [e.experiment_id for e in _call(client.search_experiments, uri)]
        newest = _call(client.search_runs, uri, exps, order_by=["attributes.start_time DESC"],
                       max_results=1) if exps else []
        if not newest:
            return ""
        exp_id = newest[0].info.experiment_id
    return f"#/experiments/{quote(str(exp_id))}/runs?{RUNS_TABLE_QUERY}"


def page_url(base_url: str, page: str) -> str:
    return f"{base_url.rstrip('/')}/{page}" if page else base_url


def compare_url(base_url: str, run_ids: list[str], experiment_ids: list[str]) -> str:
    """The UI's compare page for ``run_ids`` (what the runs table's Compare button opens)."""
    from urllib.parse import quote

    return (f"{base_url.rstrip('/')}/#/compare-runs?runs={quote(json.dumps(run_ids))}"
            f"&experiments={quote(json.dumps(sorted(set(experiment_ids))))}")


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def ui_command(tracking_uri: str | None = None, port: int = 5000, host: str = "127.0.0.1") -> tuple[list[str], str]:
    """(the `mlflow server` command serving the same store, its URL); pure except for path resolution."""
    uri, artifacts = util.resolve_store(tracking_uri)
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    cmd = [str(mlflow_bin) if mlflow_bin.exists() else "mlflow", "server", "--backend-store-uri", uri,
           "--host", host, "--port", str(port), "--workers", "1"]
    if artifacts and artifacts.startswith("file://"):
        cmd += ["--artifacts-destination", artifacts[len("file://"):]]
    return cmd, f"http://{host}:{port}"


def ui(tracking_uri: str | None = None, port: int = 5000, host: str = "127.0.0.1",
       experiment: str | None = None) -> None:
    """Serve the MLflow UI on 127.0.0.1:port against the tracker's store; print the URL of the experiment's runs
    table (``experiment`` by name, default: the experiment of the newest run); block until Ctrl-C.

    For a remote tracking server (an http(s) URI) nothing is started: that server already serves the UI."""
    uri, _ = util.resolve_store(tracking_uri)
    if uri.startswith(("http://", "https://")):
        print(f"MLflow UI: {page_url(uri, experiment_page(uri, experiment))} (served by the tracking server "
              "itself)", flush=True)
        return
    page = experiment_page(uri, experiment)  # before the server starts: a bad name fails at once
    if not _port_free(host, port):
        raise _user_error(f"port {port} on {host} is in use; pick another with --port")
    cmd, url = ui_command(uri, port, host)

    def _term(signum, frame):  # Ctrl-C, SIGTERM, SIGHUP: stop the server group
        raise KeyboardInterrupt

    previous = {}
    # SIGINT too: a process started in the background by a non-interactive shell inherits SIGINT ignored, and
    # Python then installs no KeyboardInterrupt handler of its own, so Ctrl-C forwarded to it would do nothing
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        try:
            previous[sig] = signal.signal(sig, _term)
        except ValueError:  # not the main thread: Ctrl-C only
            pass
    # the server's own output goes to stderr: stdout carries only the URL line (scripts can read it)
    proc = subprocess.Popen(cmd, start_new_session=True, stdin=subprocess.DEVNULL, stdout=sys.stderr)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise _user_error(f"mlflow server exited with {proc.returncode} (command: {' '.join(cmd)})")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.25)
        print(f"MLflow UI: {page_url(url, page)}  (store {uri}; Ctrl-C to stop)", flush=True)
        proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        _stop_group(proc)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group, then SIGKILL whatever of it is left (MLflow spawns helpers)."""
    for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
