"""Stage 3: Bayesian optimisation of the delta weights on validation, one evaluation pass per trial.

Every trial is appended to search/trials.jsonl as it finishes; a restarted search replays them into
the optimiser and continues to the same total. Each suggestion is seeded from (seed, trial number),
so a resumed search proposes the same points an uninterrupted one would.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .io import append_jsonl, atomic_write_text, fingerprint, read_json, read_jsonl, write_json


def seed_points(deltas: list[str], bounds: tuple[float, float], human: dict[str, float]) -> list[tuple[str, dict]]:
    """The baselines the search starts from: raw (all 0), uniform (all 1), each delta alone, human weights."""
    lo, hi = bounds
    clip = lambda w: float(min(max(w, lo), hi))
    points = [("raw", {d: clip(0.0) for d in deltas}), ("uniform", {d: clip(1.0) for d in deltas})]
    points += [(f"only:{d}", {e: clip(float(e == d)) for e in deltas}) for d in deltas]
    if human:
        points.append(("human", {d: clip(human.get(d, 0.0)) for d in deltas}))
    return points


def plan_trials(cfg, deltas: list[str], human: dict[str, float] | None = None) -> list[tuple[str, dict | None]]:
    """All trials in order; None weights mean 'ask the optimiser'."""
    rng = np.random.default_rng(cfg.seed)
    lo, hi = cfg.search.bounds
    plan = seed_points(deltas, cfg.search.bounds, cfg.search.human_weights if human is None else human)
    plan += [("random", {d: float(x) for d, x in zip(deltas, rng.uniform(lo, hi, len(deltas)))})
             for _ in range(cfg.search.init_points)]
    plan += [("bayes_opt", None)] * cfg.search.n_iter
    return plan


def search_fingerprint(cfg, deltas: list[str], delta_fps: dict[str, str], validation_fp: str) -> str:
    return fingerprint(cfg.search.model_dump(mode="json"), cfg.evaluation.model_dump(mode="json"),
                       cfg.seed, deltas, delta_fps, validation_fp)


def run_search(cfg, session, deltas: list[str], fp: str, force: bool = False,
               human: dict[str, float] | None = None) -> dict:
    """Run (or finish) the search; returns best = {weights, validation, trial}."""
    from bayes_opt import BayesianOptimization

    out = cfg.out / "search"
    trials_path, best_path = out / "trials.jsonl", out / "best.json"
    trials = _resume(trials_path, fp, discard=force)
    plan = plan_trials(cfg, deltas, human)
    opt = BayesianOptimization(f=None, pbounds={d: cfg.search.bounds for d in deltas}, random_state=cfg.seed,
                               verbose=0, allow_duplicate_points=True)
    for t in trials:
        opt.register(params=t["weights"], target=t["validation"])
    best = _best(trials)
    if len(trials) < len(plan):
        print(f"search: {len(plan)} trials over {len(deltas)} deltas ({len(trials)} done before)")
    with tqdm(total=len(plan), initial=len(trials), desc="search", unit="trial", disable=None) as bar:
        for number in range(len(trials), len(plan)):
            kind, weights = plan[number]
            if weights is None:
                opt._random_state.seed(cfg.seed * 100_003 + number)  # same suggestion after a restart
                weights = {d: float(v) for d, v in opt.suggest().items()}
            started = time.perf_counter()
            score = session.score(weights, "validation")
            eval_seconds = time.perf_counter() - started
            opt.register(params=weights, target=score)
            trial = {"trial": number, "kind": kind, "weights": weights, "validation": score,
                     "eval_seconds": round(eval_seconds, 4), "fingerprint": fp}
            append_jsonl(trials_path, trial)
            if best is None or score > best["validation"]:
                best = {"weights": weights, "validation": score, "trial": number, "kind": kind}
                write_json(best_path, best)
                bar.write(f"  trial {number:>3} {kind:<14} validation {score:.4f}  (new best)")
            bar.set_postfix(best=round(best["validation"], 4), refresh=False)
            bar.update()
    if read_json(best_path) != best:
        write_json(best_path, best)
    return best


def _resume(path: Path, fp: str, discard: bool) -> list[dict]:
    """The trials of this same search logged so far. A torn last line (a killed run) is dropped; the log
    of a different search (config, deltas or data changed) or a discarded one (--force search) is set
    aside as trials.<its fingerprint>.<time>.jsonl, never deleted."""
    logged = read_jsonl(path)
    if logged and (discard or logged[0].get("fingerprint") != fp):
        path.replace(path.with_name(f"trials.{logged[0].get('fingerprint')}.{time.strftime('%Y%m%d-%H%M%S')}.jsonl"))
        return []
    if path.exists() and path.read_text(encoding="utf-8") != "".join(json.dumps(t, ensure_ascii=False) + "\n" for t in logged):
        atomic_write_text(path, "".join(json.dumps(t, ensure_ascii=False) + "\n" for t in logged))
    return logged


def _best(trials: list[dict]) -> dict | None:
    if not trials:
        return None
    t = max(trials, key=lambda t: (t["validation"], -t["trial"]))
    return {"weights": t["weights"], "validation": t["validation"], "trial": t["trial"], "kind": t["kind"]}
