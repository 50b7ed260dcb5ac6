"""Rows as token ids, the way LLaMA-Factory's chat templates encode them for training (so evaluation reads
what the deltas were trained on)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..rows import Row, Turn

if TYPE_CHECKING:  # torch is imported where it is used: importing this module stays light
    pass


_templates: dict = {}


def forget_templates() -> None:
    """Drops the fixed templates, and with them the tokenizers they keep alive (see release_tokenizer)."""
    _templates.clear()


def chat_template(tokenizer, template_name: str):
    from llamafactory.data import get_template_and_fix_tokenizer
    from llamafactory.hparams import DataArguments

    # per tokenizer object: the fix sets its end-of-sequence token (gemma: <end_of_turn>), each tokenizer needs it
    key = (template_name, id(tokenizer))
    if key not in _templates:  # the tokenizer is kept with it, so that its id is never reused by another
        _templates[key] = (tokenizer, get_template_and_fix_tokenizer(tokenizer, DataArguments(template=template_name)))
    return _templates[key][1]


def truncate_turns(pairs: list[tuple[list[int], list[int]]], cutoff_len: int,
                   efficient_eos: bool = False) -> list[tuple[list[int], list[int]]]:
    """LLaMA-Factory's truncation of a supervised training row (data/processor/supervised.py, mask_history off):
    turns in order, each (prompt, answer) pair cut by `infer_seqlen` to what the turns before it left of cutoff_len
    (both keep their beginnings; a long answer takes its share first), turns past the cutoff dropped."""
    from llamafactory.data.processor.processor_utils import infer_seqlen

    total, kept = (1 if efficient_eos else 0), []
    for source, target in pairs:
        if total >= cutoff_len:
            break
        source_len, target_len = infer_seqlen(len(source), len(target), cutoff_len - total)
        kept.append((source[:source_len], target[:target_len]))
        total += source_len + target_len
    return kept


def encode_turns(tokenizer, template_name: str, prompt: str, response: str, history: list[Turn] | None = None,
                 system: str | None = None, cutoff_len: int | None = None) -> tuple[list[int], list[int], bool]:
    """(prompt ids, target ids, truncated): token ids exactly as LLaMA-Factory builds them for training with this
    chat template (earlier turns of a conversation in `history`), truncated as it truncates them to cutoff_len.

    The target is the response up to and including end-of-sequence: what greedy decoding must emit. Empty when
    the row cannot fit at all (earlier turns take the whole cutoff_len)."""
    template = chat_template(tokenizer, template_name)
    messages = list(history or []) + [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    pairs = template.encode_multiturn(tokenizer, messages, system)
    kept = truncate_turns(pairs, cutoff_len, template.efficient_eos) if cutoff_len else pairs
    truncated = kept != pairs
    if len(kept) < len(pairs):  # the last answer's turn did not fit
        return [t for pair in kept for part in pair for t in part], [], truncated
    prompt_ids = [t for pair in kept[:-1] for part in pair for t in part] + kept[-1][0]
    response_ids = kept[-1][1]
    if tokenizer.eos_token_id in response_ids:
        response_ids = response_ids[: response_ids.index(tokenizer.eos_token_id) + 1]
    return prompt_ids, response_ids, truncated


def encode_prompt_response(tokenizer, template_name: str, prompt: str, response: str,
                           history: list[Turn] | None = None, system: str | None = None,
                           cutoff_len: int | None = None) -> tuple[list[int], list[int]]:
    """encode_turns without the truncation flag."""
    return encode_turns(tokenizer, template_name, prompt, response, history, system, cutoff_len)[:2]


def model_positions(model) -> int | None:
    """How many positions the model has (its max_position_embeddings), if it says."""
    config = getattr(model, "config", None)
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    return getattr(text, "max_position_embeddings", None)


def row_name(row: Row, index: int) -> str:
    where = row.get("source") or row.get("chunk")
    return f"{where} row {row['row_id']}" if where and row.get("row_id") is not None else f"row {index}"
