"""Choices made on rows no fit saw: validation split once (by the run's seed) into the *fit* rows, whose scores the
optimiser sees (and the gradient fits its loss on), and the *holdout* rows, on which the search picks the trial it
returns. A trial is logged with all three scores: `validation` (every row), `fit` and `holdout`.

`search.select: all` picks on every validation row, as before the split. The split falls back to `all`, saying so,
where it cannot hold: an evaluation.objective (its constraints are not a mean over rows) or too few rows to halve.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

FIT_FRACTION = 0.5  # of the validation rows: the fit's; the rest is the holdout no fit sees
MIN_HOLDOUT_ROWS = 2


@dataclass(frozen=True)
class Halves:
    """The validation rows the optimiser sees (`fit`) and those the choice is made on (`holdout`); `select` says
    which rule chose (`holdout`, or `all` with `why`)."""
    fit: list[int]
    holdout: list[int]
    select: str
    why: str = ""
    rows: int = field(default=0)

    def scores(self, overall: float, rows: list[float]) -> dict[str, float]:
        """A trial's three scores from its overall validation score and its per-row scores."""
        if self.select == "all":
            return {"validation": overall, "fit": overall, "holdout": overall}
        mean = lambda index: float(np.mean([rows[i] for i in index]))
        return {"validation": overall, "fit": mean(self.fit), "holdout": mean(self.holdout)}

    def line(self) -> str:
        """One line for the log and the report: on which rows the returned trial was chosen."""
        if self.select == "all":
            return f"the returned trial is chosen on all {self.rows} validation rows ({self.why})"
        return (f"the returned trial is chosen on {len(self.holdout)} held-out validation rows that no fit and no "
                f"optimiser saw; the optimiser sees the other {len(self.fit)}")


def validation_halves(rows: int, seed: int, select: str = "holdout", objective: bool = False) -> Halves:
    """The split of `rows` validation rows (the gradient's since it had one: a permutation by `seed`, the first
    FIT_FRACTION fit)."""
    everything = list(range(rows))
    if select == "all":
        return Halves(everything, everything, "all", "search.select: all", rows)
    if objective:
        return Halves(everything, everything, "all", "evaluation.objective: its parts and constraints are not a "
                                                     "mean over rows, so they are not split", rows)
    order = np.random.default_rng(seed).permutation(rows)
    cut = int(rows * FIT_FRACTION)
    fit, holdout = sorted(int(i) for i in order[:cut]), sorted(int(i) for i in order[cut:])
    if min(len(fit), len(holdout)) < MIN_HOLDOUT_ROWS:
        return Halves(everything, everything, "all", f"only {rows} validation rows: too few to hold half out; "
                                                     f"add rows (evaluation.validation or data.validation_per_chunk)",
                      rows)
    return Halves(fit, holdout, "holdout", "", rows)


def halves_of(cfg, rows: int) -> Halves:
    """The run's split: its seed, search.select and whether an evaluation.objective is set (a bench's search
    config may carry no evaluation section)."""
    evaluation = getattr(cfg, "evaluation", None)
    return validation_halves(rows, cfg.seed, cfg.search.select, bool(evaluation and evaluation.objective))


def selection_key(trial: dict) -> tuple:
    """Which trial the search returns: the best holdout score; ties go to the better fit score, then the earlier
    trial (the baselines come first). Trials logged before the split carry only `validation`."""
    score = trial["validation"]
    return trial.get("holdout", score), trial.get("fit", score), -trial["trial"]


def seen_score(trial: dict) -> float:
    """What the optimiser is told of a trial: its fit score."""
    return trial.get("fit", trial["validation"])


def trial_scores(session, weights: dict, halves: Halves) -> dict[str, float]:
    """A point's validation, fit and holdout scores from one evaluation pass (session: a protocol.SearchSession)."""
    if halves.select == "all":
        return halves.scores(session.score(weights, "validation"), [])
    overall, rows = session.scored_rows(weights, "validation")
    return halves.scores(overall, rows)
