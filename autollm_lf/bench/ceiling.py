"""What the best weights could reach on the per-chunk goal, measured from above by oracles tuned on TEST itself."""
from __future__ import annotations

import statistics
import time
from collections import Counter
from pathlib import Path

from ..config import SearchConfig
from ..evaluate.intervals import split_by_chunk
from ..merge import param_delta
from ..search.loop import point_key
from ..search.optimizers import optimizer_problems
from ..search.optimizers.gradient import GradientOptimizer
from ..search.scored import ScoredMerge
from ..session import Session
from ..train.deltas import ALL_DELTA
from .finished import finished_session, report_rows
from .searches import quiet_search

CEILING_SHARE = 0.95  # the merge-quality goal (issue 42): on every chunk, this share of what its own delta scores
# the search oracle's tie-break: among points equally far towards the per-chunk goal (every point that meets it
# scores 1), the better overall test score wins, so the oracle also bounds the overall goal (auto_merge vs train@all)
OVERALL_TIE_BREAK = 1e-3


def gradient_ceiling(session: Session, by_chunk, own: dict[str, float], trials: int,
                     start_scores: dict[str, float], rows: Counter) -> dict:
    """The gradient oracle of bench_ceiling: Adam on every test row's teacher-forced loss, from the run's best
    weights (whose per-chunk test scores are `start_scores`), each point scored by ceiling_value on test."""
    test = session.scorer("test")
    on_test = ScoredMerge(session.cfg, session.weighted, {"validation": test, "test": test})  # fits and scores test
    opt = GradientOptimizer(session.search_params, session.cfg.search.bounds, session.cfg.seed, on_test)
    opt.fit_rows = list(range(len(test.rows)))  # all of test: an oracle, not a search
    start = session.cfg.run.read_best()["weights"]
    opt.register(start, 0.0, own=False)  # the trajectory starts at the run's best point
    started, seen = time.perf_counter(), [start_scores]
    for number in range(1, trials + 1):
        seen.append(by_chunk(opt.suggest(number)))
    best = max(seen, key=lambda scores: ceiling_value(scores, own))  # the first of equals
    return {"granularity": f"{session.weighted.granularity}, gradient", "weights": len(start),
            "start_value": ceiling_value(seen[0], own), "seconds": time.perf_counter() - started,
            **oracle_summary(best, seen, own, rows)}


def own_scores(session: Session, by_chunk) -> tuple[dict[str, float], dict[str, str], list[str]]:
    """Each chunk's own score: the best of its deltas alone (a chunk may train several: sft, dpo, ...) on its test
    rows; chunks without test rows (train_only sources, bad cases) have none and are listed apart."""
    own, best, no_test = {}, {}, set()
    for d in session.deltas:
        chunk = session.specs[d].chunk
        if chunk is None:  # train@all, train@auto_mix
            continue
        scores = by_chunk({d: 1.0})
        if chunk not in scores:
            no_test.add(chunk)
        elif chunk not in own or scores[chunk] > own[chunk]:
            own[chunk], best[chunk] = scores[chunk], d
    return own, best, sorted(no_test - set(own))


def train_all_by_chunk(session: Session, alone) -> dict[str, float] | None:
    """train@all's per-chunk test scores: scored here where it is loaded beside the deltas, else (trained on the
    user's base, apart from a shared base) as the run's report scored it on the same test rows; None without it."""
    if ALL_DELTA in session.weighted.names:
        return alone({ALL_DELTA: 1.0})
    return report_rows(session.cfg).get(f"train@{ALL_DELTA}", {}).get("test_by_chunk")


def ceiling_value(by_chunk: dict[str, float], own: dict[str, float], share: float = CEILING_SHARE) -> float:
    """Mean over chunks of how far the merge gets towards `share` of the chunk's own delta (1 = there or beyond):
    the largest value, len(own) / len(own) = 1, means every chunk meets the goal at once."""
    return statistics.mean(min(1.0, by_chunk[c] / (share * own[c])) if own[c] > 0 else 1.0 for c in own)


def overall_score(by_chunk: dict[str, float], rows: Counter) -> float:
    """The test score over every row from the per-chunk means and each chunk's number of test `rows`."""
    return sum(by_chunk[c] * n for c, n in rows.items()) / sum(rows.values())


def oracle_summary(found: dict[str, float], seen: list[dict[str, float]], own: dict[str, float],
                   rows: Counter) -> dict:
    """An oracle's result: the per-chunk scores of the point it `found`, their goal value and overall test score, and
    the best each chunk (and the overall score) reached in any point it `seen`."""
    return {"trials": len(seen), "value": ceiling_value(found, own), "by_chunk": found,
            "overall": overall_score(found, rows),
            "best_per_chunk_any_trial": {c: max(s[c] for s in seen) for c in own},
            "best_overall_any_trial": max(overall_score(s, rows) for s in seen)}


