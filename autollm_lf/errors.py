"""The one exception users see: a clear, one-line message and exit code 2."""


class UserError(Exception):
    """Bad input or a failed external step. The CLI prints `error: <message>` and exits 2."""
