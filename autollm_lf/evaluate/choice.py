"""`choice`: multiple choice by log-likelihood, as lm-evaluation-harness's `multiple_choice` output type.

A row has a prompt, its `choices` (a list of strings) and its answer (`response`, one of the choices). Each
choice is scored by the log-likelihood of its tokens after the prompt (the chat template's turn suffix left
out); the row is right when the answer has the highest (`acc`), or the highest per character with
`evaluation.length_normalize` (`acc_norm`). The choices of a row are rows of one teacher-forced pass that
share the prompt: the batching puts them together and runs the prompt once, its key/value cache reused by
every choice, instead of one forward per choice.
"""
from __future__ import annotations

from ..errors import UserError
from ..rows import Row
from . import TeacherForced, encode_turns, label_logprobs


def choice_problem(row: Row) -> str | None:
    """Why a held-out row cannot be scored by `choice`, else None."""
    choices = row.get("choices")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        return "has no `choices` list of two or more non-empty strings"
    if row.get("response") not in choices:
        return f"its answer {row.get('response')!r} is not one of its choices"
    return None


class Choice(TeacherForced):
    needs_choices = True

    def __init__(self, model, tokenizer, template_name: str, rows: list[Row], cfg, **kwargs):
        for n, row in enumerate(rows):
            if (problem := choice_problem(row)) is not None:
                raise UserError(f"evaluation.metric choice: row {n} ({row.get('source')}/{row.get('row_id')}) "
                                f"{problem}; "
                                f"give each held-out row a `choices` column and its answer as `response`")
        self.owner = [q for q, row in enumerate(rows) for _ in row["choices"]]
        options = [{**row, "response": c} for row in rows for c in row["choices"]]
        super().__init__(model, tokenizer, template_name, options, cfg, **kwargs)
        self.options, self.rows = options, rows  # one pass row per choice; one score per question
        self.last: dict[str, float] = {}

    def encode(self, template_name: str, row: Row) -> tuple[list[int], list[int], bool]:
        """The prompt and the choice's own tokens: the template's turn suffix (what it appends to any answer,
        end-of-sequence included) is cut off, as lm-eval scores only the continuation."""
        args = (self.tokenizer, template_name, row["prompt"])
        context = (row.get("history"), row.get("system"), self.cutoff_len)
        prompt, answer, truncated = encode_turns(*args, row["response"], *context)
        _, suffix, _ = encode_turns(*args, "", *context)
        if suffix and len(answer) > len(suffix) and answer[-len(suffix):] == suffix:
            answer = answer[: -len(suffix)]
        return prompt, answer, truncated

    def per_row(self, slices, b):
        """Log-likelihood of each choice's tokens."""
        return (label_logprobs(slices, b.labels) * b.target_mask).sum(-1).tolist()

    def choice_loglikelihoods(self) -> list[list[float]]:
        ll = super().row_scores()
        per_question: list[list[float]] = [[] for _ in self.rows]
        for q, value in zip(self.owner, ll):
            per_question[q].append(value)
        return per_question

    def row_scores(self) -> list[float]:
        acc, acc_norm = [], []
        for row, ll in zip(self.rows, self.choice_loglikelihoods()):
            answer = row["choices"].index(row["response"])
            acc.append(float(max(range(len(ll)), key=ll.__getitem__) == answer))
            normed = [v / len(c) for v, c in zip(ll, row["choices"])]
            acc_norm.append(float(max(range(len(ll)), key=normed.__getitem__) == answer))
        n = max(len(acc), 1)
        self.last = {"acc": sum(acc) / n, "acc_norm": sum(acc_norm) / n}
        return acc_norm if self.cfg.length_normalize else acc
