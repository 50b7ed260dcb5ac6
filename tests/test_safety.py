"""Nothing a user feeds in can delete, leak or escape: read-only sources whatever the URL spelling (SQLite and a
real PostgreSQL server), dataset paths confined to dataset_dir, credentials masked, alias bombs refused,
prepare atomic, bookkeeping files out of the chunks' namespace, endpoint failures that stop instead of poisoning."""
from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import pytest
from cli_cases import config, run_cli
from conftest import chat_stub

from autollm_lf.cli import main
from autollm_lf.config import RunConfig
from autollm_lf.data.sources.sql import read_only_engine
from autollm_lf.errors import mask_secrets


def make_db(path: Path, n: int = 20) -> Path:
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE examples (id INTEGER, task TEXT, prompt TEXT, response TEXT)")
        db.executemany("INSERT INTO examples VALUES (?,?,?,?)", [(i, "ab"[i % 2], f"p{i}", f"r{i}") for i in range(n)])
    return path


def one_line_error(code: int, err: str) -> str:
    assert code == 2 and err.startswith("error: ") and "Traceback" not in err, err
    return err


WRITING_QUERIES = [
    "WITH t AS (SELECT 1) DELETE FROM examples RETURNING id, task, prompt, response",
    "WITH t AS (SELECT 1) INSERT INTO examples SELECT * FROM examples RETURNING id, task, prompt, response",
    "WITH t AS (SELECT 1) UPDATE examples SET prompt = 'x' RETURNING id, task, prompt, response",
]


@pytest.mark.parametrize("scheme", ["sqlite", "sqlite+pysqlite", "SQLite"])
@pytest.mark.parametrize("query", WRITING_QUERIES, ids=["delete", "insert", "update"])
def test_sqlite_is_read_only_whatever_the_driver_spelling(tmp_path, capsys, scheme, query):
    db = make_db(tmp_path / "src.sqlite")
    before = db.read_bytes()
    cfg = config(tmp_path, [{"type": "sql", "url": f"{scheme}:///{db}", "query": query}])
    err = one_line_error(*run_cli(tmp_path, cfg, capsys=capsys))
    assert "readonly" in err or "read-only" in err, err
    assert db.read_bytes() == before
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*), min(prompt) FROM examples").fetchone() == (20, "p0")


def test_sqlite_connection_refuses_writes_even_past_the_query_check(tmp_path):
    db = make_db(tmp_path / "src.sqlite")
    src = RunConfig.model_validate(config(tmp_path, [{"type": "sql", "url": f"sqlite+pysqlite:///{db}",
                                                       "query": "SELECT 1"}])).data.sources[0]
    engine, _ = read_only_engine(src, "data.sources.0")
    with engine.connect() as conn:
        with pytest.raises(Exception, match="readonly|read-only|query_only"):
            conn.exec_driver_sql("DELETE FROM examples")
        conn.rollback()
    engine.dispose()
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM examples").fetchone() == (20,)


def test_unknown_dialect_refused_unless_trusted(tmp_path, capsys):
    cfg = config(tmp_path, [{"type": "sql", "url": "oracle://u:S3cret@127.0.0.1:1/db", "query": "SELECT 1"}])
    err = one_line_error(*run_cli(tmp_path, cfg, capsys=capsys))
    assert "cannot make a oracle connection read-only" in err and "read_only: trusted" in err
    assert "S3cret" not in err


# ---- real PostgreSQL and MariaDB servers: tests/test_db_servers.py ----------------------------------------


@pytest.mark.parametrize("text,masked", [
    ("postgresql://admin:S3cret@host/db", "postgresql://admin:***@host/db"),
    ("cannot read 'mysql+pymysql://u:p%40ss@h:3306/x' (x)", "cannot read 'mysql+pymysql://u:***@h:3306/x' (x)"),
    ("http://key:tok@127.0.0.1:9/v1 and sqlite:////tmp/a.db", "http://key:***@127.0.0.1:9/v1 and sqlite:////tmp/a.db"),
])
def test_mask_secrets(text, masked):
    assert mask_secrets(text) == masked


# ---- paths, YAML, atomic prepare, namespaces ------------------------------------------------------------------

