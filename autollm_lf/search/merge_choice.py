"""search.merge: auto: the merge method chosen on the holdout rows, by a race between the candidates.

1. Each candidate (merge.AUTO_MERGES: `linear`, `regmean_w`, `regmean`) scores the search's baseline points (raw,
   uniform, each delta alone, human) on validation.
2. The RACE candidates whose best point is best on the holdout half (holdout.selection_key; ties keep the earlier)
   run the search, each into search/merge_auto/<method>/ (its own trials log, resumed like the run's), first with a
   third of the optimiser's budget (`first_round`).
3. The candidate whose returned trial is then best on the holdout half goes on to the whole budget (its log resumed:
   search.n_iter is not part of the search's fingerprint), and so does every other racer the first round cannot tell
   from it (their returned trials' paired difference on the holdout rows, report.interval, includes 0). Of those, the
   one best on the holdout half at the end (ties: the earlier) becomes search.merge for the rest of the run; its trials
   log and best.json become the run's, so the search stage finds them done.
A baseline alone does not tell which method the optimiser can take further (under `regmean` a weight of 0 cannot drop
a delta, under `regmean_w` it can), hence the race. A third of the budget told the same as the whole on the Gemma
example's deltas and on the toy; on the conflict example it could not tell the two apart (one holdout row between
them), and there both go on. Cost: the baseline points once per candidate, the Gram passes of the data-aware ones, a
third of a search more per other racer, and the whole search again per racer not told apart; the log and the report
say each. The choice is written to search/merge_auto.json with the search's fingerprint, so
a re-run or a later `autollm report` reads it.
"""
from __future__ import annotations

import math
import time

from ..evaluate.intervals import paired_difference, resample_index
from ..fileio import atomic_write_text, read_json, write_json
from ..log import get_logger
from ..merge import AUTO_MERGE, MERGE_METHODS, merge_candidates
from ..merge.grams import use_regmean
from .holdout import halves_of, selection_key, trial_scores
from .loop import baseline_points, run_search

logger = get_logger(__name__)

RACE = 2  # candidates whose optimiser runs: those with the best baseline points


def with_merge(cfg, method: str):
    """The config with search.merge set to `method` (what every stage after the choice reads)."""
    return cfg.model_copy(update={"search": cfg.search.model_copy(update={"merge": method})})


def logged_choice(cfg) -> str | None:
    """The method a finished `auto` choice picked for this run, if any (its fingerprint is checked by choose_merge)."""
    logged = read_json(cfg.run.merge_choice) if cfg.search.merge == AUTO_MERGE else None
    return logged and logged.get("chosen")


def choose_merge(s, force: bool = False) -> None:
    """Resolve search.merge: auto for session `s` (session.Session): read the logged choice when it is this search's,
    else race the candidates (module docstring)."""
    if s.requested_merge != AUTO_MERGE:
        return
    fp = s.search_fingerprint(merge=AUTO_MERGE)
    logged = read_json(s.cfg.run.merge_choice)
    if logged and logged.get("fingerprint") == fp and not force:
        s.use_merge(logged["chosen"])
        return
    started = time.perf_counter()
    halves = halves_of(s.cfg, s.validation_rows())
    candidates = [_baselines(s, method, halves) for method in merge_candidates(AUTO_MERGE)]
    racing = sorted(candidates, key=lambda c: selection_key(c)[:2], reverse=True)[:RACE]  # stable: ties keep order
    first, kept = first_round(s.cfg.search.n_iter), {}  # kept: each racer's optimiser, between its two rounds
    for c in candidates:
        if c in racing:
            c["search"] = _race(s, c["method"], first, force, kept)
    raced = [c for c in candidates if "search" in c]
    leader = max(raced, key=lambda c: selection_key(c["search"])[:2])  # ties: the first kept
    if first < s.cfg.search.n_iter:
        for c in raced:
            if c is not leader:
                c["apart"] = _told_apart(s, leader, c, halves)
        going_on = [c for c in raced if c is leader or not c["apart"]["excludes_zero"]]
        for c in going_on:
            c["whole"] = _race(s, c["method"], s.cfg.search.n_iter, False, kept)  # goes on from the first round
        leader = max(going_on, key=lambda c: selection_key(c["whole"])[:2])
    chosen = leader["method"]
    for path in (s.cfg.run.trials, s.cfg.run.best):  # the chosen search becomes the run's
        atomic_write_text(path, (s.cfg.run.candidate_search(chosen) / path.name).read_text(encoding="utf-8"))
    write_json(s.cfg.run.merge_choice, {"fingerprint": fp, "chosen": chosen, "candidates": candidates,
                                        "seconds": round(time.perf_counter() - started, 1), "select": halves.select})
    s.use_merge(chosen)
    logger.info(f"search: {choice_line(read_json(s.cfg.run.merge_choice))}")


