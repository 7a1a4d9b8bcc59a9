"""Pytest fixtures around a real `mlflow server` (see tests/mlflow_server.py).

Use them from tests/conftest.py (``from conftest_tracking import *  # noqa: F401,F403``) or import the
names into a test module:

* ``mlflow_server_proc`` (session): a started MlflowServer shared by the session (``.uri``, ``.port``, ``.db``,
  ``.artifacts``, ``.stop()`` / ``.start()``); do not stop it in a test, use the factory for that.
* ``mlflow_server`` (session): its URI, ``http://127.0.0.1:<port>``.
* ``mlflow_server_factory`` (function): ``make(root=None, port=None) -> MlflowServer``, a private started server
  the test may kill and restart; every server it made is stopped at teardown.
"""

from __future__ import annotations

import pytest
from mlflow_server import MlflowServer


@pytest.fixture(scope="session")
def mlflow_server_proc(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def mlflow_server(mlflow_server_proc) -> str:
    if not mlflow_server_proc.healthy(timeout=5):
        mlflow_server_proc.start()
    return mlflow_server_proc.uri


@pytest.fixture
def mlflow_server_factory(tmp_path):
    made: list[MlflowServer] = []

    def make(root=None, port=None) -> MlflowServer:
        server = MlflowServer(root or tmp_path / f"mlflow-server-{len(made)}", port=port)
        made.append(server)
        return server.start()

    try:
        yield make
    finally:
        for server in made:
            server.stop()
