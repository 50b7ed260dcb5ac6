"""Stage 3: the search over merge weights on validation, one evaluation pass per trial.

The trials: the baselines (seeds), `init_points` random points, then `n_iter` points from the optimiser
(OPTIMIZERS, `search.optimizer`). A weight is named `<delta>`, or `<delta>@<group>` at a finer
`search.granularity` (merge.GRANULARITIES). Every trial is appended to search/trials.jsonl as it finishes; a
restarted search replays them into the optimiser and continues to the same total. Every random draw is seeded
from (seed, trial number), so a resumed search proposes the same points an uninterrupted one would.
No point is evaluated twice: a repeated suggestion is replaced by a seeded random point and counted.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from ..fileio import append_jsonl, atomic_write_text, fingerprint, read_json, read_jsonl, write_json
from ..granularity import param_delta
from ..log import get_logger, progress
from ..paths import RunDir
from .holdout import Halves, halves_of, seen_score, selection_key, trial_scores
from .optimizers import OPTIMIZERS
from .optimizers.gradient import learning_rate
from .optimizers.protocol import Optimizer, SearchSession
from .optimizers.random_search import random_point

if TYPE_CHECKING:
    from ..config import RunConfig

logger = get_logger(__name__)

BAYES_MAX_WEIGHTS = 12  # optimizer auto: a GP over more weights than this learns little in ~40 trials; CMA-ES does


def baseline_points(params: list[str], bounds: tuple[float, float], human: dict[str, float],
                    alone: bool = True) -> list[tuple[str, dict]]:
    """The baseline points the search starts from: raw (all 0), uniform (all 1), each delta alone (if `alone`:
    search.alone_baselines), human weights (keyed by delta: every weight of that delta). A point equal to an earlier one
    is left out (no trial twice)."""
    lo, hi = bounds
    clip = lambda w: float(min(max(w, lo), hi))
    deltas = list(dict.fromkeys(map(param_delta, params))) if alone else []
    points = [("raw", {p: clip(0.0) for p in params}), ("uniform", {p: clip(1.0) for p in params})]
    points += [(f"only:{d}", {p: clip(float(param_delta(p) == d)) for p in params}) for d in deltas]
    if human:
        points.append(("human", {p: clip(human.get(param_delta(p), 0.0)) for p in params}))
    unique = {}
    for kind, weights in points:
        unique.setdefault(point_key(weights), (kind, weights))
    return list(unique.values())


def point_key(weights: dict) -> tuple:
    """Two points are the same trial when every weight agrees to 1e-9 (well below any score change)."""
    return tuple(sorted((k, round(float(v), 9)) for k, v in weights.items()))


def optimizer_name(cfg, n_weights: int) -> str:
    name = cfg.search.optimizer
    return ("bayes" if n_weights <= BAYES_MAX_WEIGHTS else "cmaes") if name == "auto" else name


def plan_trials(cfg, params: list[str], human: dict[str, float] | None = None) -> list[tuple[str, dict | None]]:
    """All trials in order; None weights mean 'ask the optimiser'."""
    rng = np.random.default_rng(cfg.seed)
    lo, hi = cfg.search.bounds
    plan = baseline_points(params, cfg.search.bounds, cfg.search.human_weights if human is None else human,
                           cfg.search.alone_baselines)
    plan += [("random", {p: float(x) for p, x in zip(params, rng.uniform(lo, hi, len(params)))})
             for _ in range(cfg.search.init_points)]
    plan += [(optimizer_name(cfg, len(params)), None)] * cfg.search.n_iter
    return plan


def search_fingerprint(cfg, deltas: list[str], delta_fps: dict[str, str], validation_fp: str) -> str:
    # patience and n_iter only say where the search stops: a larger budget goes on from the trials logged; but for
    # the gradient a short budget sizes its steps (learning_rate), and another step size is another trajectory
    steps = {"learning_rate": learning_rate(cfg.search)} if cfg.search.optimizer == "gradient" else {}
    return fingerprint(cfg.search.model_dump(mode="json", exclude={"patience", "n_iter"}) | steps,
                       cfg.evaluation.model_dump(mode="json"),
                       cfg.seed, deltas, delta_fps, validation_fp)


# ---- the loop --------------------------------------------------------------------------------------------

Scores = Callable[[list[dict]], list[tuple[dict, float]]]  # points -> ({validation, fit, holdout}, eval seconds) each


def score_here(session: SearchSession, halves: Halves) -> Scores:
    """Trials scored one after the other by this process's session."""
    def score(points: list[dict]) -> list[tuple[dict, float]]:
        results = []
        for weights in points:
            started = time.perf_counter()
            results.append((trial_scores(session, weights, halves), time.perf_counter() - started))
        return results
    return score


