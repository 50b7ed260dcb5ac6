"""`metric: lm_eval`: lm-evaluation-harness tasks (local YAML + local JSON data, offline) scored on the model in
memory must equal what the `lm_eval` command reports for the same model saved and loaded from disk."""
import json
import subprocess
import sys

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from autollm_lf.config import EvaluationConfig
from autollm_lf.evaluate.lmeval import LmEval

pytestmark = pytest.mark.slow  # lm-eval runs the tasks; the command-line check loads the model again


def write_tasks(root):
    words = ["ab", "ba", "abc", "cab", "bca", "aab", "bb", "ccab", "bac", "acb"]
    mc = [{"question": f"Reverse {w}:", "choices": [w[::-1], w, w + w], "answer": i % 3} for i, w in enumerate(words)]
    gen = [{"question": f"Repeat {w}:", "answer": w} for w in words]
    (root / "mc.json").write_text(json.dumps(mc))
    (root / "gen.json").write_text(json.dumps(gen))
    common = {"dataset_path": "json", "test_split": "test", "doc_to_text": "{{question}}"}
    tasks = {
        "autollm_mc": {**common, "dataset_kwargs": {"data_files": {"test": str(root / "mc.json")}},
                       "output_type": "multiple_choice", "doc_to_choice": "{{choices}}", "doc_to_target": "{{answer}}",
                       "metric_list": [{"metric": "acc"}]},
        "autollm_gen": {**common, "dataset_kwargs": {"data_files": {"test": str(root / "gen.json")}},
                        "output_type": "generate_until", "doc_to_target": " {{answer}}",
                        "generation_kwargs": {"until": ["\n"], "max_gen_toks": 6, "do_sample": False},
                        "metric_list": [{"metric": "exact_match"}]},
    }
    paths = []
    for name, task in tasks.items():
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump({"task": name, **task}))
        paths.append(str(path))
    return paths


def test_in_memory_score_equals_the_lm_eval_command(tiny_model, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    with torch.no_grad():  # a model that exists only in memory, as a search trial's merge does
        g = torch.Generator().manual_seed(0)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    tasks = write_tasks(tmp_path)
    cfg = EvaluationConfig(metric="lm_eval", batch_size=8, lm_eval={"validation": tasks, "test": tasks})
    ev = LmEval(model, tok, "default", [{"split": "test"}], cfg)
    score = ev.score()
    assert set(ev.task_scores) == {"autollm_mc", "autollm_gen"}
    assert score == pytest.approx(sum(ev.task_scores.values()) / 2)
    assert len(ev.row_scores()) == len(ev.rows) == 20 and {r["chunk"] for r in ev.rows} == set(ev.task_scores)

    saved = tmp_path / "saved"
    model.save_pretrained(saved)
    tok.save_pretrained(saved)
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
                          f"pretrained={saved},dtype=float32", "--tasks", "autollm_mc,autollm_gen", "--include_path",
                          str(tmp_path), "--batch_size", "8", "--output_path", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    results = json.loads(next(out.rglob("results_*.json")).read_text())["results"]
    assert ev.task_scores["autollm_mc"] == pytest.approx(results["autollm_mc"]["acc,none"])
    assert ev.task_scores["autollm_gen"] == pytest.approx(results["autollm_gen"]["exact_match,none"])


def test_lm_eval_metric_end_to_end(tiny_model, tmp_path):
    """The search tunes on lm-eval tasks through the PEFT-wrapped model in memory (real CLI, real trainings)."""
    from conftest import autollm, write_config

    tasks = write_tasks(tmp_path)
    path = write_config(tmp_path, tiny_model, name="lmeval", baselines=False)
    raw = yaml.safe_load(path.read_text())
    raw["evaluation"] = {"metric": "lm_eval", "batch_size": 8, "lm_eval": {"validation": tasks[:1], "test": tasks}}
    raw["search"].update(init_points=1, n_iter=1)
    path.write_text(yaml.safe_dump(raw))
    res = autollm("run", str(path), cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    report = json.loads((tmp_path / "runs" / "lmeval" / "report" / "report.json").read_text())
    assert all(set(r["test_by_chunk"]) == {"autollm_mc", "autollm_gen"} for r in report["rows"])
    raw_row = next(r for r in report["rows"] if r["model"] == "raw")
    assert raw_row["test"] == pytest.approx(sum(raw_row["test_by_chunk"].values()) / 2)
