"""Rows as LLaMA-Factory records: a training chunk in its shape's format (alpaca, ranking, kto, text) with its
dataset_info entry, the held-out splits and the shared adapter's rows as SFT."""
from __future__ import annotations

import random

from ..config.owned import run_entry
from ..errors import UserError
from ..rows import Row
from .records import reference

PROVENANCE = ("chunk", "source", "row_id")


def _context(r: Row) -> dict:
    """Earlier turns as alpaca `history` ([user, assistant] pairs) and the system prompt."""
    turns = r.get("history") or []
    return {"history": [[u["content"], a["content"]] for u, a in zip(turns[::2], turns[1::2])],
            "system": r.get("system") or ""}


CONTEXT_COLUMNS = {"history": "history", "system": "system"}


FORMATS = {  # shape -> (LLaMA-Factory record, dataset_info entry)
    "sft": (lambda r: {"instruction": r["prompt"], "output": r["response"], **_context(r)},
            {"columns": {"prompt": "instruction", "response": "output", **CONTEXT_COLUMNS}}),
    "preference": (lambda r: {"instruction": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"],
                              **_context(r)},
                   {"ranking": True, "columns": {"prompt": "instruction", "chosen": "chosen", "rejected": "rejected",
                                                 **CONTEXT_COLUMNS}}),
    "kto": (lambda r: {"instruction": r["prompt"], "output": r["response"], "kto_tag": bool(r["label"]), **_context(r)},
            {"columns": {"prompt": "instruction", "response": "output", "kto_tag": "kto_tag", **CONTEXT_COLUMNS}}),
    "pt": (lambda r: {"text": r["text"]}, {"columns": {"prompt": "text"}}),
}


def _records(rows: list[Row], shape: str) -> tuple[list[dict], dict]:
    """Training records and their dataset_info entry: LLaMA-Factory rows stay in their own format."""
    if any("raw" in r for r in rows):
        if not all("raw" in r for r in rows):
            raise UserError(f"data: chunk {rows[0]['chunk']!r} mixes a LLaMA-Factory dataset with other sources; "
                            f"give them different chunk names")
        if any(r["lf_entry"] != rows[0]["lf_entry"] for r in rows):
            raise UserError(f"data: chunk {rows[0]['chunk']!r} mixes LLaMA-Factory datasets of different formats; "
                            f"chunk them by dataset (data.chunk_by: a column name)")
        entry = run_entry(rows[0]["lf_entry"])  # how to read the file only: no hub, script or cloud keys
        return [r["raw"] for r in rows], entry
    record, entry = FORMATS[shape]
    return [{**record(r), **{k: r[k] for k in PROVENANCE}} for r in rows], entry


def shared_rows(train: dict[str, list[Row]], seed: int, per_chunk: int) -> list[tuple[Row, tuple]]:
    """A seeded sample of every chunk's training rows with an answer to learn: (row, (prompt, answer))."""
    rng = random.Random(seed)
    picked = []
    for name in sorted(train):
        usable = [(r, ref) for r in train[name] if (ref := reference(r)) is not None]
        picked += rng.sample(usable, min(per_chunk, len(usable)))
    return picked


def _eval_records(rows: list[Row]) -> list[dict]:
    """Held-out rows in alpaca form; earlier turns of a conversation go in `history` as [user, assistant] pairs."""
    out = []
    for r in rows:
        prompt, answer = reference(r)
        out.append({"instruction": prompt, "output": answer, **_context(r), **{k: r[k] for k in PROVENANCE},
                    **({"choices": r["choices"]} if r.get("choices") is not None else {})})
    return out
