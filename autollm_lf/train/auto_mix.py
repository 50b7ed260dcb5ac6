"""Stage 3b: train@auto_mix, the AutoLLM README's "mix the data according to the delta weights".

One more LoRA adapter, trained by LLaMA-Factory on the SFT chunks interleaved (`mix_strategy: interleave_under`)
with `interleave_probs` proportional to the search's best weights. It is a baseline for the report, next to
auto_merge: does retraining on the mix beat adding the deltas? Only SFT chunks take part, as in train@all:
one LLaMA-Factory run trains one stage, so preference/KTO/PT chunks cannot be interleaved with them.
"""
from __future__ import annotations

from ..granularity import per_delta
from ..log import get_logger
from ..paths import MIX_DELTA
from .deltas import DeltaSpec, delta_specs, train_one

logger = get_logger(__name__)


def mix_probs(weights: dict[str, float], floor: float) -> dict[str, float]:
    """Weights -> probabilities: negatives count as 0, each share clipped at `floor`, then normalised.

    All-zero weights mix uniformly (the search found nothing to prefer)."""
    clipped = {k: max(w, 0.0) for k, w in weights.items()}
    total = sum(clipped.values())
    shares = {k: (w / total if total > 0 else 1 / len(clipped)) for k, w in clipped.items()}
    floored = {k: max(p, floor) for k, p in shares.items()}
    norm = sum(floored.values())
    return {k: p / norm for k, p in floored.items()}


def chunk_weights(best_weights: dict[str, float], specs: list[DeltaSpec]) -> dict[str, float]:
    """The best weight of each chunk's SFT delta (chunks without one are left out); with a finer granularity,
    each delta's mean weight."""
    best_weights = per_delta(best_weights)
    return {s.chunk: best_weights[s.name] for s in specs if s.method == "sft" and s.chunk and s.name in best_weights}


def mix_spec(cfg, shapes: dict[str, str], best_weights: dict[str, float]):
    weights = chunk_weights(best_weights, delta_specs(cfg, shapes))
    if len(weights) < 2:
        return None
    probs = mix_probs(weights, cfg.train.auto_mix_floor)
    args = {**cfg.train.method_args.get("sft", {}), "mix_strategy": "interleave_under",
            # 4 digits: sum off by 1e-4, refused by numpy
            "interleave_probs": ",".join(f"{p:.10f}" for p in probs.values())}
    return DeltaSpec(MIX_DELTA, list(probs), "sft", args), probs


def train_auto_mix(session, force: bool = False) -> None:
    """session: the run's session (session.Session, a stage above this one): its cfg and its chunks' shapes."""
    cfg = session.cfg
    if not cfg.train.auto_mix:
        return
    best = cfg.run.read_best()
    planned = mix_spec(cfg, session.shapes, best["weights"])
    if planned is None:
        logger.info("mix: fewer than two SFT chunks with a delta; no train@auto_mix")
        return
    spec, probs = planned
    logger.info("mix: interleave_probs " + ", ".join(f"{c} {p:.3f}" for c, p in probs.items()))
    train_one(cfg, spec, force=force)
