"""The row: one example as it travels from a source through prepare to training files and evaluation.

Readers (data/sources/: one file per source type) return raw records (`Record`: a source's columns, any names);
data/records.py maps them onto `Row`'s fields and adds provenance and chunk. Every key is optional: a row has the
fields of its shape (train/methods.py's SHAPE_FIELDS: sft, preference, kto, pt) and the bookkeeping its source gave it.
"""
from __future__ import annotations

from typing import Any, TypedDict

Record = dict[str, Any]  # a source's record, before prepare maps its columns


class Turn(TypedDict):
    role: str     # user | assistant
    content: str


class Row(TypedDict, total=False):
    # the example (the fields of its shape)
    prompt: str
    response: str
    chosen: str           # preference
    rejected: str         # preference
    label: bool           # kto: a desirable answer or not
    text: str             # a document a `generate` source asks questions about
    choices: list[str]    # metric `choice`: the candidate answers; `response` is the right one
    system: str           # the system prompt
    history: list[Turn]   # earlier turns of a conversation
    # provenance (copied into the training files and the bad cases)
    chunk: str            # the chunk it is trained or evaluated in
    source: str           # the source's label
    row_id: str           # its id in that source
    n: int                # its position in that source
    # bookkeeping set by readers
    chunk_fixed: str      # the chunk a source assigns itself (source key `chunk`)
    train_only: bool      # never held out (source key `train_only`; last round's bad cases)
    raw: Record           # a LLaMA-Factory dataset's original record, written back as it was
    lf_entry: dict        # and its dataset_info.json entry
    chunk_value: str      # the value of data.chunk_by it came with
