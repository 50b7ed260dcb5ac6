"""Every combination of optimiser x merge method x metric x objective on/off either runs to the end or is refused by
`validate` (issue 41): what an optimiser cannot work with is declared once on it (`needs`), and a combination that
passes `validate` must not fail later.

The declarations are read for the whole product, and the CLI's `validate` asked about a pairwise-covering set of it
(every pair of values of two dimensions at least once). The search (the stage where combinations meet) then runs for
real on a tiny trained run, in-process as the CLI runs it, over a set of accepted combinations that holds every pair
of values of any two of the four dimensions at least once (pairwise covering, built greedily). The metrics run are
those a local run can score without a server or a benchmark index: `judge` (an LLM server) and `lm_eval` (a task
index) have their own end-to-end tests, `choice` needs rows that carry choices."""
from __future__ import annotations

import itertools
import json

import pytest
import yaml
from conftest import autollm, write_config

from autollm_lf.checks import combination_problems
from autollm_lf.cli import main
from autollm_lf.evaluate.metrics import METRICS
from autollm_lf.granularity import auto_granularity
from autollm_lf.merge import MERGE_METHODS
from autollm_lf.search.optimizers import OPTIMIZERS

OPTIMIZERS_ = ["auto", *OPTIMIZERS]
MERGES = list(MERGE_METHODS)
RUN_METRICS = ["exact_match", "loss", "contains", "regex", "numeric", "python"]
OBJECTIVE = [{"chunks": ["math"], "weight": 1.0}, {"chunks": ["code"], "weight": 0.0, "max_drop": 0.5}]
METRIC_KEYS = {"regex": {"pattern": "(.*)"}, "python": {"function": "scorer:score"},
               "judge": {"judge": {"base_url": "http://127.0.0.1:9/v1", "model": "m"}},
               "lm_eval": {"lm_eval": {"validation": ["lm_task.yaml"], "test": ["lm_task.yaml"]}}}  # a local task


def overrides(optimizer: str, merge: str, metric: str, objective: bool) -> dict:
    evaluation = {"metric": metric, **METRIC_KEYS.get(metric, {}), **({"objective": OBJECTIVE} if objective else {})}
    return {"search": {"optimizer": optimizer, "merge": merge, "init_points": 1, "n_iter": 2, "alone_baselines": False,
                       "apply": "auto"},
            "evaluation": evaluation}


def write_case(base: dict, tmp_path, combo) -> str:
    raw = json.loads(json.dumps(base))
    for section, values in overrides(*combo).items():
        raw.setdefault(section, {}).update(values)
    path = tmp_path / "combo.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def refused(base: dict, tmp_path, combo, capsys) -> str | None:
    """validate's one-line refusal, or None when it accepts the combination."""
    capsys.readouterr()
    code = main(["validate", write_case(base, tmp_path, combo)])
    err = capsys.readouterr().err
    if code == 0:
        return None
    assert code == 2 and err.startswith("error: ") and "Traceback" not in err, (combo, err)
    return err


def pairwise(accepted: list[tuple]) -> list[tuple]:
    """A subset of `accepted` holding every pair of values (of any two dimensions) that some accepted combination
    holds: greedy, the combination covering most uncovered pairs first."""
    pairs = lambda c: {(i, c[i], j, c[j]) for i, j in itertools.combinations(range(len(c)), 2)}
    uncovered = set().union(*map(pairs, accepted))
    chosen = []
    while uncovered:
        best = max(accepted, key=lambda c: len(pairs(c) & uncovered))
        chosen.append(best)
        uncovered -= pairs(best)
    return chosen


