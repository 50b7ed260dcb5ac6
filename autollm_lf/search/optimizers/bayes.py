"""search.optimizer: bayes, bayes_opt's Gaussian process with expected improvement."""
from __future__ import annotations

import copy

from ..holdout import seen_score
from .pooled import PooledOptimizer, quiet
from .protocol import SearchSession


class BayesOptimizer(PooledOptimizer):
    """bayes_opt's Gaussian process with expected improvement, fed every trial (seeds included)."""

    def __init__(self, params: list[str], bounds, seed: int, session: SearchSession):
        from bayes_opt import BayesianOptimization
        self.seed = seed
        self.opt = BayesianOptimization(f=None, pbounds={p: tuple(bounds) for p in params}, random_state=seed,
                                        verbose=0, allow_duplicate_points=True)

    def suggest(self, number: int, pending: list[dict] = ()) -> dict:
        """The next point; points still being scored (a parallel batch) count as scoring the worst seen so far
        (constant liar), on a copy of the GP, so the batch spreads out."""
        opt = self.opt
        if pending:
            opt = copy.deepcopy(self.opt)
            lie = float(min(opt.space.target))
            with quiet():
                for weights in pending:
                    opt.register(params=weights, target=lie)
        opt._random_state.seed(self.seed * 100_003 + number)  # same suggestion after a restart
        with quiet():
            return {p: float(v) for p, v in opt.suggest().items()}

    def register(self, weights: dict, score: float, own: bool) -> None:
        with quiet():
            self.opt.register(params=weights, target=score)

    def replay(self, trial: dict, own: bool) -> None:
        self.register(trial["weights"], seen_score(trial), own)
