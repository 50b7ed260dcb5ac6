"""prepare: a real SQLite source, chunked and split (stratified), written as LLaMA-Factory data files."""
import json
import sqlite3

import pytest

from autollm_lf.config import RunConfig
from autollm_lf.data.prepare import prepare
from autollm_lf.data.records import chunk_name
from autollm_lf.data.toy import TASKS, build_source_db
from autollm_lf.errors import UserError


def make_cfg(tmp_path, url, **data):
    return RunConfig.model_validate({
        "name": "p", "run_dir": str(tmp_path / "runs"), "base_model": {"path": str(tmp_path)},
        "data": {"sources": [{"type": "sql", "url": url, "query": "SELECT id, task, prompt, response FROM examples"}],
                 "validation_per_chunk": 7, "test_per_chunk": 5, **data}})


def test_prepare_from_sqlite(tmp_path):
    db = build_source_db(tmp_path / "src.sqlite", seed=3, rows_per_task=40)
    before = db.read_bytes()
    cfg = make_cfg(tmp_path, f"sqlite:///{db}")
    shapes = prepare(cfg)
    assert shapes == {t: "sft" for t in sorted(TASKS)}
    data = cfg.out / "data"
    info = json.loads((data / "dataset_info.json").read_text())
    assert set(info) == set(TASKS) | {"validation", "test"}
    assert info["math"] == {"file_name": "math.json", "columns": {"prompt": "instruction", "response": "output",
                                                                 "history": "history", "system": "system"}}
    val = json.loads((data / "validation.json").read_text())
    test = json.loads((data / "test.json").read_text())
    for c in TASKS:  # stratified by chunk
        assert sum(r["chunk"] == c for r in val) == 7 and sum(r["chunk"] == c for r in test) == 5
        train = json.loads((data / f"{c}.json").read_text())
        assert len(train) == 40 - 12 and {r["chunk"] for r in train} == {c}
    prompts = lambda rows: {r["instruction"] for r in rows}
    all_train = [r for c in TASKS for r in json.loads((data / f"{c}.json").read_text())]
    assert not (prompts(all_train) & (prompts(val) | prompts(test)))
    assert all(r["source"] == "sql:0" and r["row_id"] for r in val)  # provenance kept
    assert db.read_bytes() == before  # opened read-only


def test_same_seed_same_split(tmp_path):
    db = build_source_db(tmp_path / "src.sqlite", seed=3, rows_per_task=30)
    cfg = make_cfg(tmp_path, f"sqlite:///{db}")
    prepare(cfg)
    first = (cfg.out / "data" / "validation.json").read_text()
    prepare(cfg)
    assert (cfg.out / "data" / "validation.json").read_text() == first


def test_missing_database_is_a_clear_error(tmp_path):
    cfg = make_cfg(tmp_path, f"sqlite:///{tmp_path / 'nope.sqlite'}")
    with pytest.raises(UserError, match="data.sources.0: cannot read"):
        prepare(cfg)
    assert not (tmp_path / "nope.sqlite").exists()  # read-only: never created


def test_too_small_chunk_and_missing_field(tmp_path):
    db = tmp_path / "s.sqlite"
    with sqlite3.connect(db) as c:
        c.execute("CREATE TABLE examples (id INTEGER, task TEXT, prompt TEXT, response TEXT)")
        c.executemany("INSERT INTO examples VALUES (?,?,?,?)", [(i, "a", f"p{i}", "r") for i in range(10)])
    with pytest.raises(UserError, match=r"chunk 'a' has 10 rows \(10 usable as references\), needs at least 13"):
        prepare(make_cfg(tmp_path, f"sqlite:///{db}"))
    with sqlite3.connect(db) as c:
        c.execute("UPDATE examples SET response = NULL WHERE id = 4")
    with pytest.raises(UserError, match="row 4 of sql:0 has no response"):
        prepare(make_cfg(tmp_path, f"sqlite:///{db}"))


@pytest.mark.parametrize("raw,expected", [("Math & Logic", "Math_Logic"), ("../../etc", "etc"),
                                           ("all", "all_chunk"), ("", "chunk")])
def test_chunk_names_are_safe(raw, expected):
    assert chunk_name(raw) == expected


def test_chunk_by_count_and_size_are_seeded_and_balanced(tmp_path):
    db = build_source_db(tmp_path / "src.sqlite", seed=3, rows_per_task=20)  # 80 rows
    cfg = make_cfg(tmp_path, f"sqlite:///{db}", chunk_by={"count": 3}, validation_per_chunk=2, test_per_chunk=2)
    shapes = prepare(cfg)
    assert list(shapes) == ["part-1", "part-2", "part-3"]
    summary = json.loads((cfg.out / "data" / "_summary.json").read_text())
    assert [t["rows"] for t in summary["chunks"]] == [27, 27, 26]
    assert summary["chunks"][0]["methods"] == ["sft"]
    first = (cfg.out / "data" / "part-1.json").read_text()
    prepare(cfg)
    assert (cfg.out / "data" / "part-1.json").read_text() == first  # deterministic by seed
    cfg = make_cfg(tmp_path, f"sqlite:///{db}", chunk_by={"size": 30}, validation_per_chunk=2, test_per_chunk=2)
    summary_rows = None
    shapes = prepare(cfg)
    summary_rows = [t["rows"] for t in json.loads((cfg.out / "data" / "_summary.json").read_text())["chunks"]]
    assert list(shapes) == ["part-1", "part-2", "part-3"] and summary_rows == [30, 30, 20]


