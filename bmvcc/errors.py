"""The one error type users see: a message that names the problem and the fix."""


class BmvccError(Exception):
    """A user's mistake (bad input, bad option). The CLI prints it on one line and exits 2."""

    exit_code = 2
