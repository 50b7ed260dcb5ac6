"""The seams between the search and what it drives, as Protocols (like cluster.Job): what the search needs of a
session, what the gradient optimiser needs besides, and what every optimiser offers the loop. session.Session and
bench's ScoredMerge are sessions; optimizers.OPTIMIZERS holds the optimisers."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Mapping, Protocol, Sequence

if TYPE_CHECKING:
    from ...config import RunConfig
    from ...evaluate import Evaluator
    from ...merge import WeightedDeltas


class SearchSession(Protocol):
    """What loop.run_search needs: the score of a point on a split (it only ever asks for validation)."""

    def score(self, weights: Mapping[str, float], split: str) -> float: ...

    def scored_rows(self, weights: Mapping[str, float], split: str,
                    method: str | None = None) -> tuple[float, list[float]]: ...

    def validation_rows(self) -> int:
        """How many validation rows the search's scores rest on (holdout.py splits them); 0 for an oracle."""
        ...


class FitSession(SearchSession, Protocol):
    """What the gradient optimiser needs besides: the loaded merge it differentiates, the split's evaluator (its
    encoded rows) and the config (search.merge, evaluation.logits_budget, search.memory)."""
    cfg: RunConfig
    weighted: WeightedDeltas

    def scorer(self, split: str) -> Evaluator: ...


@dataclass(frozen=True)
class Setting:
    """What an optimiser is asked to work with: the merge method (its registry entry), the metric (its evaluator
    class) and whether an evaluation.objective combines several scores."""
    merge: str
    merge_spec: object      # merge.MergeMethod
    metric: str
    metric_cls: type        # an entry of evaluate.metrics.METRICS
    objective: bool


@dataclass(frozen=True)
class Need:
    """One thing an optimiser needs of its Setting, declared once on the optimiser (`needs`): `validate`, the
    optimiser itself and the quality bench all read it. `says`: the one-line problem, formatted with the Setting's
    fields, when it does not hold."""
    holds: Callable[[Setting], bool]
    says: str


def unmet_needs(optimizer: type, setting: Setting) -> list[str]:
    """The problems of running `optimizer` (an OPTIMIZERS entry) in `setting`: one line per need that fails."""
    return [need.says.format(**vars(setting)) for need in getattr(optimizer, "needs", ()) if not need.holds(setting)]


class Optimizer(Protocol):
    """An entry of optimizers.OPTIMIZERS, built as cls(params, bounds, seed, session). `parallel`: True when it proposes
    several points at once (a pool scores them together); False for one trajectory, whose points it scores itself
    (`evaluate`, which then returns extra fields for the trial log). `needs`: what it needs of the merge, the metric
    and the objective (Need), checked before anything trains."""
    parallel: bool
    needs: tuple[Need, ...]

    def suggest(self, number: int, pending: Sequence[dict] = ()) -> dict | None: ...

    def register(self, weights: dict, score: float, own: bool) -> None: ...

    def replay(self, trial: dict, own: bool) -> None: ...

    def evaluate(self, weights: dict) -> tuple[float, dict]: ...