@pytest.mark.parametrize("bad", [{"count": 0}, {"bogus": 3}, {"count": 2, "size": 3}, "", {"size": "x"}])
def test_unknown_chunk_by_form(tmp_path, bad):
    from pydantic import ValidationError
    with pytest.raises(ValidationError, match="give a column name"):
        make_cfg(tmp_path, "sqlite:///x", chunk_by=bad)


def test_duplicates_across_splits_removed_and_counted(tmp_path, capsys):
    db = tmp_path / "dup.sqlite"
    with sqlite3.connect(db) as c:
        c.execute("CREATE TABLE examples (id INTEGER, task TEXT, prompt TEXT, response TEXT)")
        # every prompt twice within chunk a, and chunk b repeats a's prompts
        rows = [(i, "a", f"p{i % 15}", "r") for i in range(30)] + [(100 + i, "b", f"p{i}", "r") for i in range(15)]
        c.executemany("INSERT INTO examples VALUES (?,?,?,?)", rows)
    cfg = make_cfg(tmp_path, f"sqlite:///{db}", validation_per_chunk=3, test_per_chunk=3)
    prepare(cfg)
    data = cfg.out / "data"
    val, test = (json.loads((data / f"{s}.json").read_text()) for s in ("validation", "test"))
    held = [r["instruction"] for r in val + test]
    assert len(held) == len(set(held)) == 12  # no prompt held out twice (within or across chunks, splits)
    train = [r for c in "ab" for r in json.loads((data / f"{c}.json").read_text())]
    assert not {r["instruction"] for r in train} & set(held)
    summary = json.loads((data / "_summary.json").read_text())
    assert summary["duplicates_removed"] == 45 - 12 - len(train) > 0
    out = capsys.readouterr().out
    assert f"duplicates across splits removed: {summary['duplicates_removed']}" in out
    assert "methods" in out.splitlines()[0]


def test_provenance_reaches_training_files_and_source_names(tmp_path):
    db = build_source_db(tmp_path / "src.sqlite", seed=3, rows_per_task=20)
    cfg = make_cfg(tmp_path, f"sqlite:///{db}", validation_per_chunk=2, test_per_chunk=2)
    cfg.data.sources[0].name = "crm-db"
    prepare(cfg)
    train = json.loads((cfg.out / "data" / "math.json").read_text())
    assert all(r["source"] == "crm-db" and r["row_id"].isdigit() and r["chunk"] == "math" for r in train)
    from autollm_lf.data.prepare import load_split
    assert all(r["source"] == "crm-db" and r["row_id"] for r in load_split(cfg, "validation"))


def test_train_only_rows_are_never_held_out_and_the_test_split_stays(tmp_path):
    """Bad cases (train-only) taken from validation: replaced there by other rows; test rows unchanged."""
    db = build_source_db(tmp_path / "src.sqlite", seed=3, rows_per_task=30)
    cfg = make_cfg(tmp_path, f"sqlite:///{db}", validation_per_chunk=5, test_per_chunk=5)
    prepare(cfg)
    data = cfg.out / "data"
    val1, test1 = (json.loads((data / f"{s}.json").read_text()) for s in ("validation", "test"))
    run1 = tmp_path / "run1"
    (run1 / "report").mkdir(parents=True)
    bad = [r for r in val1 if r["chunk"] == "math"][:3]
    (run1 / "report" / "bad_cases.jsonl").write_text("".join(json.dumps(
        {"prompt": r["instruction"], "reference": r["output"], "prediction": "wrong", "chunk": "math",
         "source": "sql:0", "row_id": r["row_id"]}) + "\n" for r in bad))
    cfg2 = make_cfg(tmp_path / "r2", f"sqlite:///{db}", validation_per_chunk=5, test_per_chunk=5)
    from autollm_lf.config import BadCasesSource
    cfg2.data.sources.append(BadCasesSource(type="bad_cases", run=run1, rejected=True))
    shapes = prepare(cfg2)
    assert shapes["bad_cases"] == "preference"
    data2 = cfg2.out / "data"
    val2, test2 = (json.loads((data2 / f"{s}.json").read_text()) for s in ("validation", "test"))
    assert [r["instruction"] for r in test2] == [r["instruction"] for r in test1]  # same test rows
    bad_prompts = {r["instruction"] for r in bad}
    assert not bad_prompts & {r["instruction"] for r in val2 + test2}
    assert len([r for r in val2 if r["chunk"] == "math"]) == 5
    pref = json.loads((data2 / "bad_cases.json").read_text())
    assert {p["instruction"] for p in pref} == bad_prompts and all(p["rejected"] == "wrong" for p in pref)
    assert all(p["source"] == "bad_cases:1" and p["row_id"].startswith("sql:0/") for p in pref)
