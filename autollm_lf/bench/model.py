"""On a finished run of a real model: what a trial costs there, the LM head on scored positions vs all, `choice` vs
a per-choice loop, and the search process's memory."""
from __future__ import annotations

import random
from pathlib import Path

from ..data.prepare import load_split
from ..evaluate.choice import Choice
from ..evaluate.metrics import make_evaluator
from .cost import search_process_rss, timed
from .finished import finished_session


def bench_model(cfg_path: Path | None, rounds: int = 3) -> dict:
    """On a finished run of a real model (`--model-run`, default the Gemma 3 270M example): what one trial costs
    there (apply + teacher-forced exact match over validation) with and without the fast path, the LM head over
    every position vs the scored ones only (`logits_to_keep`), `choice` (one pass, the prompt shared by its
    choices) vs a plain per-choice loop, and a search process's memory against base + adapters."""
    import torch

    session = finished_session(cfg_path)
    if session is None:
        return {"skipped": f"run `autollm run {cfg_path}` first (needs its trained deltas)"}
    cfg = session.base_cfg  # search.merge: auto as the run resolved it
    w, template = session.weighted, cfg.base_model.template
    weights = cfg.run.read_best()["weights"]
    rows = load_split(cfg, "validation")
    evaluators = {fast: make_evaluator(cfg.model_copy(update={"evaluation": cfg.evaluation.model_copy(
        update={"metric": "exact_match", "fast_path": fast, "objective": None})}), w.model, w.tokenizer, rows)
        for fast in (True, False)}
    w.set_weights(weights)
    scores = {fast: ev.score() for fast, ev in evaluators.items()}
    trial = {fast: timed(lambda ev=ev: (w.set_weights(weights), ev.score()), rounds) for fast, ev in evaluators.items()}
    apply = timed(lambda: w.set_weights(weights), rounds)
    plain = evaluators[False]

    def lm_head(keep_all: bool):
        with torch.inference_mode():
            for b in plain.batches:
                w.model(input_ids=b.input_ids, logits_to_keep=0 if keep_all else b.scored)

    head = {k: timed(lambda k=k: lm_head(k), rounds) for k in (False, True)}
    return {"model": str(cfg.base_model.gguf or cfg.base_model.path), "rows": len(rows),
            "vocab_size": w.model.config.get_text_config().vocab_size, "deltas": len(w.names), "apply_mode": w.mode,
            "trial_seconds": trial[True], "trial_seconds_no_fast_path": trial[False], "apply_seconds": apply,
            "scores_equal": scores[True] == scores[False], "exact_match": scores[True],
            "pass_seconds_scored_logits": head[False], "pass_seconds_all_logits": head[True],
            "choice": bench_choice(w, template, rows, cfg.evaluation, rounds),
            "memory_lean": search_process_rss(cfg_path, {}, "run", "search.memory=lean"),
            "memory": {**search_process_rss(cfg_path, {}, "run", "search.memory=fast"),
                       "tokenizer_mb": search_process_rss(session.cfg.base_model.path, {}, "tokenizer")["model_mb"],
                       "base_plus_adapters_mb": folder_mb(session.cfg.base_model.path) + sum(
                           folder_mb(a) for a in session.adapters.values())}}


def folder_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors")) / 2**20


def mc_rows(rows: list, choices: int = 4) -> list:
    """Multiple-choice rows from held-out rows: each answer among `choices - 1` other answers of its chunk."""
    rng = random.Random(0)
    out = []
    for row in rows:
        others = sorted({r["response"] for r in rows if r["chunk"] == row["chunk"]} - {row["response"]})
        picked = rng.sample(others, min(choices - 1, len(others))) + [row["response"]]
        if len(picked) >= 2:
            out.append({**row, "choices": sorted(picked)})
    return out


