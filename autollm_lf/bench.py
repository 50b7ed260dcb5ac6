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
- ceiling: on that run, the best the weights could do for the per-chunk goal (each chunk >= 80% of its own delta):
  oracles tuned on TEST itself, which no real search may see: cmaes per delta, and the gradient fit at the run's
  granularity from its best weights.
- model: on a finished run of a real model (`--model-run`, default the Gemma 3 270M example): trial cost with
  and without the fast path, the LM head on scored positions vs all, `choice` vs a per-choice loop, memory.

`--only merge|exact_match|bo|search|model|ceiling|scale` runs one part (repeatable); `--rounds N` times each
exact-match side N times. `--toy` names the run the exact_match, bo and search parts use (e.g. the Gemma
example's run, too); `--model-run` the run the model and ceiling parts use.
"""
from __future__ import annotations

import contextlib
import io
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .checks import load_config
from .choice import Choice
from .config import ClusterConfig, EvaluationConfig, SearchConfig
from .evaluate import ExactMatch, greedy_generate
from .gradient import GradientOptimizer
from .io import read_json
from .merge import MERGE_METHODS, WeightedDeltas, delta_weight, load_base, param_delta
from .metrics import make_evaluator
from .pipeline import Session
from .prepare import load_split
from .quality import bench_quality, quality_lines
from .search import point_key, run_search
from .tiny import build_char_tokenizer
from .train import ALL_DELTA, DONE_MARKER, delta_specs, train_specs

SHAPES = {  # Qwen2-0.5B's dimensions; `quick` is for the test of this command
    "0.5B": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "quick": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=256, tie_word_embeddings=True),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def timed(fn, repeats: int = 3) -> float:
    """Median wall time of fn()."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def build_model(root: Path, shape: dict) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM


    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(max_position_embeddings=512, **shape))
    model.save_pretrained(root / "base")
    build_char_tokenizer().save_pretrained(root / "base")
    return root / "base"


