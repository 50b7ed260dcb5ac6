"""Every metric in one registry: name -> evaluator class (rows, model, tokenizer, chat template, config).

Above both evaluate.py (the teacher-forced and generated evaluators) and judge.py (the LLM judge), so
neither needs the other; config validates `evaluation.metric` against it.
"""
from __future__ import annotations

from typing import Callable

from ..rows import Row
from . import Contains, Evaluator, ExactMatch, NegativeLoss, Numeric, Python, Regex
from .choice import Choice
from .judge import Judge
from .lmeval import LmEval

METRICS: dict[str, Callable[..., Evaluator]] = {
    "exact_match": ExactMatch,
    "loss": NegativeLoss,
    "choice": Choice,
    "contains": Contains,
    "regex": Regex,
    "numeric": Numeric,
    "python": Python,
    "judge": Judge,
    "lm_eval": LmEval,
}


def make_evaluator(cfg, model, tokenizer, rows: list[Row]) -> Evaluator:
    """The run's evaluator (cfg.evaluation.metric) over these rows, with the run's chat template."""
    return METRICS[cfg.evaluation.metric](model, tokenizer, cfg.base_model.template, rows, cfg.evaluation)
