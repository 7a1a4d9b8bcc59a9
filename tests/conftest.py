"""Shared test setup: the CPU DeepSpeed environment, the tracking-server fixtures, the digits dataset."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))  # tests/ helpers: mlflow_server, conftest_tracking

# Same as the Makefile: CPU accelerator without a GPU, DeepSpeed's one-time compile cached in the project.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))

from conftest_tracking import *  # noqa: E402,F401,F403


@pytest.fixture(scope="session", autouse=True)
def digits_dataset() -> Path:
    """The bundled digits dataset, built once (tests pass data.root=<repo>/.cache/data/digits)."""
    from orchestrator.data.digits import ensure_digits_dataset

    return Path(ensure_digits_dataset(REPO / ".cache" / "data" / "digits"))