def run_search(cfg: RunConfig, session: SearchSession, deltas: list[str], fp: str, force: bool = False,
               human: dict[str, float] | None = None, pool=None, where: Path | None = None,
               kept: dict | None = None) -> dict:
    """Run (or finish) the search over the weights named in `deltas` (delta or delta@group names); returns
    best = {weights, validation, fit, holdout, trial, kind, select, start}: the trial chosen on the holdout rows
    (holdout.py) and `start`, the baseline point chosen the same way (what the search would return without its
    optimiser). With a pool (cluster.TrialPool) up to pool.size trials run at once: the optimiser proposes them
    together, the log is written in trial order once the batch is scored. `where`: a folder for the trials log and
    best.json other than the run's (search.merge: auto's candidates). `kept`: a dict the caller holds across calls in
    one process (the race's rounds): the optimiser is kept there at the end, and a later call on the same log takes it
    back instead of replaying the trials into a new one (a gradient's replay refits its whole trajectory)."""
    run = RunDir(cfg.out)
    trials_path, best_path = (where / run.trials.name, where / run.best.name) if where else (run.trials, run.best)
    params, bounds, patience = list(deltas), cfg.search.bounds, cfg.search.patience
    halves = halves_of(cfg, session.validation_rows())
    trials = _resume(trials_path, fp, discard=force)
    plan = plan_trials(cfg, params, human)
    name = optimizer_name(cfg, len(params))
    held = (kept or {}).get(trials_path)
    fresh = not (held and held[1] == len(trials))  # a kept optimiser has seen exactly these trials already
    opt = OPTIMIZERS[name](params, bounds, cfg.seed, session) if fresh else held[0]
    score, width = (pool.map, pool.size) if pool else (score_here(session, halves), 1)
    seen = {point_key(t["weights"]): t["trial"] for t in trials}
    best, stale = _best(trials[:len(plan)], name, halves), _stale(trials, name)  # a budget lowered: its first trials
    seeds = sum(1 for _, w in plan if w is not None)
    if len(trials) < len(plan) and not _patience_hit(stale, patience):
        for t in trials if fresh else []:  # only a search with trials left needs the optimiser's state (a gradient
            opt.replay(t, own=t["kind"] == name)  # replay refits)
        fresh = False  # from here on the optimiser has seen every trial
        n_deltas = len(set(map(param_delta, params)))
        logger.info(f"search: budget {len(plan)} trials over {len(params)} weights ({n_deltas} "
                    f"deltas, granularity {cfg.search.granularity}): {seeds} baseline and random points, then "
                    f"{len(plan) - seeds} from {name}"
                    + (f", stopping after {patience} without a new best" if patience else "")
                    + (f"; {len(trials)} done before" if trials else ""))
        logger.info(f"search: {halves.line()}")
    replaced = sum(1 for t in trials if "replaces" in t)
    number = len(trials)
    with progress(total=len(plan), initial=len(trials), desc="search", unit="trial") as bar:
        while number < len(plan):
            if _patience_hit(stale, patience):
                logger.info(f"search: stopped after {stale} {name} trials without a new best "
                            f"(search.patience: {patience}), {number} of {len(plan)} trials run")
                break
            suggested = time.perf_counter()
            batch = _next_batch(plan, number, width, opt, seen, params, bounds, cfg.seed)
            replaced += sum("replaces" in trial for trial, _ in batch)
            results = score([w for _, w in batch])
            # seconds: the trial's share of its batch's wall time (the optimiser's own work included), so the
            # trials' seconds add up to the search's wall time however many ran at once
            share = (time.perf_counter() - suggested) / len(batch)
            for (trial, weights), (scores, eval_seconds) in zip(batch, results):
                trial.update(weights=weights, **scores, eval_seconds=round(eval_seconds, 4), seconds=round(share, 4),
                             fingerprint=fp)
                opt.register(weights, seen_score(trial), own=trial["kind"] == name)
                append_jsonl(trials_path, trial)
                trials.append(trial)
                new = _best(trials, name, halves)
                if new["trial"] != (best or {}).get("trial"):
                    logger.info(f"  trial {trial['trial']:>3} {trial['kind']:<14} validation {trial['validation']:.4f}"
                                f"  holdout {trial['holdout']:.4f}  (new best)")
                    stale = 0
                elif trial["kind"] == name:
                    stale += 1
                if new != best:
                    best = new
                    write_json(best_path, best)
                bar.set_postfix(best=round(best["holdout"], 4), refresh=False)
                bar.update()
            number += len(batch)
    if kept is not None and not fresh:  # kept only where it has seen every trial (a finished search skips replay)
        kept[trials_path] = (opt, len(trials))
    if replaced:
        logger.info(f"search: {replaced} repeated suggestion(s) replaced by random points "
                    f"(no point is evaluated twice)")
    if read_json(best_path) != best:
        write_json(best_path, best)
    warn_on_bounds(best, bounds)
    return best


