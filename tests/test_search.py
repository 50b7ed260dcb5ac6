"""The search loop with a known objective (no model): seeds first, every trial logged, restart-safe."""
import json
from types import SimpleNamespace

from autollm_lf.config import SearchConfig
from autollm_lf.search import plan_trials, run_search, seed_points

DELTAS = ["a", "b", "c"]
TARGET = {"a": 0.2, "b": 0.7, "c": 0.4}


class FakeSession:
    def __init__(self):
        self.calls = 0

    def score(self, weights, split):
        self.calls += 1
        return 1.0 - sum((weights[d] - TARGET[d]) ** 2 for d in DELTAS)


def make_cfg(tmp_path, n_iter=12):
    return SimpleNamespace(out=tmp_path, seed=3, search=SearchConfig(bounds=(0.0, 1.0), init_points=3, n_iter=n_iter,
                                                                     human_weights={"b": 1.5}))


def test_seed_points_cover_baselines_and_clip_to_bounds():
    pts = dict(seed_points(DELTAS, (0.0, 1.0), {"b": 1.5}))
    assert pts["raw"] == {"a": 0.0, "b": 0.0, "c": 0.0} and pts["uniform"] == {"a": 1.0, "b": 1.0, "c": 1.0}
    assert pts["only:b"] == {"a": 0.0, "b": 1.0, "c": 0.0}
    assert pts["human"] == {"a": 0.0, "b": 1.0, "c": 0.0}  # 1.5 clipped to the upper bound


def test_search_logs_every_trial_and_improves_on_seeds(tmp_path):
    cfg = make_cfg(tmp_path)
    session = FakeSession()
    best = run_search(cfg, session, DELTAS, fp="x")
    trials = [json.loads(l) for l in (tmp_path / "search" / "trials.jsonl").read_text().splitlines()]
    assert len(trials) == len(plan_trials(cfg, DELTAS)) == session.calls == 2 + 3 + 1 + 3 + 12
    assert [t["trial"] for t in trials] == list(range(len(trials)))
    assert best == json.loads((tmp_path / "search" / "best.json").read_text())
    assert best["validation"] == max(t["validation"] for t in trials)
    seeds_best = max(t["validation"] for t in trials if t["kind"] != "bayes_opt")
    assert best["validation"] > seeds_best  # the optimiser found something better than every seed
    assert all(0.0 <= w <= 1.0 for t in trials for w in t["weights"].values())


def test_restart_continues_to_the_same_trials(tmp_path):
    full_dir, cut_dir = tmp_path / "full", tmp_path / "cut"
    run_search(make_cfg(full_dir), FakeSession(), DELTAS, fp="x")
    full = (full_dir / "search" / "trials.jsonl").read_text().splitlines()
    # a run killed after 13 trials, with a torn half-written 14th line
    (cut_dir / "search").mkdir(parents=True)
    (cut_dir / "search" / "trials.jsonl").write_text("\n".join(full[:13]) + "\n" + full[13][:20])
    session = FakeSession()
    run_search(make_cfg(cut_dir), session, DELTAS, fp="x")
    resumed = (cut_dir / "search" / "trials.jsonl").read_text().splitlines()
    assert session.calls == len(full) - 13  # nothing re-evaluated
    strip = lambda lines: [{k: v for k, v in json.loads(l).items() if k != "eval_seconds"} for l in lines]
    assert strip(resumed) == strip(full)
    assert json.loads((cut_dir / "search" / "best.json").read_text()) == json.loads((full_dir / "search" / "best.json").read_text())


def test_finished_search_is_not_rerun_and_changed_search_starts_over(tmp_path):
    run_search(make_cfg(tmp_path), FakeSession(), DELTAS, fp="x")
    session = FakeSession()
    run_search(make_cfg(tmp_path), session, DELTAS, fp="x")
    assert session.calls == 0
    session = FakeSession()
    run_search(make_cfg(tmp_path, n_iter=2), session, DELTAS, fp="y")
    assert session.calls == 2 + 3 + 1 + 3 + 2


def test_a_failing_objective_logs_nothing_for_its_trial_and_a_rerun_continues(tmp_path):
    """A judge endpoint down mid-search raises UserError: that trial is not logged, the re-run continues."""
    import pytest

    from autollm_lf.errors import UserError

    class Flaky(FakeSession):
        def score(self, weights, split):
            if self.calls == 7:
                raise UserError("evaluation.judge: endpoint down")
            return super().score(weights, split)

    full_dir, cut_dir = tmp_path / "full", tmp_path / "cut"
    run_search(make_cfg(full_dir), FakeSession(), DELTAS, fp="x")
    with pytest.raises(UserError):
        run_search(make_cfg(cut_dir), Flaky(), DELTAS, fp="x")
    assert len((cut_dir / "search" / "trials.jsonl").read_text().splitlines()) == 7
    run_search(make_cfg(cut_dir), FakeSession(), DELTAS, fp="x")
    strip = lambda d: [{k: v for k, v in json.loads(l).items() if k != "eval_seconds"}
                       for l in (d / "search" / "trials.jsonl").read_text().splitlines()]
    assert strip(cut_dir) == strip(full_dir)
