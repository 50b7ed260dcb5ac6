"""A source's records as rows: columns mapped onto Row's fields, the shape of a chunk's data detected and its rows
checked for it, the fixed evaluation sets read, each held-out row's reference answer."""
from __future__ import annotations

import json
import re

from ..config import RunConfig
from ..errors import UserError
from ..rows import Record, Row
from ..train.methods import SHAPE_FIELDS, SHAPE_WORDS
from .sources import READERS

# carried as they are (lists, dicts, flags)
KEEP = ("history", "system", "raw", "lf_entry", "train_only", "chunk_fixed")
FIELDS = ("prompt", "response", "chosen", "rejected", "label", "text")
TRUE, FALSE = {"true", "1", "yes", "desirable"}, {"false", "0", "no", "undesirable"}


def _normalise(raw: list[Record], columns: dict[str, str], chunk_by: str | None, where: str, label: str,
               kind: str = "") -> list[Row]:
    """Map source columns to the tool's fields (missing ones are None); keep provenance (source, row id).
    chunk_by None: chunks are drawn at random later ({count: N} / {size: N})."""
    mapping = {**{f: f for f in FIELDS}, **({chunk_by: chunk_by} if chunk_by else {}), **columns}
    if kind in ("llamafactory", "generate", "bad_cases") and chunk_by:
        mapping[chunk_by] = "chunk_value"  # chosen by the reader (e.g. one chunk per LLaMA-Factory dataset)
    rows = []
    for n, r in enumerate(raw):
        if chunk_by and r.get(mapping[chunk_by]) in (None, ""):
            raise UserError(f"{where}: row {n} of {label} has no {chunk_by} (column {mapping[chunk_by]!r}); "
                            f"fill it, drop the row, or map the field with {where}.columns")
        row = {f: (None if r.get(col) in (None, "") else r.get(col)) for f, col in mapping.items()}
        nested = [f for f, v in row.items() if f != "label" and isinstance(v, (dict, list))]
        if nested:
            raise UserError(f"{where}: row {n} of {label}: {nested[0]} (column {mapping[nested[0]]!r}) is "
                            f"a {type(row[nested[0]]).__name__}, not text; map a text column to it or fix the row")
        row = {k: (v if k == "label" or v is None else str(v)) for k, v in row.items()}
        row.update({k: r[k] for k in KEEP if r.get(k) is not None})
        if r.get(columns.get("choices", "choices")) is not None:
            row["choices"] = _choices(r[columns.get("choices", "choices")], f"{where}: row {n} of {label}")
        if r.get(mapping.get("messages", "messages")):
            row.update(split_messages(r[mapping.get("messages", "messages")], f"row {n} of {label}"))
        row["source"], row["row_id"], row["n"] = label, str(r.get(columns.get("id", "id"), n)), n
        rows.append(row)
    return rows


def source_rows(src, where: str, cfg: RunConfig, chunk_by: str | None) -> list[Row]:
    """One source's rows, normalised, with provenance (and marked train-only if the source says so)."""
    label = src.name or f"{src.type}:{where.rsplit('.', 1)[-1]}"
    rows = _normalise(READERS[src.type](src, where, cfg), getattr(src, "columns", {}), chunk_by, where, label, src.type)
    for row in rows if src.train_only else []:
        row["train_only"] = True
    return rows


def fixed_eval_rows(cfg: RunConfig, split: str) -> list[Row]:
    """evaluation.validation / evaluation.test: fixed held-out rows from any source. Their chunk (for the
    per-chunk tables) is the data.chunk_by column where a row has it, else the source's name (or `eval`)."""
    column = cfg.data.chunk_column
    rows = []
    for i, src in enumerate(getattr(cfg.evaluation, split)):
        where = f"evaluation.{split}.{i}"
        raw = READERS[src.type](src, where, cfg)
        label = src.name or f"{split}:{i}"
        for r in _normalise(raw, getattr(src, "columns", {}), None, where, label, src.type):
            original = raw[r["n"]]
            value = original.get("chunk_value") or (original.get(getattr(src, "columns", {}).get(column, column))
                                                    if column else None)
            r["chunk"] = chunk_name(str(value)) if value not in (None, "") else chunk_name(src.name or "eval")
            if reference(r) is None or not (r.get("prompt") or r.get("text")):
                raise UserError(f"{where}: row {r['n']} of {r['source']} has no reference answer; held-out rows "
                                f"need prompt and response (or chosen)")
            rows.append(r)
    return rows


