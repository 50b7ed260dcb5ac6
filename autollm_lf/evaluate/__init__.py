"""Evaluators: score a model on held-out rows, batched and tokenised once, per row (so per chunk too).

`exact_match` and `loss` need no generation: with teacher forcing, greedy decoding reproduces the
reference (and then stops) exactly when the argmax at every reference position, end-of-sequence
included, is the reference token, so one forward pass per batch scores a trial. `contains`, `regex`,
`numeric`, `python` and `judge` score answers produced by batched greedy `generate`.

Parts: encode.py, base.py (Evaluator), batches.py, prefix.py, logits.py, teacher.py, generated.py; metrics.py (every
metric in one registry: choice.py, judge.py with llm.py, lmeval.py), objective.py, intervals.py.
"""
from .base import Batch, Evaluator
from .batches import plan_batches, shared_prefix
from .encode import chat_template, encode_prompt_response, encode_turns, forget_templates, model_positions, row_name
from .generated import Contains, Generated, Numeric, Python, Regex, greedy_generate, load_function
from .logits import (
           MIN_LOGITS_BYTES,
           ChunkedHead,
           greedy_tokens,
           label_logprobs,
           logits_bytes,
           logsumexp_and_label_logits,
           rows_per_call,
)
from .prefix import PromptKeysOnly, has_sliding_window
from .teacher import ExactMatch, NegativeLoss, TeacherForced

__all__ = ["MIN_LOGITS_BYTES", "Batch", "ChunkedHead", "Contains", "Evaluator", "ExactMatch", "Generated",
           "NegativeLoss", "Numeric", "PromptKeysOnly", "Python", "Regex", "TeacherForced", "encode_prompt_response",
           "encode_turns", "forget_templates", "greedy_generate", "greedy_tokens", "has_sliding_window",
           "label_logprobs", "load_function", "logits_bytes", "logsumexp_and_label_logits", "model_positions",
           "plan_batches", "row_name", "rows_per_call", "shared_prefix", "chat_template"]