def build_adapters(base: Path, root: Path, n: int, rank: int = 16) -> dict[str, Path]:
    """n random rank-`rank` LoRA deltas on every linear module (non-zero B)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, init_lora_weights=False))
    out = {}
    for i in range(n):
        torch.manual_seed(100 + i)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.normal_(0, 0.02)
        model.save_pretrained(root / f"d{i}")
        out[f"d{i}"] = root / f"d{i}"
    return out


def reload_trial(weighted, weights: dict, base: Path, tmp: Path):
    """The AutoLLM-style trial: W0 + sum w_i dW_i into a state dict, save_pretrained, reload."""
    from transformers import AutoModelForCausalLM


    plain = AutoModelForCausalLM.from_pretrained(base)
    state = plain.state_dict()
    for name, module in weighted.model.named_modules():
        if hasattr(module, "lora_A") and weighted.names[0] in module.lora_A:
            key = name.removeprefix("base_model.model.") + ".weight"
            for d in weighted.names:
                state[key] += weights[d] * delta_weight(module.lora_A[d].weight, module.lora_B[d].weight,
                                                        weighted.bank.unit_scaling[0][d])
    plain.load_state_dict(state)
    plain.save_pretrained(tmp / "merged")
    return AutoModelForCausalLM.from_pretrained(tmp / "merged").eval()


def forward_pass(model, ids):
    import torch
    with torch.no_grad():
        model(input_ids=ids)


MERGE_BENCH = ("ties", "dare_ties", "dare_linear")  # linear is measured as `cat` and `fold`


def trial_costs(base: Path, adapters: dict[str, Path], ids, plain, repeats: int, density: float = 0.5) -> dict:
    """One loaded model per delta count; each way of applying weights is timed on it in turn. The evaluation
    pass is timed in quarters, each followed by the same quarter on the plain model, and the ratio is the sum
    over the quarters: pass times on a shared 2-core machine drift by 15-30% over minutes, and a quarter and
    its plain twin, a second or two apart, drift together."""

    w = WeightedDeltas(base, adapters, mode="cat")
    rng = random.Random(0)
    weights = lambda: {n: rng.uniform(0, 1) for n in w.names}
    # linear: the goals are on these two
    ways = [("cat", lambda: w.use_mode("cat"), 5, repeats), ("fold", lambda: w.use_mode("fold"), 3, repeats)]
    ways += [(m, lambda m=m: w.use_method(m, density), 1, 1) for m in MERGE_BENCH]
    quarters = ids.split(max(1, ids.shape[0] // 4))
    result = {}
    for name, use, apply_repeats, rounds in ways:
        use()
        first = timed(lambda: w.set_weights(weights()), repeats=1)  # ties: includes trimming each delta once
        apply = timed(lambda: w.set_weights(weights()), repeats=apply_repeats)
        forward_pass(w.model, quarters[0])  # warm-up: a search runs many trials in one mode
        trial_pass = plain_pass = 0.0
        for _ in range(rounds):
            for part in quarters:
                trial_pass += timed(lambda: forward_pass(w.model, part), 1) / rounds
                plain_pass += timed(lambda: forward_pass(plain, part), 1) / rounds
        result[name] = {"apply_seconds": apply, "first_apply_seconds": first, "pass_seconds": trial_pass,
                        "plain_pass_seconds": plain_pass, "trial_vs_plain": (apply + trial_pass) / plain_pass,
                        "merge_fraction": apply / trial_pass}
    best = min(("cat", "fold"), key=lambda m: result[m]["trial_vs_plain"])  # what search.apply: auto keeps
    result["linear"] = {**result[best], "picked": best}
    return result


def bench_merge(shape_name: str, repeats: int) -> dict:
    import torch

    shape = SHAPES[shape_name]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = build_model(tmp, shape)
        adapters16 = build_adapters(base, tmp / "adapters", 16)
        adapters4 = {k: adapters16[k] for k in list(adapters16)[:4]}
        ids = torch.randint(0, shape["vocab_size"], (16, 64), generator=torch.Generator().manual_seed(0))

        weighted = WeightedDeltas(base, adapters4, mode="cat")
        weights = {n: 0.3 + 0.1 * i for i, n in enumerate(weighted.names)}
        ours = timed(lambda: weighted.set_weights(weights), repeats=5)
        reloaded = {}
        reload = timed(lambda: reloaded.setdefault("m", reload_trial(weighted, weights, base, tmp)), repeats=1)
        plain = reloaded["m"]
        plain_pass = timed(lambda: forward_pass(plain, ids), repeats)
        weighted.set_weights(weights)
        with torch.no_grad():  # the in-place model and the reloaded merged model agree
            max_diff = (weighted.model(input_ids=ids[:2]).logits - plain(input_ids=ids[:2]).logits).abs().max().item()
        weighted = reloaded = None  # free the in-place model before the next part; the plain one stays, for the ratios
        costs = {n: trial_costs(base, a, ids, plain, repeats) for n, a in (("4", adapters4), ("16", adapters16))}
        plain = None
        size = sum(p.stat().st_size for p in tmp.rglob("*.safetensors") if "d" not in p.parent.name or
                   p.parent.name in adapters4)
        memory = {mode: search_process_rss(base, adapters4, mode) for mode in ("auto", "fold")}
    return {
        "shape": shape_name, "eval_batch": "16x64 tokens",
        "overhead_seconds_ours": ours, "overhead_seconds_reload": reload,
        "overhead_ratio": reload / max(ours, 1e-9),
        "trial_seconds_ours": ours + costs["4"]["cat"]["pass_seconds"], "trial_seconds_reload": reload + plain_pass,
        "plain_pass_seconds": plain_pass, "max_logit_diff_in_place_vs_reload": max_diff,
        "plain_pass_seconds_range": [min(c["plain_pass_seconds"] for m in costs.values() for c in m.values()),
                                     max(c["plain_pass_seconds"] for m in costs.values() for c in m.values())],
        "trial_vs_plain": {f"{n}_deltas": {mode: round(c["trial_vs_plain"], 3) for mode, c in modes.items()}
                           for n, modes in costs.items()},
        "merge_fraction": {f"{n}_deltas": {mode: round(c["merge_fraction"], 3) for mode, c in modes.items()}
                           for n, modes in costs.items()},
        "linear_picked": {f"{n}_deltas": modes["linear"]["picked"] for n, modes in costs.items()},
        "density": 0.5,
        "detail": costs,
        "search_memory": memory, "base_plus_4_adapters_mb": size / 2**20,
        "search_memory_ratio": {mode: m["model_mb"] / (size / 2**20) for mode, m in memory.items()},
    }


RSS_PROBE = """
import json, sys
import torch, transformers, peft  # the runtime first: its RSS (shared libraries, ~0.8 GB) is not the model's
import llamafactory.data  # the chat templates' code (~60 MB), imported by the first encoded row
from autollm_lf.config import EvaluationConfig
from autollm_lf.evaluate import ExactMatch
from autollm_lf.merge import WeightedDeltas
from autollm_lf.pipeline import release_tokenizer

