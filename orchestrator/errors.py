"""User-facing errors: the CLI prints these as one line and exits 2, with no traceback."""


class UserError(Exception):
    """Bad user input: one line, exit 2."""
