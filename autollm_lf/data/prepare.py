"""Stage 1: read rows from the sources, chunk them, hold out validation and test splits (stratified by
chunk), and write LLaMA-Factory data files plus dataset_info.json."""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from collections import Counter, defaultdict
from pathlib import Path

from ..config import RunConfig
from ..config.owned import run_entry
from ..errors import UserError
from ..evaluate.choice import choice_problem
from ..evaluate.metrics import METRICS
from ..fileio import atomic_write_text, json_text, read_json
from ..log import get_logger
from ..paths import SHARED, sft_view
from ..rows import Record, Row
from ..train.deltas import chunk_methods
from ..train.methods import SHAPE_FIELDS, SHAPE_WORDS
from .sources import READERS

logger = get_logger(__name__)

RESERVED_CHUNK_NAMES = {"all", "validation", "test", "dataset_info"}


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


def chunk_name(value: str) -> str:
    """Chunk names become file and folder names: keep them tame."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", value).strip("._-")[:64] or "chunk"
    return f"{name}_chunk" if name in RESERVED_CHUNK_NAMES else name


def _refuse_colliding_chunks(rows: list[Row], column: str) -> None:
    """Two different values that become one file name ('a b', 'a/b', 'a_b') would silently merge chunks."""
    values: dict[str, set] = defaultdict(set)
    for r in rows:
        values[r["chunk"]].add(str(r[column]))
    for name, originals in sorted(values.items()):
        if len(originals) > 1:
            raise UserError(f"data: {column} values {', '.join(map(repr, sorted(originals)))} all become chunk "
                            f"{name!r} (chunk names keep letters, digits, '.', '_' and '-'); make them differ in those")


def assign_chunks(rows: list[Row], cfg: RunConfig) -> None:
    """Set each row's `chunk`: from a column (sanitised), or at random (seeded) into {count: N} chunks or
    chunks of {size: N} rows, named part-01, part-02, ... Rows whose source fixed a chunk value (bad cases,
    generated rows given `chunk:`) keep it."""
    d = cfg.data
    if d.chunk_column:
        for r in rows:
            r["chunk"] = chunk_name(str(r[d.chunk_column]))
        _refuse_colliding_chunks(rows, d.chunk_column)
        return
    fixed = [r for r in rows if r.get("chunk_fixed")]
    free = [r for r in rows if not r.get("chunk_fixed")]
    for r in fixed:
        r["chunk"] = chunk_name(str(r["chunk_fixed"]))
    order = list(range(len(free)))
    random.Random(f"{cfg.seed}:chunk_by").shuffle(order)
    count = d.chunk_by.count if hasattr(d.chunk_by, "count") else max(1, -(-len(free) // d.chunk_by.size))
    width = len(str(count))
    for pos, i in enumerate(order):
        part = pos % count if hasattr(d.chunk_by, "count") else pos // d.chunk_by.size
        free[i]["chunk"] = f"part-{part + 1:0{width}d}"


def prompt_key(r: Row) -> tuple:
    """What makes two rows "the same question": the whole context (system prompt, earlier turns, prompt),
    so conversations that only end alike are not duplicates; plain text rows by their text."""
    if r.get("prompt") is None:
        return ("text", r.get("text"))
    history = tuple((t["role"], t["content"]) for t in r.get("history") or [])
    return (r.get("system") or "", history, r["prompt"])


def held_out_per_chunk(cfg: RunConfig, fixed: dict[str, list[Row]]) -> tuple[int, int]:
    """Rows each chunk gives to validation and test: none for a split with a fixed evaluation set, unless
    data.validation_per_chunk / data.test_per_chunk are set explicitly too."""
    d = cfg.data
    per_chunk = lambda split, n: n if not fixed[split] or f"{split}_per_chunk" in d.model_fields_set else 0
    return per_chunk("validation", d.validation_per_chunk), per_chunk("test", d.test_per_chunk)


def split_chunks(rows: list[Row], cfg: RunConfig, fixed: dict[str, list[Row]] | None = None):
    """Per chunk: detect and check the shape, shuffle (seeded), take validation and test rows among the
    scorable ones, keep the rest for training. A prompt is held out once (validation or test, never both);
    rows marked train_only (bad cases) and every row sharing their prompt are never held out. Fixed
    evaluation sets (`fixed`: validation/test rows from evaluation.validation/test) come first; training
    rows whose prompt is in one are removed and counted.
    Returns (train, shapes, validation, test, removed) with removed = {duplicates, in_fixed_eval}."""
    d = cfg.data
    fixed = fixed or {"validation": [], "test": []}
    fixed_keys = {split: {prompt_key(r) for r in split_rows} for split, split_rows in fixed.items()}
    shared = fixed_keys["validation"] & fixed_keys["test"]
    if shared:
        raise UserError(f"evaluation: {len(shared)} prompts are in both the validation and the test set (e.g. "
                        f"{next(iter(shared))[-1]!r}); validation and test never share a prompt: remove them from one")
    assign_chunks(rows, cfg)
    by_chunk: dict[str, list[Row]] = defaultdict(list)
    for r in rows:
        by_chunk[r["chunk"]].append(r)
    train_only = {prompt_key(r) for r in rows if r.get("train_only")}
    taken: set = fixed_keys["validation"] | fixed_keys["test"]  # prompts already held out, across chunks and splits
    train, shapes, val, test = {}, {}, [], []
    for name in sorted(by_chunk):
        items = by_chunk[name]
        shapes[name] = detect_shape(name, items)
        validate_rows(name, shapes[name], items)
        random.Random(f"{cfg.seed}:{name}").shuffle(items)
        if all(r.get("train_only") for r in items):  # e.g. last round's bad cases: training rows only
            train[name] = items
            continue
        scorable = [r for r in items if reference(r) is not None]
        V, T = held_out_per_chunk(cfg, fixed)
        unique, seen = [], set()
        for r in scorable:  # a prompt already held out (another chunk, or a duplicate row) stays out
            if prompt_key(r) not in taken and prompt_key(r) not in seen:
                seen.add(prompt_key(r))
                unique.append(r)
        # The split without train-only rows is kept, so a later round keeps the same test rows (bad cases come
        # from validation); a train-only prompt drawn into validation (or test) is replaced by the next free row.
        chunk_val = [r for r in unique[:V] if prompt_key(r) not in train_only]
        chunk_test = [r for r in unique[V:V + T] if prompt_key(r) not in train_only]
        spare = [r for r in unique[V + T:] if prompt_key(r) not in train_only]
        short = V - len(chunk_val)
        chunk_val += spare[:short]
        chunk_test += spare[short: short + T - len(chunk_test)]
        need = V + T + d.min_train_per_chunk
        if len(items) < need or len(chunk_val) < V or len(chunk_test) < T:
            distinct = len({prompt_key(r) for r in scorable if prompt_key(r) not in train_only})
            if len(items) >= need and distinct < V + T:
                raise UserError(f"data: chunk {name!r} has {len(items)} rows but only {distinct} distinct prompts "
                                f"(a prompt is held out once); validation_per_chunk + test_per_chunk = {V + T} "
                                f"needs that many distinct prompts: add varied rows or lower them")
            usable = sum(prompt_key(r) not in train_only for r in scorable)
            raise UserError(f"data: chunk {name!r} has {len(items)} rows ({usable} usable as references), "
                            f"needs at least {need} (validation_per_chunk + test_per_chunk + min_train_per_chunk); "
                            f"add rows or lower them")
        held = chunk_val + chunk_test
        taken |= {prompt_key(r) for r in held}
        val += chunk_val
        test += chunk_test
        held_ids = {id(r) for r in held}
        train[name] = [r for r in items if id(r) not in held_ids]
    val, test = fixed["validation"] + val, fixed["test"] + test
    held_out = {prompt_key(r) for r in val + test}
    in_fixed = fixed_keys["validation"] | fixed_keys["test"]
    removed = {"duplicates": 0, "in_fixed_eval": 0}
    for name, items in train.items():
        kept = [r for r in items if prompt_key(r) not in held_out]
        removed["in_fixed_eval"] += sum(prompt_key(r) in in_fixed for r in items)
        removed["duplicates"] += sum(prompt_key(r) in held_out and prompt_key(r) not in in_fixed for r in items)
        train[name] = kept
        if len(kept) < d.min_train_per_chunk:  # checked after the removal: the training rows that are left
            gone = sum(prompt_key(r) in in_fixed for r in items)
            raise UserError(f"data: chunk {name!r} keeps {len(kept)} training rows after its held-out rows and the "
                            f"{gone} whose prompt is in a fixed evaluation set (evaluation.validation/test) are "
                            f"removed; it needs data.min_train_per_chunk = {d.min_train_per_chunk}: add rows to it, "
                            f"take them out of the fixed set, or lower validation_per_chunk/test_per_chunk")
    return train, shapes, val, test, removed


def check_scorable(cfg: RunConfig, val: list[Row], test: list[Row]) -> None:
    """Something to score on each split, and every chunk an evaluation.objective part names among its rows:
    checked here, not after every delta has trained."""
    scores_rows = lambda metric: METRICS[metric or cfg.evaluation.metric].scores_rows
    uses_rows = scores_rows(None) or any(scores_rows(p.metric) for p in cfg.evaluation.objective)
    for split, rows in (("validation", val), ("test", test)):
        if uses_rows and not rows:
            raise UserError(f"data: no {split} rows: every source is train_only or its chunks hold out none; give "
                            f"evaluation.{split} (a fixed set) or a source without train_only: true")
        present = {r["chunk"] for r in rows}
        for i, part in enumerate(cfg.evaluation.objective):
            if not scores_rows(part.metric):
                continue
            unknown = sorted(set(part.chunks) - present)
            if unknown:
                raise UserError(f"evaluation.objective.{i}.chunks: {', '.join(unknown)} has no {split} rows (its "
                                f"{split} rows' chunks are {', '.join(sorted(present)) or 'none'}); name chunks "
                                f"that are held out, not train_only ones")


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


def prepare(cfg: RunConfig) -> dict[str, str]:
    """Write runs/<name>/data/ and return {chunk: shape}. Everything is computed first and written to a new
    folder that replaces the old one only when complete: a failed prepare leaves the last good one intact."""
    rows = [r for i, src in enumerate(cfg.data.sources)
            for r in source_rows(src, f"data.sources.{i}", cfg, cfg.data.chunk_column)]
    if not rows:
        raise UserError("data.sources: no rows; check the query or file")
    fixed = {split: fixed_eval_rows(cfg, split) for split in ("validation", "test")}
    train, shapes, val, test, removed = split_chunks(rows, cfg, fixed)
    check_scorable(cfg, val, test)
    if METRICS[cfg.evaluation.metric].needs_choices:
        _check_choices(val + test)
    files, info = {}, {}
    for name, items in train.items():
        files[f"{name}.json"], entry = _records(items, shapes[name])
        info[name] = {"file_name": f"{name}.json", **entry}
        if shapes[name] == "preference" and "raw" not in items[0]:  # train@all learns its chosen answers as SFT
            info[sft_view(name)] = {"file_name": f"{name}.json",
                                    "columns": {"prompt": "instruction", "response": "chosen", **CONTEXT_COLUMNS}}
    for split, items in (("validation", val), ("test", test)):
        files[f"{split}.json"] = _eval_records(items)
        info[split] = {"file_name": f"{split}.json", **FORMATS["sft"][1]}
    if cfg.train.shared:  # the shared adapter's rows: a few of every chunk's training rows, as SFT
        picked = shared_rows(train, cfg.seed, cfg.train.shared.rows_per_chunk)
        files[f"{SHARED}.json"] = [{"instruction": p, "output": a, **_context(r), **{k: r[k] for k in PROVENANCE}}
                                   for r, (p, a) in picked]
        info[SHARED] = {"file_name": f"{SHARED}.json", **FORMATS["sft"][1]}
    table = chunk_table(cfg, train, shapes, val, test)
    files["dataset_info.json"] = info
    files[cfg.run.summary.name] = {
        "chunks": table, "duplicates_removed": removed["duplicates"], "removed_in_fixed_eval": removed["in_fixed_eval"],
        "sources": dict(Counter(r["source"] for r in rows)), "validation_from": eval_origin(cfg, "validation", fixed),
        "test_from": eval_origin(cfg, "test", fixed)}
    files[cfg.run.manifest.name] = {"chunks": list(shapes), "shapes": shapes}
    replace_folder(cfg.run.data, files)
    _print_table(table, removed)
    return shapes


def _check_choices(held_out: list[Row]) -> None:
    for r in held_out:
        prompt, answer = reference(r)
        if (problem := choice_problem({"choices": r.get("choices"), "response": answer})) is not None:
            raise UserError(f"data: row {r['n']} of {r['source']} {problem}; evaluation.metric choice scores "
                            f"held-out rows with a `choices` column and their answer among them")


def replace_folder(folder: Path, files: dict[str, object]) -> None:
    """Make `folder` hold exactly these JSON files: written into a fresh sibling folder that is then swapped in
    (the old one is removed only after the new one is in place). A folder that already holds them is left
    untouched, so a re-run rewrites nothing."""
    texts = {name: json_text(data) for name, data in files.items()}
    if folder.is_dir() and {p.name for p in folder.iterdir()} == set(texts) and \
            all((folder / name).read_text(encoding="utf-8") == text for name, text in texts.items()):
        return
    folder.parent.mkdir(parents=True, exist_ok=True)
    fresh = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.new-"))
    old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
    try:
        for name, text in texts.items():
            atomic_write_text(fresh / name, text)
        fresh.chmod(0o755)
        if folder.exists():
            folder.rename(old)
        fresh.rename(folder)
    except BaseException:
        shutil.rmtree(fresh, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def chunk_table(cfg: RunConfig, train, shapes, val, test) -> list[dict]:
    """Per chunk: rows, shape, training methods, split sizes."""

    count = lambda rows, c: sum(r["chunk"] == c for r in rows)
    return [{"chunk": c, "rows": len(items) + count(val, c) + count(test, c), "shape": shapes[c],
             "methods": chunk_methods(cfg, c, shapes[c]), "train": len(items), "validation": count(val, c),
             "test": count(test, c)} for c, items in train.items()]


def eval_origin(cfg: RunConfig, split: str, fixed: dict[str, list[Row]]) -> str:
    """Where a split's rows come from, in words (the report says it above its tables)."""
    per_chunk = held_out_per_chunk(cfg, fixed)[split == "test"]
    parts = [f"{len(fixed[split])} rows of evaluation.{split} "
             f"({', '.join(sorted({r['source'] for r in fixed[split]}))})"] if fixed[split] else []
    parts += [f"{per_chunk} rows held out per chunk"] if per_chunk else []
    return " + ".join(parts)