def status(key):  # MB; VmHWM is this process's own peak (ru_maxrss of a child also counts the parent at fork)
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key + ":")) / 1024

runtime = status("VmRSS")
base, adapters, mode = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
if mode == "run":  # what `autollm search` holds on this run (argv[1]: its config): trials, and a gradient fit
    from autollm_lf.checks import load_config
    from autollm_lf.gradient import GradientOptimizer
    from autollm_lf.pipeline import Session
    import time
    cfg = load_config(base, None, sys.argv[4:])  # argv[4:]: overrides (search.memory=lean)
    session = Session(cfg)
    session.ready_for_trials()
    started = time.perf_counter()
    for i in range(3):
        session.score(cfg.run.read_best()["weights"], "validation")
    trial_seconds, trials = (time.perf_counter() - started) / 3, status("VmHWM")
    fit = cfg.search.optimizer == "gradient"
    started = time.perf_counter()
    if fit:  # one trial's Adam steps: a backward pass holds more than a trial
        GradientOptimizer(session.search_params, cfg.search.bounds, cfg.seed, session).suggest(0)
    gpu = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    print(json.dumps({"mode": session.weighted.mode, "runtime_mb": runtime, "trials_mb": trials - runtime,
                      "peak_mb": status("VmHWM"), "gradient_fit": fit, "cuda_peak_mb": gpu,
                      "trial_seconds": trial_seconds, "fit_seconds": time.perf_counter() - started}))
    sys.exit()
if mode == "tokenizer":  # the tokenizer alone: host memory a search holds whatever the model's size or device
    transformers.AutoTokenizer.from_pretrained(base)
    print(json.dumps({"mode": mode, "runtime_mb": runtime, "peak_mb": status("VmHWM"), "rss_mb": status("VmRSS")}))
    sys.exit()
w = WeightedDeltas(base, adapters, mode=mode)
rows = [{"prompt": "abcd" * (4 + i % 8), "response": "dcba" * (1 + i % 3)} for i in range(32)]
scorer = ExactMatch(w.model, w.tokenizer, "default", rows, EvaluationConfig(batch_size=16))
release_tokenizer(w, [scorer])  # as the search does: trials run on token ids
if mode == "auto":  # as the search stage does: time a trial each way it may take, keep the cheaper
    w.pick_mode(scorer.score, {n: 0.5 for n in adapters})
for i in range(3):  # trials
    w.set_weights({n: 0.1 * i for n in adapters})
    scorer.score()
