"""The LLM judge: a real OpenAI-compatible server (`llamafactory-cli api` with the tiny model), plus a
small local server with scripted answers for parsing, caching, retries and the API key."""
import socket

import pytest
from conftest import chat_stub
from transformers import AutoModelForCausalLM, AutoTokenizer

from autollm_lf.config import EvaluationConfig, JudgeConfig
from autollm_lf.errors import UserError
from autollm_lf.evaluate.judge import parse_score
from autollm_lf.evaluate.metrics import METRICS

ROWS = [{"prompt": p, "response": p[::-1]} for p in ["ab", "abc", "ba", "cab"]]


@pytest.mark.parametrize("text,expected", [('{"score": 1}', 1.0), ('sure {"score": 0.25} done', 0.25),
                                            ('{"score": 7}', 1.0), ('{"grade": 1}', None), ("no json", None),
                                            ('{"score": "high"}', None), ("", None)])
def test_parse_score(text, expected):
    assert parse_score(text) == expected


def grade(prompt: str) -> str:
    """Grades 1 when the reference appears reversed in the prompt's question, else garbage."""
    return '{"score": 1}' if "Question:\nab\n" in prompt else "I think it is fine"


@pytest.fixture
def scripted_server():
    """The judge endpoint; its first POST is answered 503 (the client retries)."""
    with chat_stub(grade, fail_first=True) as (url, state):
        yield url, state


def judge_cfg(base_url, **kw):
    return EvaluationConfig(metric="judge", max_new_tokens=4, batch_size=4,
                            judge=JudgeConfig(base_url=base_url, model="m", **kw))


def test_judge_scores_caches_retries_and_counts_unparsable(tiny_model, scripted_server, monkeypatch):
    url, state = scripted_server
    monkeypatch.setenv("MY_JUDGE_KEY", "sk-test-123")
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    judge = METRICS["judge"](model, tok, "default", ROWS, judge_cfg(url, api_key_env="MY_JUDGE_KEY"))
    assert judge.row_scores() == [1.0, 0.0, 0.0, 0.0]
    assert judge.stats == {"unparsable": 3, "requests": 4, "errors": 0}
    posts = [auth for method, auth in state["calls"] if method == "POST"]
    assert len(posts) == 5  # one 503, retried
    assert all(auth == "Bearer sk-test-123" for auth in posts)
    judge.row_scores()  # same answers again: served from the cache
    assert state["posts"] == 5 and judge.stats["requests"] == 4


def test_judge_errors_are_clear(tiny_model, scripted_server, monkeypatch):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    monkeypatch.delenv("NOT_SET_KEY", raising=False)
    with pytest.raises(UserError, match="NOT_SET_KEY is not set"):
        METRICS["judge"](model, tok, "default", ROWS, judge_cfg(scripted_server[0], api_key_env="NOT_SET_KEY"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    with pytest.raises(UserError, match="evaluation.judge.base_url: no answer from"):
        METRICS["judge"](model, tok, "default", ROWS, judge_cfg(dead, timeout=2.0))


@pytest.mark.slow
def test_judge_against_real_llamafactory_api(tiny_model, llamafactory_api):
    """The tiny model is a poor judge: its answers hold no score. The evaluation must cope, not crash."""
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    judge = METRICS["judge"](model, tok, "default", ROWS, judge_cfg(llamafactory_api, max_tokens=8, timeout=120.0))
    scores = judge.row_scores()
    assert len(scores) == len(ROWS) and all(0.0 <= s <= 1.0 for s in scores)
    assert judge.stats["errors"] == 0 and judge.stats["requests"] == len(ROWS)
    assert judge.stats["unparsable"] == sum(s == 0.0 for s in scores)


def test_judge_that_stops_answering_stops_instead_of_scoring_zero(tiny_model):
    """After its retries a failed request is an error, not a 0 fed to the optimiser."""
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    with chat_stub(lambda prompt: '{"score": 1}', fail_after=2) as (url, state):
        judge = METRICS["judge"](model, tok, "default", ROWS, judge_cfg(url, retries=1, timeout=5.0, concurrency=1))
        with pytest.raises(UserError, match=r"evaluation.judge: .* failed after 1 retries .*this trial is not logged"):
            judge.row_scores()
        assert state["answered"] == 2 and state["posts"] == 4  # the third request and its one retry
