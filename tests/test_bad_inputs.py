"""Table-driven bad inputs: each exits 2 with one clear line naming the key, file or row, no traceback,
and leaves every file already on disk exactly as it was."""
import hashlib
import json
import sqlite3
import sys
from pathlib import Path

import pytest
import yaml

from autollm_lf.cli import main


def good_config(root: Path) -> dict:
    return {
        "name": "t", "run_dir": str(root / "runs"),
        "base_model": {"path": str(root / "model")},
        "data": {"sources": [{"type": "sql", "url": f"sqlite:///{root / 'src.sqlite'}",
                              "query": "SELECT id, task, prompt, response FROM examples"}],
                 "validation_per_chunk": 2, "test_per_chunk": 2},
        "search": {"human_weights": {"a": 1.0}},
    }


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A model folder, a source database and a prepared run: the state bad input must not disturb."""
    root = tmp_path_factory.mktemp("bad")
    (root / "model").mkdir()
    (root / "model" / "config.json").write_text("{}")
    (root / "notes.txt").write_text("prompt,response\n")
    with sqlite3.connect(root / "src.sqlite") as db:
        db.execute("CREATE TABLE examples (id INTEGER, task TEXT, prompt TEXT, response TEXT)")
        db.executemany("INSERT INTO examples VALUES (?,?,?,?)",
                       [(i, "ab"[i % 2], f"p{i}", f"r{i}") for i in range(20)])
        db.execute("CREATE TABLE gaps (id INTEGER, task TEXT, prompt TEXT, response TEXT)")
        db.executemany("INSERT INTO gaps VALUES (?,?,?,?)",
                       [(i, "a", f"p{i}", None if i == 3 else "r") for i in range(9)])
        db.execute("CREATE TABLE odd (id INTEGER, task TEXT, prompt TEXT, response TEXT)")
        db.executemany("INSERT INTO odd VALUES (?,?,?,?)",  # chunk values that collide once made file names
                       [(i, ["a b", "a/b", "a_b"][i % 3], f"p{i}", "r") for i in range(30)])
        db.execute("CREATE TABLE same (id INTEGER, task TEXT, prompt TEXT, response TEXT)")
        db.executemany("INSERT INTO same VALUES (?,?,?,?)", [(i, "a", "one prompt", f"r{i}") for i in range(20)])
    make_bad_inputs(root)
    cfg = root / "good.yaml"
    cfg.write_text(yaml.safe_dump(good_config(root)))
    assert main(["prepare", str(cfg)]) == 0
    sys.path.insert(0, str(root))  # the metric modules; no __pycache__, so the workspace stays as it was
    sys.dont_write_bytecode, dont_write = True, sys.dont_write_bytecode
    yield root
    sys.path.remove(str(root))
    sys.dont_write_bytecode = dont_write


def make_bad_inputs(root: Path) -> None:
    """Files that are broken in one way each: LLaMA-Factory dirs, data files, templates, metric modules."""
    def lf(name: str, info, files: dict[str, bytes]):
        (root / name).mkdir()
        (root / name / "dataset_info.json").write_bytes(info if isinstance(info, bytes) else json.dumps(info).encode())
        for file, data in files.items():
            (root / name / file).write_bytes(data)
    rows = json.dumps([{"instruction": f"q{i}", "output": "a"} for i in range(12)]).encode()
    lf("lf_badjson", b'{"d": {"file_name": "d.json"', {"d.json": rows})
    lf("lf_list", b'[{"file_name": "d.json"}]', {"d.json": rows})
    lf("lf_chosen_str", {"d": {"file_name": "d.json", "formatting": "sharegpt", "ranking": True,
                               "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}}},
       {"d.json": json.dumps([{"conversations": [{"from": "human", "value": "q"}], "chosen": "yes",
                               "rejected": "no"}]).encode()})
    lf("lf_strings", {"d": {"file_name": "d.json"}}, {"d.json": b'["a", "b"]'})
    lf("lf_latin1", {"d": {"file_name": "d.json"}},
       {"d.json": '[{"instruction": "café", "output": "x"}]'.encode("latin-1")})
    lf("lf_formatting", {"d": {"file_name": "d.json", "formatting": "markdown"}}, {"d.json": rows})
    (root / "latin1.jsonl").write_bytes('{"task": "a", "prompt": "café", "response": "x"}\n'.encode("latin-1"))
    (root / "nested.jsonl").write_text("".join(json.dumps({"task": "a", "prompt": {"q": i}, "response": "r"}) + "\n"
                                               for i in range(12)))
    (root / "broken_syntax.j2").write_text("model_name_or_path: {{ model_name_or_path }\n")
    (root / "broken_var.j2").write_text("model_name_or_path: {{ model_path }}\n")
    (root / "metric_raises.py").write_text("raise RuntimeError('no GPU here')\ndef f(p, r, rows): return []\n")
    (root / "metric_syntax.py").write_text("def f(p, r, rows) return []\n")
    (root / "cut_model").mkdir()
    (root / "cut_model" / "config.json").write_text('{"architectures": ["LlamaFor')
    (root / "a_file").write_text("not a folder")


def edit(cfg: dict, path: str, value) -> dict:
    """Set a dotted key (list indices as numbers); value None with '-' prefix deletes it."""
    keys = path.lstrip("-").split(".")
    node = cfg
    for k in keys[:-1]:
        node = node[int(k)] if k.isdigit() else node.setdefault(k, {})
    if path.startswith("-"):
        del node[keys[-1]]
    else:
        node[int(keys[-1]) if keys[-1].isdigit() else keys[-1]] = value
    return cfg


SQL = "data.sources.0"
GENERATE = {"type": "generate", "base_url": "http://127.0.0.1:9/v1", "model": "m", "timeout": 2, "retries": 0,
            "documents": {"type": "sql", "url": "sqlite:///WS/src.sqlite",
                          "query": "SELECT id, prompt AS text FROM examples"}}
CASES = [  # (id, edits, command, expected text in the one error line)
    ("unknown top-level key", [("nmae", "x")], "validate", "nmae: unknown key"),
    ("mistyped nested key", [("data.chunkby", "task")], "validate", "data.chunkby: unknown key"),
    ("mistyped search key", [("search.n_iters", 3)], "validate", "search.n_iters: unknown key"),
    ("seed not an int", [("seed", "zero")], "validate", "seed: Input should be a valid integer"),
    ("n_iter not an int", [("search.n_iter", "many")], "validate", "search.n_iter: Input should be a valid integer"),
    ("negative init_points", [("search.init_points", -2)], "validate", "search.init_points: Input should be greater"),
    ("bounds reversed", [("search.bounds", [1.0, 0.0])], "validate", "search.bounds: lower bound 1.0 must be below"),
    ("bounds equal", [("search.bounds", [0.5, 0.5])], "validate", "search.bounds: lower bound 0.5 must be below"),
    ("bounds one number", [("search.bounds", [1.0])], "validate", "search.bounds"),
    ("human weight not a number", [("search.human_weights", {"a": "lots"})], "validate", "search.human_weights.a"),
    ("missing base_model", [("-base_model", None)], "validate", "base_model: required key is missing"),
    ("missing query", [(f"-{SQL}.query", None)], "validate", "data.sources.0.sql.query: required key is missing"),
    ("no sources", [("data.sources", [])], "validate", "data.sources: List should have at least 1 item"),
    ("unknown source type", [(f"{SQL}.type", "mongo")], "validate", "data.sources.0: Input tag 'mongo'"),
    ("batch size zero", [("evaluation.batch_size", 0)], "validate", "evaluation.batch_size: Input should be greater"),
    ("unknown template", [("train.templates", {"sft": "nope.j2"})], "validate",
     "train.templates.sft: no template 'nope.j2'"),
    ("unknown method", [("train.methods", ["ppo"])], "validate", "train.methods: unknown method 'ppo'"),
    ("method does not fit the data", [("train.chunk_methods", {"a": ["dpo"]})], "train",
     "train: method 'dpo' does not fit chunk 'a': its data is prompt/response, dpo needs prompt with chosen/rejected"),
    ("unknown metric", [("evaluation.metric", "bleu")], "validate", "unknown metric 'bleu'"),
    ("run name escapes", [("name", "../elsewhere")], "validate", "name: use letters, digits"),
    ("base model not a model", [("base_model.path", "/nonexistent/model")], "validate",
     "base_model.path: /nonexistent/model is not a Hugging Face model folder"),
    ("sqlite file missing", [(f"{SQL}.url", "sqlite:////nonexistent/x.sqlite")], "validate",
     "data.sources.0.url: SQLite file /nonexistent/x.sqlite not found"),
    ("file source missing", [("data.sources", [{"type": "file", "path": "/nonexistent/d.jsonl"}])], "validate",
     "data.sources.0.path: /nonexistent/d.jsonl not found"),
    ("file source wrong format", [("data.sources", [{"type": "file", "path": "WS/notes.txt"}])], "prepare",
     "notes.txt is not one of"),
    ("query fails", [(f"{SQL}.query", "SELECT nope FROM examples")], "prepare", "data.sources.0: cannot read"),
    ("query writes", [(f"{SQL}.query", "DELETE FROM examples")], "prepare",
     "data.sources.0.query: sources are read-only"),
    ("two statements", [(f"{SQL}.query", "SELECT 1; DROP TABLE examples")], "prepare", "sources are read-only"),
    ("database unreachable", [(f"{SQL}.url", "postgresql+psycopg2://u@127.0.0.1:1/db")], "prepare",
     "data.sources.0: cannot read"),
    ("row missing field", [(f"{SQL}.query", "SELECT id, task, prompt, response FROM gaps")], "prepare",
     "row 3 of sql:0 has no response"),
    ("chunk too small", [("data.validation_per_chunk", 9)], "prepare",
     "chunk 'a' has 10 rows (10 usable as references), needs at least 12"),
    ("no rows", [(f"{SQL}.query", "SELECT id, task, prompt, response FROM examples WHERE 0")], "prepare",
     "data.sources: no rows"),
    ("chunk_by column missing", [("data.chunk_by", "topic")], "prepare", "has no topic (column 'topic')"),
    ("human weight for unknown chunk", [("search.human_weights", {"c": 1.0})], "train",
     "search.human_weights: unknown chunk 'c'"),
    ("chunk_args for unknown chunk", [("train.chunk_args", {"z": {"learning_rate": 0.1}})], "train",
     "train.chunk_args: unknown chunk 'z'"),
    ("search before training", [], "search", "deltas not trained: a-sft, b-sft, all; run `autollm train` first"),
    ("evaluator module missing", [("evaluation", {"metric": "python", "function": "no_such_mod:f"})], "validate",
     "evaluation.function: cannot import 'no_such_mod:f'"),
    ("evaluator function missing", [("evaluation", {"metric": "python", "function": "json:nope"})], "validate",
     "evaluation.function: cannot import 'json:nope'"),
    ("python metric without function", [("evaluation", {"metric": "python"})], "validate",
     "metric 'python' needs evaluation.function"),
    ("bad regex", [("evaluation", {"metric": "regex", "pattern": "("})], "validate", "not a valid regular expression"),
    ("judge endpoint down",
     [("evaluation", {"metric": "judge", "judge": {"base_url": "http://127.0.0.1:9/v1", "model": "m", "timeout": 2}})],
     "run", "evaluation.judge.base_url: no answer from http://127.0.0.1:9/v1"),
    ("judge key not set", [("evaluation", {"metric": "judge",
                                           "judge": {"base_url": "http://127.0.0.1:9/v1", "model": "m",
                                                     "api_key_env": "AUTOLLM_NO_SUCH_KEY"}})],
     "run", "AUTOLLM_NO_SUCH_KEY is not set"),
    ("unknown chunk_by form", [("data.chunk_by", {"bogus": 3})], "validate",
     "data.chunk_by: unknown form {'bogus': 3}; give a column name (e.g. task), {count: N} or {size: N}"),
    ("chunk_by count zero", [("data.chunk_by", {"count": 0})], "validate", "data.chunk_by: unknown form {'count': 0}"),
    ("generate key not set", [("data.sources", [{**GENERATE, "api_key_env": "AUTOLLM_NO_SUCH_KEY"}])], "validate",
     "data.sources.0.api_key_env: environment variable AUTOLLM_NO_SUCH_KEY is not set; export it"),
    ("generate server down", [("data.sources", [GENERATE])], "prepare",
     "data.sources.0.base_url: no answer from http://127.0.0.1:9/v1"),
    ("generate template missing", [("data.sources", [{**GENERATE, "prompt_template": "nope.j2"}])], "validate",
     "data.sources.0.prompt_template: no template 'nope.j2'"),
    ("generate text column missing", [("data.sources", [{**GENERATE, "text_column": "body"}])], "prepare",
     "data.sources.0.text_column: document 0 has no 'body'"),
    ("generate documents missing",
     [("data.sources", [{**GENERATE, "documents": {"type": "file", "path": "/nonexistent/docs.csv"}}])],
     "validate", "data.sources.0.documents.path: /nonexistent/docs.csv not found"),
    ("bad_cases run missing", [("data.sources", [{"type": "bad_cases", "run": "/nonexistent/run"}])], "validate",
     "data.sources.0.run: /nonexistent/run/report/bad_cases.jsonl not found; run `autollm run` on that run first"),
    ("round without the previous round", [("round", 2)], "validate",
     "round 2 starts from round 1's best merge, but round 1 is not finished"),
    ("round zero", [("round", 0)], "validate", "round: Input should be greater than or equal to 1"),
    # Tracebacks once, one line now
    ("run_dir is a file", [("run_dir", "WS/a_file")], "validate", "run_dir: WS/a_file is a file, not a folder"),
    ("dataset_info not JSON", [("data.sources", [{"type": "llamafactory", "dataset_dir": "WS/lf_badjson",
                                                  "datasets": ["d"]}])],
     "prepare", "lf_badjson/dataset_info.json line 1: not valid JSON"),
    ("dataset_info a list", [("data.sources", [{"type": "llamafactory", "dataset_dir": "WS/lf_list",
                                                "datasets": ["d"]}])],
     "prepare", "dataset_info.json must be a JSON object of dataset name -> entry"),
    ("sharegpt chosen a string", [("data.sources", [{"type": "llamafactory", "dataset_dir": "WS/lf_chosen_str",
                                                     "datasets": ["d"]}])],
     "prepare", "record 0 of dataset 'd': 'chosen' is a str; in sharegpt/openai formatting it must be one message"),
    ("dataset file of strings", [("data.sources", [{"type": "llamafactory", "dataset_dir": "WS/lf_strings",
                                                    "datasets": ["d"]}])],
     "prepare", "d.json record 0 is a str, not an object"),
    ("dataset file not UTF-8", [("data.sources", [{"type": "llamafactory", "dataset_dir": "WS/lf_latin1",
                                                   "datasets": ["d"]}])],
     "prepare", "d.json is not UTF-8 text"),
    ("file source not UTF-8", [("data.sources", [{"type": "file", "path": "WS/latin1.jsonl"}])], "prepare",
     "data.sources.0.path: cannot load WS/latin1.jsonl"),
    ("metric module raises", [("evaluation", {"metric": "python", "function": "metric_raises:f"})], "validate",
     "evaluation.function: importing 'metric_raises' failed (RuntimeError: no GPU here)"),
    ("metric module syntax error", [("evaluation", {"metric": "python", "function": "metric_syntax:f"})], "validate",
     "evaluation.function: importing 'metric_syntax' failed (SyntaxError"),
    # Accepted silently once
    ("bounds infinite", [("search.bounds", [0.0, float("inf")])], "validate",
     "search.bounds.1: Input should be a finite number"),
    ("human weight NaN", [("search.human_weights", {"a": float("nan")})], "validate",
     "search.human_weights.a: Input should be a finite number"),
    ("two sources one name",
     [("data.sources", [{"type": "sql", "name": "s", "url": "sqlite:///WS/src.sqlite", "query": "SELECT 1"},
                        {"type": "sql", "name": "s", "url": "sqlite:///WS/src.sqlite", "query": "SELECT 1"}])],
     "validate", "data.sources: name 's' given to more than one source"),
    ("chunk values collide", [(f"{SQL}.query", "SELECT id, task, prompt, response FROM odd")], "prepare",
     "data: task values 'a b', 'a/b', 'a_b' all become chunk 'a_b'"),
    ("name ends in a newline", [("name", "t\n")], "validate", "name: use letters, digits"),
    ("base model config cut off", [("base_model.path", "WS/cut_model")], "validate",
     "base_model.path: WS/cut_model/config.json is not a valid JSON object"),
    ("unknown formatting", [("data.sources", [{"type": "llamafactory", "dataset_dir": "WS/lf_formatting",
                                               "datasets": ["d"]}])],
     "prepare", "d has formatting 'markdown'; LLaMA-Factory knows alpaca, sharegpt, openai"),
    ("template syntax error", [("train.templates", {"sft": "WS/broken_syntax.j2"})], "validate",
     "train.templates.sft: WS/broken_syntax.j2 line 1: unexpected '}'"),
    ("template undefined variable", [("train.templates", {"sft": "WS/broken_var.j2"})], "validate",
     "train.templates.sft: WS/broken_var.j2: 'model_path' is undefined; autollm sets only"),
    ("prompt not text", [("data.sources", [{"type": "file", "path": "WS/nested.jsonl"}])], "prepare",
     "data.sources.0: row 0 of file:0: prompt (column 'prompt') is a dict, not text"),
    ("prompts not distinct", [(f"{SQL}.query", "SELECT id, task, prompt, response FROM same")], "prepare",
     "chunk 'a' has 20 rows but only 1 distinct prompts"),
    ("sql URL not a URL", [(f"{SQL}.url", "not a url")], "validate",
     "data.sources.0.url: 'not a url' is not a database URL"),
    ("password masked", [(f"{SQL}.url", "postgresql+psycopg2://admin:S3cret@127.0.0.1:1/db")], "prepare",
     "cannot read 'postgresql+psycopg2://admin:***@127.0.0.1:1/db'"),
]


def in_workspace(value, workspace: Path):
    """'WS/...' in any string of a case's value -> a path in the workspace."""
    if isinstance(value, str):
        return value.replace("WS/", f"{workspace}/")
    if isinstance(value, list):
        return [in_workspace(v, workspace) for v in value]
    if isinstance(value, dict):
        return {k: in_workspace(v, workspace) for k, v in value.items()}
    return value


