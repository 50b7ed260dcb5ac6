"""search.merge: auto: the merge method chosen on the holdout rows, before the optimiser runs.

Each candidate (merge.AUTO_MERGES: `linear`, `regmean_w`) scores the search's baseline points (raw, uniform, each
delta alone, human) on the validation rows; the candidate whose best point is best on the holdout half (as the search
chooses its trial: holdout.selection_key; a tie keeps the earlier candidate) becomes search.merge for the rest of the
run. Cost: the baseline points once more per extra candidate, and the Gram pass of a data-aware one. The chosen
candidate's points are not scored again by the search (the session keeps each point's rows), unless search.apply: auto
then moves the weights to another apply mode. The choice is written to
search/merge_auto.json with the search's fingerprint, so a re-run or a later `autollm report` reads it.
"""
from __future__ import annotations

import time

from .grams import use_regmean
from .holdout import halves_of, selection_key, trial_scores
from .io import read_json, write_json
from .log import get_logger
from .merge import AUTO_MERGE, MERGE_METHODS, merge_candidates
from .search import baseline_points

logger = get_logger(__name__)


def with_merge(cfg, method: str):
    """The config with search.merge set to `method` (what every stage after the choice reads)."""
    return cfg.model_copy(update={"search": cfg.search.model_copy(update={"merge": method})})


def logged_choice(cfg) -> str | None:
    """The method a finished `auto` choice picked for this run, if any (its fingerprint is checked by choose_merge)."""
    logged = read_json(cfg.run.merge_choice) if cfg.search.merge == AUTO_MERGE else None
    return logged and logged.get("chosen")


def choose_merge(s, force: bool = False) -> None:
    """Resolve search.merge: auto for session `s` (session.Session): read the logged choice when it is this search's,
    else score every candidate's baseline points and keep the best on the holdout rows."""
    if s.requested_merge != AUTO_MERGE:
        return
    fp = s.search_fingerprint(merge=AUTO_MERGE)
    logged = read_json(s.cfg.run.merge_choice)
    if logged and logged.get("fingerprint") == fp and not force:
        s.use_merge(logged["chosen"])
        return
    started = time.perf_counter()
    halves = halves_of(s.cfg, s.validation_rows())
    search = s.cfg.search
    points = baseline_points(s.search_params, search.bounds, s.human_weights() if search.human_weights else {},
                             search.alone_baselines)
    candidates = []
    for method in merge_candidates(AUTO_MERGE):
        _ensure_data(s, method)
        s.weighted.use_method(method)
        scored = [{"trial": i, "kind": kind, **trial_scores(s, weights, halves)} for i, (kind, weights) in
                  enumerate(points)]
        candidates.append({"method": method, **max(scored, key=selection_key), "points": scored})
    chosen = max(candidates, key=lambda c: selection_key(c)[:2])["method"]  # the first of equals: a tie keeps linear
    seconds = round(time.perf_counter() - started, 1)
    write_json(s.cfg.run.merge_choice, {"fingerprint": fp, "chosen": chosen, "candidates": candidates,
                                        "points": len(points), "seconds": seconds, "select": halves.select})
    s.use_merge(chosen)
    logger.info(f"search: {choice_line(read_json(s.cfg.run.merge_choice))}")


def _ensure_data(s, method: str) -> None:
    space = MERGE_METHODS[method].data_aware
    if space and not s.weighted.has_regmean(space):
        use_regmean(s.cfg, s.weighted, {d: s.specs[d].chunk for d in s.deltas}, s.cfg.search.regmean_alpha, space)


def choice_line(logged: dict) -> str:
    """One line for the log and the report: what `auto` chose, on what, at what cost."""
    on = "holdout" if logged.get("select") == "holdout" else "validation"
    best = ", ".join(f"{c['method']} {c[on]:.4f} ({c['kind']})" for c in logged["candidates"])
    return (f"merge auto -> {logged['chosen']}: each candidate's best baseline point on the {on} rows: {best}; "
            f"cost {logged['points']} baseline points per candidate, {logged['seconds']:.0f} s with the Grams")
