"""evaluation.objective: a weighted sum of metrics on chunks' rows, with constraints against the raw model."""
import json

import pytest
import yaml
from conftest import autollm, write_config
from transformers import AutoModelForCausalLM, AutoTokenizer

from autollm_lf.checks import name_problems
from autollm_lf.config import RunConfig
from autollm_lf.errors import UserError
from autollm_lf.evaluate.objective import PENALTY, Objective

ROWS = [{"prompt": p, "response": p[::-1], "chunk": c, "source": "s", "row_id": str(i)}
        for i, (p, c) in enumerate([("ab", "x"), ("abc", "x"), ("ba", "y"), ("cab", "y"), ("bca", "y")])]


def cfg_with(objective):
    return RunConfig.model_validate({"name": "o", "base_model": {"path": "."},
                                     "data": {"sources": [{"type": "sql", "url": "sqlite:///x", "query": "SELECT 1"}]},
                                     "evaluation": {"metric": "exact_match", "objective": objective}})


def test_weighted_parts_and_constraint_penalty(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    cfg = cfg_with([{"chunks": ["x"], "weight": 1.0}, {"metric": "loss", "chunks": ["y"], "weight": 0.5},
                    {"chunks": ["y"], "weight": 0.0, "max_drop": 0.01}])
    objective = Objective(cfg, model, tok, ROWS, lambda o: {"exact_match@y": 1.0})
    parts = objective.part_scores()
    assert set(parts) == {"exact_match@x", "loss@y", "exact_match@y"}
    floor_gap = max(0.0, 1.0 - 0.01 - parts["exact_match@y"])
    expected = parts["exact_match@x"] + 0.5 * parts["loss@y"] - PENALTY * floor_gap
    assert objective.score() == pytest.approx(expected)
    assert floor_gap > 0  # the tiny model does not reverse every y row: the constraint bites
    assert len(objective.row_scores()) == len(ROWS)  # per-row scores: evaluation.metric on every row
    lenient = Objective(cfg, model, tok, ROWS, lambda o: {"exact_match@y": 0.0})
    assert lenient.score() == pytest.approx(parts["exact_match@x"] + 0.5 * parts["loss@y"])


def test_objective_names_unknown_chunks_and_metrics(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    with pytest.raises(UserError, match="evaluation.objective.0.chunks: no held-out rows of 'z'; the held-out rows' "
                                        "chunks are x, y"):
        Objective(cfg_with([{"chunks": ["z"]}]), model, tok, ROWS, lambda o: {})
    objective = [{"chunks": ["x"]}, {"metric": "bleu"}]
    problems = name_problems({"evaluation": {"metric": "exact_match", "objective": objective}})
    assert [p for p in problems if p.startswith("evaluation.objective.1.metric: unknown metric 'bleu'")]


@pytest.mark.slow
def test_objective_end_to_end(tiny_model, tmp_path):
    """The search maximises the objective; the report gives each part, and every row's number is the objective."""
    path = write_config(tmp_path, tiny_model, name="obj", baselines=False)
    raw = yaml.safe_load(path.read_text())
    raw["evaluation"]["objective"] = [{"chunks": ["math"], "weight": 1.0}, {"metric": "loss", "chunks": ["code"],
                                                                            "weight": 0.1},
                                      {"chunks": ["code"], "weight": 0.0, "max_drop": 0.05}]
    path.write_text(yaml.safe_dump(raw))
    res = autollm("run", str(path), cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    run = tmp_path / "runs" / "obj"
    report = json.loads((run / "report" / "report.json").read_text())
    raw_code = json.loads((run / "search" / "raw_constraints.validation.json").read_text())["exact_match@code"]
    for row in report["rows"]:
        p = row["parts"]["validation"]
        penalty = 10.0 * max(0.0, raw_code - 0.05 - p["exact_match@code"])
        assert row["validation"] == pytest.approx(p["exact_match@math"] + 0.1 * p["loss@code"] - penalty)
    best = json.loads((run / "search" / "best.json").read_text())
    auto = next(r for r in report["rows"] if r["model"] == "auto_merge")
    assert auto["validation"] == pytest.approx(best["validation"])
    assert "Objective parts, validation | test:" in (run / "report" / "report.md").read_text()
