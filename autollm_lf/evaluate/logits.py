"""Logits kept within a memory budget: rows per call, the LM head over vocabulary slices (ChunkedHead)."""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from .base import Batch

if TYPE_CHECKING:  # torch is imported where it is used: importing this module stays light
    import torch


MIN_LOGITS_BYTES = 16 * 2**20  # logits this small are never cut: a char-level toy's never are


def logits_bytes(model, budget: float) -> int:
    """What the logits of one forward call may take: `budget` (evaluation.logits_budget) of the model's weight
    memory. A 262k vocabulary makes a 32-row, 12-position batch's logits 0.4 GB, 0.4x Gemma 3 270M's weights."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return max(MIN_LOGITS_BYTES, int(budget * weights))


def rows_per_call(model, positions: int, budget: float) -> int:
    """How many rows one forward call may take so that its logits (rows x positions x vocabulary) stay within
    logits_bytes; at least one."""
    head = model.get_output_embeddings().weight
    return max(1, logits_bytes(model, budget) // (positions * head.shape[0] * head.element_size()))


def row_slices(b: "Batch", rows: int) -> list["Batch"]:
    """The batch as forward calls of at most `rows` rows. Same padded length and prefix: each row's logits are
    the batch's, bit for bit on the CPUs measured (tests compare the scores)."""
    if len(b.index) <= rows:
        return [b]
    return [dataclasses.replace(b, input_ids=b.input_ids[s:s + rows], target_mask=b.target_mask[s:s + rows],
                                labels=b.labels[s:s + rows], index=b.index[s:s + rows])
            for s in range(0, len(b.index), rows)]


def _causal_lm(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model  # under a PeftModel


class ChunkedHead:
    """The LM head over slices of the vocabulary: a batch's logits are reduced slice by slice and never held
    whole, while the head's weights are still read once per batch (row slices read them once per call: 671 MB
    each time for Gemma 3's 262k x 640 head, which made a CPU trial 1.5x slower). Exact: the same columns of the
    same matmul and the same elementwise final soft-capping (Gemma) as the model's own head; TeacherForced
    compares the two on its first batch and runs row slices instead if they differ."""

    def __init__(self, model):
        causal = _causal_lm(model)
        self.decoder, self.linear = causal.get_decoder(), causal.get_output_embeddings()
        self.softcap = getattr(causal.config.get_text_config(), "final_logit_softcapping", None)

    @staticmethod
    def fits(model) -> bool:
        """A plain Linear head: not one a LoRA wraps (its weight would miss the delta)."""
        import torch
        return type(_causal_lm(model).get_output_embeddings()) is torch.nn.Linear

    def slices(self, hidden: torch.Tensor, columns: int):
        """(first vocabulary id, logits over the next `columns` ids) for the hidden states."""
        import torch
        weight, bias = self.linear.weight, self.linear.bias
        for lo in range(0, weight.shape[0], columns):
            part = slice(lo, lo + columns)
            x = torch.nn.functional.linear(hidden, weight[part], None if bias is None else bias[part])
            if self.softcap is not None:  # the model's forward's ops (divide, tanh, multiply), in place: no copies
                x.div_(self.softcap).tanh_().mul_(self.softcap)
            yield lo, x
            del x  # before the next slice: one slice alive at a time


def greedy_tokens(slices) -> torch.Tensor:
    """The argmax over the whole vocabulary from (first id, logits) slices; ties go to the lowest id, as argmax."""
    import torch
    best = top = None
    for lo, x in slices:
        i = x.argmax(-1)
        v = x.gather(-1, i.unsqueeze(-1)).squeeze(-1)
        if best is None:
            best, top = v, i + lo
        else:
            better = v > best
            best, top = torch.where(better, v, best), torch.where(better, i + lo, top)
        del x  # before the next slice is computed
    return top


def label_logprobs(slices, labels: torch.Tensor) -> torch.Tensor:
    """log softmax at each label over the whole vocabulary, from (first id, logits) slices (in float32)."""
    lse, picked = logsumexp_and_label_logits(slices, labels)
    return picked - lse


def logsumexp_and_label_logits(slices, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The logsumexp over the whole vocabulary and the logit at each label, from (first id, logits) slices
    (in float32)."""
    import torch
    lse = picked = None
    for lo, x in slices:
        x = x.float()
        part = x.logsumexp(-1)
        inside = (labels >= lo) & (labels < lo + x.shape[-1])
        got = x.gather(-1, (labels - lo).clamp(0, x.shape[-1] - 1).unsqueeze(-1)).squeeze(-1)
        lse = part if lse is None else torch.logaddexp(lse, part)
        picked = torch.where(inside, got, got.new_zeros(()) if picked is None else picked)
        del x  # before the next slice is computed
    return lse, picked
