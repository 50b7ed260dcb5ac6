"""`autollm bench --only quality`: merge quality on a finished (real-model) run.

Every merge method x optimiser runs the real search loop on validation at the same trial budget, with several
seeds; the weights each picks are scored on test, with the bootstrap interval over test rows, and per chunk as a
fraction of that chunk's own delta's test score (on the chunks that delta learned: its score above the base's with
an interval that excludes 0); each pick's gain over its own start and its difference from the run's train@all,
paired on the same test rows. One larger budget shows what more trials buy. One loaded model: methods are switched
in place, the seeds' baseline points are scored once per method."""
from __future__ import annotations

import contextlib
import io
import statistics
import tempfile
import time
from pathlib import Path

from ..errors import UserError
from ..evaluate.intervals import mean_interval, paired_difference, resample_index, split_by_chunk
from ..merge import MERGE_METHODS
from ..merge.grams import use_regmean
from ..search.loop import baseline_points, run_search
from ..search.optimizers import optimizer_problems
from ..session import Session
from .finished import finished_session, report_row_scores, report_rows

QUALITY_METHODS = ("linear", "regmean", "regmean_core", "regmean_w", "tsv", "iso_c", "iso_cts")
QUALITY_OPTIMIZERS = ("gradient", "cmaes")


def quality_pairs(methods=QUALITY_METHODS, optimizers=QUALITY_OPTIMIZERS,
                  metric: str = "exact_match") -> list[tuple[str, str]]:
    """Every method x optimiser the quality bench searches, leaving out the pairs an optimiser declares it cannot
    work with (optimizers.optimizer_problems). Checked when the flags are read, so a narrowing with nothing to search
    fails before any bench part runs."""
    pairs, refused = [], []
    for m in methods:
        for o in optimizers:
            problems = optimizer_problems(o, m, metric, objective=False)
            (refused if problems else pairs).append(problems[0] if problems else (m, o))
    if not pairs:
        raise UserError(f"bench --merge {' '.join(methods)} --optimizer {' '.join(optimizers)}: no pair to "
                        f"search ({refused[0]}); add --optimizer cmaes")
    return pairs


class _MethodSession:
    """The run's Session seen with another search config (merge method, optimiser, budget): the same loaded model
    and scorers; the session scores each point once per method (the baselines are the same for every seed)."""

    def __init__(self, session: Session, search):
        self.cfg = session.cfg.model_copy(update={"search": search})
        self.weighted = session.weighted
        self.scorer = session.scorer
        self.score = session.score
        self.scored_rows = session.scored_rows
        self.validation_rows = session.validation_rows


def _search(session: Session, search, params: list[str], seed: int) -> tuple[dict, float]:
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        target = _MethodSession(session, search)
        with contextlib.redirect_stdout(io.StringIO()):
            best = run_search(target.cfg.model_copy(update={"run_dir": Path(tmp), "seed": seed}), target,
                              params, fp=f"quality-{search.merge}-{search.optimizer}-{seed}",
                              human=session.search_human())
        return best, time.perf_counter() - started


def _test_summary(session: Session, weights: dict, method: str, own: dict, index, level: float) -> dict:
    overall, scores = session.scored_rows(weights, "test", method)
    by_chunk = split_by_chunk(scores, session.row_chunks("test"))[1]
    return {"test": overall, "test_ci": mean_interval(scores, index, level), "test_by_chunk": by_chunk,
            "of_own": {c: by_chunk[c] / own[c] for c in own if own[c] > 0}, "scores": scores}


def _search_gain(session: Session, best: dict, method: str, test_scores: list[float], index, level: float) -> dict:
    """The search's own gain on test: its pick - its start (the baseline it would return without the optimiser),
    paired on the same rows; and the start's kind and test score."""
    start = best["start"]
    _, start_scores = session.scored_rows(start["weights"], "test", method)
    return {"start": start["kind"], "start_test": sum(start_scores) / max(len(start_scores), 1),
            **paired_difference(test_scores, start_scores, index, level)}


