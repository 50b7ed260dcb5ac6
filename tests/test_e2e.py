"""The whole pipeline through the real CLI and the real `llamafactory-cli train`, on a tiny model."""
import json
import subprocess
import sys

import pytest
import yaml

from autollm_lf.toy import build_source_db


def autollm(*args, cwd):
    return subprocess.run([sys.executable, "-m", "autollm_lf", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=900)


def write_config(tmp_path, tiny_model, name="e2e", search=None, **train_args):
    db = tmp_path / "src.sqlite"
    if not db.exists():
        build_source_db(db, seed=1, rows_per_task=24)
    cfg = {
        "name": name, "seed": 0, "base_model": {"path": str(tiny_model), "template": "default"},
        "data": {"sources": [{"type": "sql", "url": f"sqlite:///{db}",
                              "query": "SELECT id, task, prompt, response FROM examples WHERE task IN ('math', 'code')"}],
                 "chunk_by": "task", "validation_per_chunk": 6, "test_per_chunk": 6},
        "train": {"args": {"num_train_epochs": 1.0, "per_device_train_batch_size": 4, "logging_steps": 1,
                           "learning_rate": 0.01, **train_args}},
        "search": {"init_points": 2, "n_iter": 3, "human_weights": {"math": 0.5}, **(search or {})},
        "evaluation": {"batch_size": 8},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def first_run(tiny_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    cfg = write_config(tmp, tiny_model)
    res = autollm("run", str(cfg), cwd=tmp)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return tmp, cfg, res


def test_run_writes_the_documented_layout(first_run):
    tmp, _, _ = first_run
    run = tmp / "runs" / "e2e"
    for rel in ["config.resolved.yaml", "data/dataset_info.json", "data/validation.json", "data/test.json",
                "configs/math-sft.yaml", "configs/code-sft.yaml", "configs/all.yaml",
                "deltas/math-sft/adapter_model.safetensors", "deltas/all/adapter_model.safetensors",
                "deltas/math-sft/trainer_log.jsonl", "deltas/math-sft/train.log",
                "search/trials.jsonl", "search/best.json", "report/report.md", "report/report.json",
                "report/convergence.png", "merged/adapter_model.safetensors", "merged/adapter_config.json"]:
        assert (run / rel).exists(), rel
    rendered = yaml.safe_load((run / "configs" / "math-sft.yaml").read_text())
    assert rendered["learning_rate"] == 0.01 and rendered["dataset"] == "math"
    assert yaml.safe_load((run / "configs" / "all.yaml").read_text())["dataset"] == "code,math"


def test_report_and_search_contents(first_run):
    tmp, _, _ = first_run
    run = tmp / "runs" / "e2e"
    report = json.loads((run / "report" / "report.json").read_text())
    models = [r["model"] for r in report["rows"]]
    assert models == ["raw", "train@all", "train@code-sft", "train@math-sft", "average_merge", "human_merge", "auto_merge"]
    assert all(0.0 <= r[k] <= 1.0 for r in report["rows"] for k in ("validation", "test"))
    trials = [json.loads(l) for l in (run / "search" / "trials.jsonl").read_text().splitlines()]
    assert len(trials) == 2 + 2 + 1 + 2 + 3  # raw, uniform, one-hot x2, human, random x2, bayes_opt x3
    best = json.loads((run / "search" / "best.json").read_text())
    assert best["validation"] == max(t["validation"] for t in trials)
    assert report["best"]["validation"] == best["validation"]
    auto = next(r for r in report["rows"] if r["model"] == "auto_merge")
    for r in report["rows"]:
        if r["model"] in ("raw", "train@code-sft", "train@math-sft", "average_merge", "human_merge"):
            assert auto["validation"] >= r["validation"]  # they were all seeds of the search
    export = json.loads((run / "merged" / "autollm_export.json").read_text())
    assert export["exported_validation"] == best["validation"]


def test_second_run_retrains_nothing_and_hand_edit_retrains_one(first_run):
    tmp, cfg, _ = first_run
    run = tmp / "runs" / "e2e"
    mtimes = {d: (run / "deltas" / d / "adapter_model.safetensors").stat().st_mtime_ns for d in ("math-sft", "code-sft", "all")}
    trials_before = (run / "search" / "trials.jsonl").read_text()
    outputs = ["data/validation.json", "data/math.json", "report/report.json", "merged/adapter_model.safetensors"]
    output_mtimes = {p: (run / p).stat().st_mtime_ns for p in outputs}
    again = autollm("run", str(cfg), cwd=tmp)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.count("up to date, not retrained") == 3
    assert "report: " in again.stdout and again.stdout.count(" up to date\n") >= 2  # report and export
    assert {p: (run / p).stat().st_mtime_ns for p in outputs} == output_mtimes  # nothing rewritten
    assert (run / "search" / "trials.jsonl").read_text() == trials_before
    assert {d: (run / "deltas" / d / "adapter_model.safetensors").stat().st_mtime_ns for d in mtimes} == mtimes

    math_yaml = run / "configs" / "math-sft.yaml"
    math_yaml.write_text(math_yaml.read_text().replace("lora_rank: 8", "lora_rank: 4"))
    third = autollm("run", str(cfg), cwd=tmp)
    assert third.returncode == 0, third.stderr[-2000:]
    assert "keeping hand-edited" in third.stdout and "lora_rank: 4" in math_yaml.read_text()
    assert json.loads((run / "deltas" / "math-sft" / "adapter_config.json").read_text())["r"] == 4
    assert (run / "deltas" / "math-sft" / "adapter_model.safetensors").stat().st_mtime_ns != mtimes["math-sft"]
    assert (run / "deltas" / "code-sft" / "adapter_model.safetensors").stat().st_mtime_ns == mtimes["code-sft"]


def test_failing_llamafactory_run_exits_2_with_log_tail(tiny_model, tmp_path):
    cfg = write_config(tmp_path, tiny_model, name="broken", not_a_llamafactory_key=1)
    res = autollm("train", str(cfg), cwd=tmp_path)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "has no prepared data" in res.stderr  # train before prepare: told what to run
    res = autollm("run", str(cfg), cwd=tmp_path)
    assert res.returncode == 2
    assert "training delta code-sft failed" in res.stderr and "not_a_llamafactory_key" in res.stderr
    assert "Traceback (most recent call last)" not in res.stderr.split("last lines:")[0]


def test_unknown_chunk_in_human_weights_stops_before_training(tiny_model, tmp_path):
    cfg_path = write_config(tmp_path, tiny_model, name="typo")
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["search"]["human_weights"] = {"maths": 1.0}
    cfg_path.write_text(yaml.safe_dump(cfg))
    res = autollm("run", str(cfg_path), cwd=tmp_path)
    assert res.returncode == 2
    assert "search.human_weights: unknown chunk 'maths'; the chunks are code, math" in res.stderr
    assert not (tmp_path / "runs" / "typo" / "deltas").exists()


def test_keep_going_searches_over_the_deltas_that_trained(tiny_model, tmp_path):
    cfg_path = write_config(tmp_path, tiny_model, name="partial")
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["train"]["chunk_args"] = {"code": {"not_a_llamafactory_key": 1}}
    cfg_path.write_text(yaml.safe_dump(cfg))
    res = autollm("run", str(cfg_path), "--keep-going", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "training delta code-sft failed" in res.stderr
    assert "left out (training failed): code-sft" in res.stderr
    run = tmp_path / "runs" / "partial"
    report = json.loads((run / "report" / "report.json").read_text())
    assert [r["model"] for r in report["rows"]] == ["raw", "train@all", "train@math-sft", "average_merge",
                                                     "human_merge", "auto_merge"]
    assert set(report["best"]["weights"]) == {"math-sft"}
    assert (run / "deltas" / "code-sft" / "train.log").exists()  # the failed run's log is kept for the user


def test_ties_merge_searches_reports_and_exports_with_its_error(first_run):
    """search.merge: ties on the same deltas: a new search (nothing retrained), the merge rows use ties, and the
    export is an SVD whose error is recorded and printed instead of refused."""
    tmp, cfg, _ = first_run
    run = tmp / "runs" / "e2e"
    raw = yaml.safe_load(cfg.read_text())
    raw["search"].update(merge="ties", density=0.6)
    ties_cfg = tmp / "e2e-ties.yaml"
    ties_cfg.write_text(yaml.safe_dump(raw))
    res = autollm("run", str(ties_cfg), cwd=tmp)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "search: merge ties (density 0.6)" in res.stdout and "relative error per module" in res.stdout
    report = json.loads((run / "report" / "report.json").read_text())
    assert report["merge"] == {"method": "ties", "density": 0.6}
    export = json.loads((run / "merged" / "autollm_export.json").read_text())
    assert export["merge"]["method"] == "ties" and 0 <= export["merge"]["relative_frobenius_error_max"] < 1
    assert "exported_validation" in export and "search_validation" in export