def _choices(value, where: str) -> list[str]:
    """A multiple-choice row's options: a list, or its JSON text (as a SQL or CSV column holds it)."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass
    if not isinstance(value, list) or not all(isinstance(c, (str, int, float)) for c in value):
        raise UserError(f"{where}: choices must be a list of strings (or its JSON text)")
    return [str(c) for c in value]


def split_messages(messages, where: str) -> dict:
    """An OpenAI-style `messages` list -> history (earlier turns), prompt (last user turn), response (last
    assistant turn, if the list ends with one), system."""
    try:
        turns = [{"role": m["role"], "content": str(m["content"])} for m in messages]
    except (TypeError, KeyError):
        raise UserError(f"data: {where}: messages must be a list of {{role, content}}") from None
    system = next((t["content"] for t in turns if t["role"] == "system"), None)
    turns = [t for t in turns if t["role"] in ("user", "assistant")]
    out = {"system": system}
    if turns and turns[-1]["role"] == "assistant":
        out["response"] = turns.pop()["content"]
    if not turns or turns[-1]["role"] != "user":
        raise UserError(f"data: {where}: messages must end with a user turn (and optionally the assistant's answer)")
    out["prompt"] = turns.pop()["content"]
    out["history"] = turns
    return out


def detect_shape(name: str, rows: list[Row]) -> str:
    """preference if any row has chosen/rejected, else kto if any has a label, else sft, else pt."""
    present = {f for r in rows for f in FIELDS if r.get(f) is not None}
    for shape, marker in (("preference", {"chosen", "rejected"}), ("kto", {"label"}), ("sft", {"response"}),
                          ("pt", {"text"})):
        if present & marker:
            return shape
    raise UserError(f"data: chunk {name!r} has no usable rows: give prompt/response, prompt with chosen/rejected, "
                    f"prompt/response with a label, or text (map columns with data.sources.N.columns)")


def validate_rows(name: str, shape: str, rows: list[Row]) -> None:
    """Every row of a chunk must have the fields of the chunk's shape; KTO labels must be booleans."""
    for r in rows:
        missing = [f for f in SHAPE_FIELDS[shape] if r.get(f) is None]
        if missing:
            raise UserError(f"data: row {r['n']} of {r['source']} has no {', '.join(missing)} (chunk {name!r} holds "
                            f"{SHAPE_WORDS[shape]} data); fill it, drop the row, or map the column")
        if shape == "kto":
            value = str(r["label"]).strip().lower()
            if value not in TRUE | FALSE:
                raise UserError(f"data: row {r['n']} of {r['source']} has label {r['label']!r}; use true/false")
            r["label"] = value in TRUE


def reference(r: Row) -> tuple[str, str] | None:
    """(prompt, reference answer) for scoring a held-out row; None when the row cannot be scored."""
    if r.get("label") is False:
        return None  # an undesirable KTO answer is no reference
    answer = r.get("response") or r.get("chosen")
    return (r["prompt"], answer) if answer is not None else ("", r["text"])


RESERVED_CHUNK_NAMES = {"all", "validation", "test", "dataset_info"}


def chunk_name(value: str) -> str:
    """Chunk names become file and folder names: keep them tame."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", value).strip("._-")[:64] or "chunk"
    return f"{name}_chunk" if name in RESERVED_CHUNK_NAMES else name
