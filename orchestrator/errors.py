"""User-facing errors: the CLI prints these as one line and exits 2, with no traceback."""

from __future__ import annotations

import os
from pathlib import Path


class UserError(Exception):
    """Bad user input: one line, exit 2."""


# A rank that meets bad input leaves its one line in RUN_DIR/ERROR: the launcher reports it (a rank's stderr may
# be a log file) and the other ranks, ended by that rank's exit, put it in their summary instead of their own error.
ERROR_FILE = "ERROR"


def report_bad_input(run_dir: str | os.PathLike, message: str) -> None:
    """Write ``message`` to RUN_DIR/ERROR (atomically); an unwritable run dir is left alone, being the error."""
    from .fsutil import atomic_write

    try:
        if Path(run_dir).is_dir():
            atomic_write(Path(run_dir) / ERROR_FILE, f"{message}\n")
    except OSError:
        pass


def reported_bad_input(run_dir: str | os.PathLike) -> str:
    """The line a rank left in RUN_DIR/ERROR, or '' when there is none."""
    try:
        return (Path(run_dir) / ERROR_FILE).read_text().strip().splitlines()[0]
    except (OSError, IndexError):
        return ""


def clear_bad_input(run_dir: str | os.PathLike) -> None:
    """Remove a previous start's report before ranks start."""
    (Path(run_dir) / ERROR_FILE).unlink(missing_ok=True)
