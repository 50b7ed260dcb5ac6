"""A loaded merge scored by evaluators it is given (or by a function of the weights): a session (a
optimizers.protocol.FitSession) with no run behind it, for the bench's searches on a subset of rows and its oracles
on test."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Mapping

if TYPE_CHECKING:
    from ..config import RunConfig
    from ..evaluate import Evaluator
    from ..merge import WeightedDeltas


@dataclass
class ScoredMerge:
    cfg: RunConfig                     # the run's config, usually with the search section the bench tries
    weighted: WeightedDeltas           # the run's loaded deltas (a session.Session's)
    scorers: Mapping[str, Evaluator]   # by split
    objective: Callable[[Mapping[str, float]], float] | None = None  # an oracle: scores a point itself

    def scorer(self, split: str) -> Evaluator:
        return self.scorers[split]

    def score(self, weights: Mapping[str, float], split: str) -> float:
        if self.objective is not None:
            return self.objective(weights)
        self.weighted.set_weights(weights)
        return self.scorers[split].score()

    def validation_rows(self) -> int:
        """An oracle scores its points itself: no validation rows to split."""
        return 0 if self.objective is not None else len(self.scorers["validation"].rows)

    def scored_rows(self, weights: Mapping[str, float], split: str,
                    method: str | None = None) -> tuple[float, list[float]]:
        self.weighted.set_weights(weights, method)
        scores = self.scorers[split].row_scores()
        return sum(scores) / max(len(scores), 1), scores
