"""Stage 1: read rows from the sources (records.py), chunk them, hold out validation and test splits (split.py,
stratified by chunk), and write LLaMA-Factory data files (formats.py) plus dataset_info.json."""
from __future__ import annotations

import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path

from ..config import RunConfig
from ..errors import UserError
from ..evaluate.choice import choice_problem
from ..evaluate.metrics import METRICS
from ..fileio import atomic_write_text, json_text, read_json
from ..log import get_logger
from ..paths import SHARED, sft_view
from ..rows import Row
from ..train.deltas import chunk_methods
from .formats import CONTEXT_COLUMNS, FORMATS, PROVENANCE, _context, _eval_records, _records, shared_rows
from .records import fixed_eval_rows, reference, source_rows
from .split import check_scorable, held_out_per_chunk, split_chunks

logger = get_logger(__name__)


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