print(json.dumps({"mode": w.mode, "runtime_mb": runtime, "peak_mb": status("VmHWM")}))
"""


def search_process_rss(base: Path, adapters: dict[str, Path], mode: str, *overrides: str) -> dict:
    """Peak RSS (MB) of a process that does what a search does (load once, pick the apply mode, trials with a
    teacher-forced evaluation), and the RSS of its runtime before any model was loaded."""
    out = subprocess.run([sys.executable, "-c", RSS_PROBE, str(base),
                          json.dumps({k: str(v) for k, v in adapters.items()}), mode, *overrides],
                         capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return {**result, "model_mb": result["peak_mb"] - result["runtime_mb"]}


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


    cfg = load_config(toy_cfg) if toy_cfg and toy_cfg.exists() else None
    if cfg is None or not cfg.run.best.exists():
        return {"skipped": "run `sh autollm.sh` first (needs the toy's trained deltas)"}
    session = Session(cfg)
    validation = load_split(cfg, "validation")
    rows = min(rows or len(validation), len(validation))
    subset = [validation[i] for i in sorted(random.Random(0).sample(range(len(validation)), rows))]
    scorer = make_evaluator(cfg, session.weighted.model, session.weighted.tokenizer, subset)
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


def quiet_search(search, session_like, params: list[str], seed: int, fp: str) -> tuple[dict, float]:
    """The real search loop on a session-like scorer, its log in a temporary folder and its output hidden: the
    best point and the seconds it took."""
    from types import SimpleNamespace
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            best = run_search(SimpleNamespace(out=Path(tmp), seed=seed, search=search), session_like, params, fp=fp)
        return best, time.perf_counter() - started


QUALITY_BUDGET = 11  # trials per search in `--only quality`: the Gemma example's 8 seed points and 3 fits

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
    from types import SimpleNamespace


    cfg = load_config(toy_cfg) if toy_cfg and toy_cfg.exists() else None
    if cfg is None or not cfg.run.best.exists():
        return {"skipped": "run `sh autollm.sh` first (needs the toy's trained deltas)"}
    session = Session(cfg)
    w = session.weighted
    if w.mode == "scaling":
        return {"skipped": "search.apply: scaling cannot switch to normalised merges; use auto, cat or fold"}
    validation = load_split(cfg, "validation")
    rows = min(rows or len(validation), len(validation))
    subset = [validation[i] for i in sorted(random.Random(0).sample(range(len(validation)), rows))]
    sub_scorer = make_evaluator(cfg, w.model, w.tokenizer, subset)
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
            session_like = SimpleNamespace(score=lambda weights, split: (w.set_weights(weights), sub_scorer.score())[1],
                                           weighted=w, scorer=lambda split: sub_scorer,
                                           cfg=SimpleNamespace(search=search))
            best, seconds = quiet_search(search, session_like, params, seed, fp="bench")
            runs.append({"seed": seed, "subset_validation": best["validation"], **scores(best["weights"], method),
                         "seconds": seconds, "weights": best["weights"]})
        results.append({"merge": method, "granularity": granularity, "optimizer": optimizer, "weights": len(params),
                        "runs": runs, **{f"{k}_mean": statistics.mean(r[k] for r in runs)
                                         for k in ("subset_validation", "validation", "test", "seconds")}})
    w.use_method(cfg.search.merge, cfg.search.density)
    w.use_granularity(cfg.search.granularity)
    return {"trials": trials, "seeds": seeds, "validation_subset_rows": len(subset), "yardsticks": yardsticks,
            "results": results}


def bench_model(cfg_path: Path | None, rounds: int = 3) -> dict:
    """On a finished run of a real model (`--model-run`, default the Gemma 3 270M example): what one trial costs
    there (apply + teacher-forced exact match over validation) with and without the fast path, the LM head over
    every position vs the scored ones only (`logits_to_keep`), `choice` (one pass, the prompt shared by its
    choices) vs a plain per-choice loop, and a search process's memory against base + adapters."""
    import torch

    cfg = load_config(cfg_path) if cfg_path and cfg_path.exists() else None
    if cfg is None or not cfg.run.best.exists():
        return {"skipped": f"run `autollm run {cfg_path}` first (needs its trained deltas)"}
    session = Session(cfg)
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