def per_choice_loglikelihoods(model, evaluator: Choice, template: str, rows: list) -> list[list[float]]:
    """The plain computation `choice` is checked against: one forward per (prompt, choice), no cache, no batching."""
    import torch

    out = []
    with torch.inference_mode():
        for row in rows:
            lls = []
            for c in row["choices"]:
                p, a, _ = evaluator.encode(template, {**row, "response": c})
                ids = torch.tensor([p + a], device=evaluator.device)
                logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
                lls.append(sum(logp[len(p) - 1 + k, t].item() for k, t in enumerate(a)))
            out.append(lls)
    return out


def bench_choice(w, template: str, rows: list, eval_cfg, rounds: int) -> dict:
    """`choice` on multiple-choice rows made from the held-out rows vs one plain forward per (prompt, choice)."""
    mc = mc_rows(rows)
    ev = Choice(w.model, w.tokenizer, template, mc, eval_cfg.model_copy(update={"metric": "choice"}))
    per_choice_loop = lambda: per_choice_loglikelihoods(w.model, ev, template, mc)
    fast, loop = ev.choice_loglikelihoods(), per_choice_loop()
    diff = max(abs(x - y) for f, lp in zip(fast, loop) for x, y in zip(f, lp))
    seconds = {"one_pass": timed(ev.score, rounds), "per_choice_loop": timed(per_choice_loop, rounds)}
    return {"questions": len(mc), "choices": sum(len(r["choices"]) for r in mc), **seconds,
            "speedup": seconds["per_choice_loop"] / seconds["one_pass"], "max_loglikelihood_diff": diff}


def model_lines(m: dict) -> list[str]:
    if "skipped" in m:
        return [f"model: {m['skipped']}"]
    c, mem = m["choice"], m["memory"]
    disk = mem["base_plus_adapters_mb"]
    return [
        f"== real model {m['model']} ({m['vocab_size']} tokens, {m['deltas']} deltas, apply {m['apply_mode']}), "
        f"{m['rows']} validation rows",
        f"trial (apply + exact match): {m['trial_seconds']:.2f}s, without the fast path "
        f"{m['trial_seconds_no_fast_path']:.2f}s (scores equal: {m['scores_equal']}); apply alone "
        f"{m['apply_seconds']:.3f}s",
        f"LM head on the scored positions only: pass {m['pass_seconds_scored_logits']:.2f}s vs every position "
        f"{m['pass_seconds_all_logits']:.2f}s",
        f"choice: {c['questions']} questions, {c['choices']} choices: one pass {c['one_pass']:.2f}s vs per-choice "
        f"loop {c['per_choice_loop']:.2f}s = {c['speedup']:.1f}x (log-likelihoods within "
        f"{c['max_loglikelihood_diff']:.1e})",
        f"search memory (apply auto, picked {mem['mode']}; 3 trials{', a gradient fit' if mem['gradient_fit'] else ''}"
        f"): peak RSS {mem['peak_mb']:.0f} MB - runtime {mem['runtime_mb']:.0f} MB = {mem['model_mb']:.0f} MB = "
        f"{mem['model_mb'] / disk:.2f}x base + adapters ({disk:.0f} MB on disk); the trials alone "
        f"{mem['trials_mb'] / disk:.2f}x; the tokenizer, freed before the first trial, peaks at "
        f"{mem['tokenizer_mb']:.0f} MB alone" + (f"; GPU peak {mem['cuda_peak_mb']:.0f} MB = "
                                                 f"{mem['cuda_peak_mb'] / disk:.2f}x" if mem["cuda_peak_mb"] else ""),
        *[f"  search.memory: {name}: trials {m['trials_mb'] / disk:.2f}x ({m['trial_seconds']:.1f}s each), whole "
          f"peak {m['model_mb'] / disk:.2f}x" + (f" (fit {m['fit_seconds']:.0f}s)" if m["gradient_fit"] else "")
          for name, m in (("fast", mem), ("lean", m["memory_lean"]))]]
