"""`autollm bench` runs and reports every figure (tiny shapes here; the real figures come from a full run)."""
import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_bench_quick_json(tmp_path):
    res = subprocess.run([sys.executable, "-m", "autollm_lf", "bench", "--quick", "--json",
                          "--toy", str(tmp_path / "no-toy.yaml"), "--model-run", str(tmp_path / "no-run.yaml")],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "trial overhead: in place" in res.stdout
    assert f"model: run `autollm run {tmp_path / 'no-run.yaml'}` first" in res.stdout
    result = json.loads(res.stdout.strip().splitlines()[-1])
    merge = result["merge"]
    assert merge["overhead_seconds_reload"] > merge["overhead_seconds_ours"] > 0
    assert merge["max_logit_diff_in_place_vs_reload"] < 1e-4  # the reloaded merge is the same model
    memory = merge["search_memory"]
    assert memory["fold"]["mode"] == "fold" and memory["auto"]["mode"] in ("cat", "fold")
    assert all(m["peak_mb"] > m["runtime_mb"] > 0 for m in memory.values())
    for n in ("4_deltas", "16_deltas"):
        assert set(merge["trial_vs_plain"][n]) == {"cat", "fold", "linear", "ties", "dare_ties", "dare_linear"}
        assert set(merge["merge_fraction"][n]) == set(merge["trial_vs_plain"][n])
    assert "skipped" in result["exact_match_speedup"] and "skipped" in result["bo_vs_random"]


@pytest.mark.slow
def test_bench_only_one_part(tmp_path):
    """`--only exact_match` runs that part alone (here: skipped, no toy run), no 0.5B merge part."""
    res = subprocess.run([sys.executable, "-m", "autollm_lf", "bench", "--only", "exact_match", "--json",
                          "--toy", str(tmp_path / "no-toy.yaml")], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads(res.stdout.strip().splitlines()[-1])
    assert "skipped" in result["exact_match_speedup"]
    assert "merge" not in result and "bo_vs_random" not in result
    assert "trial overhead" not in res.stdout and "exact match: run `sh autollm.sh` first" in res.stdout


def test_bench_rounds_must_be_positive():
    res = subprocess.run([sys.executable, "-m", "autollm_lf", "bench", "--rounds", "0"], capture_output=True, text=True)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        "error: bench --rounds: 0 is not a positive number of rounds; give 1 or more"]


@pytest.mark.parametrize("args, message", [
    (["--seeds", "0"], "error: bench --seeds: 0 is not a valid count; give a whole number of 1 or more"),
    (["--larger-budget", "-1"],
     "error: bench --larger-budget: -1 is not a valid count; give a whole number (0 for none)"),
    (["--merge", "tsv", "--optimizer", "gradient"],
     "error: bench --merge tsv --optimizer gradient: no pair to search (gradient cannot fit search.merge 'tsv' (its "
     "merge is not differentiable in the weights); use it with linear, linear_norm, regmean, regmean_core, "
     "regmean_w, or pick bayes or cmaes); add --optimizer cmaes"),
])
def test_bench_quality_narrowing_is_checked_first(args, message, tmp_path):
    """A narrowed quality part that cannot run says so in one line, before any model is loaded."""
    res = subprocess.run([sys.executable, "-m", "autollm_lf", "bench", "--only", "quality", "--model-run",
                          str(tmp_path / "none.yaml"), *args], capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr.strip().splitlines() == [message]


@pytest.mark.slow
def test_bench_scale_part_trains_on_a_local_ray_cluster(tmp_path, tiny_model):
    """`--only scale`: the deltas of a prepared run as Ray tasks on one 1-CPU node, then on two."""
    from conftest import write_config

    cfg = write_config(tmp_path, tiny_model, name="sc")
    prep = subprocess.run([sys.executable, "-m", "autollm_lf", "prepare", str(cfg)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert prep.returncode == 0, prep.stderr[-2000:]
    res = subprocess.run([sys.executable, "-m", "autollm_lf", "bench", "--only", "scale", "--quick", "--json",
                          "--toy", str(cfg)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    scale = json.loads(res.stdout.strip().splitlines()[-1])["scale"]
    assert scale["deltas"] == 2 and scale["nodes"] == 2
    assert set(scale["one_delta_seconds"]) == {"math-sft", "code-sft"}
    assert all(s > 0 for s in scale["one_delta_seconds"].values())
    # two trainings side by side on two 1-CPU nodes take less wall time than one after the other
    assert scale["parallel_wall_seconds"] < scale["serial_wall_seconds"]
    assert scale["efficiency"] == pytest.approx(scale["serial_wall_seconds"] / 2 / scale["parallel_wall_seconds"])
    assert "scale: 2 deltas as Ray tasks" in res.stdout
    assert not (tmp_path / "runs" / "sc" / "deltas").exists()  # the bench trains in a temporary folder


def test_ceiling_value_is_one_only_when_every_chunk_reaches_its_share():
    from autollm_lf.bench import ceiling_value
    own = {"code": 0.5, "math": 0.25, "pref": 0.0}
    assert ceiling_value({"code": 0.475, "math": 0.2375, "pref": 0.0}, own) == pytest.approx(1.0)  # 95% exactly
    assert ceiling_value({"code": 0.47, "math": 0.2375, "pref": 0.0}, own) < 1.0
    assert ceiling_value({"code": 0.9, "math": 0.9, "pref": 0.0}, own) == pytest.approx(1.0)  # beyond counts as 1
    # code halfway to its 0.4 (80%), math none of the way, a chunk whose own delta scores 0 is met by anything
    assert ceiling_value({"code": 0.2, "math": 0.0, "pref": 0.0}, own, share=0.8) == pytest.approx((0.5 + 0 + 1) / 3)
    assert ceiling_value({"code": 0.2, "math": 0.2, "pref": 0.0}, own, share=1.0) == pytest.approx((0.4 + 0.8 + 1) / 3)


def test_overall_score_weights_each_chunk_by_its_rows():
    from collections import Counter

    from autollm_lf.bench.ceiling import overall_score
    assert overall_score({"a": 1.0, "b": 0.0}, Counter({"a": 3, "b": 1})) == pytest.approx(0.75)
    assert overall_score({"a": 0.5, "b": 0.5}, Counter({"a": 1, "b": 9})) == pytest.approx(0.5)


def test_ceiling_tunes_the_runs_merge_and_takes_each_delta_alone_as_trained(tmp_path, monkeypatch):
    """On a `regmean` run the oracles and the auto_merge yardstick are merged with `regmean` (the merge the goal is
    about), each chunk's own delta alone with `linear` (under regmean a one-hot point still holds every Gram), and
    train@all, trained on the user's base apart from the shared base, comes from the run's report (same test rows)."""
    from types import SimpleNamespace

    from autollm_lf.bench import ceiling
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"rows": [{"model": "train@all", "test_by_chunk": {"a": 0.5, "b": 0.25}}]}))
    scored = []  # (weights, method) of every scoring pass

    def scored_rows(weights, split, method=None):
        scored.append((dict(weights), method))
        hits = {"a": weights.get("a-sft", 0.0), "b": weights.get("b-sft", 0.0)}
        return 0.0, [hits["a"]] * 2 + [hits["b"]] * 2

    weighted = SimpleNamespace(method="regmean", granularity="module_kind", mode="cat", names=["a-sft", "b-sft"],
                               params=["a-sft", "b-sft"], use_granularity=lambda g: setattr(weighted, "granularity", g))
    cfg = SimpleNamespace(search=SimpleNamespace(bounds=[0.0, 1.0], merge="regmean"), data=SimpleNamespace(
        test_per_chunk=2), run=SimpleNamespace(read_best=lambda: {"weights": {"a-sft": 0.5, "b-sft": 1.0}},
                                               report_json=report), model_copy=lambda update: cfg)
    session = SimpleNamespace(base_cfg=cfg, cfg=cfg, weighted=weighted, deltas=["a-sft", "b-sft"],
                              specs={"a-sft": SimpleNamespace(chunk="a"), "b-sft": SimpleNamespace(chunk="b")},
                              scored_rows=scored_rows, row_chunks=lambda split: ["a", "a", "b", "b"])
    searched = {}

    def quiet_search(merge, params, seed, fp):
        searched["merge"] = merge["cfg"].search.merge
        value = merge["objective"]({"a-sft": 1.0, "b-sft": 1.0})
        return {"validation": value, "weights": {"a-sft": 1.0, "b-sft": 1.0}}, 0.1

    monkeypatch.setattr(ceiling, "finished_session", lambda path: session)
    monkeypatch.setattr(ceiling, "ScoredMerge", lambda cfg, w, scorers, objective: {"cfg": cfg, "objective": objective})
    monkeypatch.setattr(ceiling, "quiet_search", quiet_search)
    r = ceiling.bench_ceiling(tmp_path / "run.yaml", trials=8, gradient_trials=0)
    alone = [(w, m) for w, m in scored if len(w) == 1]
    assert alone and all(m == "linear" for _, m in alone)  # each delta alone, as trained
    assert ({"a-sft": 0.5, "b-sft": 1.0}, "regmean") in scored  # auto_merge as the run merged it
    assert searched["merge"] == "regmean" and ({"a-sft": 1.0, "b-sft": 1.0}, "regmean") in scored
    assert r["yardsticks"]["train@all"]["by_chunk"] == {"a": 0.5, "b": 0.25}
    # the overall test score, row-weighted: train@all (.5 x 2 + .25 x 2) / 4, auto_merge (.5 x 2 + 1 x 2) / 4
    assert r["yardsticks"]["train@all"]["overall"] == pytest.approx(0.375)
    assert r["yardsticks"]["auto_merge"]["overall"] == pytest.approx(0.75) and r["test_rows"] == 4
    assert r["results"][0]["overall"] == pytest.approx(1.0) == r["results"][0]["best_overall_any_trial"]
    assert r["merge"] == "regmean" and r["granularity"] == "module_kind" and weighted.granularity == "module_kind"
    assert "the run's merge, regmean at module_kind" in "\n".join(ceiling.ceiling_lines(r))