def _next_batch(plan, number: int, width: int, opt: Optimizer, seen: dict, params, bounds,
                seed) -> list[tuple[dict, dict]]:
    """Up to `width` trials from `number` on, all planned points or all the optimiser's (it starts from every
    seed's score), each new: a repeated suggestion is replaced by a seeded random point, counted. Marks every
    point seen."""
    planned = plan[number][1] is not None
    limit = width if planned or opt.parallel else 1
    batch: list[tuple[dict, dict]] = []
    for n in range(number, min(number + limit, len(plan))):
        kind, weights = plan[n]
        if (weights is not None) != planned:
            break
        trial = {"trial": n, "kind": kind}
        if weights is None:
            weights = opt.suggest(n, [w for _, w in batch]) if batch else opt.suggest(n)
            if weights is None:  # the optimiser needs this batch's scores first (a CMA-ES generation)
                break
            attempt = 0
            while point_key(weights) in seen:
                trial["replaces"] = seen[point_key(weights)]
                attempt += 1
                weights = random_point(params, bounds, [seed, n, attempt])
        seen[point_key(weights)] = n
        batch.append((trial, weights))
    return batch


def warn_on_bounds(best: dict, bounds) -> list[str]:
    """The weights of the best point that sit on a bound: the optimum may lie beyond it."""
    lo, hi = bounds
    at = [f"{p}={w:g} ({'upper' if abs(w - hi) < 1e-9 else 'lower'})" for p, w in best["weights"].items()
          if abs(w - hi) < 1e-9 or abs(w - lo) < 1e-9]
    if at:
        shown = ", ".join(at[:6]) + (f" and {len(at) - 6} more" if len(at) > 6 else "")
        logger.info(f"search: warning: {len(at)} of the best weights sit on a bound: {shown}; widen search.bounds "
                    f"(now [{lo:g}, {hi:g}]) if a weight beyond it may be better")
    return at


def _patience_hit(stale: int, patience: int | None) -> bool:
    return patience is not None and stale >= patience


def _stale(trials: list[dict], optimizer: str) -> int:
    """Optimiser trials since the last new best (chosen as the search chooses: holdout.selection_key)."""
    best, stale = None, 0
    for t in trials:
        if best is None or selection_key(t) > best:
            best, stale = selection_key(t), 0
        elif t["kind"] == optimizer:
            stale += 1
    return stale


def _resume(path: Path, fp: str, discard: bool) -> list[dict]:
    """The trials of this same search logged so far. A torn last line (a killed run) is dropped; the log
    of a different search (config, deltas or data changed) or a discarded one (--force search) is set
    aside as trials.<its fingerprint>.<time>.jsonl, never deleted."""
    logged = read_jsonl(path)
    if logged and (discard or logged[0].get("fingerprint") != fp):
        path.replace(path.with_name(f"trials.{logged[0].get('fingerprint')}.{time.strftime('%Y%m%d-%H%M%S')}.jsonl"))
        return []
    if path.exists() and path.read_text(encoding="utf-8") != "".join(
            json.dumps(t, ensure_ascii=False) + "\n" for t in logged):
        atomic_write_text(path, "".join(json.dumps(t, ensure_ascii=False) + "\n" for t in logged))
    return logged


def _best(trials: list[dict], optimizer: str, halves: Halves) -> dict | None:
    """The trial the search returns (holdout.selection_key) and its `start`: the baseline or random point chosen the
    same way, i.e. what the search would return had its optimiser proposed nothing."""
    if not trials:
        return None
    fields = lambda t: {k: t[k] for k in ("weights", "validation", "trial", "kind")} | {
        "fit": t.get("fit", t["validation"]), "holdout": t.get("holdout", t["validation"])}
    planned = [t for t in trials if t["kind"] != optimizer] or trials
    return {**fields(max(trials, key=selection_key)), "select": halves.select, "select_line": halves.line(),
            "start": fields(max(planned, key=selection_key))}