def bench_quality(cfg_path: Path | None, budget: int = 14, seeds: int = 3, big_budget: int = 0,
                  pairs: list[tuple[str, str]] | None = None) -> dict:
    pairs = pairs or quality_pairs()
    session = finished_session(cfg_path)
    if session is None:
        return {"skipped": f"run `autollm run {cfg_path}` first (needs its trained deltas)"}
    cfg = session.base_cfg  # search.merge: auto as the run resolved it
    w = session.weighted
    chunk_of = {d: session.specs[d].chunk for d in session.deltas}
    for method in dict.fromkeys(m for m, _ in pairs):
        space = MERGE_METHODS[method].data_aware
        if space and not w.has_regmean(space):
            use_regmean(cfg, w, chunk_of, cfg.search.regmean_alpha, space)
    level, n_boot = cfg.report.interval, cfg.report.bootstrap
    chunks = session.row_chunks("test")
    index = resample_index(chunks, n_boot, cfg.seed)
    base_overall, base_scores = session.scored_rows({d: 0.0 for d in session.deltas}, "test", "linear")
    own, learned = {}, {}
    for d, c in chunk_of.items():
        _, scores = session.scored_rows({d: 1.0}, "test", "linear")
        cols = [i for i, k in enumerate(chunks) if k == c]
        if not cols:
            continue  # a training-only chunk: nothing to score it on
        own[c] = sum(scores[i] for i in cols) / len(cols)
        learned[c] = paired_difference([scores[i] for i in cols], [base_scores[i] for i in cols],
                                       resample_index([c] * len(cols), n_boot, cfg.seed), level)
    learned_chunks = [c for c, d in learned.items() if d["excludes_zero"] and d["difference"] > 0]
    train_all = report_row_scores(cfg, "train@all")  # paired with each search's pick on the same rows
    yardsticks = {m: {k: r.get(k) for k in ("test", "test_ci", "test_by_chunk")}
                  for m, r in report_rows(cfg).items() if m in ("raw", "train@all", "shared_base")}
    n_baselines = len(baseline_points(session.search_params, cfg.search.bounds, cfg.search.human_weights,
                                      cfg.search.alone_baselines))

    def measured(method: str, optimizer: str, trials: int, searches: int) -> dict:
        """`searches` searches of `trials` trials each (the baseline points, then the optimiser), scored on test,
        one per RNG seed (the gradient's minibatches and the fit/holdout split: not another start point)."""
        w.use_method(method, cfg.search.density)
        search = cfg.search.model_copy(update={"merge": method, "optimizer": optimizer, "init_points": 0,
                                               "n_iter": max(trials - n_baselines, 0), "patience": None})
        runs = []
        for seed in range(searches):
            best, seconds = _search(session, search, session.search_params, seed)
            summary = _test_summary(session, best["weights"], method, own, index, level)
            runs.append({"seed": seed, "validation": best["validation"], "seconds": seconds, **summary,
                         "gain": _search_gain(session, best, method, summary["scores"], index, level),
                         "vs_train_all": train_all and paired_difference(summary["scores"], train_all, index, level)})
        return _combine(method, optimizer, trials, runs, learned_chunks)

    results = [measured(method, optimizer, budget, seeds) for method, optimizer in pairs]
    if big_budget:
        results.append(measured(cfg.search.merge, cfg.search.optimizer, big_budget, 1))
    w.use_method(cfg.search.merge, cfg.search.density)
    for r in results:
        for run in r["runs"]:
            run.pop("scores")
    return {"run": str(cfg.run.root), "test_rows": len(chunks), "interval": level, "baseline_points": n_baselines,
            "own_delta": own, "learned": learned_chunks, "base_test": base_overall, "yardsticks": yardsticks,
            "results": results}


def _combine(method: str, optimizer: str, budget: int, runs: list[dict], learned: list[str]) -> dict:
    mean = lambda key: statistics.mean(r[key] for r in runs)
    worst_of_own = [min((r["of_own"][c] for c in learned if c in r["of_own"]), default=float("nan")) for r in runs]
    return {"merge": method, "optimizer": optimizer, "trials": budget, "runs": runs,
            "validation_mean": mean("validation"), "test_mean": mean("test"), "seconds_mean": mean("seconds"),
            "worst_learned_chunk_of_own_mean": statistics.mean(worst_of_own)}


def quality_lines(r: dict) -> list[str]:
    if "skipped" in r:
        return ["quality: " + r["skipped"]]
    lines = [f"quality ({r['run']}, {r['test_rows']} test rows, {r['interval']:.0%} intervals; chunks the deltas "
             f"learned: {', '.join(r['learned'])}):"]
    for name, y in r["yardsticks"].items():
        ci = y.get("test_ci") or [float("nan")] * 2
        lines.append(f"  {name:<28} test {y['test']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]")
    for x in r["results"]:
        runs = "; ".join(f"seed {run['seed']}: {run['test']:.3f} [{run['test_ci'][0]:.3f}, {run['test_ci'][1]:.3f}], "
                         f"gain over its start ({run['gain']['start']} {run['gain']['start_test']:.3f}) "
                         f"{_paired(run['gain'])}" + (f", - train@all {_paired(run['vs_train_all'])}"
                                                      if run.get("vs_train_all") else "") for run in x["runs"])
        lines.append(f"  {x['merge']}/{x['optimizer']} ({x['trials']} trials)".ljust(30)
                     + f"validation {x['validation_mean']:.3f}  test {x['test_mean']:.3f}  worst learned chunk "
                       f"{x['worst_learned_chunk_of_own_mean']:.0%} of its delta  ({runs}; {x['seconds_mean']:.0f}s)")
    return lines


def _paired(d: dict) -> str:
    return f"{d['difference']:+.3f} [{d['interval'][0]:+.3f}, {d['interval'][1]:+.3f}]"