CEILING_SHARE = 0.8  # the merge-quality goal: on every chunk, this share of what that chunk's own delta scores


def gradient_ceiling(session, by_chunk, own: dict[str, float], trials: int, start_scores: dict[str, float]) -> dict:
    """The gradient oracle of bench_ceiling: Adam on every test row's teacher-forced loss, from the run's best
    weights (whose per-chunk test scores are `start_scores`), each point scored by ceiling_value on test."""
    from types import SimpleNamespace

    test = session.scorer("test")
    like = SimpleNamespace(weighted=session.weighted, cfg=session.cfg, scorer=lambda split: test)
    opt = GradientOptimizer(session.search_params, session.cfg.search.bounds, session.cfg.seed, like)
    opt.fit_rows = list(range(len(test.rows)))  # all of test: an oracle, not a search
    start = session.cfg.run.read_best()["weights"]
    opt.register(start, 0.0, own=False)  # the trajectory starts at the run's best point
    started, seen = time.perf_counter(), [start_scores]
    for number in range(1, trials + 1):
        seen.append(by_chunk(opt.suggest(number)))
    values = [ceiling_value(scores, own) for scores in seen]
    best = max(range(len(values)), key=values.__getitem__)
    return {"granularity": f"{session.cfg.search.granularity}, gradient", "weights": len(start),
            "trials": len(seen), "value": values[best], "by_chunk": seen[best], "start_value": values[0],
            "seconds": time.perf_counter() - started,
            "best_per_chunk_any_trial": {c: max(s[c] for s in seen) for c in own}}


def own_scores(session, by_chunk) -> tuple[dict[str, float], dict[str, str], list[str]]:
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


def ceiling_value(by_chunk: dict[str, float], own: dict[str, float], share: float = CEILING_SHARE) -> float:
    """Mean over chunks of how far the merge gets towards `share` of the chunk's own delta (1 = there or beyond):
    the largest value, len(own) / len(own) = 1, means every chunk meets the goal at once."""
    return statistics.mean(min(1.0, by_chunk[c] / (share * own[c])) if own[c] > 0 else 1.0 for c in own)


def bench_ceiling(cfg_path: Path | None, trials: int = 40, gradient_trials: int = 6, seed: int = 0) -> dict:
    """What the best weights could reach on the per-chunk goal, measured from above, by two oracles that tune on the
    TEST split itself (which no real search may see): the search loop (cmaes, `trials`, one weight per delta)
    maximising ceiling_value (every chunk towards 80% of its own delta's test score), and the gradient optimiser
    at the run's granularity fitted on all of test's reference answers, from the run's best weights
    (`gradient_trials` trials of its Adam steps; the best point by ceiling_value). If neither meets the goal on
    every chunk, a search tuned on validation is not likely to; train@all's ratios are shown beside them."""
    from types import SimpleNamespace

    cfg = load_config(cfg_path) if cfg_path and cfg_path.exists() else None
    if cfg is None or not cfg.run.best.exists():
        return {"skipped": f"run `autollm run {cfg_path}` first (needs its trained deltas)"}
    session = Session(cfg)
    w = session.weighted
    if w.mode == "scaling":
        return {"skipped": "search.apply: scaling cannot switch granularity; use auto, cat or fold"}
    by_chunk = lambda weights: session.score_by_chunk(weights, "test", "linear")[1]
    own, best_delta, no_test = own_scores(session, by_chunk)
    if not own:
        return {"skipped": f"no chunk of {cfg_path} has test rows (train_only sources, bad cases): nothing to reach"}
    yardsticks = {"auto_merge": by_chunk(cfg.run.read_best()["weights"])}
    if ALL_DELTA in w.names:
        yardsticks["train@all"] = by_chunk({ALL_DELTA: 1.0})
    w.use_method("linear")
    w.use_granularity("delta")
    params = [p for p in w.params if param_delta(p) in session.deltas]
    search = SearchConfig(bounds=cfg.search.bounds, init_points=3, n_iter=max(trials - 5 - len(params), 0),
                          optimizer="cmaes", granularity="delta", merge="linear")
    seen = {}  # point -> its per-chunk test scores (the search scores no point twice)

    def oracle(weights, split):
        seen[point_key(weights)] = scores = by_chunk(weights)
        return ceiling_value(scores, own)

    session_like = SimpleNamespace(score=oracle, weighted=w, cfg=SimpleNamespace(search=search))
    best, seconds = quiet_search(search, session_like, params, seed, fp="ceiling")
    results = [{"granularity": "delta", "weights": len(params), "trials": len(seen), "value": best["validation"],
                "by_chunk": seen[point_key(best["weights"])], "seconds": seconds,
                "best_per_chunk_any_trial": {c: max(s[c] for s in seen.values()) for c in own}}]
    w.use_method(cfg.search.merge, cfg.search.density)
    w.use_granularity(cfg.search.granularity)
    if MERGE_METHODS[cfg.search.merge].low_rank and gradient_trials:
        results.append(gradient_ceiling(session, by_chunk, own, gradient_trials, yardsticks["auto_merge"]))
    return {"share": CEILING_SHARE, "own_delta": own, "own_delta_name": best_delta, "no_test_rows": no_test,
            "rows_per_chunk": cfg.data.test_per_chunk,
            "yardsticks": {k: {"by_chunk": v, "value": ceiling_value(v, own)} for k, v in yardsticks.items()},
            "results": results}


