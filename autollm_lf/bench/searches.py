"""The search on the toy's trained deltas: teacher-forced vs generated exact match, bayes_opt vs random, and merge
methods x granularities x optimisers at one budget (the real search loop on a ScoredMerge)."""
from __future__ import annotations

import contextlib
import io
import random
import statistics
import tempfile
import time
from pathlib import Path

from ..checks import load_config
from ..config import EvaluationConfig, SearchConfig
from ..data.prepare import load_split
from ..evaluate import ExactMatch, greedy_generate
from ..evaluate.metrics import make_evaluator
from ..merge import load_base, param_delta
from ..search.loop import run_search
from ..search.scored import ScoredMerge
from ..train.deltas import ALL_DELTA
from .cost import timed
from .finished import finished_session


def bench_exact_match(toy_cfg: Path | None, rounds: int = 5) -> dict:
    """Teacher-forced exact match vs generate-based, on the toy's validation rows, `rounds` times each."""

    cfg = load_config(toy_cfg) if toy_cfg and toy_cfg.exists() else None
    if cfg is None or not cfg.run.split("validation").exists():
        return {"skipped": "run `sh autollm.sh` first (needs the toy's base model and validation split)"}
    model, tok = load_base(cfg.base_model.path)
    rows = load_split(cfg, "validation")
    eval_cfg = EvaluationConfig(batch_size=cfg.evaluation.batch_size)
    ev = ExactMatch(model, tok, cfg.base_model.template, rows, eval_cfg)
    plain = ExactMatch(model, tok, cfg.base_model.template, rows, eval_cfg, share_prefix=False)  # length batches only
    whole = ExactMatch(model, tok, cfg.base_model.template, rows, eval_cfg, keys_only_prompts=False)  # last layer whole

    def generate_based():  # greedy generate on the same rows, as the generate-based evaluators run it
        hits = 0
        for index in ev.prompt_length_batches():  # as Generated batches
            chunk = [ev.encoded[i] for i in index]  # stop at the longest reference: greedy can't match past it
            new = greedy_generate(model, tok, [p for p, _ in chunk], max(len(t) for _, t in chunk))
            hits += sum(g[: len(t)] == t for g, (_, t) in zip(new, chunk))
        return hits / len(rows)

    # each side runs once untimed (warm-up); then `rounds` rounds, the sides in turn (drift on a shared machine
    # hits them all alike), and the median of each; the per-round ratios show the spread
    sides = {"tf": ev.score, "plain": plain.score, "whole": whole.score, "gen": generate_based}
    scores = {key: fn() for key, fn in sides.items()}
    times = {k: [] for k in sides}
    for _ in range(rounds):
        for key, fn in sides.items():
            times[key].append(timed(fn, repeats=1))
    tf, tf_plain, tf_whole, gen = (statistics.median(times[k]) for k in sides)
    per_round = [g / t for g, t in zip(times["gen"], times["tf"])]
    return {"rows": len(rows), "teacher_forced_seconds": tf, "generate_seconds": gen, "speedup": gen / tf,
            "rounds": rounds, "speedup_per_round": per_round,
            "teacher_forced_no_prefix_cache_seconds": tf_plain, "speedup_no_prefix_cache": gen / tf_plain,
            "teacher_forced_whole_last_layer_seconds": tf_whole, "speedup_whole_last_layer": gen / tf_whole,
            "teacher_forced_score": scores["tf"], "generate_score": scores["gen"],
            "scores_equal": len(set(scores.values())) == 1}


