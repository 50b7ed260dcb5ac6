"""The one exception users see: a clear, one-line message and exit code 2; and the masking of secrets in
anything printed or written.

Secrets are found by SQLAlchemy's URL parser (the grammar the database URL is read with): a URL's password and
every query parameter named like a password, token, key or secret. `mask_url` renders a URL with them hidden;
`remember_secrets` records them (raw and percent-encoded) so that `mask_secrets` hides them wherever they appear
in a message, a log line or a written file, whatever a driver made of the URL. A regular expression only backs
this up for URLs that were never remembered.
"""
from __future__ import annotations

import re
from urllib.parse import quote, quote_plus

MASK = "***"
SECRET_PARAM = re.compile(r"pass|pwd|token|key|secret|auth|credential|signature", re.IGNORECASE)
MIN_SECRET = 4  # shorter secrets are masked inside URLs only: replacing every "ab" in a message would garble it

# scheme://user:password@host -> scheme://user:***@host (the password up to the last '@' of the URL's authority)
URL_PASSWORD = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.\-]*://[^\s:/@'\"]*:)([^\s'\"]*)(@[^\s@/'\"]*(?:[/?]|\b))")
QUERY_SECRET = re.compile(r"([?&][^=&\s'\"#]*(?:pass|pwd|token|key|secret|auth|credential|signature)[^=&\s'\"#]*=)"
                          r"([^&\s'\"#]+)", re.IGNORECASE)

_known: set[str] = set()


class UserError(Exception):
    """Bad input or a failed external step. The CLI prints `error: <message>` and exits 2."""


def _parse(url: str):
    try:
        from sqlalchemy.engine import make_url
        return make_url(url)
    except Exception:  # noqa: BLE001 - not a URL SQLAlchemy reads: nothing to find
        return None


def url_secrets(url: str) -> list[str]:
    """The password and secret-named query values of a URL, as SQLAlchemy's parser reads them."""
    parsed = _parse(url)
    if parsed is None:
        return []
    found = [parsed.password] if parsed.password else []
    for key, value in parsed.query.items():
        if SECRET_PARAM.search(key):
            found += [value] if isinstance(value, str) else list(value)
    if parsed.host and "@" in parsed.host:  # an unencoded '@' in the password: all of it up to the last '@'
        found += [f"{parsed.password or ''}@{parsed.host.rsplit('@', 1)[0]}", parsed.host.rsplit("@", 1)[0]]
    return [str(s) for s in found if s]


def remember_secrets(*urls: str | None) -> None:
    """Record the secrets of these URLs, so that mask_secrets hides them in any text."""
    for url in urls:
        for secret in url_secrets(url) if url else []:
            _known.update({secret, quote(secret, safe=""), quote_plus(secret), quote(secret)})


def raw_at_problem(url: str) -> str | None:
    """An unencoded '@' in a URL's password (SQLAlchemy then reads part of the password as the host)."""
    parsed = _parse(url)
    if parsed is not None and parsed.host and "@" in parsed.host:
        return (f"{mask_url(url)!r} has an unencoded '@' in its password (or user name); write it percent-encoded "
                f"as %40")
    return None


def mask_url(url: str) -> str:
    """The URL as SQLAlchemy renders it with the password hidden, secret-named query values hidden too."""
    parsed = _parse(url)
    if parsed is None:
        return mask_secrets(url)
    query = {k: (MASK if SECRET_PARAM.search(k) else v) for k, v in parsed.query.items()}
    text = parsed.set(query=query).render_as_string(hide_password=True).replace(quote(MASK, safe=""), MASK)
    if parsed.host and "@" in parsed.host:
        text = text.replace(parsed.host, parsed.host.rsplit("@", 1)[1], 1)
    return text


def mask_secrets(text: str) -> str:
    """Hide every remembered secret and the password and secret-named parameters of every URL in `text`; used for
    every message, log line and written config."""
    for secret in sorted((s for s in _known if len(s) >= MIN_SECRET), key=len, reverse=True):
        text = text.replace(secret, MASK)
    text = URL_PASSWORD.sub(lambda m: m.group(1) + MASK + m.group(3), text)
    return QUERY_SECRET.sub(lambda m: m.group(1) + MASK, text)
