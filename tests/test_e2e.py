"""The whole pipeline through the real CLI and the real `llamafactory-cli train`, on a tiny model."""
import json
import shutil

import pytest
import yaml
from conftest import autollm, write_config

from autollm_lf.bench import ceiling_value

pytestmark = pytest.mark.slow  # real llamafactory-cli runs


@pytest.fixture(scope="module")
def first_run(tiny_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    cfg = write_config(tmp, tiny_model)
    res = autollm("run", str(cfg), cwd=tmp)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return tmp, cfg, res


@pytest.fixture
def own_run(first_run, tmp_path):
    """A copy of the first run's folder for a test that changes it: no test depends on another's changes or
    on the order the tests run in, and the first run trains once."""
    tmp, cfg, _ = first_run
    shutil.copytree(tmp, tmp_path, dirs_exist_ok=True, symlinks=True)
    return tmp_path, tmp_path / cfg.name


@pytest.fixture(scope="module")
def loss_run(first_run, tmp_path_factory):
    """The first run's deltas scored with a graded metric, evaluation.metric: loss (teacher-forced): the tiny run's
    exact_match is 0 on every row of every model, so no score there tells one model from another. A copy with a new
    search, report and export (nothing retrained: a copied run's deltas are up to date)."""
    tmp, cfg, _ = first_run
    root = tmp_path_factory.mktemp("e2e-loss")
    shutil.copytree(tmp, root, dirs_exist_ok=True, symlinks=True)
    raw = yaml.safe_load(cfg.read_text())
    raw["evaluation"]["metric"] = "loss"
    raw["train"]["auto_mix"] = False  # its new best would train train@auto_mix again
    path = root / "e2e-loss.yaml"
    path.write_text(yaml.safe_dump(raw))
    res = autollm("run", str(path), cwd=root)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert res.stdout.count("up to date, not retrained") == 3 and "training delta" not in res.stdout
    return root, path, res


def test_run_writes_the_documented_layout(first_run):
    tmp, _, _ = first_run
    run = tmp / "runs" / "e2e"
    for rel in ["config.resolved.yaml", "data/dataset_info.json", "data/validation.json", "data/test.json",
                "configs/math-sft.yaml", "configs/code-sft.yaml", "configs/all.yaml",
                "deltas/math-sft/adapter_model.safetensors", "deltas/all/adapter_model.safetensors",
                "deltas/math-sft/trainer_log.jsonl", "deltas/math-sft/train.log",
                "search/trials.jsonl", "search/best.json", "report/report.md", "report/report.json",
                "report/convergence.png", "report/weights.png", "report/report.html", "deltas/auto_mix/train.log",
                "merged/adapter_model.safetensors", "merged/adapter_config.json", "export.yaml", "chat.yaml"]:
        assert (run / rel).exists(), rel
    rendered = yaml.safe_load((run / "configs" / "math-sft.yaml").read_text())
    assert rendered["learning_rate"] == 0.01 and rendered["dataset"] == "math"
    assert yaml.safe_load((run / "configs" / "all.yaml").read_text())["dataset"] == "code,math"


def test_report_and_search_contents(first_run):
    tmp, _, _ = first_run
    run = tmp / "runs" / "e2e"
    report = json.loads((run / "report" / "report.json").read_text())
    models = [r["model"] for r in report["rows"]]
    assert models == ["raw", "train@all", "train@code-sft", "train@math-sft", "average_merge", "human_merge",
                      "auto_merge", "train@auto_mix"]
    assert all(0.0 <= r[k] <= 1.0 for r in report["rows"] for k in ("validation", "test"))
    trials = [json.loads(l) for l in (run / "search" / "trials.jsonl").read_text().splitlines()]
    assert len(trials) == 2 + 2 + 1 + 2 + 3  # raw, uniform, one-hot x2, human, random x2, bayes_opt x3
    best = json.loads((run / "search" / "best.json").read_text())
    # the trial the search returns is the one with the best holdout score (then fit, then the earlier), as logged
    chosen = max(trials, key=lambda t: (t["holdout"], t["fit"], -t["trial"]))
    assert (best["trial"], best["weights"], best["validation"]) == (chosen["trial"], chosen["weights"],
                                                                    chosen["validation"])
    assert report["best"]["validation"] == best["validation"]
    auto = next(r for r in report["rows"] if r["model"] == "auto_merge")
    assert auto["weights"] == best["weights"]  # (every score here is 0: see test_report_rows_score_their_models)
    human = next(r for r in report["rows"] if r["model"] == "human_merge")
    assert human["weights"] == next(t for t in trials if t["kind"] == "human")["weights"] == {"code-sft": 0.0,
                                                                                            "math-sft": 0.5}
    export = json.loads((run / "merged" / "autollm_export.json").read_text())
    assert export["weights"] == best["weights"] and export["exported_validation"] == best["validation"]
    for r in report["rows"]:  # every score with its interval, on the rows it rests on
        for split in ("validation", "test"):
            low, high = r[f"{split}_ci"]
            assert low <= r[split] <= high and r[f"{split}_rows"] > 0
    paired = report["paired"]["test"]
    auto_all = [next(r for r in report["rows"] if r["model"] == m)["test"] for m in ("auto_merge", "train@all")]
    assert paired["overall"]["difference"] == pytest.approx(auto_all[0] - auto_all[1])
    assert set(paired["by_chunk"]) == {"code", "math"}
    md = (run / "report" / "report.md").read_text()
    assert "Paired difference auto_merge - train@all" in md and "95% interval" in md


def test_report_rows_score_their_models(loss_run, monkeypatch):
    """On a graded metric (loss_run): the rows that are points of the search score what the search logged for them,
    and raw, train@all and auto_merge, loaded here afresh as a user loads them (the base model, deltas/all, the
    exported adapter), score what the report says on both splits."""
    from autollm_lf.checks import load_config
    from autollm_lf.session import adapter_scorers

    tmp, loss_cfg, res = loss_run
    run = tmp / "runs" / "e2e"
    trials = [json.loads(l) for l in (run / "search" / "trials.jsonl").read_text().splitlines()]
    assert len({round(t["validation"], 6) for t in trials}) == len(trials)  # graded: no two points tie
    best = json.loads((run / "search" / "best.json").read_text())
    assert best == {**best, **{k: v for k, v in max(trials, key=lambda t: (t["holdout"], t["fit"], -t["trial"]))
                               .items() if k in ("trial", "weights", "validation", "fit", "holdout")}}
    row = {r["model"]: r for r in json.loads((run / "report" / "report.json").read_text())["rows"]}
    assert row["auto_merge"]["weights"] == best["weights"]
    logged = {t["kind"]: t for t in trials}
    for model, kind in (("raw", "raw"), ("train@code-sft", "only:code-sft"), ("train@math-sft", "only:math-sft"),
                        ("average_merge", "uniform"), ("human_merge", "human")):
        assert row[model]["validation"] == pytest.approx(logged[kind]["validation"], rel=1e-6), model
    assert row["auto_merge"]["validation"] == pytest.approx(best["validation"], rel=1e-6)
    monkeypatch.chdir(tmp)  # the config's relative paths, as `autollm run` read them
    loss = load_config(loss_cfg)
    for model, adapter in (("auto_merge", run / "merged"), ("train@all", run / "deltas" / "all"), ("raw", None)):
        for split, scorer in adapter_scorers(loss, adapter, ("validation", "test")).items():
            assert scorer.score() == pytest.approx(row[model][split], rel=1e-4), (model, split)
    export = json.loads((run / "merged" / "autollm_export.json").read_text())
    assert export["exported_validation"] == pytest.approx(row["auto_merge"]["validation"], rel=1e-4)
    # each row's test score is the mean over the test rows of its per-chunk means
    test_chunks = [r["chunk"] for r in json.loads((run / "data" / "test.json").read_text())]
    for r in row.values():
        assert set(r["test_by_chunk"]) == {"code", "math"}
        assert r["test"] == pytest.approx(sum(test_chunks.count(c) * v for c, v in r["test_by_chunk"].items())
                                          / len(test_chunks)), r["model"]


def test_second_run_retrains_nothing_and_hand_edit_retrains_one(own_run):
    """On a copy of the first run, elsewhere: its rendered configs name the first run's folder, but a delta's
    fingerprint reads the run folder's own path as a placeholder, so the copy is "the same" run."""
    tmp, cfg = own_run
    first = autollm("run", str(cfg), cwd=tmp)  # the copy's first run: no delta trained again
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert first.stdout.count("up to date, not retrained") == 4 and "training delta" not in first.stdout
    run = tmp / "runs" / "e2e"
    mtimes = {d: (run / "deltas" / d / "adapter_model.safetensors").stat().st_mtime_ns
              for d in ("math-sft", "code-sft", "all", "auto_mix")}
    trials_before = (run / "search" / "trials.jsonl").read_text()
    outputs = [run / p for p in ("data/validation.json", "data/math.json", "report/report.json", "report/report.html",
                                 "merged/adapter_model.safetensors", "export.yaml", "chat.yaml")]
    outputs += [tmp / "saves" / "Custom" / "lora" / "e2e-best" / "adapter_model.safetensors",
                 tmp / "llamaboard_cache" / "user_config.yaml"]
    output_mtimes = {p: p.stat().st_mtime_ns for p in outputs}
    again = autollm("run", str(cfg), cwd=tmp)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.count("up to date, not retrained") == 4  # three deltas and train@auto_mix
    assert "report: " in again.stdout and again.stdout.count(" up to date\n") >= 2  # report and export
    assert {p: p.stat().st_mtime_ns for p in outputs} == output_mtimes  # nothing rewritten
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


def test_second_round_starts_from_the_first_rounds_best_merge(own_run):
    """Round 2: base = round 1's best merge as full weights (llamafactory-cli export), round 1's bad cases
    as a DPO chunk (train-only: never in round 2's validation or test), report with the score across rounds."""
    tmp, cfg_path = own_run
    run = tmp / "runs" / "e2e"
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["rounds"] = {"rejected": True}
    cfg_path.write_text(yaml.safe_dump(cfg))
    bad = [json.loads(l) for l in (run / "report" / "bad_cases.jsonl").read_text().splitlines()]
    assert bad and all(b["source"] == "sql:0" and b["row_id"] and b["prediction"] != b["reference"] for b in bad)
    val1 = {r["instruction"] for r in json.loads((run / "data" / "validation.json").read_text())}
    assert {b["prompt"] for b in bad} <= val1  # bad cases come from validation only
    assert "## Bad cases (validation)" in (run / "report" / "report.md").read_text()

    res = autollm("run", str(cfg_path), "--round", "2", cwd=tmp)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    r2 = run / "round-2"
    assert (run / "merged_full" / "config.json").exists() and (run / "export.yaml").exists()
    resolved = yaml.safe_load((r2 / "config.resolved.yaml").read_text())
    assert resolved["base_model"]["path"] == str(run / "merged_full") and resolved["round"] == 2
    adapter_cfg = json.loads((r2 / "deltas" / "math-sft" / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == str(run / "merged_full")
    held2 = [r for s in ("validation", "test") for r in json.loads((r2 / "data" / f"{s}.json").read_text())]
    assert not {r["instruction"] for r in held2} & {b["prompt"] for b in bad}  # bad cases never held out
    test1, test2 = (json.loads((d / "data" / "test.json").read_text()) for d in (run, r2))
    assert [r["instruction"] for r in test2] == [r["instruction"] for r in test1]  # the same test rows
    manifest = json.loads((r2 / "data" / "_manifest.json").read_text())
    if any((b["prediction"] or "").strip() for b in bad):
        assert manifest["shapes"]["bad_cases"] == "preference"
        assert (r2 / "deltas" / "bad_cases-dpo" / "adapter_model.safetensors").exists()
        pref = json.loads((r2 / "data" / "bad_cases.json").read_text())
        assert all(p["source"] == "bad_cases:round-1" and p["rejected"] for p in pref)
    report = json.loads((r2 / "report" / "report.json").read_text())
    rounds = report["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    r1 = json.loads((run / "report" / "report.json").read_text())
    assert rounds[0]["auto_merge_test"] == r1["best"]["test"] and rounds[1]["auto_merge_test"] == report["best"]["test"]
    assert rounds[1]["test_rows_shared_with_round_1"] == rounds[1]["test_rows"] == 12
    assert "## Score across rounds" in (r2 / "report" / "report.md").read_text()


def test_round_without_the_previous_round_is_refused(tiny_model, tmp_path):
    cfg = write_config(tmp_path, tiny_model, name="lonely")
    res = autollm("run", str(cfg), "--round", "2", cwd=tmp_path)
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert "round 2 starts from round 1's best merge, but round 1 is not finished" in res.stderr
    assert f"run `autollm run {cfg}` first" in res.stderr
    assert not (tmp_path / "runs").exists()


def test_ties_merge_searches_reports_and_exports_with_its_error(own_run):
    """search.merge: ties on the same deltas: a new search (nothing retrained), the merge rows use ties, and the
    export is an SVD whose error is recorded and printed instead of refused."""
    tmp, cfg = own_run
    run = tmp / "runs" / "e2e"
    raw = yaml.safe_load(cfg.read_text())
    raw["search"].update(merge="ties", density=0.6)
    raw["train"]["auto_mix"] = False  # its new best would train train@auto_mix again: not what this test is about
    ties_cfg = tmp / "e2e-ties.yaml"
    ties_cfg.write_text(yaml.safe_dump(raw))
    res = autollm("run", str(ties_cfg), cwd=tmp)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert res.stdout.count("up to date, not retrained") == 3 and "training delta" not in res.stdout
    assert "search: merge ties (density 0.6)" in res.stdout and "relative error per module" in res.stdout
    report = json.loads((run / "report" / "report.json").read_text())
    assert report["merge"] == {"method": "ties", "density": 0.6}
    export = json.loads((run / "merged" / "autollm_export.json").read_text())
    assert export["merge"]["method"] == "ties" and 0 <= export["merge"]["relative_frobenius_error_max"] < 1
    assert "exported_validation" in export and "search_validation" in export
    # the auto_merge a user reads is the adapter they get (a truncated SVD); the merge the search scored is beside it
    rows = {r["model"]: r for r in report["rows"]}
    assert rows["auto_merge"]["validation"] == pytest.approx(export["exported_validation"], abs=1e-9)
    assert rows["auto_merge (in memory)"]["validation"] == pytest.approx(export["search_validation"], abs=1e-9)
    md = (run / "report" / "report.md").read_text()
    assert "auto_merge is the exported adapter (a truncated SVD" in md
    assert "search.apply auto" not in md  # apply: auto is no switch; an explicit scaling or cat would be said


def test_spectral_merge_searches_reports_and_exports_exactly(own_run):
    """search.merge: iso_cts on the same deltas with cmaes: a new search, the report says the merge, and the
    exported adapter, loaded by PEFT afresh, scores what the search scored in place (exact LoRA, no SVD error)."""
    tmp, cfg = own_run
    run = tmp / "runs" / "e2e"
    raw = yaml.safe_load(cfg.read_text())
    raw["search"].update(merge="iso_cts", optimizer="cmaes", n_iter=4)
    raw["train"]["auto_mix"] = False
    spectral_cfg = tmp / "e2e-iso_cts.yaml"
    spectral_cfg.write_text(yaml.safe_dump(raw))
    res = autollm("run", str(spectral_cfg), cwd=tmp)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = json.loads((run / "report" / "report.json").read_text())
    assert report["merge"]["method"] == "iso_cts"
    md = (run / "report" / "report.md").read_text()
    assert "use `iso_cts` (average_merge, every weight 1, is the method itself" in md
    export = json.loads((run / "merged" / "autollm_export.json").read_text())
    best = json.loads((run / "search" / "best.json").read_text())
    assert export["merge"]["method"] == "iso_cts" and "relative_frobenius_error_max" not in export["merge"]
    assert export["exported_validation"] == best["validation"]


def test_bench_model_part_on_a_finished_run(first_run):
    """`autollm bench --only model` on a finished run: equal scores with and without the fast path, `choice` equal
    to a per-choice loop, and a search process's memory (it reads the run, writes nothing into it)."""
    tmp, cfg, _ = first_run
    before = sorted(p for p in (tmp / "runs").rglob("*"))
    res = autollm("bench", "--only", "model", "--only", "ceiling", "--quick", "--model-run", str(cfg), "--json",
                  cwd=tmp)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    result = json.loads(res.stdout.strip().splitlines()[-1])
    model, ceiling = result["model"], result["ceiling"]
    assert model["scores_equal"] and model["rows"] > 0 and model["deltas"] >= 2
    assert model["choice"]["questions"] > 0 and model["choice"]["max_loglikelihood_diff"] < 1e-4
    assert model["memory"]["peak_mb"] > model["memory"]["runtime_mb"] > 0 and model["memory"]["mode"] == "cat"
    assert 0 < model["memory"]["trials_mb"] <= model["memory"]["model_mb"] and model["memory"]["tokenizer_mb"] > 0
    assert "choice:" in res.stdout and "search memory (apply auto" in res.stdout
    lean = model["memory_lean"]  # search.memory=lean, the same steps: a peak, and the times it reports
    assert lean["peak_mb"] > lean["runtime_mb"] > 0 and lean["trial_seconds"] > 0
    assert "search.memory: lean" in res.stdout
    # the ceiling: a search on test itself; every delta alone is one of its points, so each chunk reaches at least
    # its own delta's score in some trial, and the value it reports is that of the per-chunk scores it reports
    own, oracle = ceiling["own_delta"], ceiling["results"][0]
    assert oracle["trials"] >= len(own) + 2 and set(oracle["by_chunk"]) >= set(own)
    assert all(oracle["best_per_chunk_any_trial"][c] >= own[c] for c in own)
    assert oracle["value"] == pytest.approx(ceiling_value(oracle["by_chunk"], own))
    # its overall test score: row-weighted from the chunks it reports, and no trial's above the best any trial had
    assert min(oracle["by_chunk"].values()) <= oracle["overall"] <= oracle["best_overall_any_trial"]
    assert oracle["best_overall_any_trial"] <= max(oracle["best_per_chunk_any_trial"].values())
    fitted = ceiling["results"][1]  # the gradient oracle: from the run's best point, which it counts
    # its trajectory starts at the run's best weights: the start is auto_merge's value (not a maximum of itself)
    assert fitted["trials"] == 3
    assert fitted["start_value"] == pytest.approx(ceiling["yardsticks"]["auto_merge"]["value"])
    assert fitted["value"] == pytest.approx(ceiling_value(fitted["by_chunk"], own))
    assert "with weights searched on TEST itself" in res.stdout
    assert sorted(p for p in (tmp / "runs").rglob("*")) == before


def test_bench_quality_on_a_finished_run(loss_run):
    """`autollm bench --only quality`: every merge method x optimiser searched at one budget; each picked point
    scored on test with its interval and per chunk against the chunk's own delta (on a graded metric: loss_run)."""
    tmp, cfg, _ = loss_run
    res = autollm("bench", "--only", "quality", "--quick", "--model-run", str(cfg), "--json", cwd=tmp)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    quality = json.loads(res.stdout.strip().splitlines()[-1])["quality"]
    combos = {(r["merge"], r["optimizer"]) for r in quality["results"]}
    spectral = {("tsv", "cmaes"), ("iso_c", "cmaes"), ("iso_cts", "cmaes")}  # not row scales: no gradient
    assert combos == {(m, o) for m in ("linear", "regmean", "regmean_core", "regmean_w")
                      for o in ("gradient", "cmaes")} | spectral
    # the bench scores in a session of its own: a delta alone on its chunk is the report's train@<delta> row there,
    # and a linear search's start (the baseline point it would return without its optimiser) is that row on test
    rows = {r["model"]: r for r in json.loads((tmp / "runs" / "e2e" / "report" / "report.json").read_text())["rows"]}
    own = quality["own_delta"]
    assert own == pytest.approx({c: rows[f"train@{c}-sft"]["test_by_chunk"][c] for c in ("code", "math")}, abs=1e-9)
    row_of = {"raw": "raw", "uniform": "average_merge", "human": "human_merge",
              **{f"only:{c}-sft": f"train@{c}-sft" for c in own}}
    for r in quality["results"]:
        run = r["runs"][0]
        assert run["test_ci"][0] <= run["test"] <= run["test_ci"][1] and r["trials"] == 11
        assert set(run["of_own"]) == {c for c, v in own.items() if v > 0}
        assert run["gain"]["difference"] == pytest.approx(run["test"] - run["gain"]["start_test"])
        # paired with the report's train@all on the same test rows
        assert run["vs_train_all"]["difference"] == pytest.approx(run["test"] - rows["train@all"]["test"])
        if r["merge"] == "linear":
            assert run["gain"]["start_test"] == pytest.approx(rows[row_of[run["gain"]["start"]]]["test"], abs=1e-9)
    assert "quality (" in res.stdout and "regmean/gradient" in res.stdout and "- train@all " in res.stdout
    # narrowed: one pair, two seeds, and a larger budget of the run's own method and optimiser
    res = autollm("bench", "--only", "quality", "--quick", "--model-run", str(cfg), "--json", "--merge", "regmean",
                  "--optimizer", "gradient", "--seeds", "2", "--larger-budget", "13", cwd=tmp)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    results = json.loads(res.stdout.strip().splitlines()[-1])["quality"]["results"]
    own = yaml.safe_load((tmp / "runs" / "e2e" / "config.resolved.yaml").read_text())["search"]
    assert [(r["merge"], r["optimizer"], r["trials"], [run["seed"] for run in r["runs"]]) for r in results] == [
        ("regmean", "gradient", 11, [0, 1]), (own["merge"], own["optimizer"], 13, [0])]
