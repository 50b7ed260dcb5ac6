"""exact_match by teacher forcing must equal what greedy generation actually produces."""
import random

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from autollm_lf.config import EvaluationConfig
from autollm_lf.evaluate import METRICS, ExactMatch, encode_prompt_response


def half_trained(tiny_model, rows, tok):
    """A few optimiser steps on the rows, so greedy decoding gets some right (with EOS) and some wrong."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    pairs = [encode_prompt_response(tok, "default", r["prompt"], r["response"]) for r in rows]
    for step in range(120):
        p, a = pairs[step % len(pairs)]
        ids = torch.tensor([p + a])
        labels = torch.tensor([[-100] * len(p) + a])
        model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def test_teacher_forced_exact_match_equals_greedy_generation(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    rng = random.Random(0)
    words = ["".join(rng.choice("abcd") for _ in range(rng.randint(2, 5))) for _ in range(40)]
    rows = [{"prompt": w, "response": w[:2]} for w in words]
    model = half_trained(tiny_model, rows[:30], tok)
    flags = ExactMatch(model, tok, "default", rows, EvaluationConfig(batch_size=7)).correct()
    for row, flag in zip(rows, flags):
        ids, target = encode_prompt_response(tok, "default", row["prompt"], row["response"])
        gen = model.generate(torch.tensor([ids]), max_new_tokens=len(target) + 2, do_sample=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()
        assert flag == (gen[: len(target)] == target), row
    assert 0 < sum(flags) < len(flags), flags


def greedy_answers(model, tok, rows):
    out = []
    for r in rows:
        ids, _ = encode_prompt_response(tok, "default", r["prompt"], "")
        gen = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)[0, len(ids):]
        out.append(tok.decode(gen, skip_special_tokens=True).strip())
    return out


def test_generated_metrics_agree_with_one_by_one_generation(tiny_model):
    """Batched, left-padded generate gives the same answers as generating row by row."""
    tok = AutoTokenizer.from_pretrained(tiny_model)
    rows = [{"prompt": p, "response": p[:2]} for p in ["ab", "abcd", "bca", "dddd", "cab", "a"]]
    model = half_trained(tiny_model, rows, tok)
    cfg = EvaluationConfig(metric="contains", batch_size=4, max_new_tokens=8)
    evaluator = METRICS["contains"](model, tok, "default", rows, cfg)
    single = greedy_answers(model, tok, rows)
    assert evaluator.predictions() == single
    assert evaluator.row_scores() == [float(r["response"] in s) for r, s in zip(rows, single)]
    regex = METRICS["regex"](model, tok, "default", rows, EvaluationConfig(metric="regex", pattern=r"^(\w{2})", max_new_tokens=8))
    assert regex.row_scores() == [float(s[:2] == r["response"] and len(s) >= 2 and s[:2].isalnum()) for r, s in zip(rows, single)]


def test_numeric_and_python_and_loss(tiny_model, tmp_path, monkeypatch):
    from autollm_lf.evaluate import Numeric

    cfg = EvaluationConfig(metric="numeric", tolerance=0.01)
    assert Numeric.compare(type("N", (), {"cfg": cfg})(), "the answer is 1,234.005", "1234", {})
    assert not Numeric.compare(type("N", (), {"cfg": cfg})(), "about 12", "13", {})
    tok = AutoTokenizer.from_pretrained(tiny_model)
    rows = [{"prompt": "ab", "response": "a"}, {"prompt": "cd", "response": "cdcd"}]
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    (tmp_path / "my_metric.py").write_text("def score(preds, refs, rows):\n    return [len(p) + len(r) for p, r in zip(preds, refs)]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    py = METRICS["python"](model, tok, "default", rows, EvaluationConfig(metric="python", function="my_metric:score", max_new_tokens=3))
    preds = py.predictions()
    assert py.row_scores() == [float(len(p) + len(r["response"])) for p, r in zip(preds, rows)]
    loss = METRICS["loss"](model, tok, "default", rows, EvaluationConfig(metric="loss"))
    ids, target = encode_prompt_response(tok, "default", "cd", "cdcd")
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([ids + target]), labels=torch.tensor([[-100] * len(ids) + target])).loss
    assert abs(loss.row_scores()[1] + ref.item()) < 1e-5
