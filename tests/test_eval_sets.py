"""Fixed evaluation sets (evaluation.validation / evaluation.test, any source type): chunks keep their rows,
training rows whose prompt is in a fixed set are removed and counted, validation and test never share a prompt,
and the AutoLLM layout (four delta files + eval files) runs end to end."""
import json
import shutil
from pathlib import Path

import pytest
from conftest import autollm

from autollm_lf.config import RunConfig
from autollm_lf.data.prepare import prepare
from autollm_lf.errors import UserError

LAYOUT = Path(__file__).resolve().parent.parent / "examples" / "autollm_layout"
DELTAS = ["delta_1", "delta_2", "delta_3", "delta_4"]


def layout_cfg(root: Path, **data) -> dict:
    shutil.copytree(LAYOUT, root / "layout", dirs_exist_ok=True)
    fixed = lambda name: [{"type": "file", "name": name, "path": str(root / "layout" / f"{name}.json"),
                           "columns": {"prompt": "instruction", "response": "output"}}]
    return {"name": "layout", "run_dir": str(root / "runs"), "base_model": {"path": str(root)},
            "data": {"sources": [{"type": "llamafactory", "dataset_dir": str(root / "layout"), "datasets": DELTAS}],
                     "chunk_by": "task", **data},
            "evaluation": {"validation": fixed("eval_data"), "test": fixed("test_data")}}


def read(run: Path, name: str):
    return json.loads((run / "data" / name).read_text())


def test_fixed_sets_keep_every_chunk_row_and_name_their_chunks(tmp_path):
    cfg = RunConfig.model_validate(layout_cfg(tmp_path))
    prepare(cfg)
    run = tmp_path / "runs" / "layout"
    assert all(len(read(run, f"{d}.json")) == 60 for d in DELTAS)  # nothing held out of the chunks
    val, test = read(run, "validation.json"), read(run, "test.json")
    assert len(val) == len(test) == 40
    assert {r["chunk"] for r in val} == set(DELTAS) and all(r["source"] == "eval_data" for r in val)
    assert {r["instruction"] for r in val} == {r["instruction"] for r in
                                               json.loads((tmp_path / "layout" / "eval_data.json").read_text())}
    summary = read(run, "_summary.json")
    assert summary["validation_from"] == "40 rows of evaluation.validation (eval_data)"
    assert summary["test_from"] == "40 rows of evaluation.test (test_data)"


def test_training_rows_in_a_fixed_set_are_removed_and_counted(tmp_path):
    raw = layout_cfg(tmp_path, validation_per_chunk=5)
    leaked = json.loads((tmp_path / "layout" / "delta_2.json").read_text())[:3]
    evals = json.loads((tmp_path / "layout" / "eval_data.json").read_text())
    (tmp_path / "layout" / "eval_data.json").write_text(json.dumps(
        evals + [{"instruction": r["instruction"], "output": r["output"], "task": "delta_2"} for r in leaked]))
    cfg = RunConfig.model_validate(raw)
    prepare(cfg)
    run = tmp_path / "runs" / "layout"
    summary = read(run, "_summary.json")
    assert summary["removed_in_fixed_eval"] == 3
    assert summary["validation_from"] == "43 rows of evaluation.validation (eval_data) + 5 rows held out per chunk"
    train2 = {r["instruction"] for r in read(run, "delta_2.json")}
    assert not train2 & {r["instruction"] for r in leaked}
    assert len(read(run, "validation.json")) == 43 + 4 * 5 and len(read(run, "test.json")) == 40


def test_validation_and_test_never_share_a_prompt(tmp_path):
    raw = layout_cfg(tmp_path)
    shutil.copy(tmp_path / "layout" / "eval_data.json", tmp_path / "layout" / "test_data.json")
    with pytest.raises(UserError, match="40 prompts are in both the validation and the test set"):
        prepare(RunConfig.model_validate(raw))


def test_no_held_out_rows_anywhere_is_refused():
    with pytest.raises(ValueError, match="data.validation_per_chunk: 0 leaves no validation rows"):
        RunConfig.model_validate({"name": "x", "base_model": {"path": "."}, "data": {
            "sources": [{"type": "sql", "url": "sqlite:///x", "query": "SELECT 1"}], "validation_per_chunk": 0}})


@pytest.mark.slow
def test_autollm_layout_runs_end_to_end(tmp_path, tiny_model, monkeypatch):
    """Tune on eval_data, report on test_data, through the real CLI and real trainings: the rows each split is scored
    on are the fixed sets' own, and every test_data answer rewritten changes no trial and no validation score (the
    search run again, every trial scored afresh) but every model's test score. The metric is graded (loss): the tiny
    models' exact_match is 0 on nearly every row, which would make both checks hold whatever rows were scored."""
    import yaml

    from autollm_lf.checks import load_config
    from autollm_lf.data.prepare import load_split

    raw = layout_cfg(tmp_path)
    raw["evaluation"]["metric"] = "loss"
    raw.update(base_model={"path": str(tiny_model), "template": "default"}, run_dir="runs",
               train={"args": {"num_train_epochs": 1.0, "per_device_train_batch_size": 8, "learning_rate": 0.01},
                      "auto_mix": False},
               search={"init_points": 2, "n_iter": 2, "human_weights": {"delta_3": 1.0}})
    path = tmp_path / "layout.yaml"
    path.write_text(yaml.safe_dump(raw))
    res = autollm("run", str(path), cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    run = tmp_path / "runs" / "layout"
    report = (run / "report" / "report.md").read_text()
    assert ("Validation: 40 rows of evaluation.validation (eval_data). "
            "Test: 40 rows of evaluation.test (test_data).") in report
    rows = json.loads((run / "report" / "report.json").read_text())["rows"]
    assert {r["model"] for r in rows} >= {"raw", "train@all", "auto_merge", *(f"train@{d}-sft" for d in DELTAS)}
    assert all(set(r["test_by_chunk"]) == set(DELTAS) for r in rows)
    # the rows each split's evaluator scores (session.scorer reads them through load_split) are the fixed sets'
    monkeypatch.chdir(tmp_path)
    cfg = load_config(path)
    given = {name: sorted((r["instruction"], r["output"])
                          for r in json.loads((tmp_path / "layout" / f"{name}.json").read_text()))
             for name in ("eval_data", "test_data")}
    for split, name in (("validation", "eval_data"), ("test", "test_data")):
        assert sorted((r["prompt"], r["response"]) for r in load_split(cfg, split)) == given[name]
        assert all(r[f"{split}_rows"] == 40 for r in rows)

    trials = (run / "search" / "trials.jsonl").read_text().splitlines()
    scored = lambda lines: [{k: v for k, v in json.loads(l).items() if k not in ("eval_seconds", "seconds")}
                            for l in lines]
    test_data = json.loads((tmp_path / "layout" / "test_data.json").read_text())
    (tmp_path / "layout" / "test_data.json").write_text(json.dumps([{**r, "output": r["output"] + " and so on"}
                                                                    for r in test_data]))
    res = autollm("run", str(path), "--force", "search", cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert res.stdout.count("up to date, not retrained") == len(DELTAS) + 1  # the deltas and train@all
    assert "search: budget" in res.stdout  # searched again, every trial scored afresh
    assert scored((run / "search" / "trials.jsonl").read_text().splitlines()) == scored(trials)
    after = json.loads((run / "report" / "report.json").read_text())["rows"]
    assert [(r["model"], r["validation"]) for r in after] == [(r["model"], r["validation"]) for r in rows]
    assert all(a["test"] != b["test"] for a, b in zip(after, rows)), [(r["model"], r["test"]) for r in after]
