"""User-facing errors: the CLI prints each problem as one line and exits 2, with no traceback.

``UserError`` carries one problem or several (every problem a validation pass found, each its own line);
``orchestrator.cli.main`` is the one place that prints them. An ``OSError`` on a path the user gave becomes a
UserError there too (``os_error_line``).
"""

from __future__ import annotations

import os
from pathlib import Path


class UserError(Exception):
    """Bad user input: one line per problem, exit 2.

    ``UserError("one line")`` or ``UserError(*problems)``; ``str(e)`` is the lines joined by newlines and
    ``e.problems`` the list. A problem given with embedded newlines is split, so no line ever hides another."""

    def __init__(self, *problems: str):
        lines = [ln.strip() for p in problems for ln in str(p).splitlines() if ln.strip()]
        super().__init__("\n".join(lines))
        self.problems: list[str] = lines or ["bad input"]


# OSErrors that are about a path even when raised without one (``FileNotFoundError("PATH: no such ...")``)
PATH_ERRORS = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)


def os_error_line(err: OSError) -> str | None:
    """One line for an OSError on a path (what failed, on which path, why), or None when it is not about a
    path (a socket, a pipe): that is a failure, not bad input."""
    if err.filename is None:
        return str(err).splitlines()[0] if isinstance(err, PATH_ERRORS) and str(err) else None
    why = err.strerror or type(err).__name__
    where = f"{err.filename}" + (f" -> {err.filename2}" if getattr(err, "filename2", None) else "")
    return f"{where}: {why}"


# A rank that meets bad input leaves its line(s) in RUN_DIR/ERROR: the launcher reports them (a rank's stderr
# may be a log file) and the other ranks, ended by that rank's exit, put them in their summary instead of their
# own error.
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
    """The line(s) a rank left in RUN_DIR/ERROR, or '' when there are none."""
    try:
        return "\n".join(ln for ln in (Path(run_dir) / ERROR_FILE).read_text().splitlines() if ln.strip())
    except OSError:
        return ""


def clear_bad_input(run_dir: str | os.PathLike) -> None:
    """Remove a previous start's report before ranks start."""
    try:
        (Path(run_dir) / ERROR_FILE).unlink(missing_ok=True)
    except NotADirectoryError:  # the run dir is checked before this; a file in its place is not ours to touch
        pass