@pytest.fixture(scope="module")
def trained(tiny_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("combos")
    path = write_config(tmp, tiny_model, name="combo", baselines=False)
    (tmp / "lm_task.yaml").write_text(yaml.safe_dump({"task": "autollm_combo", "dataset_path": "json",
                                                      "output_type": "generate_until", "test_split": "test"}))
    (tmp / "scorer.py").write_text("def score(predictions, references, rows):\n"
                                   "    return [float(p.strip() == r.strip())\n"
                                   "            for p, r in zip(predictions, references)]\n")
    for stage in ("prepare", "train"):
        res = autollm(stage, str(path), cwd=tmp)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return tmp, yaml.safe_load(path.read_text())


@pytest.mark.slow
def test_every_combination_runs_to_the_end_or_is_refused_at_validate(trained, capsys, monkeypatch):
    tmp, base = trained
    monkeypatch.chdir(tmp)
    monkeypatch.syspath_prepend(str(tmp))  # the python metric's scorer module
    product = list(itertools.product(OPTIMIZERS_, MERGES, [*METRICS], [False, True]))
    declared = {c: combination_problems(*(lambda o: (o["search"], o["evaluation"]))(overrides(*c))) for c in product}
    # what is refused is what the optimisers declare, and only that: gradient with a merge it cannot differentiate,
    # a metric without reference answers, or an objective; nothing else in the product
    gradient = lambda c: c[0] == "gradient" and (not MERGE_METHODS[c[1]].differentiable or c[2] == "lm_eval" or c[3])
    assert {c for c, p in declared.items() if p} == {c for c in product if gradient(c)}
    # the CLI's validate on a set holding every pair of values: it refuses (one line, exit 2) exactly those
    verdicts = {c: refused(base, tmp, c, capsys) for c in pairwise(product)}
    assert {c for c, e in verdicts.items() if e} == {c for c in verdicts if gradient(c)}
    assert all("search.optimizer: gradient" in e for e in verdicts.values() if e)
    runnable = [c for c in product if not declared[c] and c[2] in RUN_METRICS]
    failures = []
    for combo in pairwise(runnable):
        capsys.readouterr()
        code = main(["search", write_case(base, tmp, combo)])
        out = capsys.readouterr()
        best = json.loads((tmp / "runs" / "combo" / "search" / "best.json").read_text())
        if code != 0 or "Traceback" in out.err or not best.get("weights"):
            failures.append((combo, code, out.err[-500:]))
    assert not failures, failures


def test_auto_granularity_takes_the_finest_with_no_more_weights_than_fit_rows():
    counts = {"module": 40, "module_kind": 4, "delta": 2}
    assert auto_granularity(counts.__getitem__, 40) == "module"
    assert auto_granularity(counts.__getitem__, 39) == "module_kind"
    assert auto_granularity(counts.__getitem__, 1) == "delta"  # the coarsest when even it has more


@pytest.mark.slow
def test_auto_granularity_resolves_on_the_run_and_its_report_says_so(trained, capsys, monkeypatch):
    tmp, base = trained
    monkeypatch.chdir(tmp)
    combo = ("cmaes", "linear", "exact_match", False)
    path = tmp / write_case(base, tmp, combo)
    cfg = yaml.safe_load(path.read_text())
    cfg["search"]["granularity"] = "auto"
    path.write_text(yaml.safe_dump(cfg))
    capsys.readouterr()
    assert main(["search", str(path)]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if "granularity auto ->" in x)
    chosen = line.split("-> ")[1].split()[0]
    counts = dict(part.rsplit(" ", 1) for part in line.split("fit rows; ")[1].rstrip(")").split(", "))
    fit_rows = int(line.split(" weights for ")[1].split()[0])
    assert chosen == auto_granularity(lambda g: int(counts[g]), fit_rows)
    assert int(counts["module"]) > int(counts["delta"])  # the candidates really differ on this run
    best = json.loads((tmp / "runs" / "combo" / "search" / "best.json").read_text())
    assert all(("@" in name) == (chosen != "delta") for name in best["weights"])


@pytest.mark.slow
def test_auto_merge_races_the_candidates_and_keeps_the_best_on_the_holdout_rows(trained, capsys, monkeypatch):
    """search.merge: auto scores the baseline points under linear, regmean_w and regmean, runs a third of the search
    for the two whose best point is best on the holdout rows, and keeps the one whose returned trial is best there (a
    tie: the earlier) goes on to the whole budget, with the other if the first round cannot tell them apart (paired on
    the holdout rows); the best of those at the end is chosen and its trials become the run's; a second run reads the
    choice instead of racing again."""
    from autollm_lf.checks import load_config
    from autollm_lf.merge import AUTO_MERGES
    from autollm_lf.report.markdown import merge_line
    from autollm_lf.search.holdout import selection_key
    from autollm_lf.session import Session
    tmp, base = trained
    monkeypatch.chdir(tmp)
    path = tmp / write_case(base, tmp, ("gradient", "auto", "loss", False))
    capsys.readouterr()
    assert main(["validate", str(path)]) == 0
    assert main(["search", str(path), "--force", "search"]) == 0
    search_dir = tmp / "runs" / "combo" / "search"
    logged = json.loads((search_dir / "merge_auto.json").read_text())
    candidates = logged["candidates"]
    assert [c["method"] for c in candidates] == list(AUTO_MERGES)
    key = lambda c: selection_key(c)[:2]
    raced = [c for c in candidates if "search" in c]
    assert len(raced) == 2 and all(key(c) >= key(o) for c in raced for o in candidates if o not in raced)
    first = max(raced, key=lambda c: key(c["search"]))
    other = next(c for c in raced if c is not first)
    went = [c for c in raced if "whole" in c]
    assert other["apart"]["of"] == first["method"] and "apart" not in first
    assert went == ([first] if other["apart"]["excludes_zero"] else raced)
    assert logged["chosen"] == max(went, key=lambda c: key(c["whole"]))["method"]
    uniform = {c["method"]: next(p for p in c["points"] if p["kind"] == "uniform")["validation"] for c in candidates}
    assert len(set(uniform.values())) == 3  # the three methods were really applied
    chosen_dir = search_dir / "merge_auto" / logged["chosen"]
    assert (search_dir / "trials.jsonl").read_text() == (chosen_dir / "trials.jsonl").read_text()
    leader = next(c for c in raced if c["method"] == logged["chosen"])
    assert [c["search"]["n_iter"] for c in raced] == [1, 1] and leader["whole"]["n_iter"] == 2  # n_iter 2: 1, then 2
    assert json.loads((search_dir / "best.json").read_text())["holdout"] == pytest.approx(leader["whole"]["holdout"])
    assert leader["whole"]["holdout"] >= leader["search"]["holdout"]  # it went on from its first round
    for c in raced:  # each raced search's own baseline trials are that method's scores
        trials = [json.loads(line) for line in (search_dir / "merge_auto" / c["method"] / "trials.jsonl")
                  .read_text().splitlines()]
        assert sum(t["kind"] == "gradient" for t in trials) == (2 if c in went else 1)
        points = {p["kind"]: p for p in c["points"]}
        assert all(t["holdout"] == pytest.approx(points[t["kind"]]["holdout"], abs=1e-9) for t in trials
                   if t["kind"] in points)
    assert "merge auto -> " + logged["chosen"] in capsys.readouterr().out
    session = Session(load_config(path))
    assert session.cfg.search.merge == logged["chosen"]  # a later process (report, export) reads the choice
    assert f"merge auto -> {logged['chosen']}" in merge_line(session.cfg)
    assert main(["search", str(path)]) == 0
    assert json.loads((search_dir / "merge_auto.json").read_text()) == logged  # not raced again
    out = capsys.readouterr().out
    assert "merge auto -> " not in out and "(new best)" not in out  # nothing scored again
