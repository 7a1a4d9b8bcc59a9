"""Small pure helpers of the tracker: store resolution, flattening, key and value limits, error classes, params
as a resumed run last used them.

Nothing here imports mlflow at module import time, so ``create_tracker`` stays cheap on every rank.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from pathlib import Path
from typing import Any

# MLflow's limits (mlflow.utils.validation, 3.x). Older servers cap param values at 500 characters; a value
# refused by such a server is retried truncated to LEGACY_PARAM_VAL_LENGTH.
MAX_PARAM_VAL_LENGTH = 6000
LEGACY_PARAM_VAL_LENGTH = 500
MAX_TAG_VAL_LENGTH = 8000
MAX_KEY_LENGTH = 250
MAX_PARAMS_TAGS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000

# Environment MLflow's HTTP client reads on every request. Its defaults (7 retries with exponential backoff,
# 120 s timeout) would hold the worker thread for minutes per call while a server is down; the tracker
# retries by itself, so one quick attempt per call is what it wants. Explicit user settings are kept.
HTTP_ENV_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}

_KEY_BAD = re.compile(r"[^A-Za-z0-9_\-. :/]")


def apply_http_env() -> None:
    for k, v in HTTP_ENV_DEFAULTS.items():
        os.environ.setdefault(k, v)


def is_local_store(uri: str) -> bool:
    """A store this process writes itself (sqlite / a file path), as opposed to a tracking server."""
    scheme = uri.split(":", 1)[0].lower() if ":" in uri else ""
    return scheme in ("", "file", "sqlite") or (len(scheme) == 1 and uri[1:3] in (":\\", ":/"))


def resolve_store(tracking_uri: str | None = None, artifact_location: str | None = None,
                  cwd: str | os.PathLike | None = None) -> tuple[str, str | None]:
    """(tracking URI, artifact location for new experiments or None = the store's default).

    Order: explicit URI (config), else $MLFLOW_TRACKING_URI, else ``sqlite:///<cwd>/mlflow.db`` with artifacts
    in ``<cwd>/mlartifacts``. An explicit artifact location is honoured for any store.
    """
    base = Path(cwd) if cwd is not None else Path.cwd()
    uri = (tracking_uri or "").strip() or os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if not uri:
        uri = f"sqlite:///{(base / 'mlflow.db').resolve()}"
    loc: str | None = None
    if artifact_location:
        loc = artifact_location
        if "://" not in loc and not loc.startswith("mlflow-artifacts:"):
            loc = (base / loc).resolve().as_uri()
    elif uri.startswith("sqlite:") or is_local_store(uri):
        loc = (base / "mlartifacts").resolve().as_uri()
    return uri, loc


def sanitize_key(key: Any) -> str:
    """A key MLflow accepts: alphanumerics, ``_ - . : /`` and spaces, at most 250 characters."""
    k = _KEY_BAD.sub("_", str(key)).strip() or "_"
    return k[:MAX_KEY_LENGTH]


def value_str(value: Any) -> str:
    if isinstance(value, str):
        return value
    return str(value)


def flatten(obj: Any, prefix: str = "") -> dict[str, str]:
    """Nested dicts (and dataclasses) to ``{"a.b.c": "value"}``; lists and scalars are stringified.

    An empty dict is kept as ``"{}"`` so the key still states its (empty) value.
    """
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    out: dict[str, str] = {}
    if isinstance(obj, dict):
        if not obj and prefix:
            out[prefix] = "{}"
        for k, v in obj.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            if dataclasses.is_dataclass(v) and not isinstance(v, type):
                v = dataclasses.asdict(v)
            if isinstance(v, dict):
                out.update(flatten(v, key))
            else:
                out[key] = value_str(v)
    elif prefix:
        out[prefix] = value_str(obj)
    else:
        raise TypeError(f"log_params takes a dict or a dataclass, got {type(obj).__name__}")
    return out


def to_float(value: Any) -> float | None:
    """A metric value as float (tensors and numpy scalars included) or None if it is not a number."""
    try:
        if hasattr(value, "item") and callable(value.item):
            value = value.item()
        f = float(value)
    except (TypeError, ValueError, RuntimeError):
        return None
    if math.isinf(f):  # MLflow stores +-inf, but as a huge float: keep the sign, clamp the magnitude
        return math.copysign(1.7976931348623157e308, f)
    return f


def http_status_of(exc: BaseException) -> int | None:
    """The HTTP status an exception stands for, where it has one."""
    get = getattr(exc, "get_http_status_code", None)  # MlflowException / RestException
    if callable(get):
        try:
            return int(get())
        except Exception:
            return None
    resp = getattr(exc, "response", None)  # requests.HTTPError
    code = getattr(resp, "status_code", None)
    return int(code) if isinstance(code, int) else None


def is_permanent(exc: BaseException) -> bool:
    """True for an error that retrying cannot fix (a refused value, a missing file); False for an outage
    (connection refused, timeout, 5xx, 429, a locked database)."""
    if isinstance(exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError,
                        ValueError, TypeError, KeyError)):
        # MlflowException subclasses Exception only; ValueError here is our own / a client-side check.
        return True
    code = http_status_of(exc)
    if code is None:
        return False
    return 400 <= code < 500 and code not in (408, 429)


_UNREACHABLE = ("max retries exceeded", "connection refused", "connection reset", "connection aborted",
                "timed out", "remotedisconnected", "name or service not known", "failed to establish")


def is_unreachable(exc: BaseException) -> bool:
    """The store could not be reached at all (as opposed to a request it answered with an error)."""
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    text = f"{type(exc).__name__} {exc}".lower()
    return any(s in text for s in _UNREACHABLE) or "connectionerror" in text


def is_not_found(exc: BaseException) -> bool:
    code = getattr(exc, "error_code", None)
    return code == "RESOURCE_DOES_NOT_EXIST" or http_status_of(exc) == 404


def short(exc: BaseException, n: int = 200) -> str:
    """An exception on one line, at most ``n`` characters (for warnings)."""
    s = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return s if len(s) <= n else s[: n - 3] + "..."


_RESUMED = re.compile(r"^resume\.(\d+)\.(.+?)(\.\d+)?$")


def effective_params(params: dict[str, str]) -> dict[str, str]:
    """Params as the run last used them: a value changed on resume (logged as ``resume.<n>.<key>``) replaces
    the original, shown as ``value (resume n)``; the ``resume.*`` keys themselves are folded away."""
    eff = {k: v for k, v in params.items() if not _RESUMED.match(k)}
    changes = []
    for k, v in params.items():
        m = _RESUMED.match(k)
        if m and m.group(2) in eff:
            changes.append((int(m.group(1)), int((m.group(3) or ".0")[1:]), m.group(2), v))
    for n, _, key, v in sorted(changes):
        eff[key] = f"{v} (resume {n})"
    return eff
