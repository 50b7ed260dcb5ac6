"""`metric: choice`: multiple choice by log-likelihood (lm-eval's multiple_choice), computed in the
teacher-forced pass with the prompt shared by its choices; checked against a plain per-choice loop."""
import json
import random

import pytest
import yaml
from conftest import autollm
from transformers import AutoModelForCausalLM, AutoTokenizer

from autollm_lf.bench import per_choice_loglikelihoods
from autollm_lf.config import EvaluationConfig
from autollm_lf.errors import UserError
from autollm_lf.evaluate.choice import Choice

rng = random.Random(0)
WORDS = ["ab", "ba", "abc", "cab", "bca", "aab", "bb", "ccab"]


def mc_rows(n=12):
    rows = []
    for i in range(n):
        w = rng.choice(WORDS) + str(i)
        choices = [w[::-1], w, w.upper(), w + w][: 2 + i % 3]  # 2 to 4 choices, of different lengths
        rows.append({"prompt": f"System says: reverse it please. {w}", "choices": choices,
                     "response": choices[i % len(choices)], "chunk": "mc", "source": "s", "row_id": str(i)})
    return rows


@pytest.mark.parametrize("batch_size", [3, 64])
def test_choice_equals_a_plain_per_choice_loop(tiny_model, batch_size):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    rows = mc_rows()
    for normalize in (False, True):
        ev = Choice(model, tok, "default", rows, EvaluationConfig(metric="choice", batch_size=batch_size,
                                                                  length_normalize=normalize))
        fast = ev.choice_loglikelihoods()
        slow = per_choice_loglikelihoods(model, ev, "default", rows)
        assert [len(x) for x in fast] == [len(r["choices"]) for r in rows]
        assert all(abs(f - s) < 1e-4 for fr, sr in zip(fast, slow) for f, s in zip(fr, sr))
        pick = lambda lls, row: max(range(len(lls)),
                                    key=lambda j: lls[j] / (len(row["choices"][j]) if normalize else 1))
        expected = [float(pick(s, r) == r["choices"].index(r["response"])) for s, r in zip(slow, rows)]
        assert ev.row_scores() == expected
    assert set(ev.last) == {"acc", "acc_norm"}


def test_choices_of_a_question_share_the_prompt_once(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    rows = mc_rows()
    ev = Choice(model, tok, "default", rows, EvaluationConfig(metric="choice", batch_size=64))
    positions = sum(b.input_ids.numel() for b in ev.batches) + ev.prefixes.numel()
    per_choice = sum(len(p) + len(a) for p, a in ev.encoded)
    assert any(b.prefix for b in ev.batches) and positions < per_choice  # the shared prompt ran once


def test_choice_rows_must_have_their_answer_among_the_choices(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    bad = [{"prompt": "q", "choices": ["a", "b"], "response": "c", "source": "s", "row_id": "7"}]
    with pytest.raises(UserError, match=r"row 0 \(s/7\) its answer 'c' is not one of its choices"):
        Choice(model, tok, "default", bad, EvaluationConfig(metric="choice"))


@pytest.mark.slow
def test_choice_metric_end_to_end(tiny_model, tmp_path):
    """A file source with a `choices` column, trained and searched with metric choice through the real CLI."""
    rows = [{"task": "mc" if i % 2 else "mc2", "prompt": r["prompt"], "response": r["response"],
             "choices": json.dumps(r["choices"])} for i, r in enumerate(mc_rows(40))]
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = {"name": "mc", "base_model": {"path": str(tiny_model), "template": "default"},
           "data": {"sources": [{"type": "file", "path": str(tmp_path / "mc.jsonl")}], "chunk_by": "task",
                    "validation_per_chunk": 5, "test_per_chunk": 5},
           "train": {"args": {"num_train_epochs": 1.0, "per_device_train_batch_size": 8}, "auto_mix": False,
                     "train_all": False},
           "search": {"init_points": 1, "n_iter": 1}, "evaluation": {"metric": "choice", "batch_size": 16}}
    (tmp_path / "mc.yaml").write_text(yaml.safe_dump(cfg))
    res = autollm("run", str(tmp_path / "mc.yaml"), cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    report = json.loads((tmp_path / "runs" / "mc" / "report" / "report.json").read_text())
    assert report["metric"] == "choice"
    assert all(0.0 <= r["test"] <= 1.0 and set(r["test_by_chunk"]) == {"mc", "mc2"} for r in report["rows"])
    validation = json.loads((tmp_path / "runs" / "mc" / "data" / "validation.json").read_text())
    assert all(isinstance(r["choices"], list) and r["output"] in r["choices"] for r in validation)
