"""Stage 3b: train@auto_mix, the AutoLLM README's "mix the data according to the delta weights".

One more LoRA adapter, trained by LLaMA-Factory on the SFT chunks interleaved (`mix_strategy: interleave_under`)
with `interleave_probs` proportional to the search's best weights. It is a baseline for the report, next to
auto_merge: does retraining on the mix beat adding the deltas? Only SFT chunks take part, as in train@all:
one LLaMA-Factory run trains one stage, so preference/KTO/PT chunks cannot be interleaved with them.
"""
from __future__ import annotations

from .errors import UserError
from .io import read_json

MIX_DELTA = "auto_mix"


def mix_probs(weights: dict[str, float], floor: float) -> dict[str, float]:
    """Weights -> probabilities: negatives count as 0, each share clipped at `floor`, then normalised.

    All-zero weights mix uniformly (the search found nothing to prefer)."""
    clipped = {k: max(w, 0.0) for k, w in weights.items()}
    total = sum(clipped.values())
    shares = {k: (w / total if total > 0 else 1 / len(clipped)) for k, w in clipped.items()}
    floored = {k: max(p, floor) for k, p in shares.items()}
    norm = sum(floored.values())
    return {k: p / norm for k, p in floored.items()}


def chunk_weights(best_weights: dict[str, float], shapes: dict[str, str]) -> dict[str, float]:
    """The best weight of each SFT chunk's `<chunk>-sft` delta (chunks without one are left out)."""
    from .search import per_delta
    best_weights = per_delta(best_weights)  # finer granularity: each delta's mean weight
    return {c: best_weights[f"{c}-sft"] for c, shape in shapes.items() if shape == "sft" and f"{c}-sft" in best_weights}


def mix_spec(cfg, shapes: dict[str, str], best_weights: dict[str, float]):
    from .train import DeltaSpec

    weights = chunk_weights(best_weights, shapes)
    if len(weights) < 2:
        return None
    probs = mix_probs(weights, cfg.train.auto_mix_floor)
    args = {**cfg.train.method_args.get("sft", {}), "mix_strategy": "interleave_under",
            "interleave_probs": ",".join(f"{p:.10f}" for p in probs.values())}  # 4 digits: sum off by 1e-4, refused by numpy
    return DeltaSpec(MIX_DELTA, list(probs), "sft", args), probs


def train_auto_mix(session) -> None:
    from .train import model_fingerprint, train_one

    cfg = session.cfg
    if not cfg.train.auto_mix:
        return
    best = read_json(cfg.out / "search" / "best.json")
    if best is None:
        raise UserError(f"{cfg.out / 'search' / 'best.json'} missing; run `autollm search` first")
    planned = mix_spec(cfg, session.shapes, best["weights"])
    if planned is None:
        print("mix: fewer than two SFT chunks with a delta; no train@auto_mix")
        return
    spec, probs = planned
    print("mix: interleave_probs " + ", ".join(f"{c} {p:.3f}" for c, p in probs.items()))
    train_one(cfg, spec, model_fingerprint(cfg.base_model.path), force="mix" in session.force)
