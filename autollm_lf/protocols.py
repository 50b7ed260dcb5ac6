"""The seams between the search and what it drives, as Protocols (like cluster.Job): what the search needs of a
session, what the gradient optimiser needs besides, and what every optimiser offers the loop. session.Session and
bench's ScoredMerge are sessions; search.OPTIMIZERS holds the optimisers."""
from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Protocol, Sequence

if TYPE_CHECKING:
    from .config import RunConfig
    from .evaluate import Evaluator
    from .merge import WeightedDeltas


class SearchSession(Protocol):
    """What search.run_search needs: the score of a point on a split (it only ever asks for validation)."""

    def score(self, weights: Mapping[str, float], split: str) -> float: ...


class FitSession(SearchSession, Protocol):
    """What the gradient optimiser needs besides: the loaded merge it differentiates, the split's evaluator (its
    encoded rows) and the config (search.merge, evaluation.logits_budget, search.memory)."""
    cfg: RunConfig
    weighted: WeightedDeltas

    def scorer(self, split: str) -> Evaluator: ...

    def scored_rows(self, weights: Mapping[str, float], split: str,
                    method: str | None = None) -> tuple[float, list[float]]: ...


class Optimizer(Protocol):
    """An entry of search.OPTIMIZERS, built as cls(params, bounds, seed, session). `parallel`: True when it proposes
    several points at once (a pool scores them together); False for one trajectory, whose points it scores itself
    (`evaluate`, which then returns extra fields for the trial log)."""
    parallel: bool

    def suggest(self, number: int, pending: Sequence[dict] = ()) -> dict | None: ...

    def register(self, weights: dict, score: float, own: bool) -> None: ...

    def replay(self, trial: dict, own: bool) -> None: ...

    def evaluate(self, weights: dict) -> tuple[float, dict]: ...
