"""The one exception users see: a clear, one-line message and exit code 2; and the masking of secrets in
anything printed or written."""
from __future__ import annotations

import re

# scheme://user:password@host -> scheme://user:***@host (database URLs, endpoints with basic auth)
URL_PASSWORD = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.\-]*://[^\s:/@'\"]*:)([^\s@/'\"]+)(@)")


class UserError(Exception):
    """Bad input or a failed external step. The CLI prints `error: <message>` and exits 2."""


def mask_secrets(text: str) -> str:
    """Hide the password of every URL in `text`; used for every message, log line and resolved config."""
    return URL_PASSWORD.sub(r"\1***\3", text)
