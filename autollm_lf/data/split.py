"""Rows cut into chunks and into training, validation and test splits (held out per chunk, duplicates removed), and
checked to leave something to score."""
from __future__ import annotations

import random
from collections import defaultdict

from ..config import RunConfig
from ..errors import UserError
from ..evaluate.metrics import METRICS
from ..rows import Row
from .records import chunk_name, detect_shape, reference, validate_rows


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
