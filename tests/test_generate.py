"""The `generate` source: a scripted OpenAI-compatible server (malformed answers counted, logged and skipped;
a 503 retried; a re-run served from the cache with zero requests), and a real `llamafactory-cli api` serving
the tiny model (poor answers: the source copes)."""
import json

import pytest
from conftest import chat_stub

from autollm_lf.cli import main
from autollm_lf.config import RunConfig
from autollm_lf.data.prepare import prepare
from autollm_lf.data.sources import read_rows
from autollm_lf.data.sources.generate import parse_examples

GOOD = json.dumps([{"prompt": f"q{i}", "response": f"a{i}"} for i in range(3)])
ANSWERS = {  # document marker -> the scripted model's answer
    "GOOD": GOOD,
    "FENCED": "Sure!\n```json\n" + json.dumps([{"question": "fq", "answer": "fa"}]) + "\n```",
    "PARTIAL": json.dumps([{"prompt": "pq", "response": "pa"}, {"prompt": "no answer"}, "junk"]),
    "BAD": "I cannot do that.",
    "OBJECT": json.dumps({"prompt": "x"}),
}


def scripted(prompt: str) -> str:
    """The scripted model's answer: the one for the document marker in the prompt."""
    return next(a for marker, a in ANSWERS.items() if marker in prompt)


@pytest.fixture
def stub():
    """The generating endpoint; its first POST is answered 503 (the client retries). Yields (url, state)."""
    with chat_stub(scripted, fail_first=True) as (url, state):
        yield url, state


@pytest.fixture
def server(stub):
    return stub[0]


def write_docs(tmp_path, markers):
    path = tmp_path / "docs.csv"
    path.write_text("id,topic,text\n" + "".join(f"d{i},t{i % 2},\"A {m} document.\"\n" for i, m in enumerate(markers)))
    return path


def make_cfg(tmp_path, url, docs, **gen):
    return RunConfig.model_validate({
        "name": "g", "run_dir": str(tmp_path / "runs"), "base_model": {"path": str(tmp_path)},
        "data": {"sources": [{"type": "generate", "name": "news-qa", "documents": {"type": "file", "path": str(docs)},
                              "base_url": url, "model": "m", "cache_dir": str(tmp_path / "cache"), **gen}],
                 "chunk_by": "topic", "validation_per_chunk": 1, "test_per_chunk": 1}})


@pytest.mark.parametrize("answer,n,bad,why", [
    (GOOD, 3, 0, None), (ANSWERS["FENCED"], 1, 0, None), (ANSWERS["PARTIAL"], 1, 2, None),
    ("nothing", 0, 0, "no JSON list in the answer"), ('{"a": 1}', 0, 0, "the JSON is not a list"),
    ('[{"x": 1}]', 0, 1, "no item has a prompt and a response"),
    ('{"examples": [{"prompt": "p", "response": "r"}]}', 1, 0, None)])
def test_parse_examples(answer, n, bad, why):
    examples, nbad, reason = parse_examples(answer)
    assert (len(examples), nbad, reason) == (n, bad, why)


def test_generate_parses_skips_retries_and_caches(tmp_path, stub, monkeypatch, capsys):
    server, state = stub
    monkeypatch.setenv("GEN_KEY", "sk-gen")
    docs = write_docs(tmp_path, ["GOOD", "FENCED", "PARTIAL", "BAD", "OBJECT", "GOOD"])
    cfg = make_cfg(tmp_path, server, docs, api_key_env="GEN_KEY", concurrency=3, retries=2)
    rows = read_rows(cfg.data.sources[0], 0, cfg)
    assert len(rows) == 3 + 1 + 1 + 3
    assert rows[0] == {"prompt": "q0", "response": "a0", "chunk_value": "t0", "id": "d0:0"}
    stats = json.loads((tmp_path / "cache" / "last_stats.json").read_text())
    # six documents, two with the same text -> five distinct prompts; one 503 retried
    assert stats == {"documents": 6, "requests": 6, "cached": 0, "examples": 8, "malformed_answers": 2,
                     "malformed_items": 2, "failed": 0}
    assert all(auth == "Bearer sk-gen" for kind, auth in state["calls"] if kind == "POST")
    logged = [json.loads(l) for l in (tmp_path / "cache" / "malformed.jsonl").read_text().splitlines()]
    assert sorted(r["document"] for r in logged) == [3, 4]
    assert "skipped 2 malformed answers" in capsys.readouterr().out

    state["calls"].clear()
    again = read_rows(cfg.data.sources[0], 0, cfg)  # a re-run pays nothing: not even the /models check
    assert again == rows and state["calls"] == []
    assert json.loads((tmp_path / "cache" / "last_stats.json").read_text())["cached"] == 5


