"""Evaluators: score a model on held-out rows. Batched, tokenised once, so one search trial is one pass.

`exact_match` scores greedy decoding without generating: with teacher forcing, greedy decoding
reproduces the reference (and then stops) exactly when the argmax at every reference position,
end-of-sequence included, is the reference token. One forward pass per batch gives that.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


def encode_prompt_response(tokenizer, template_name: str, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """Token ids exactly as LLaMA-Factory builds them for training with this chat template.

    The target is the response up to and including end-of-sequence: what greedy decoding must emit.
    """
    from llamafactory.data import get_template_and_fix_tokenizer
    from llamafactory.hparams import DataArguments

    template = _templates.get(template_name)
    if template is None:
        template = _templates[template_name] = get_template_and_fix_tokenizer(tokenizer, DataArguments(template=template_name))
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    prompt_ids, response_ids = template.encode_oneturn(tokenizer, messages)
    if tokenizer.eos_token_id in response_ids:
        response_ids = response_ids[: response_ids.index(tokenizer.eos_token_id) + 1]
    return prompt_ids, response_ids


_templates: dict = {}


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    target_mask: torch.Tensor  # True where position t+1 holds a reference token to predict at t
    index: torch.Tensor        # row index of each sequence in the original order


class ExactMatch:
    """Fraction of rows whose greedy answer equals the reference exactly."""

    def __init__(self, model, tokenizer, template_name: str, rows: list[dict], batch_size: int = 64):
        self.model = model
        self.n = len(rows)
        device = next(model.parameters()).device
        encoded = [encode_prompt_response(tokenizer, template_name, r["prompt"], r["response"]) for r in rows]
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]) + len(encoded[i][1]))
        self.batches = [self._collate([encoded[i] for i in order[s:s + batch_size]], order[s:s + batch_size],
                                      tokenizer.pad_token_id, device)
                        for s in range(0, len(order), batch_size)]

    @staticmethod
    def _collate(items, index, pad_id, device) -> Batch:
        length = max(len(p) + len(r) for p, r in items)
        ids = torch.full((len(items), length), pad_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        target = torch.zeros((len(items), length - 1), dtype=torch.bool)
        for row, (p, r) in enumerate(items):
            ids[row, : len(p) + len(r)] = torch.tensor(p + r)
            attn[row, : len(p) + len(r)] = 1
            target[row, len(p) - 1: len(p) + len(r) - 1] = True
        return Batch(ids.to(device), attn.to(device), target.to(device), torch.tensor(index))

    @torch.no_grad()
    def correct(self) -> list[bool]:
        result = [False] * self.n
        for b in self.batches:
            logits = self.model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits[:, :-1]
            hit = (logits.argmax(-1) == b.input_ids[:, 1:]) | ~b.target_mask
            for i, ok in zip(b.index.tolist(), hit.all(-1).tolist()):
                result[i] = ok
        return result

    def score(self) -> float:
        return sum(self.correct()) / max(self.n, 1)


METRICS: dict[str, Callable[..., ExactMatch]] = {"exact_match": ExactMatch}