def lf_dir(root: Path, file_name: str) -> Path:
    root.mkdir()
    (root / "dataset_info.json").write_text(json.dumps({"d": {"file_name": file_name}}))
    return root


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_llamafactory_file_name_stays_inside_dataset_dir(tmp_path, capsys, how):
    secret = tmp_path / "outside" / "secret.json"
    secret.parent.mkdir()
    secret.write_text(json.dumps([{"instruction": f"SECRET {i}", "output": "x"} for i in range(20)]))
    name = {"dotdot": "../outside/secret.json", "absolute": str(secret), "symlink": "link.json"}[how]
    root = lf_dir(tmp_path / "lf", name)
    if how == "symlink":
        (root / "link.json").symlink_to(secret)
    cfg = config(tmp_path, [{"type": "llamafactory", "dataset_dir": str(root), "datasets": ["d"]}])
    err = one_line_error(*run_cli(tmp_path, cfg, capsys=capsys))
    assert "points outside" in err
    assert not (tmp_path / "runs").exists()


def test_billion_laughs_refused_at_validate(tmp_path, capsys):
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\nname: *a9\n")
    assert bomb.stat().st_size < 1500
    started = time.perf_counter()
    assert main(["validate", str(bomb)]) == 2
    assert time.perf_counter() - started < 5
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "aliases expand to more than" in err and len(err.splitlines()) == 1


def test_recursive_alias_refused(tmp_path, capsys):
    path = tmp_path / "rec.yaml"
    path.write_text("name: &a [1, *a]\n")
    assert main(["validate", str(path)]) == 2
    assert "refers to the node that contains it" in capsys.readouterr().err


def test_failed_prepare_keeps_the_last_good_one(tmp_path, capsys):
    db = make_db(tmp_path / "src.sqlite")
    good = config(tmp_path, [{"type": "sql", "url": f"sqlite:///{db}",
                              "query": "SELECT id, task, prompt, response FROM examples"}])
    assert run_cli(tmp_path, good, capsys=capsys)[0] == 0
    data = tmp_path / "runs" / "t" / "data"
    before = {p.name: p.read_bytes() for p in data.iterdir()}
    # Chunk 'a' changes (fewer rows) and chunk 'b' mixes a LLaMA-Factory dataset with SQL rows: the second
    # fails only after 'a' is ready to be written.
    root = lf_dir(tmp_path / "lf", "b.json")
    (root / "b.json").write_text(json.dumps([{"instruction": f"lf{i}", "output": "o"} for i in range(8)]))
    (root / "dataset_info.json").write_text(json.dumps({"b": {"file_name": "b.json"}}))
    bad = config(tmp_path, [{"type": "sql", "url": f"sqlite:///{db}",
                             "query": "SELECT id, task, prompt, response FROM examples WHERE id < 16"},
                            {"type": "llamafactory", "dataset_dir": str(root), "datasets": ["b"]}])
    err = one_line_error(*run_cli(tmp_path, bad, capsys=capsys))
    assert "mixes a LLaMA-Factory dataset with other sources" in err
    assert {p.name: p.read_bytes() for p in data.iterdir()} == before
    assert [p.name for p in data.parent.iterdir() if p.name.startswith(".data")] == []


def test_chunks_cannot_overwrite_bookkeeping(tmp_path, capsys):
    db = tmp_path / "src.sqlite"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE examples (id INTEGER, task TEXT, prompt TEXT, response TEXT)")
        names = ["summary", "manifest", "dataset_info", "validation"]
        conn.executemany("INSERT INTO examples VALUES (?,?,?,?)",
                         [(i, names[i % 4], f"p{i}", f"r{i}") for i in range(24)])
    cfg = config(tmp_path, [{"type": "sql", "url": f"sqlite:///{db}",
                             "query": "SELECT id, task, prompt, response FROM examples"}], test_per_chunk=1,
                 validation_per_chunk=1)
    assert run_cli(tmp_path, cfg, capsys=capsys)[0] == 0
    data = tmp_path / "runs" / "t" / "data"
    info = json.loads((data / "dataset_info.json").read_text())
    manifest = json.loads((data / "_manifest.json").read_text())
    assert set(manifest["shapes"]) == {"summary", "manifest", "dataset_info_chunk", "validation_chunk"}
    for chunk in manifest["shapes"]:  # each chunk's file holds its own training rows
        rows = json.loads((data / info[chunk]["file_name"]).read_text())
        assert len(rows) == 4 and {r["chunk"] for r in rows} == {chunk}
    assert {"chunks", "duplicates_removed", "sources"} <= set(json.loads((data / "_summary.json").read_text()))