def bench_scale(toy_cfg: Path | None, nodes: int = 2, max_deltas: int | None = None) -> dict:
    """The toy's deltas trained as Ray tasks on a local Ray cluster of 1-CPU nodes: first on one node (one after
    the other: each delta's time, and the serial wall time), then on `nodes` nodes at once; the scheduler's wall
    time vs the ideal serial / nodes. Every training gets one thread, as one CPU slot of a node."""
    import shutil

    import ray
    from ray.cluster_utils import Cluster

    cfg = load_config(toy_cfg) if toy_cfg and toy_cfg.exists() else None
    if cfg is None or not cfg.run.manifest.exists():
        return {"skipped": "run `sh autollm.sh` first (needs the toy's prepared data)"}
    specs = delta_specs(cfg, read_json(cfg.run.manifest)["shapes"])[:max_deltas]
    walls, per_delta = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
        try:
            ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
            for n in (1, nodes):
                while len(ray.nodes()) < n:
                    cluster.add_node(num_cpus=1)
                cluster.wait_for_nodes()
                run_cfg = cfg.model_copy(update={"run_dir": Path(tmp) / f"nodes{n}",
                                                 "cluster": ClusterConfig(address=cluster.address)})
                shutil.copytree(cfg.run.data, run_cfg.run.data)
                with contextlib.redirect_stdout(io.StringIO()):
                    started = time.perf_counter()
                    train_specs(run_cfg, specs, force=True)
                    walls[n] = time.perf_counter() - started
                per_delta[n] = {s.name: read_json(run_cfg.run.delta(s.name) / DONE_MARKER)["seconds"]
                                for s in specs}
        finally:
            ray.shutdown()
            cluster.shutdown()
    ideal = walls[1] / nodes
    return {"deltas": len(specs), "nodes": nodes, "one_delta_seconds": per_delta[1],
            "one_delta_seconds_parallel": per_delta[nodes], "serial_wall_seconds": walls[1],
            "parallel_wall_seconds": walls[nodes], "ideal_seconds": ideal, "efficiency": ideal / walls[nodes]}


def scale_lines(r: dict) -> list[str]:
    if "skipped" in r:
        return ["scale: " + r["skipped"]]
    one = r["one_delta_seconds"]
    return [f"scale: {r['deltas']} deltas as Ray tasks, 1-CPU nodes of a local Ray cluster: one delta "
            f"{min(one.values()):.0f}-{max(one.values()):.0f} s; one node {r['serial_wall_seconds']:.0f} s, "
            f"{r['nodes']} nodes {r['parallel_wall_seconds']:.0f} s vs ideal {r['ideal_seconds']:.0f} s "
            f"(efficiency {r['efficiency']:.0%})"]


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


