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

from ...errors import UserError, mask_secrets, mask_url, raw_at_problem, remember_secrets
from ...rows import Record

SELECT_ONLY = re.compile(r"^\s*(select|with)\b", re.IGNORECASE)
INTO_FILE = re.compile(r"\binto\s+(outfile|dumpfile)\b", re.IGNORECASE)


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


def _session_engine(session: str, *statements: str) -> Callable:
    """Dialects whose connections are made read-only by a statement run on every new connection (`session`, the
    whole session), and whose query transaction is opened read-only by `statements` too."""
    def make(url):
        from sqlalchemy import create_engine, event

        connect_args = {}
        if url.get_backend_name() == "postgresql" and url.get_driver_name() in ("psycopg", "psycopg2"):
            # libpq sets it before the session runs anything: default_transaction_read_only for the whole session
            options = " ".join(filter(None, [url.query.get("options"), "-c default_transaction_read_only=on"]))
            url, connect_args = url.difference_update_query(["options"]), {"options": options}
        engine = create_engine(url, connect_args=connect_args)

        @event.listens_for(engine, "connect")
        def read_only_session(dbapi_connection, record):
            cursor = dbapi_connection.cursor()
            cursor.execute(session)
            cursor.close()
            dbapi_connection.commit()

        return engine, list(statements)
    return make


def _trusted_engine(url):
    from sqlalchemy import create_engine
    return create_engine(url), []


# dialect -> url -> (engine, statements run first in the query's transaction)
READ_ONLY: dict[str, Callable] = {
    "sqlite": _sqlite_engine,
    "postgresql": _session_engine("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY", "SET TRANSACTION READ ONLY"),
    "mysql": _session_engine("SET SESSION TRANSACTION READ ONLY", "START TRANSACTION READ ONLY"),
    "mariadb": _session_engine("SET SESSION TRANSACTION READ ONLY", "START TRANSACTION READ ONLY"),
}

# What a read-only transaction does not stop: PostgreSQL's superuser (anything), server-file writers (lo_export,
# COPY TO), dblink (a second connection, not read-only) and adminpack (pg_file_write); MySQL/MariaDB's FILE
# privilege (SELECT ... INTO OUTFILE writes a server file inside a READ ONLY transaction). An account that has
# them is refused unless the user vouches for it with read_only: trusted.
PG_RIGHTS = """
SELECT r.rolsuper,
       pg_has_role(current_user, 'pg_write_server_files', 'MEMBER')
         OR pg_has_role(current_user, 'pg_execute_server_program', 'MEMBER'),
       has_function_privilege('lo_export(oid, text)', 'EXECUTE'),
       (SELECT string_agg(DISTINCT e.extname, ', ') FROM pg_extension e
          JOIN pg_depend d ON d.refobjid = e.oid AND d.deptype = 'e' JOIN pg_proc p ON p.oid = d.objid
         WHERE e.extname IN ('dblink', 'adminpack') AND has_function_privilege(p.oid, 'EXECUTE')),
       current_user, current_setting('default_transaction_read_only')
  FROM pg_roles r WHERE r.rolname = current_user
"""
MYSQL_RIGHTS = ("SELECT PRIVILEGE_TYPE FROM information_schema.USER_PRIVILEGES "
                "WHERE PRIVILEGE_TYPE IN ('FILE', 'SUPER')")
TRUSTED = "connect as an account without them (a read-only one), or set {where}.read_only: trusted"


def _postgres_rights(conn, where: str) -> None:
    superuser, files, lo_export, extensions, user, session_ro = conn.exec_driver_sql(PG_RIGHTS).one()
    why = ("is a superuser (it can write server files and open connections)" if superuser else
           "may write server files or run programs (pg_write_server_files / pg_execute_server_program)" if files else
           "may call lo_export, which writes a server file" if lo_export else
           f"may call {extensions} functions (dblink opens a second, writable connection; adminpack writes "
           f"server files)" if extensions else None)
    if why:
        raise UserError(f"{where}.url: role {user!r} {why}, which a read-only transaction does not stop; "
                        + TRUSTED.format(where=where))
    if session_ro != "on":
        raise UserError(f"{where}.url: the session did not turn read-only (default_transaction_read_only is "
                        f"{session_ro}); " + TRUSTED.format(where=where))


def _mysql_rights(conn, where: str) -> None:
    found = sorted({row[0] for row in conn.exec_driver_sql(MYSQL_RIGHTS)})
    if found:
        raise UserError(f"{where}.url: the account has the {' and '.join(found)} privilege (SELECT ... INTO OUTFILE "
                        f"writes a server file inside a READ ONLY transaction); " + TRUSTED.format(where=where))


RIGHTS: dict[str, Callable] = {"postgresql": _postgres_rights, "mysql": _mysql_rights, "mariadb": _mysql_rights}


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
    if INTO_FILE.search(src.query):
        raise UserError(f"{where}.query: sources are read-only; a query may not write a file (INTO OUTFILE/DUMPFILE)")
    try:
        engine, statements = read_only_engine(src, where)
        rights = RIGHTS.get(engine.dialect.name) if src.read_only == "enforce" else None
        try:
            with engine.connect() as conn, conn.begin() as tx:
                for statement in statements:
                    conn.exec_driver_sql(statement)
                if rights:
                    rights(conn, where)
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