def bench_bo_vs_random(toy_cfg: Path | None, trials: int = 30, seeds: int = 3, reference: int = 200,
                       rows: int = 240) -> dict:
    """On the toy's deltas: bayes_opt vs random search, against the best of `reference` random trials."""
    import numpy as np
    from bayes_opt import BayesianOptimization


    session = finished_session(toy_cfg)
    if session is None:
        return {"skipped": "run `sh autollm.sh` first (needs the toy's trained deltas)"}
    cfg = session.base_cfg  # search.merge: auto as the run resolved it
    validation = load_split(cfg, "validation")
    rows = min(rows or len(validation), len(validation))
    subset = [validation[i] for i in sorted(random.Random(0).sample(range(len(validation)), rows))]
    scorer = make_evaluator(cfg, session.weighted.model, session.tokenizer, subset)
    deltas, (lo, hi) = session.deltas, cfg.search.bounds

    def f(weights):
        session.weighted.set_weights(weights)
        return scorer.score()

    def random_search(seed, n):
        rng = np.random.default_rng(seed)
        return max(f({d: float(x) for d, x in zip(deltas, rng.uniform(lo, hi, len(deltas)))}) for _ in range(n))

    def bo(seed):
        opt = BayesianOptimization(f=None, pbounds={d: (lo, hi) for d in deltas}, random_state=seed, verbose=0,
                                   allow_duplicate_points=True)
        rng, best = np.random.default_rng(seed), -1.0
        for i in range(trials):
            w = ({d: float(x) for d, x in zip(deltas, rng.uniform(lo, hi, len(deltas)))} if i < 5
                 else {d: float(v) for d, v in opt.suggest().items()})
            s = f(w)
            opt.register(params=w, target=s)
            best = max(best, s)
        return best

    ref = random_search(10_000, reference)
    bo_best = [bo(s) for s in range(seeds)]
    rnd_best = [random_search(s, trials) for s in range(seeds)]
    return {"validation_rows": len(subset), "trials": trials, "bo_best": bo_best, "random_best": rnd_best,
            "reference_best_of_random": ref, "bo_mean_vs_reference": statistics.mean(bo_best) / ref,
            "random_mean_vs_reference": statistics.mean(rnd_best) / ref}


def quiet_search(scored: ScoredMerge, params: list[str], seed: int, fp: str) -> tuple[dict, float]:
    """The real search loop on a scored merge (its cfg's search section), its log in a temporary folder and its
    output hidden: the best point and the seconds it took."""
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        cfg = scored.cfg.model_copy(update={"run_dir": Path(tmp), "seed": seed})
        with contextlib.redirect_stdout(io.StringIO()):
            best = run_search(cfg, scored, params, fp=fp)
        return best, time.perf_counter() - started


QUALITY_BUDGET = 11  # trials per search in `--only quality`: the Gemma example's 8 baseline points and 3 fits


SEARCH_BENCH = [  # (merge method, granularity, optimizer): what `--only search` compares, at one budget
    ("linear", "delta", "bayes"),        # the search before the merge-quality work
    ("linear", "delta", "cmaes"),
    ("linear_norm", "delta", "bayes"),   # shared output directions counted once
    ("linear", "module", "gradient"),    # one weight per delta per module, Adam on half of validation
]


