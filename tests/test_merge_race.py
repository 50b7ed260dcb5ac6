"""search.merge: auto's race, its rounds without a model: the baseline points, the searches and the paired
difference are stubbed with fixed holdout scores, so each rule of merge_choice is seen alone (the real race on a
trained run: tests/test_combinations.py::test_auto_merge_races_...)."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from autollm_lf.config import SearchConfig
from autollm_lf.paths import RunDir
from autollm_lf.search import merge_choice


class RaceSession:
    """What choose_merge asks of a session; `use_merge` is recorded."""

    def __init__(self, out, n_iter):
        self.cfg = SimpleNamespace(run=RunDir(out), seed=0, search=SearchConfig(n_iter=n_iter, merge="auto"),
                                   evaluation=SimpleNamespace(objective=[]))
        self.requested_merge, self.used = "auto", []

    def search_fingerprint(self, merge=None):
        return "fp"

    def validation_rows(self):
        return 40

    def use_merge(self, method):
        self.used.append(method)


def race(tmp_path, monkeypatch, n_iter, first: dict, whole: dict, apart: dict):
    """choose_merge with each method's baseline, first-round and whole-budget holdout scores given; returns
    merge_auto.json and the searches run as (method, n_iter)."""
    s, runs = RaceSession(tmp_path / "run", n_iter), []
    base = {"linear": 0.1, "regmean_w": 0.5, "regmean": 0.5}

    def baselines(s, method, halves):
        return {"method": method, "trial": 1, "kind": "uniform", "validation": base[method], "fit": base[method],
                "holdout": base[method], "points": []}

    def run(s, method, n, force, kept):
        runs.append((method, n))
        folder = s.cfg.run.candidate_search(method)
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("trials.jsonl", "best.json"):
            (folder / name).write_text(f"{method} {n}\n")
        score = (whole if n > 1 else first)[method]  # the first round is 1 trial in every case here
        return {"trial": 2, "kind": "gradient", "validation": score, "fit": score, "holdout": score, "n_iter": n}

    def told_apart(s, leader, other, halves):
        return {"of": leader["method"], "difference": 0.01, "interval": [-0.02, 0.04] if not apart[other["method"]]
                else [0.01, 0.04], "excludes_zero": apart[other["method"]], "rows": 20}

    monkeypatch.setattr(merge_choice, "_baselines", baselines)
    monkeypatch.setattr(merge_choice, "_race", run)
    monkeypatch.setattr(merge_choice, "_told_apart", told_apart)
    merge_choice.choose_merge(s)
    assert s.used[-1] == json.loads(s.cfg.run.merge_choice.read_text())["chosen"]
    assert s.cfg.run.trials.read_text() == s.cfg.run.candidate_search(s.used[-1]).joinpath("trials.jsonl").read_text()
    return json.loads(s.cfg.run.merge_choice.read_text()), runs


def test_a_leader_told_apart_goes_on_alone(tmp_path, monkeypatch):
    logged, runs = race(tmp_path, monkeypatch, 3, first={"regmean_w": 0.55, "regmean": 0.60},
                        whole={"regmean_w": 0.70, "regmean": 0.62}, apart={"regmean_w": True})
    assert runs == [("regmean_w", 1), ("regmean", 1), ("regmean", 3)]
    assert logged["chosen"] == "regmean"  # the runner-up, told apart, never ran its whole budget
    line = merge_choice.choice_line(logged)
    assert "regmean_w told apart from regmean (regmean - regmean_w +0.0100 [+0.0100, +0.0400]" in line, line
    assert "regmean went on to 3: regmean 0.6200" in line


def test_racers_not_told_apart_both_go_on_and_the_end_decides(tmp_path, monkeypatch):
    logged, runs = race(tmp_path, monkeypatch, 3, first={"regmean_w": 0.62, "regmean": 0.627},
                        whole={"regmean_w": 0.70, "regmean": 0.63}, apart={"regmean_w": False})
    assert runs == [("regmean_w", 1), ("regmean", 1), ("regmean_w", 3), ("regmean", 3)]
    assert logged["chosen"] == "regmean_w"  # behind after the first round, ahead at the end
    line = merge_choice.choice_line(logged)
    assert "not told apart from regmean" in line and "regmean_w and regmean went on to 3" in line, line


@pytest.mark.parametrize("n_iter", [1, 2])
def test_a_budget_of_one_round_is_decided_by_it(tmp_path, monkeypatch, n_iter):
    """n_iter 1: the first round is the whole budget, nothing goes on; n_iter 2: the round is 1 trial, then 2."""
    logged, runs = race(tmp_path, monkeypatch, n_iter, first={"regmean_w": 0.62, "regmean": 0.60},
                        whole={"regmean_w": 0.50, "regmean": 0.70}, apart={"regmean": False})
    assert runs[:2] == [("regmean_w", 1), ("regmean", 1)]
    assert logged["chosen"] == ("regmean_w" if n_iter == 1 else "regmean")
    assert len(runs) == (2 if n_iter == 1 else 4)
