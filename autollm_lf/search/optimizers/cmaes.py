"""search.optimizer: cmaes, CMA-ES (the `cma` package, as mergekit-evolve)."""
from __future__ import annotations

import numpy as np

from ..holdout import seen_score
from .pooled import PooledOptimizer, quiet
from .protocol import SearchSession


class CmaesOptimizer(PooledOptimizer):
    """CMA-ES (the `cma` package, as mergekit-evolve), started at the best point registered before its first
    suggestion, step 0.3 of the bounds' width, bounded. Generation g is asked under numpy seed (seed, g), so a
    replay asks the same populations; a replayed own trial is told its logged score."""

    def __init__(self, params: list[str], bounds, seed: int, session: SearchSession):
        self.params, self.bounds, self.seed = params, tuple(bounds), seed
        self.es, self.best, self.generation = None, None, 0
        self.queue, self.asked, self.told_x, self.told_y = [], [], [], []

    def suggest(self, number: int, pending: list[dict] = ()) -> dict | None:
        """The next point of this generation; None while the generation is asked out but not yet told."""
        import cma
        lo, hi = self.bounds
        if not self.queue and pending:
            return None
        if not self.queue:
            np.random.seed((self.seed * 7919 + self.generation) % 2**32)
            if self.es is None:
                x0 = np.clip(self.best[0] if self.best else np.full(len(self.params), (lo + hi) / 2), lo, hi)
                with quiet():
                    self.es = cma.CMAEvolutionStrategy(list(x0), 0.3 * (hi - lo), {
                        "bounds": [lo, hi], "seed": self.seed + 1, "verbose": -9, "verb_log": 0, "verb_disp": 0})
            with quiet():
                self.asked = self.es.ask()
            self.queue, self.told_x, self.told_y = list(self.asked), [], []
            self.generation += 1
        x = np.clip(self.queue.pop(0), lo, hi)
        return {p: float(v) for p, v in zip(self.params, x)}

    def register(self, weights: dict, score: float, own: bool) -> None:
        x = np.array([weights[p] for p in self.params])
        if self.best is None or score > self.best[1]:
            self.best = (x, score)
        if not own or self.es is None:
            return
        self.told_x.append(x)
        self.told_y.append(-score)  # cma minimises
        if len(self.told_y) == len(self.asked):
            with quiet():
                self.es.tell(self.told_x, self.told_y)

    def replay(self, trial: dict, own: bool) -> None:
        if own:
            self.suggest(trial["trial"])  # advance the same asks; the logged point (maybe a replacement) is told
        self.register(trial["weights"], seen_score(trial), own)