def bench_search(toy_cfg: Path | None, trials: int = 40, seeds: int = 3, rows: int | None = None,
                 combos: list[tuple[str, str, str]] | None = None) -> dict:
    """On the toy's trained deltas: each (merge, granularity, optimizer) runs the real search loop (seeds, random
    points, optimiser; `trials` in all) with `seeds` seeds on the validation split (or a fixed subset of `rows` rows);
    the weights it picks are then scored on the whole validation and test splits. train@all and the best single delta
    are the yardsticks. One loaded model: methods and granularities are switched in place."""
    session = finished_session(toy_cfg)
    if session is None:
        return {"skipped": "run `sh autollm.sh` first (needs the toy's trained deltas)"}
    cfg = session.base_cfg  # search.merge: auto as the run resolved it
    w = session.weighted
    if w.mode == "scaling":
        return {"skipped": "search.apply: scaling cannot switch to normalised merges; use auto, cat or fold"}
    validation = load_split(cfg, "validation")
    rows = min(rows or len(validation), len(validation))
    subset = [validation[i] for i in sorted(random.Random(0).sample(range(len(validation)), rows))]
    sub_scorer = make_evaluator(cfg, w.model, session.tokenizer, subset)
    full = {split: session.scorer(split) for split in ("validation", "test")}

    def scores(weights, method="linear"):
        w.set_weights(weights, method)
        return {split: scorer.score() for split, scorer in full.items()}

    deltas = session.deltas
    yardsticks = {"train@all": scores({ALL_DELTA: 1.0}) if ALL_DELTA in w.names else None}
    singles = {d: scores({d: 1.0}) for d in deltas}
    best_single = max(singles, key=lambda d: singles[d]["validation"])
    yardsticks["best_single"] = {"delta": best_single, **singles[best_single]}
    results = []
    run_granularity = w.granularity  # the run's (search.granularity auto: as resolved)
    for method, granularity, optimizer in combos or SEARCH_BENCH:
        w.use_method(method, cfg.search.density)
        w.use_granularity(granularity)
        params = [p for p in w.params if param_delta(p) in deltas]
        runs = []
        for seed in range(seeds):
            n_seeds = 2 + len(deltas)
            search = SearchConfig(bounds=cfg.search.bounds, init_points=min(5, max(trials - n_seeds, 0)),
                                  n_iter=max(trials - n_seeds - 5, 0), optimizer=optimizer, granularity=granularity,
                                  merge=method, density=cfg.search.density)
            scored = ScoredMerge(cfg.model_copy(update={"search": search}), w, {"validation": sub_scorer})
            best, seconds = quiet_search(scored, params, seed, fp="bench")
            runs.append({"seed": seed, "subset_validation": best["validation"], **scores(best["weights"], method),
                         "seconds": seconds, "weights": best["weights"]})
        results.append({"merge": method, "granularity": granularity, "optimizer": optimizer, "weights": len(params),
                        "runs": runs, **{f"{k}_mean": statistics.mean(r[k] for r in runs)
                                         for k in ("subset_validation", "validation", "test", "seconds")}})
    w.use_method(cfg.search.merge, cfg.search.density)
    w.use_granularity(run_granularity)
    return {"trials": trials, "seeds": seeds, "validation_subset_rows": len(subset), "yardsticks": yardsticks,
            "results": results}


def search_lines(r: dict) -> list[str]:
    if "skipped" in r:
        return ["search: " + r["skipped"]]
    y = r["yardsticks"]
    lines = [f"search ({r['trials']} trials, {r['seeds']} seeds, "
             f"picked on {r['validation_subset_rows']} validation rows; means over seeds):"]
    if y.get("train@all"):
        lines.append(f"  train@all                       validation {y['train@all']['validation']:.4f}  "
                     f"test {y['train@all']['test']:.4f}")
    b = y["best_single"]
    lines.append(f"  best single ({b['delta']})".ljust(34) + f"validation {b['validation']:.4f}  test {b['test']:.4f}")
    for x in r["results"]:
        name = f"{x['merge']}/{x['granularity']}/{x['optimizer']} ({x['weights']}w)"
        lines.append(f"  {name:<31} validation {x['validation_mean']:.4f}  test {x['test_mean']:.4f}  "
                     f"(subset {x['subset_validation_mean']:.4f}, {x['seconds_mean']:.0f}s)")
    return lines


def exact_match_line(em: dict) -> str:
    if "skipped" in em:
        return em["skipped"]
    per_round = sorted(em["speedup_per_round"])
    return (f"teacher-forced {em['teacher_forced_seconds']:.2f}s vs generate {em['generate_seconds']:.2f}s = "
            f"{em['speedup']:.1f}x (medians of {em['rounds']} rounds; "
            f"per round {per_round[0]:.2f}-{per_round[-1]:.2f}x; "
            f"without the shared-prefix cache {em['teacher_forced_no_prefix_cache_seconds']:.2f}s "
            f"= {em['speedup_no_prefix_cache']:.1f}x; last layer whole at prompt positions "
            f"{em['teacher_forced_whole_last_layer_seconds']:.2f}s = {em['speedup_whole_last_layer']:.1f}x), "
            f"scores {em['teacher_forced_score']:.4f} / {em['generate_score']:.4f}"
            + ("" if em["scores_equal"] else " NOT EQUAL"))