def snapshot(root: Path) -> dict[str, str]:
    """Every file but the cases and the runs' autollm.log, which records the failure (see test_bad_input)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and "cases" not in p.parts and p.name != "autollm.log"}


@pytest.mark.parametrize("case_id,edits,command,expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input(workspace, capsys, case_id, edits, command, expected):
    cfg = good_config(workspace)
    for path, value in edits:
        edit(cfg, path, in_workspace(value, workspace))
    case_file = workspace / "cases" / f"{case_id.replace(' ', '_')}.yaml"
    case_file.parent.mkdir(exist_ok=True)
    case_file.write_text(yaml.safe_dump(cfg))
    before = snapshot(workspace)
    logged = {log: log.read_text() for log in workspace.rglob("autollm.log")}
    capsys.readouterr()
    assert main([command, str(case_file)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err and "S3cret" not in err
    assert len(err.splitlines()) == 1 or command == "validate", err  # validate lists every problem, one a line
    assert in_workspace(expected, workspace) in err, err
    assert snapshot(workspace) == before
    for log in workspace.rglob("autollm.log"):  # a run's log this case wrote to ends with the same error line
        if log.read_text() != logged.get(log):
            assert log.read_text().splitlines()[-1].endswith(err.strip()), (log, err)


def test_the_good_config_passes(workspace, capsys):
    """The control: every case is good_config with one edit, so good_config itself must pass validate and prepare
    (else the validate and prepare cases could fail for the same reason, whatever their edit), and neither may say
    any case's expected text (an empty one is said by every output: that case would check nothing); prepare, run
    again on the same data, writes every file as it was."""
    path = workspace / "cases" / "good.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(yaml.safe_dump(good_config(workspace)))
    for command in ("validate", "prepare"):
        before = snapshot(workspace)
        capsys.readouterr()
        assert main([command, str(path)]) == 0, capsys.readouterr().err
        said = "".join(capsys.readouterr())
        assert [case for case, _, _, expected in CASES if in_workspace(expected, workspace) in said] == []
        assert snapshot(workspace) == before


def test_adapters_of_a_different_base_are_refused(workspace, capsys):
    run = workspace / "runs" / "t"
    try:
        for name in ("a-sft", "b-sft", "all"):
            d = run / "deltas" / name
            d.mkdir(parents=True)
            (d / "adapter_model.safetensors").write_bytes(b"")
            (d / "autollm_delta.json").write_text(json.dumps({"fingerprint": "x"}))
            (d / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/some/other/model"}))
        before = snapshot(workspace)
        assert main(["search", str(workspace / "good.yaml")]) == 2
        err = capsys.readouterr().err
        assert "was trained on /some/other/model, not on base_model.path" in err
        assert snapshot(workspace) == before
    finally:
        import shutil
        shutil.rmtree(run / "deltas", ignore_errors=True)


@pytest.mark.parametrize("text,expected", [("name: [unclosed", "not valid YAML"), ("- a\n- b\n", "expected a mapping")])
def test_unparsable_config(tmp_path, capsys, text, expected):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    assert main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert expected in err and str(bad) in err
