"""The optimisers' registry: search.optimizer names one. An optimiser (protocol.Optimizer): suggest(trial number,
pending points) -> weights; register(weights, score, own) with the trial's fit score (holdout.py: the holdout rows are
never shown to an optimiser); replay(logged trial). `parallel = False`: one point at a time (each from the one
before). Each declares what it needs of the merge method, metric and objective (`needs`, protocol.Need), read by
optimizer_problems for validate, the search and the bench.

Parts: protocol.py (the Protocols and Need), pooled.py, bayes.py, cmaes.py, random_search.py, gradient.py.
"""
from __future__ import annotations

from typing import Callable

from .bayes import BayesOptimizer
from .cmaes import CmaesOptimizer
from .gradient import GradientOptimizer
from .protocol import Optimizer, Setting, unmet_needs
from .random_search import RandomOptimizer

OPTIMIZERS: dict[str, Callable[..., Optimizer]] = {
    "bayes": BayesOptimizer, "cmaes": CmaesOptimizer, "random": RandomOptimizer, "gradient": GradientOptimizer}


def optimizer_problems(optimizer: str, merge: str, metric: str, objective: bool) -> list[str]:
    """What stops `optimizer` (auto: either of its choices) from working with this merge method, metric and
    objective on/off, as each optimiser declares it (`needs`); names not in their registries are left to the
    config check that reports unknown names."""
    from ...evaluate.metrics import METRICS
    from ...merge import MERGE_METHODS, merge_candidates
    merges = [m for m in merge_candidates(merge) if m in MERGE_METHODS]  # search.merge: auto, each candidate
    if not merges or metric not in METRICS:
        return []
    names = ["bayes", "cmaes"] if optimizer == "auto" else [optimizer]
    settings = [Setting(m, MERGE_METHODS[m], metric, METRICS[metric], objective) for m in merges]
    return list(dict.fromkeys(p for name in names if name in OPTIMIZERS for setting in settings
                              for p in unmet_needs(OPTIMIZERS[name], setting)))
