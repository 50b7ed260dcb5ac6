"""The evaluator interface every metric implements (metrics.METRICS), and one planned batch."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import UserError
from ..rows import Row
from .encode import encode_turns, model_positions, row_name

if TYPE_CHECKING:  # torch is imported where it is used: importing this module stays light
    import torch


@dataclass
class Batch:
    input_ids: torch.Tensor     # the rows after their shared prefix, right-padded
    target_mask: torch.Tensor   # over the scored positions: True where the next position holds a reference token
    labels: torch.Tensor        # over the scored positions: the token each must predict
    scored: int                 # the last positions of input_ids, whose logits are computed (the answer span)
    index: list[int]            # row index of each sequence in the original order
    prefix: tuple[int, ...] = ()  # prompt tokens every row of the batch starts with (run once, cached)


class Evaluator:
    """Base: `row_scores()` gives one score per row (higher is better); `score()` their mean."""

    trials_need_tokenizer = True  # False: once the rows are token ids, scoring never encodes or decodes again
    scores_rows = True  # False: it scores a benchmark of its own (lm_eval), not the run's held-out rows
    right_or_wrong = True  # False: a row's score is no 0/1 verdict (loss); the bad cases then use exact match
    needs_choices = False  # True: every held-out row must carry `choices` (choice)
    reference_tokens = True  # each row's prompt and reference answer as token ids (`encoded`): a loss to fit

    @classmethod
    def config_problems(cls, evaluation) -> list[str]:
        """What this metric needs of the evaluation section that cannot be used (checks.py: before any work)."""
        return []

    def __init__(self, model, tokenizer, template_name: str, rows: list[Row], cfg):
        self.model, self.tokenizer, self.rows, self.cfg = model, tokenizer, rows, cfg
        # held-out rows as training saw them: cut to cutoff_len, never past the model's positions
        limits = [n for n in (getattr(cfg, "cutoff_len", None), model_positions(model)) if n]
        self.cutoff_len = min(limits) if limits else None
        encoded = [self.encode(template_name, r) for r in rows]
        unfit = [row_name(r, i) for i, (r, (p, t, _)) in enumerate(zip(rows, encoded)) if not p or not t]
        if unfit:
            raise UserError(f"evaluation: {len(unfit)} held-out row(s) cannot fit in cutoff_len {self.cutoff_len} even "
                            f"truncated (their earlier turns take all of it): {', '.join(unfit[:5])}"
                            f"{' ...' if len(unfit) > 5 else ''}; shorten their history or raise evaluation.cutoff_len")
        self.encoded = [(p, t) for p, t, _ in encoded]
        self.stats: dict[str, int] = {}
        truncated = sum(cut for *_, cut in encoded)
        if truncated:  # reported in report.json's evaluation_stats
            self.stats["truncated"] = truncated

    def encode(self, template_name: str, row: Row) -> tuple[list[int], list[int], bool]:
        """(prompt ids, answer ids, truncated) of one row, as LLaMA-Factory encodes and truncates it for training."""
        return encode_turns(self.tokenizer, template_name, row["prompt"], row["response"], row.get("history"),
                            row.get("system"), self.cutoff_len)

    def row_scores(self) -> list[float]:
        raise NotImplementedError

    def score(self) -> float:
        scores = self.row_scores()
        return sum(scores) / max(len(scores), 1)

    def _batches(self, key) -> list[list[int]]:
        """Row indices grouped in batches of similar length (less padding)."""
        order = sorted(range(len(self.encoded)), key=key)
        size = self.cfg.batch_size
        return [order[s:s + size] for s in range(0, len(order), size)]

    def prompt_length_batches(self) -> list[list[int]]:
        """Batches for `generate`: by prompt length, the least left padding."""
        return self._batches(lambda i: len(self.encoded[i][0]))