def bench_ceiling(cfg_path: Path | None, trials: int = 40, gradient_trials: int = 6, seed: int = 0) -> dict:
    """What the best weights could reach on the per-chunk goal, measured from above, by two oracles that tune on the
    TEST split itself (which no real search may see), merged as the run merges (its method): the search loop
    (cmaes, `trials`, one weight per delta) maximising ceiling_value (every chunk towards 95% of its own delta's
    test score), and the gradient optimiser at the run's granularity fitted on all of test's reference answers,
    from the run's best weights (`gradient_trials` trials of its Adam steps; the best point by ceiling_value). If
    neither meets the goal on every chunk, a search tuned on validation is not likely to; train@all's ratios are
    shown beside them."""
    session = finished_session(cfg_path)
    if session is None:
        return {"skipped": f"run `autollm run {cfg_path}` first (needs its trained deltas)"}
    cfg = session.base_cfg  # search.merge: auto as the run resolved it
    w = session.weighted
    if w.mode == "scaling":
        return {"skipped": "search.apply: scaling cannot switch granularity; use auto, cat or fold"}
    method, run_granularity = w.method, w.granularity  # the run's (search.merge / granularity auto: as resolved)
    test_chunks = session.row_chunks("test")
    scored = lambda weights, how: split_by_chunk(session.scored_rows(weights, "test", how)[1], test_chunks)[1]
    by_chunk = lambda weights: scored(weights, method)  # merged as the run merges: the oracles tune that merge
    # a delta alone as trained (`linear`: under `regmean` a one-hot point still holds every delta's Gram)
    alone = lambda weights: scored(weights, "linear")
    own, best_delta, no_test = own_scores(session, alone)
    rows = Counter(test_chunks)
    if not own:
        return {"skipped": f"no chunk of {cfg_path} has test rows (train_only sources, bad cases): nothing to reach"}
    yardsticks = {"auto_merge": by_chunk(cfg.run.read_best()["weights"])}
    train_all = train_all_by_chunk(session, alone)
    if train_all:
        yardsticks["train@all"] = train_all
    w.use_granularity("delta")
    params = [p for p in w.params if param_delta(p) in session.deltas]
    search = SearchConfig(bounds=cfg.search.bounds, init_points=3, n_iter=max(trials - 5 - len(params), 0),
                          optimizer="cmaes", granularity="delta", merge=method)
    seen = {}  # point -> its per-chunk test scores (the search scores no point twice)

    def oracle(weights):
        seen[point_key(weights)] = scores = by_chunk(weights)
        return ceiling_value(scores, own) + OVERALL_TIE_BREAK * overall_score(scores, rows)

    best, seconds = quiet_search(ScoredMerge(cfg.model_copy(update={"search": search}), w, {}, objective=oracle),
                                 params, seed, fp="ceiling")
    results = [{"granularity": "delta", "weights": len(params), "seconds": seconds,
                **oracle_summary(seen[point_key(best["weights"])], list(seen.values()), own, rows)}]
    w.use_granularity(run_granularity)
    fits = gradient_trials and not optimizer_problems("gradient", method, cfg.evaluation.metric,
                                                      bool(cfg.evaluation.objective))
    if fits:  # what the gradient optimiser declares it can fit (its `needs`)
        results.append(gradient_ceiling(session, by_chunk, own, gradient_trials, yardsticks["auto_merge"], rows))
    return {"share": CEILING_SHARE, "merge": method, "granularity": run_granularity, "own_delta": own,
            "own_delta_name": best_delta, "no_test_rows": no_test, "rows_per_chunk": cfg.data.test_per_chunk,
            "test_rows": sum(rows.values()),
            "yardsticks": {k: {"by_chunk": v, "value": ceiling_value(v, own), "overall": overall_score(v, rows)}
                           for k, v in yardsticks.items()},
            "results": results}


def ceiling_lines(r: dict) -> list[str]:
    if "skipped" in r:
        return ["ceiling: " + r["skipped"]]
    chunks = list(r["own_delta"])
    width = lambda c: max(8, len(c) + 2)
    row = lambda name, scores, overall=None: f"  {name:<40}" + "".join(
        f"{scores[c]:>{width(c)}.2f}" for c in chunks) + ("" if overall is None else f"{overall:>12.3f}")
    lines = [f"ceiling (the run's merge, {r['merge']} at {r['granularity']}, with weights searched on TEST itself, "
             f"{r['test_rows']} rows, {r['rows_per_chunk']} per chunk; goal: every chunk "
             f">= {r['share']:.0%} of its own delta):",
             f"  {'':<40}" + "".join(f"{c:>{width(c)}}" for c in chunks) + f"{'all rows':>12}",
             row("own delta", r["own_delta"]),
             row(f"{r['share']:.0%} of it", {c: r["share"] * v for c, v in r["own_delta"].items()})]
    named = r.get("own_delta_name", {})
    lines += [f"  (own delta: the best of the chunk's deltas alone: {', '.join(named.values())})"] if named else []
    lines += [f"  (no test rows, not scored: {', '.join(r['no_test_rows'])})"] if r.get("no_test_rows") else []
    lines += [row(f"{k} ({y['value']:.3f})", y["by_chunk"], y["overall"]) for k, y in r["yardsticks"].items()]
    for x in r["results"]:
        lines.append(row(f"oracle {x['granularity']} ({x['value']:.3f})", x["by_chunk"], x["overall"]))
        lines.append(row("  best chunk by chunk (and all rows)", x["best_per_chunk_any_trial"],
                         x["best_overall_any_trial"]))
        lines.append(f"    ({x['weights']} weights, {x['trials']} trials, {x['seconds']:.0f}s)")
    return lines