def ceiling_lines(r: dict) -> list[str]:
    if "skipped" in r:
        return ["ceiling: " + r["skipped"]]
    chunks = list(r["own_delta"])
    row = lambda name, scores: f"  {name:<34}" + "".join(f"{scores[c]:>{max(8, len(c) + 2)}.2f}" for c in chunks)
    lines = [f"ceiling (weights searched on TEST itself, {r['rows_per_chunk']} rows per chunk; goal: every chunk "
             f">= {r['share']:.0%} of its own delta):",
             f"  {'':<34}" + "".join(f"{c:>{max(8, len(c) + 2)}}" for c in chunks),
             row("own delta", r["own_delta"]),
             row(f"{r['share']:.0%} of it", {c: r["share"] * v for c, v in r["own_delta"].items()})]
    named = r.get("own_delta_name", {})
    lines += [f"  (own delta: the best of the chunk's deltas alone: {', '.join(named.values())})"] if named else []
    lines += [f"  (no test rows, not scored: {', '.join(r['no_test_rows'])})"] if r.get("no_test_rows") else []
    lines += [row(f"{k} ({y['value']:.3f})", y["by_chunk"]) for k, y in r["yardsticks"].items()]
    for x in r["results"]:
        lines.append(row(f"oracle {x['granularity']} ({x['value']:.3f})", x["by_chunk"]))
        lines.append(row("  best chunk by chunk", x["best_per_chunk_any_trial"]))
        lines.append(f"    ({x['weights']} weights, {x['trials']} trials, {x['seconds']:.0f}s)")
    return lines


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


def run_bench(as_json: bool, quick: bool, toy_cfg: Path | None, parts: list[str], rounds: int = 5,
              model_cfg: Path | None = None) -> dict:
    """Run the named parts (cli.BENCH_PARTS: merge, exact_match, bo, search, model, ceiling, scale)."""
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
        result["quality"] = bench_quality(model_cfg, budget=QUALITY_BUDGET, seeds=1 if quick else 3,
                                          big_budget=None if quick else 3 * QUALITY_BUDGET)
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


def merge_lines(m: dict) -> list[str]:
    lines = [f"trial overhead: in place {m['overhead_seconds_ours']:.4f}s "
             f"vs reload {m['overhead_seconds_reload']:.2f}s = {m['overhead_ratio']:.0f}x",
             f"whole trial:    in place {m['trial_seconds_ours']:.2f}s vs reload {m['trial_seconds_reload']:.2f}s "
             f"(plain pass {m['plain_pass_seconds']:.2f}s; the same plain pass took "
             f"{m['plain_pass_seconds_range'][0]:.2f}-{m['plain_pass_seconds_range'][1]:.2f}s over this run)",
             f"trial / plain pass (merge fraction = apply / pass), ties and dare at density {m['density']}:"]
    for n, modes in m["trial_vs_plain"].items():
        lines.append(f"  {n:<10} " + ", ".join(f"{k} {v:.3f}x ({m['merge_fraction'][n][k]:.2f})"
                                               for k, v in modes.items() if k != "linear")
                     + f"; linear = {m['linear_picked'][n]}")
    for mode, mem in m["search_memory"].items():
        lines.append(f"search memory (apply {mode}, picked {mem['mode']}): peak RSS {mem['peak_mb']:.0f} MB - runtime "
                     f"{mem['runtime_mb']:.0f} MB = {mem['model_mb']:.0f} MB = "
                     f"{m['search_memory_ratio'][mode]:.2f}x base + 4 adapters ({m['base_plus_4_adapters_mb']:.0f} MB "
                     f"on disk)")
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