def test_generate_feeds_prepare_with_provenance(tmp_path, server):
    docs = tmp_path / "docs.csv"
    docs.write_text("id,topic,text\nd0,t0,A GOOD one.\nd1,t0,Another GOOD one.\n")
    cfg = make_cfg(tmp_path, server, docs, chunk="news")
    shapes = prepare(cfg)
    assert shapes == {"news": "sft"}
    rows = [r for s in ("news", "validation", "test") for r in json.loads((cfg.out / "data" / f"{s}.json").read_text())]
    # six examples, three distinct prompts (both documents give q0..q2): two held out, their copies dropped
    assert len(rows) == 4 and json.loads((cfg.out / "data" / "_summary.json").read_text())["duplicates_removed"] == 2
    assert all(r["source"] == "news-qa" and r["row_id"].startswith("d") for r in rows)


def test_generate_errors(tmp_path, server, monkeypatch, capsys):
    docs = write_docs(tmp_path, ["GOOD"])
    (tmp_path / "config.json").write_text("{}")  # base_model.path must look like a model folder
    monkeypatch.delenv("NO_SUCH_GEN_KEY", raising=False)
    cfg_path = tmp_path / "g.yaml"
    import yaml
    base = make_cfg(tmp_path, server, docs).model_dump(mode="json")
    base["data"]["sources"][0]["api_key_env"] = "NO_SUCH_GEN_KEY"
    cfg_path.write_text(yaml.safe_dump(base))
    assert main(["validate", str(cfg_path)]) == 2
    assert "data.sources.0.api_key_env: environment variable NO_SUCH_GEN_KEY is not set" in capsys.readouterr().err
    base["data"]["sources"][0].update(api_key_env=None, base_url="http://127.0.0.1:9/v1", timeout=2)
    cfg_path.write_text(yaml.safe_dump(base))
    assert main(["prepare", str(cfg_path)]) == 2
    err = capsys.readouterr().err.splitlines()[-1]  # after the documents file's loading progress
    assert err.startswith("error: data.sources.0.base_url: no answer from http://127.0.0.1:9/v1")
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.slow
def test_generate_against_real_llamafactory_api(tmp_path, llamafactory_api):
    """The tiny model writes no usable JSON: every answer is counted as malformed and skipped, nothing crashes,
    and a re-run is served from the cache."""
    docs = write_docs(tmp_path, ["GOOD", "BAD"])
    cfg = make_cfg(tmp_path, llamafactory_api, docs, max_tokens=8, timeout=120.0, concurrency=2)
    rows = read_rows(cfg.data.sources[0], 0, cfg)
    stats = json.loads((tmp_path / "cache" / "last_stats.json").read_text())
    assert stats["requests"] == 2 and stats["failed"] == 0
    # 8 tokens of a char-level model cannot hold one {prompt, response} object: no example, and every answer that
    # is not an (empty) JSON list is counted as malformed and logged once
    assert rows == [] and stats["examples"] == 0 and 0 <= stats["malformed_answers"] <= 2
    logged = (tmp_path / "cache" / "malformed.jsonl")
    assert (len(logged.read_text().splitlines()) if logged.exists() else 0) == stats["malformed_answers"]
    read_rows(cfg.data.sources[0], 0, cfg)
    assert json.loads((tmp_path / "cache" / "last_stats.json").read_text())["requests"] == 0
