"""search.optimizer: random, uniform random points (the baseline every optimiser must beat); random_point also
draws the loop's replacement for a repeated suggestion."""
from __future__ import annotations

import numpy as np

from .pooled import PooledOptimizer
from .protocol import SearchSession


def random_point(params: list[str], bounds, seed) -> dict:
    lo, hi = bounds
    return {p: float(x) for p, x in zip(params, np.random.default_rng(seed).uniform(lo, hi, len(params)))}


class RandomOptimizer(PooledOptimizer):
    """Uniform random points (the baseline every optimiser must beat)."""

    def __init__(self, params: list[str], bounds, seed: int, session: SearchSession):
        self.params, self.bounds, self.seed = params, bounds, seed

    def suggest(self, number: int, pending: list[dict] = ()) -> dict:
        return random_point(self.params, self.bounds, [self.seed, number, 7])

    def register(self, weights: dict, score: float, own: bool) -> None:
        pass

    def replay(self, trial: dict, own: bool) -> None:
        pass