# ---- conversations keyed by their whole context ---------------------------------------------------------------

def test_conversations_that_end_alike_are_not_duplicates(tmp_path, capsys):
    """As in glaive_toolcall_en_demo: many conversations end with "Thank you." after different histories."""
    root = tmp_path / "lf"
    root.mkdir()
    chats = [{"conversations": [{"from": "human", "value": f"question {i}"}, {"from": "gpt", "value": f"answer {i}"},
                                {"from": "human", "value": "Thank you."}, {"from": "gpt", "value": f"welcome {i}"}]}
             for i in range(12)]
    (root / "chat.json").write_text(json.dumps(chats))
    (root / "dataset_info.json").write_text(json.dumps({"chat": {"file_name": "chat.json", "formatting": "sharegpt"}}))
    cfg = config(tmp_path, [{"type": "llamafactory", "dataset_dir": str(root), "datasets": ["chat"]}])
    assert run_cli(tmp_path, cfg, capsys=capsys)[0] == 0
    data = tmp_path / "runs" / "t" / "data"
    summary = json.loads((data / "_summary.json").read_text())
    assert summary["duplicates_removed"] == 0
    assert len(json.loads((data / "chat.json").read_text())) == 8
    held = json.loads((data / "validation.json").read_text()) + json.loads((data / "test.json").read_text())
    assert len(held) == 4 and len({r["history"][0][0] for r in held}) == 4


def test_tool_turns_refused_with_one_line(tmp_path, capsys):
    root = tmp_path / "lf"
    root.mkdir()
    chats = [{"conversations": [{"from": "human", "value": f"order {i}"},
                                {"from": "function_call", "value": '{"name": "order"}'},
                                {"from": "observation", "value": '{"ok": true}'},
                                {"from": "gpt", "value": "done"}]} for i in range(12)]
    (root / "tools.json").write_text(json.dumps(chats))
    (root / "dataset_info.json").write_text(
        json.dumps({"tools": {"file_name": "tools.json", "formatting": "sharegpt"}}))
    cfg = config(tmp_path, [{"type": "llamafactory", "dataset_dir": str(root), "datasets": ["tools"]}])
    err = one_line_error(*run_cli(tmp_path, cfg, capsys=capsys))
    assert "record 0 of dataset 'tools': it has tool turns" in err and len(err.splitlines()) == 1


# ---- endpoints that stop answering mid-way stop the work ------------------------------------------------------

def test_generate_endpoint_failing_mid_prepare_stops_and_resumes(tmp_path, capsys):
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"id": f"d{i}", "text": f"doc {i}"}) + "\n" for i in range(4)))
    answer = lambda prompt: json.dumps([{"prompt": f"q {prompt[-8:]} {j}", "response": "a"} for j in range(6)])
    with chat_stub(answer, fail_after=2) as (url, state):
        source = {"type": "generate", "documents": {"type": "file", "path": str(docs)}, "base_url": url, "model": "m",
                  "retries": 1, "timeout": 5, "concurrency": 1, "cache_dir": str(tmp_path / "cache")}
        cfg = config(tmp_path, [source], chunk_by={"count": 1})
        err = one_line_error(*run_cli(tmp_path, cfg, capsys=capsys))
        assert "2 of 4 requests" in err and "re-run when the endpoint answers" in err
        assert not (tmp_path / "runs" / "t" / "data").exists()
        assert len(list((tmp_path / "cache").glob("*.json"))) == 2  # the answers that arrived are kept
        state["fail_after"] = None  # the endpoint is back
        posts = state["posts"]
        assert run_cli(tmp_path, cfg, capsys=capsys)[0] == 0
        assert state["posts"] - posts == 2  # only the two missing documents are asked again


@pytest.mark.parametrize("content,expected", [
    (b"\x00\x01\x02\x03binary", "binary data, not YAML"),
    ("name: caf\xe9\n".encode("latin-1"), "not a UTF-8 text file (byte 9)"),
    (b"name: a\nseed: 1\nname: b\n", "line 3: key 'name' is given twice (first on line 1); keep one"),
    (b"name: a\ndata:\n  sources: []\n  sources: []\n", "line 4: key 'sources' is given twice (first on line 3)"),
])
def test_config_file_problems_are_one_line(tmp_path, capsys, content, expected):
    path = tmp_path / "c.yaml"
    path.write_bytes(content)
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}") and expected in err and len(err.splitlines()) == 1, err
