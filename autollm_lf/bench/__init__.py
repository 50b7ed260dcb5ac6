"""`autollm bench`: what a search trial costs, measured side by side in one run.

- overhead_seconds_ours vs overhead_seconds_reload: setting weights in place vs the AutoLLM-style
  trial (weighted state-dict sum, save_pretrained, reload), on a random model of a ~0.5B Llama/Qwen
  shape built locally, with four rank-16 deltas;
- trial_vs_plain: one whole trial (apply weights + evaluation pass) / the same pass on a plain model
  whose weights already hold the merge, at 4 and 16 deltas, for linear (`cat` and `fold`; `linear` is
  the one `search.apply: auto` keeps) and ties / dare_ties / dare_linear, with merge_fraction (apply
  time / evaluation pass);
- exact_match_speedup: teacher-forced vs generate-based exact match on the same rows (scores equal);
- bo_vs_random: on the toy, best validation after 30 trials of bayes_opt vs random search;
- search memory: peak RSS of a process that does what a search does, less the RSS of its runtime (torch,
  transformers, peft) before any model, vs base + adapters on disk; `auto` and `fold`.
- search: on the toy, merge methods x granularities x optimisers (bench_search), 3 seeds, one budget: the
  validation and test scores of the weights each picks, vs train@all and the best single delta.
- scale: the toy's deltas as Ray tasks on a local Ray cluster of 1-CPU nodes: one node vs two, vs the ideal.
- ceiling: on that run, the best the weights could do for the per-chunk goal (each chunk >= 95% of its own delta):
  oracles tuned on TEST itself, which no real search may see, merged as the run merges: cmaes per delta, and the
  gradient fit at the run's granularity from its best weights.
- model: on a finished run of a real model (`--model-run`, default the Gemma 3 270M example): trial cost with
  and without the fast path, the LM head on scored positions vs all, `choice` vs a per-choice loop, memory.

`--only merge|exact_match|bo|search|model|ceiling|scale|quality` runs one part (repeatable); `--rounds N` times
each exact-match side N times; `--merge`, `--optimizer`, `--seeds` and `--larger-budget` narrow the quality part.
`--toy` names the run the exact_match, bo and search parts use (e.g. the Gemma example's run, too); `--model-run`
the run the model, ceiling and quality parts use.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from .ceiling import bench_ceiling, ceiling_lines, ceiling_value, own_scores
from .cost import bench_merge, merge_lines
from .model import bench_model, model_lines, per_choice_loglikelihoods
from .quality import bench_quality, quality_lines
from .scale import bench_scale, scale_lines
from .searches import (
    QUALITY_BUDGET,
    bench_bo_vs_random,
    bench_exact_match,
    bench_search,
    exact_match_line,
    search_lines,
)

__all__ = ["bench_ceiling", "bench_merge", "bench_model", "bench_scale", "bench_search", "ceiling_value",
           "own_scores", "per_choice_loglikelihoods", "print_table", "run_bench"]


def run_bench(as_json: bool, quick: bool, toy_cfg: Path | None, parts: list[str], rounds: int = 5,
              model_cfg: Path | None = None, quality: dict | None = None) -> dict:
    """Run the named parts (cli.BENCH_PARTS: merge, exact_match, bo, search, model, ceiling, scale, quality);
    `quality` overrides bench_quality's pairs, seeds and big_budget (0: no larger budget)."""
    import torch
    torch.manual_seed(0)
    started = time.time()
    result = {"threads": torch.get_num_threads(), "device": "cuda" if torch.cuda.is_available() else "cpu"}
    if "merge" in parts:
        result["merge"] = bench_merge("quick" if quick else "0.5B", repeats=1 if quick else 2)
    if "exact_match" in parts:
        result["exact_match_speedup"] = bench_exact_match(toy_cfg, rounds)
    if "bo" in parts:
        result["bo_vs_random"] = bench_bo_vs_random(toy_cfg, trials=8 if quick else 30, seeds=1 if quick else 3,
                                                    reference=10 if quick else 200, rows=40 if quick else 240)
    if "search" in parts:
        result["search"] = bench_search(toy_cfg, trials=12 if quick else 40, seeds=1 if quick else 3,
                                        rows=40 if quick else None)
    if "model" in parts:
        result["model"] = bench_model(model_cfg, rounds=1 if quick else 3)
    if "ceiling" in parts:
        result["ceiling"] = bench_ceiling(model_cfg, trials=8 if quick else 40, gradient_trials=2 if quick else 6)
    if "scale" in parts:
        result["scale"] = bench_scale(toy_cfg, max_deltas=2 if quick else None)
    if "quality" in parts:
        chosen = {"seeds": 1 if quick else 3, "big_budget": 0 if quick else 3 * QUALITY_BUDGET, **(quality or {})}
        result["quality"] = bench_quality(model_cfg, budget=QUALITY_BUDGET, **chosen)
    result["seconds"] = time.time() - started
    print_table(result)
    if as_json:
        print(json.dumps(result, default=float))
    return result


def print_table(r: dict) -> None:
    m = r.get("merge")
    shape = f"{m['shape']} shape, " if m else ""
    tail = f", eval {m['eval_batch']}" if m else ""
    lines = [f"== autollm bench ({shape}{r['device']}, {r['threads']} threads{tail})"]
    if m:
        lines += merge_lines(m)
    if "exact_match_speedup" in r:
        lines.append("exact match: " + exact_match_line(r["exact_match_speedup"]))
    if "bo_vs_random" in r:
        bo = r["bo_vs_random"]
        lines.append("bo vs random: " + (bo["skipped"] if "skipped" in bo else
                     f"{bo['trials']} trials, BO {bo['bo_mean_vs_reference']:.1%} and random "
                     f"{bo['random_mean_vs_reference']:.1%} of the best of {bo['reference_best_of_random']:.4f} "
                     "random trials"))
    if "search" in r:
        lines += search_lines(r["search"])
    if "model" in r:
        lines += model_lines(r["model"])
    if "ceiling" in r:
        lines += ceiling_lines(r["ceiling"])
    if "scale" in r:
        lines += scale_lines(r["scale"])
    if "quality" in r:
        lines += quality_lines(r["quality"])
    lines.append(f"took {r['seconds']:.0f}s")
    print("\n".join(lines))