def _baselines(s, method: str, halves) -> dict:
    """`method`'s baseline points scored: every one, and the best on the holdout rows."""
    _ensure_data(s, method)
    s.weighted.use_method(method, s.cfg.search.density)
    search = s.cfg.search
    points = baseline_points(s.search_params, search.bounds, s.search_human(), search.alone_baselines)
    scored = [{"trial": i, "kind": kind, **trial_scores(s, weights, halves)} for i, (kind, weights) in
              enumerate(points)]
    return {"method": method, **max(scored, key=selection_key), "points": scored}


def first_round(n_iter: int) -> int:
    """The optimiser trials every racer runs before the leader alone goes on: a third of search.n_iter (at least 1)."""
    return min(n_iter, max(1, math.ceil(n_iter / 3)))


def _race(s, method: str, n_iter: int, force: bool, kept: dict) -> dict:
    """The search with `method` up to `n_iter` optimiser trials, in its own folder; returns its best (run_search's).
    `kept`: run_search's optimisers, so the second round goes on from the first without refitting it."""
    s.use_merge(method)
    started = time.perf_counter()
    cfg = s.cfg.model_copy(update={"search": s.cfg.search.model_copy(update={"n_iter": n_iter})})
    best = run_search(cfg, s, s.search_params, s.search_fingerprint(), force=force, human=s.search_human(),
                      where=s.cfg.run.candidate_search(method), kept=kept)
    logger.info(f"search: merge auto: {method}'s search after {n_iter} of {s.cfg.search.n_iter} optimiser trials "
                f"returns trial {best['trial']} ({best['kind']}): holdout {best['holdout']:.4f} "
                f"({time.perf_counter() - started:.0f} s)")
    return {k: best[k] for k in ("trial", "kind", "validation", "fit", "holdout")} | {"n_iter": n_iter}


def _told_apart(s, leader: dict, other: dict, halves) -> dict:
    """leader - other on the holdout rows, paired: the per-row scores of the trials their first rounds returned, each
    merged with its own method (report.interval, a bootstrap within chunks); `excludes_zero`: told apart."""
    rows = []
    for c in (leader, other):
        best = read_json(s.cfg.run.candidate_search(c["method"]) / s.cfg.run.best.name)
        s.use_merge(c["method"])
        rows.append(s.scored_rows(best["weights"], "validation")[1])  # scored once per process: the race's pass
    chunks = s.row_chunks("validation")
    index = resample_index([chunks[i] for i in halves.holdout], s.cfg.report.bootstrap, s.cfg.seed)
    a, b = ([r[i] for i in halves.holdout] for r in rows)
    return {"of": leader["method"]} | paired_difference(a, b, index, s.cfg.report.interval)


def _ensure_data(s, method: str) -> None:
    space = MERGE_METHODS[method].data_aware
    if space and not s.weighted.has_regmean(space):
        use_regmean(s.cfg, s.weighted, {d: s.specs[d].chunk for d in s.deltas}, s.cfg.search.regmean_alpha, space)


def choice_line(logged: dict) -> str:
    """One line for the log and the report: what `auto` chose, on what, at what cost."""
    on = "holdout" if logged.get("select") == "holdout" else "validation"
    base = ", ".join(f"{c['method']} {c[on]:.4f} ({c['kind']})" for c in logged["candidates"])
    raced = [c for c in logged["candidates"] if "search" in c]
    rounds = f" after {raced[0]['search']['n_iter']} optimiser trials" if "n_iter" in raced[0]["search"] else ""
    went = [c for c in raced if "whole" in c]
    said = "".join(f"; {c['method']} {'' if c['apart']['excludes_zero'] else 'not '}told apart from "
                   f"{c['apart']['of']} ({c['apart']['of']} - {c['method']} {_difference(c['apart'])})"
                   for c in raced if "apart" in c)
    whole = "" if not went else (f"{said}, " if said else "; ") + (
        " and ".join(c["method"] for c in went) + f" went on to {went[0]['whole']['n_iter']}: "
        + ", ".join(f"{c['method']} {c['whole'][on]:.4f}" for c in went))
    return (f"merge auto -> {logged['chosen']}: the best baseline point of each candidate on the {on} rows: {base}; "
            f"the searches of the best {len(raced)} return{rounds} "
            + ", ".join(f"{c['method']} {c['search'][on]:.4f}" for c in raced)
            + f"{whole}; {logged['seconds']:.0f} s in all (Grams, baselines and every search)")


def _difference(apart: dict) -> str:
    low, high = apart["interval"]
    return f"{apart['difference']:+.4f} [{low:+.4f}, {high:+.4f}] on {apart['rows']} holdout rows"
