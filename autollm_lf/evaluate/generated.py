"""Metrics on answers produced by batched greedy `generate`: contains, regex, numeric, python."""
from __future__ import annotations

import importlib
import re
from typing import TYPE_CHECKING, Callable

from ..errors import UserError
from ..rows import Row
from .base import Evaluator

if TYPE_CHECKING:  # torch is imported where it is used: importing this module stays light
    pass


def greedy_generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """The new tokens of batched greedy `generate` for these prompt ids (left-padded, so all continue at once)."""
    import torch
    device, pad = next(model.parameters()).device, tokenizer.pad_token_id
    length = max(map(len, prompts))
    ids = torch.tensor([[pad] * (length - len(p)) + p for p in prompts], device=device)
    attn = torch.tensor([[0] * (length - len(p)) + [1] * len(p) for p in prompts], device=device)
    with torch.no_grad():
        gen = model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=pad)
    return gen[:, length:].tolist()


class Generated(Evaluator):
    """Greedy answers from batched `generate` (left padding), compared to the reference by `compare`."""

    def predictions(self) -> list[str]:
        out = [""] * len(self.rows)
        for index in self.prompt_length_batches():
            new = greedy_generate(self.model, self.tokenizer, [self.encoded[i][0] for i in index],
                                  self.cfg.max_new_tokens)
            for i, seq in zip(index, new):
                out[i] = self.tokenizer.decode(seq, skip_special_tokens=True).strip()
        return out

    def row_scores(self) -> list[float]:
        preds = self.predictions()
        return [float(self.compare(p, r["response"].strip(), r)) for p, r in zip(preds, self.rows)]

    def compare(self, prediction: str, reference: str, row: Row) -> float:
        raise NotImplementedError


class Contains(Generated):
    def compare(self, prediction, reference, row):
        return reference in prediction


class Regex(Generated):
    """Extract the answer with `evaluation.pattern` (group 1 if any) and compare it to the reference."""

    def compare(self, prediction, reference, row):
        m = re.search(self.cfg.pattern, prediction)
        return bool(m) and (m.group(1) if m.groups() else m.group(0)).strip() == reference


NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")


class Numeric(Generated):
    """The last number in the answer equals the reference within `evaluation.tolerance`."""

    def compare(self, prediction, reference, row):
        found = NUMBER.findall(prediction.replace(",", ""))
        try:
            return bool(found) and abs(float(found[-1]) - float(reference)) <= self.cfg.tolerance
        except ValueError:
            return False


def load_function(spec: str) -> Callable:
    """`package.module:function` -> the function, or a UserError saying what is wrong."""
    module_name, _, attr = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as e:
        raise UserError(f"evaluation.function: cannot import {spec!r} ({e}); give module:function on the Python path")
    except Exception as e:  # the user's module itself failed while importing (a syntax error, a raise at import)
        raise UserError(f"evaluation.function: importing {module_name!r} failed ({type(e).__name__}: {e}); "
                        f"fix that module") from None
    if not callable(fn):
        raise UserError(f"evaluation.function: {spec!r} is not callable")
    return fn


class Python(Generated):
    """The user's `module:function(predictions, references, rows)` returning one score per row."""

    @classmethod
    def config_problems(cls, evaluation) -> list[str]:
        try:
            load_function(evaluation.function)
        except UserError as e:
            return [str(e)]
        return []

    def row_scores(self):
        scores = load_function(self.cfg.function)(self.predictions(), [r["response"] for r in self.rows], self.rows)
        scores = list(scores)
        if len(scores) != len(self.rows):
            raise UserError(f"evaluation.function: {self.cfg.function} returned {len(scores)} scores "
                            f"for {len(self.rows)} rows")
        return [float(s) for s in scores]
