"""Sources read-only against a hostile query, on real servers the tests start themselves: PostgreSQL (Debian's
postgresql) and MariaDB (Debian's mariadb-server), each with an account that HAS write rights on the source
tables. The session itself is read-only; writes, server-file writes and second connections do not happen."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from cli_cases import config, run_cli

from autollm_lf.config import RunConfig
from autollm_lf.errors import UserError

pytestmark = pytest.mark.slow  # real servers (about 15 s for both)

def one_line_error(code: int, err: str) -> str:
    assert code == 2 and err.startswith("error: ") and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    return err


# ---- a real PostgreSQL server, started by the test ------------------------------------------------------------

def _pg_bin() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return found[-1].parent if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres():
    """A throwaway PostgreSQL cluster on 127.0.0.1 (Debian's postgresql package; `sh autollm.sh test` installs it)."""
    bindir = _pg_bin()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries not found (/usr/lib/postgresql/*/bin); apt-get install postgresql")
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    root = Path(tempfile.mkdtemp(prefix="autollm-pg-"))
    if as_user:
        shutil.chown(root, "postgres")
    data, port = root / "data", _free_port()
    (root / "pw").write_text("0wnerPw\n")
    if as_user:
        shutil.chown(root / "pw", "postgres")
    # passwords are checked over TCP (dblink needs that), the fixture itself comes in through the socket
    subprocess.run([*as_user, str(bindir / "initdb"), "-D", str(data), "-U", "owner", "--auth-local=trust",
                    "--auth-host=scram-sha-256", f"--pwfile={root / 'pw'}"], check=True, capture_output=True)
    subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-w", "-o",
                    f"-h 127.0.0.1 -p {port} -k {root}", "start"], check=True, capture_output=True)
    import psycopg

    conn = psycopg.connect(host=str(root), port=port, user="owner", dbname="postgres", autocommit=True)
    with conn.cursor() as cur:  # `writer`: an ordinary role with every write right on the source tables
        cur.execute("CREATE ROLE writer LOGIN PASSWORD 'pa/ss@1?x'")
        cur.execute("CREATE DATABASE linked")
    for db in ("postgres", "linked"):
        with psycopg.connect(host=str(root), port=port, user="owner", dbname=db, autocommit=True) as c:
            c.execute("CREATE TABLE examples (id int, task text, prompt text, response text)")
            c.execute("INSERT INTO examples SELECT i, CASE WHEN i % 2 = 0 THEN 'a' ELSE 'b' END, 'p' || i, 'r' || i "
                      "FROM generate_series(0, 19) i")
            c.execute("CREATE TABLE log (n int)")
            c.execute("CREATE FUNCTION bump() RETURNS int LANGUAGE sql AS 'INSERT INTO log VALUES (1) RETURNING 1'")
            c.execute("GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON examples, log TO writer")
            c.execute("GRANT CREATE ON SCHEMA public TO writer")
            if db == "linked":  # dblink: a query can open a second connection, which no READ ONLY covers
                c.execute("CREATE EXTENSION dblink")
    with conn.cursor() as cur:  # a large object lo_export could write to a server file
        cur.execute("SELECT lo_from_bytea(0, 'server secret'::bytea)")
        oid = cur.fetchone()[0]
    try:
        yield {"port": port, "conn": conn, "root": root, "oid": oid}
    finally:
        conn.close()
        subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def _pg_counts(pg, db: str = "postgres") -> tuple[int, int]:
    import psycopg
    with psycopg.connect(host=str(pg["root"]), port=pg["port"], user="owner", dbname=db, autocommit=True) as c:
        return c.execute("SELECT (SELECT count(*) FROM examples), (SELECT count(*) FROM log)").fetchone()


WRITER = "writer:pa%2Fss%401%3Fx"  # the password pa/ss@1?x, percent-encoded as a URL wants it


PG_WRITES = {
    "writing CTE": "WITH d AS (DELETE FROM examples RETURNING *) SELECT id, task, prompt, response FROM d",
    "function that writes": "SELECT id, task, prompt, response, bump() AS b FROM examples",
    "set_config to read-write": "SELECT id, task, prompt, response, set_config('transaction_read_only', 'off', true) "
                                "AS x FROM examples",
}


@pytest.mark.parametrize("case", list(PG_WRITES))
def test_postgres_is_read_only(tmp_path, capsys, postgres, case):
    url = f"postgresql+psycopg://{WRITER}@127.0.0.1:{postgres['port']}/postgres"
    cfg = config(tmp_path, [{"type": "sql", "url": url, "query": PG_WRITES[case]}])
    err = one_line_error(*run_cli(tmp_path, cfg, capsys=capsys))
    assert "read-only transaction" in err or "read-write mode" in err, err
    assert "pa/ss" not in err and "pa%2Fss" not in err and "writer:***@" in err
    assert _pg_counts(postgres) == (20, 0)


def test_postgres_copy_to_refused(tmp_path, capsys, postgres):
    target = postgres["root"] / "copied.csv"
    url = f"postgresql://writer@127.0.0.1:{postgres['port']}/postgres"
    for query in (f"COPY examples TO '{target}'", f"WITH x AS (SELECT 1) SELECT 1; COPY examples TO '{target}'"):
        cfg = config(tmp_path, [{"type": "sql", "url": url, "query": query}])
        err = one_line_error(*run_cli(tmp_path, cfg, capsys=capsys))
        assert "sources are read-only" in err
    assert not target.exists()


def test_postgres_reads_and_masks_the_password_everywhere(tmp_path, capsys, postgres):
    url = f"postgresql://{WRITER}@127.0.0.1:{postgres['port']}/postgres?sslmode=disable&password=pa%2Fss%401%3Fx"
    cfg = config(tmp_path, [{"type": "sql", "url": url, "query": "SELECT id, task, prompt, response FROM examples"}])
    code, err = run_cli(tmp_path, cfg, capsys=capsys)
    assert code == 0, err
    run = tmp_path / "runs" / "t"
    assert len(json.loads((run / "data" / "validation.json").read_text())) == 4
    written = [p.read_text(errors="ignore") for p in run.rglob("*") if p.is_file()]
    assert not any(s in text for text in written for s in ("pa/ss", "pa%2Fss", "ss@1"))
    resolved = (run / "config.resolved.yaml").read_text()
    assert "writer:***@127.0.0.1" in resolved and "password=***" in resolved, resolved
    assert _pg_counts(postgres) == (20, 0)


def _pg_source(postgres, query: str, db: str = "postgres", user: str = WRITER, **extra):
    from autollm_lf.data.sources.sql import read_sql
    url = f"postgresql+psycopg://{user}@127.0.0.1:{postgres['port']}/{db}"
    src = RunConfig.model_validate(config(Path(tempfile.mkdtemp()), [{"type": "sql", "url": url, "query": query,
                                                                      **extra}])).data.sources[0]
    return lambda: read_sql(src, "data.sources.0")


def test_postgres_session_itself_is_read_only(postgres):
    rows = _pg_source(postgres, "SELECT current_setting('default_transaction_read_only') AS session, "
                                "current_setting('transaction_read_only') AS tx, current_user AS who")()
    assert rows == [{"session": "on", "tx": "on", "who": "writer"}]


def test_postgres_server_file_writes_do_not_happen(postgres):
    target = postgres["root"] / "exported.bin"
    read = _pg_source(postgres, f"SELECT lo_export({postgres['oid']}, '{target}') AS x")
    with pytest.raises(UserError, match="permission denied for function lo_export"):
        read()
    assert not target.exists()


def test_postgres_superuser_refused_unless_trusted(postgres):
    with pytest.raises(UserError, match="role 'owner' is a superuser.*read_only: trusted"):
        _pg_source(postgres, "SELECT 1 AS one", user="owner:0wnerPw")()
    assert _pg_source(postgres, "SELECT 1 AS one", user="owner:0wnerPw", read_only="trusted")() == [{"one": 1}]


def test_postgres_dblink_second_connection_refused(postgres):
    """dblink_exec opens a second connection that no READ ONLY covers: the role may call it, so it is refused
    before the query runs (with read_only: trusted, as the proof, the second connection does write)."""
    conninfo = f"host=127.0.0.1 port={postgres['port']} dbname=linked user=writer password=pa/ss@1?x"
    query = f"SELECT dblink_exec('{conninfo}', 'DELETE FROM examples') AS x"
    with pytest.raises(UserError, match="may call dblink functions.*read_only: trusted") as e:
        _pg_source(postgres, query, db="linked")()
    assert "pa/ss" not in str(e.value)
    assert _pg_counts(postgres, "linked") == (20, 0)
    _pg_source(postgres, query, db="linked", read_only="trusted")()
    assert _pg_counts(postgres, "linked") == (0, 0)  # what the refusal prevents




# ---- a real MariaDB server, started by the test ---------------------------------------------------------------

@pytest.fixture(scope="module")
def mariadb():
    """A throwaway MariaDB server on 127.0.0.1 (Debian's mariadb-server; `sh autollm.sh test` installs it). It may
    write server files (secure_file_priv names a folder), so INTO OUTFILE is a real threat here. Accounts: `writer`
    (every write right on the source tables, no FILE privilege) and `filer` (the same and FILE)."""
    install, server = shutil.which("mariadb-install-db"), shutil.which("mariadbd")
    if not (install and server):
        pytest.skip("MariaDB server not found (mariadb-install-db, mariadbd); apt-get install mariadb-server")
    pymysql = pytest.importorskip("pymysql")
    root = Path(tempfile.mkdtemp(prefix="autollm-mariadb-"))
    data, out, sock, port = root / "data", root / "out", root / "sock", _free_port()
    out.mkdir()
    user = ["--user=root"] if os.geteuid() == 0 else []
    subprocess.run([install, "--no-defaults", f"--datadir={data}", *user, "--auth-root-authentication-method=normal",
                    "--skip-test-db"], check=True, capture_output=True)
    proc = subprocess.Popen([server, "--no-defaults", f"--datadir={data}", *user, f"--socket={sock}",
                             f"--port={port}", "--bind-address=127.0.0.1", "--skip-name-resolve",
                             f"--log-error={root / 'err.log'}", f"--pid-file={root / 'pid'}",
                             f"--secure-file-priv={out}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while True:
        try:
            admin = pymysql.connect(unix_socket=str(sock), user="root", autocommit=True)
            break
        except pymysql.err.OperationalError:
            assert proc.poll() is None and time.time() < deadline, (root / "err.log").read_text()[-2000:]
            time.sleep(0.3)
    with admin.cursor() as cur:
        cur.execute("CREATE DATABASE src")
        cur.execute("CREATE TABLE src.examples (id int, task text, prompt text, response text)")
        cur.execute("INSERT INTO src.examples VALUES " + ", ".join(f"({i}, '{'ab'[i % 2]}', 'p{i}', 'r{i}')"
                                                                for i in range(20)))
        cur.execute("CREATE TABLE src.log (n int)")
        for name in ("writer", "filer"):
            cur.execute(f"CREATE USER '{name}'@'%' IDENTIFIED BY 'pa/ss@1?x'")
            cur.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE, CREATE, DROP ON src.* TO '{name}'@'%'")
        cur.execute("GRANT FILE ON *.* TO 'filer'@'%'")
    try:
        yield {"port": port, "admin": admin, "out": out}
    finally:
        admin.close()
        proc.terminate()
        proc.wait(timeout=60)
        shutil.rmtree(root, ignore_errors=True)


def _maria_counts(db) -> tuple[int, int]:
    with db["admin"].cursor() as cur:
        cur.execute("SELECT (SELECT count(*) FROM src.examples), (SELECT count(*) FROM src.log)")
        return cur.fetchone()


def _maria_url(db, user: str = "writer") -> str:
    return f"mysql+pymysql://{user}:pa%2Fss%401%3Fx@127.0.0.1:{db['port']}/src"


@pytest.mark.parametrize("query", [
    "WITH d AS (SELECT 1) DELETE FROM examples",
    "SELECT id, task, prompt, response FROM examples; DELETE FROM examples",
    "SELECT id, task, prompt, response FROM examples INTO OUTFILE '{out}/dump.csv'",
    "SELECT id, task, prompt, response INTO DUMPFILE '{out}/dump.bin' FROM examples LIMIT 1",
])
def test_mariadb_writes_and_outfile_refused(tmp_path, capsys, mariadb, query):
    cfg = config(tmp_path, [{"type": "sql", "url": _maria_url(mariadb), "query": query.format(out=mariadb["out"])}])
    err = one_line_error(*run_cli(tmp_path, cfg, capsys=capsys))
    assert "read-only" in err or "READ ONLY" in err, err
    assert "pa/ss" not in err and "pa%2Fss" not in err
    assert _maria_counts(mariadb) == (20, 0) and not list(mariadb["out"].iterdir())


def test_mariadb_session_is_read_only_and_reads(tmp_path, capsys, mariadb):
    from autollm_lf.data.sources.sql import read_sql
    query = "SELECT @@session.tx_read_only AS session_ro, CURRENT_USER() AS who"
    src = RunConfig.model_validate(config(tmp_path, [{"type": "sql", "url": _maria_url(mariadb),
                                                      "query": query}])).data.sources[0]
    assert read_sql(src, "data.sources.0") == [{"session_ro": 1, "who": "writer@%"}]
    cfg = config(tmp_path, [{"type": "sql", "url": _maria_url(mariadb),
                             "query": "SELECT id, task, prompt, response FROM examples"}])
    code, err = run_cli(tmp_path, cfg, capsys=capsys)
    assert code == 0, err
    assert len(json.loads((tmp_path / "runs" / "t" / "data" / "validation.json").read_text())) == 4
    written = [p.read_text(errors="ignore") for p in (tmp_path / "runs").rglob("*") if p.is_file()]
    assert not any("pa/ss" in text or "pa%2Fss" in text for text in written)


def test_mariadb_write_in_a_function_call_does_not_happen(tmp_path, capsys, mariadb):
    """A stored function that writes, called from a SELECT: the READ ONLY transaction stops it."""
    with mariadb["admin"].cursor() as cur:
        cur.execute("CREATE FUNCTION IF NOT EXISTS src.bump() RETURNS int MODIFIES SQL DATA "
                    "BEGIN INSERT INTO src.log VALUES (1); RETURN 1; END")
        cur.execute("GRANT EXECUTE ON FUNCTION src.bump TO 'writer'@'%'")
    cfg = config(tmp_path, [{"type": "sql", "url": _maria_url(mariadb),
                             "query": "SELECT id, task, prompt, response, bump() AS b FROM examples"}])
    err = one_line_error(*run_cli(tmp_path, cfg, capsys=capsys))
    assert "READ ONLY" in err, err
    assert _maria_counts(mariadb) == (20, 0)


def test_mariadb_file_privilege_refused_unless_trusted(tmp_path, mariadb):
    """INTO OUTFILE writes a server file inside a READ ONLY transaction (shown here with read_only: trusted): an
    account with the FILE privilege is refused before the query runs, however the query is spelled."""
    from autollm_lf.data.sources.sql import read_sql
    target = mariadb["out"] / "trusted.csv"
    sneaky = f"SELECT id FROM examples LIMIT 1 INTO/**/OUTFILE '{target}'"

    def read(query, **extra):
        src = RunConfig.model_validate(config(tmp_path, [{"type": "sql", "url": _maria_url(mariadb, "filer"),
                                                          "query": query, **extra}])).data.sources[0]
        return read_sql(src, "data.sources.0")

    with pytest.raises(UserError, match="has the FILE privilege.*read_only: trusted"):
        read(sneaky)
    assert not target.exists()
    with pytest.raises(UserError, match="does not return rows"):  # returns no rows, but has written the file:
        read(sneaky, read_only="trusted")  # what the refusal prevents (the READ ONLY transaction does not stop it)
    assert target.exists()
    target.unlink()