def _print_table(table: list[dict], removed: dict[str, int]) -> None:
    logger.info(f"{'chunk':<20} {'rows':>6} {'shape':<11} {'methods':<14} {'train':>6} {'validation':>10} {'test':>6}")
    for t in table:
        logger.info(f"{t['chunk']:<20} {t['rows']:>6} {t['shape']:<11} {','.join(t['methods']):<14} {t['train']:>6} "
                    f"{t['validation']:>10} {t['test']:>6}")
    logger.info(f"duplicates across splits removed: {removed['duplicates']} training rows whose prompt is also in "
                f"validation or test" + (f"; {removed['in_fixed_eval']} whose prompt is in a fixed evaluation set"
                              if removed["in_fixed_eval"] else ""))


def load_split(cfg: RunConfig, split: str) -> list[Row]:
    rows = read_json(cfg.run.split(split))
    if rows is None:
        raise UserError(f"{cfg.run.split(split)} missing; run `autollm prepare` first")
    return [{"prompt": r["instruction"], "response": r["output"], "chunk": r["chunk"], "split": split,
             "source": r.get("source"), "row_id": r.get("row_id"),
             "history": [{"role": role, "content": c}
                         for pair in r.get("history", []) for role, c in zip(("user", "assistant"), pair)],
             "system": r.get("system") or None, **({"choices": r["choices"]} if "choices" in r else {})} for r in rows]
