"""`python -m autollm_lf.bench.probe BASE ADAPTERS_JSON MODE [OVERRIDES...]`: a process that does what a search does
and prints its memory as one JSON line (cost.search_process_rss runs it). A process of its own, so that its peak RSS
is the search's alone: VmHWM is this process's own peak (ru_maxrss of a child also counts the parent at fork).

MODE `run`: BASE is a run's config; load its session, score three trials, and one gradient fit if the run's
optimiser is gradient. `tokenizer`: load BASE's tokenizer alone. Otherwise an apply mode (`auto`, `cat`, `fold`):
load BASE with ADAPTERS, pick the mode as the search stage does, three trials."""
import json
import sys
import time

import llamafactory.data  # noqa: F401 (the chat templates' code, ~60 MB, imported by the first encoded row)
import peft  # noqa: F401
import torch  # the runtime first: its RSS (shared libraries, ~0.8 GB) is not the model's
import transformers

from ..checks import load_config
from ..config import EvaluationConfig
from ..evaluate import ExactMatch
from ..merge import WeightedDeltas
from ..search.optimizers.gradient import GradientOptimizer
from ..session import Session, release_tokenizer


def status(key: str) -> float:
    """MB of /proc/self/status's `key` line (VmRSS now, VmHWM the peak)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":")) / 1024


def probe_run(config: str, overrides: list[str], runtime: float) -> dict:
    """What `autollm search` holds on this run: trials, and a gradient fit."""
    cfg = load_config(config, None, overrides)  # overrides: search.memory=lean
    session = Session(cfg)
    cfg = session.base_cfg  # search.merge: auto as the run resolved it
    session.ready_for_trials()
    best, scorer = cfg.run.read_best()["weights"], session.scorer("validation")
    started = time.perf_counter()
    for _ in range(3):  # a trial: set the weights, score (not session.score, which scores a point only once)
        session.weighted.set_weights(best)
        scorer.score()
    trial_seconds, trials = (time.perf_counter() - started) / 3, status("VmHWM")
    fit = cfg.search.optimizer == "gradient"
    started = time.perf_counter()
    if fit:  # one trial's Adam steps: a backward pass holds more than a trial
        GradientOptimizer(session.search_params, cfg.search.bounds, cfg.seed, session).suggest(0)
    gpu = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    return {"mode": session.weighted.mode, "runtime_mb": runtime, "trials_mb": trials - runtime,
            "peak_mb": status("VmHWM"), "gradient_fit": fit, "cuda_peak_mb": gpu,
            "trial_seconds": trial_seconds, "fit_seconds": time.perf_counter() - started}


def probe_mode(base: str, adapters: dict, mode: str, runtime: float) -> dict:
    """Load once, pick the apply mode, three trials with a teacher-forced evaluation."""
    w = WeightedDeltas(base, adapters, mode=mode)
    rows = [{"prompt": "abcd" * (4 + i % 8), "response": "dcba" * (1 + i % 3)} for i in range(32)]
    scorer = ExactMatch(w.model, w.tokenizer, "default", rows, EvaluationConfig(batch_size=16))
    release_tokenizer(w, [scorer])  # as the search does: trials run on token ids
    if mode == "auto":  # as the search stage does: time a trial each way it may take, keep the cheaper
        w.pick_mode(scorer.score, {n: 0.5 for n in adapters})
    for i in range(3):
        w.set_weights({n: 0.1 * i for n in adapters})
        scorer.score()
    return {"mode": w.mode, "runtime_mb": runtime, "peak_mb": status("VmHWM")}


def main(argv: list[str]) -> dict:
    runtime = status("VmRSS")
    base, adapters, mode = argv[0], json.loads(argv[1]), argv[2]
    if mode == "run":
        return probe_run(base, argv[3:], runtime)
    if mode == "tokenizer":  # the tokenizer alone: host memory a search holds whatever the model's size or device
        transformers.AutoTokenizer.from_pretrained(base)
        return {"mode": mode, "runtime_mb": runtime, "peak_mb": status("VmHWM"), "rss_mb": status("VmRSS")}
    return probe_mode(base, adapters, mode, runtime)


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])))
