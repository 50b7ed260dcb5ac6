"""`evaluation.objective`: what the search maximises when one metric on all rows is not the whole story.

A weighted sum of parts, each a metric on some chunks' rows (e.g. exact match on the task chunks + 0.5 x
choice accuracy on a benchmark file given as a fixed evaluation set), and constraints ("lose at most 0.01
on chunk X", measured against the raw model): a part with `max_drop` costs PENALTY per unit it falls below
raw - max_drop. Every part is an ordinary evaluator over its rows, so each keeps its own fast path.
"""
from __future__ import annotations

from typing import Callable

from ..errors import UserError
from ..rows import Row
from .metrics import METRICS

PENALTY = 10.0  # per unit below a constraint's floor: larger than any weighted sum of [0, 1] metrics gains


def part_name(part, default_metric: str) -> str:
    metric = part.metric or default_metric
    return f"{metric}@{','.join(part.chunks)}" if part.chunks else metric


class Objective:
    """Looks like an evaluator to the search (`score()`); the report also reads `part_scores()`. Its
    `row_scores()` and `rows` are the primary metric's (evaluation.metric on every row): the per-chunk tables
    and the bad cases."""

    def __init__(self, cfg, model, tokenizer, rows: list[Row], raw: Callable[["Objective"], dict[str, float]]):
        """`raw(objective)` gives the raw model's score of each constraint part (the session measures it once
        with every weight 0; a reloaded adapter reads what the search stage recorded)."""
        ev = cfg.evaluation
        make = lambda metric, subset: METRICS[metric](model, tokenizer, cfg.base_model.template, subset, ev)
        present = sorted({r["chunk"] for r in rows})
        self.parts = []
        for i, part in enumerate(ev.objective):
            unknown = sorted(set(part.chunks) - set(present))
            if unknown:
                raise UserError(f"evaluation.objective.{i}.chunks: "
                                f"no held-out rows of {', '.join(map(repr, unknown))}; "
                                f"the held-out rows' chunks are {', '.join(present)}")
            subset = [r for r in rows if not part.chunks or r["chunk"] in part.chunks]
            self.parts.append((part_name(part, ev.metric), part, make(part.metric or ev.metric, subset)))
        self._primary, self._make_primary = None, lambda: make(ev.metric, rows)
        self.rows = rows
        self.raw = raw(self) if self.constraints() else {}

    @property
    def primary(self):
        if self._primary is None:
            self._primary = self._make_primary()
        return self._primary

    @property
    def model(self):
        return self.primary.model

    @property
    def tokenizer(self):
        return self.primary.tokenizer

    @property
    def stats(self) -> dict:
        return self.primary.stats

    def constraints(self) -> list[str]:
        return [name for name, part, _ in self.parts if part.max_drop is not None]

    def constraint_scores(self) -> dict[str, float]:
        return {name: evaluator.score() for name, part, evaluator in self.parts if part.max_drop is not None}

    def part_scores(self) -> dict[str, float]:
        return {name: evaluator.score() for name, _, evaluator in self.parts}

    def score(self) -> float:
        return self.total(self.part_scores())

    def total(self, scores: dict[str, float]) -> float:
        """The objective from its parts' scores (part_scores): weighted, less the penalty of each constraint broken."""
        total = 0.0
        for name, part, _ in self.parts:
            total += part.weight * scores[name]
            if part.max_drop is not None:
                total -= PENALTY * max(0.0, self.raw[name] - part.max_drop - scores[name])
        return total

    def row_scores(self) -> list[float]:
        return self.primary.row_scores()
