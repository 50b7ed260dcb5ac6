"""The `sql` source: one query against any SQLAlchemy URL, on a connection that cannot write.

Read-only is a property of the connection, never of the URL's spelling or of the query's first word
(Python's sqlite3 opens no transaction before a statement starting with WITH, so a "rolled back"
`WITH ... DELETE` commits). One entry per dialect in READ_ONLY says how; an unknown dialect is refused
unless the user vouches for the account with `read_only: trusted`.
"""
from __future__ import annotations

import re
import sqlite3
from pathlib import Path
from typing import Callable
from urllib.parse import quote

from .errors import UserError, mask_secrets, mask_url, raw_at_problem, remember_secrets
from .rows import Record

SELECT_ONLY = re.compile(r"^\s*(select|with)\b", re.IGNORECASE)


def _sqlite_engine(url):
    """Any SQLite driver spelling (sqlite://, sqlite+pysqlite://, ...): the file opened `mode=ro` by the
    standard library, plus `PRAGMA query_only`, whatever the driver name said."""
    from sqlalchemy import create_engine

    if not url.database or url.database == ":memory:":
        raise ValueError("no database file in the URL; write sqlite:///path/to/file.sqlite")
    path = Path(url.database).resolve()
    if not path.is_file():
        raise ValueError(f"SQLite file {path} not found")

    def connect():
        conn = sqlite3.connect(f"file:{quote(str(path))}?mode=ro", uri=True)
        conn.execute("PRAGMA query_only = ON")
        return conn

    return create_engine("sqlite://", creator=connect), []


def _statement_engine(*statements: str) -> Callable:
    """Dialects whose transactions are made read-only by a statement run before the query."""
    def make(url):
        from sqlalchemy import create_engine
        return create_engine(url), list(statements)
    return make


def _trusted_engine(url):
    from sqlalchemy import create_engine
    return create_engine(url), []


# dialect -> url -> (engine, statements run first in the query's transaction)
READ_ONLY: dict[str, Callable] = {
    "sqlite": _sqlite_engine,
    "postgresql": _statement_engine("SET TRANSACTION READ ONLY"),
    "mysql": _statement_engine("START TRANSACTION READ ONLY"),
    "mariadb": _statement_engine("START TRANSACTION READ ONLY"),
}


def parse_url(url: str, where: str):
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    remember_secrets(url)
    if (problem := raw_at_problem(url)) is not None:
        raise UserError(f"{where}.url: {problem}")
    try:
        return make_url(url)
    except ArgumentError:
        raise UserError(f"{where}.url: {mask_secrets(url)!r} is not a database URL; write e.g. "
                        f"sqlite:///path/to/file.sqlite or postgresql://user@host/db") from None


def read_only_engine(src, where: str):
    """(engine, statements) for a connection that cannot write, or a UserError."""
    url = parse_url(src.url, where)
    dialect = url.get_backend_name()
    make = READ_ONLY.get(dialect)
    if make is None and src.read_only == "trusted":
        make = _trusted_engine
    if make is None:
        raise UserError(f"{where}.url: autollm cannot make a {dialect} connection read-only (it can for "
                        f"{', '.join(READ_ONLY)}); use a read-only database account and set {where}.read_only: trusted")
    return make(url)


def read_sql(src, where: str) -> list[Record]:
    """Rows of one SELECT (or WITH ... SELECT) query, run in a read-only transaction that is rolled back."""
    from sqlalchemy import text
    from sqlalchemy.exc import SQLAlchemyError

    if not SELECT_ONLY.match(src.query) or ";" in src.query.strip().rstrip(";"):
        raise UserError(f"{where}.query: sources are read-only; give one SELECT (or WITH ... SELECT) query")
    try:
        engine, statements = read_only_engine(src, where)
        try:
            with engine.connect() as conn, conn.begin() as tx:
                for statement in statements:
                    conn.exec_driver_sql(statement)
                rows = [dict(r._mapping) for r in conn.execute(text(src.query))]
                tx.rollback()
        finally:
            engine.dispose()
    except (SQLAlchemyError, ImportError, ValueError, TypeError, sqlite3.Error) as e:  # TypeError: unknown URL option
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        message = (f"{where}: cannot read {mask_url(src.url)!r} with the query ({first}); check the URL, that the "
                   f"database exists, and the SQL (sources are opened read-only)")
        raise UserError(mask_secrets(message)) from None
    return rows
