"""Stage 1: read rows from the sources, chunk them, hold out validation and test splits (stratified by
chunk), and write LLaMA-Factory data files plus dataset_info.json."""
from __future__ import annotations

import random
import re
from collections import defaultdict
from pathlib import Path
from typing import Callable

from .config import FileSource, RunConfig, SqlSource
from .errors import UserError
from .io import write_json

RESERVED_CHUNK_NAMES = {"all", "validation", "test", "dataset_info"}


def sqlite_read_only(url: str) -> str:
    """sqlite:///path -> a URI that opens the file read-only (and fails if it does not exist)."""
    path = url.split(":///", 1)[1]
    return f"sqlite:///file:{path}?mode=ro&uri=true"


READ_ONLY_SQL = re.compile(r"^\s*(select|with)\b", re.IGNORECASE)


def read_sql(src: SqlSource, index: int) -> list[dict]:
    """Run the query in a transaction that is always rolled back; only SELECT/WITH queries are accepted."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import SQLAlchemyError

    if not READ_ONLY_SQL.match(src.query) or ";" in src.query.strip().rstrip(";"):
        raise UserError(f"data.sources.{index}.query: sources are read-only; give one SELECT (or WITH ... SELECT) query")

    url = sqlite_read_only(src.url) if src.url.startswith("sqlite:///") else src.url
    try:
        engine = create_engine(url)
        with engine.connect() as conn, conn.begin() as tx:
            rows = [dict(r._mapping) for r in conn.execute(text(src.query))]
            tx.rollback()
        engine.dispose()
    except (SQLAlchemyError, ImportError) as e:
        first = str(e).splitlines()[0]
        raise UserError(f"data.sources.{index}: cannot read {src.url!r} with the query ({first}); "
                        f"check the URL, that the file exists, and the SQL") from None
    return rows


def read_file(src: FileSource, index: int) -> list[dict]:
    import datasets

    builders = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
    builder = builders.get(src.path.suffix.lower())
    if builder is None:
        raise UserError(f"data.sources.{index}.path: {src.path} is not one of {sorted(builders)}")
    if not src.path.is_file():
        raise UserError(f"data.sources.{index}.path: {src.path} not found")
    return list(datasets.load_dataset(builder, data_files=str(src.path), split="train"))


READERS: dict[str, Callable] = {"sql": read_sql, "file": read_file}


def _normalise(raw: list[dict], columns: dict[str, str], chunk_by: str, index: int, label: str) -> list[dict]:
    """Map source columns to the tool's fields; keep provenance (source, row id)."""
    mapping = {"prompt": "prompt", "response": "response", chunk_by: chunk_by, **columns}
    rows = []
    for n, r in enumerate(raw):
        row = {field: r.get(col) for field, col in mapping.items()}
        missing = [f"{field} (column {col!r})" for field, col in mapping.items() if row[field] in (None, "")]
        if missing:
            raise UserError(f"data.sources.{index}: row {n} of {label} has no {', '.join(missing)}; "
                            f"fill it, drop the row, or map the field with data.sources.{index}.columns")
        row = {k: str(v) for k, v in row.items()}
        row["source"], row["row_id"] = label, str(r.get(columns.get("id", "id"), n))
        rows.append(row)
    return rows


def chunk_name(value: str) -> str:
    """Chunk names become file and folder names: keep them tame."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", value).strip("._-")[:64] or "chunk"
    return f"{name}_chunk" if name in RESERVED_CHUNK_NAMES else name


def split_chunks(rows: list[dict], cfg: RunConfig) -> tuple[dict[str, list[dict]], list[dict], list[dict], int]:
    """Per chunk: shuffle (seeded), take validation and test rows, keep the rest for training."""
    d = cfg.data
    by_chunk: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        r["chunk"] = chunk_name(r[d.chunk_by])
        by_chunk[r["chunk"]].append(r)
    train, val, test = {}, [], []
    for name in sorted(by_chunk):
        items = by_chunk[name]
        random.Random(f"{cfg.seed}:{name}").shuffle(items)
        need = d.validation_per_chunk + d.test_per_chunk + d.min_train_per_chunk
        if len(items) < need:
            raise UserError(f"data: chunk {name!r} has {len(items)} rows, needs at least {need} "
                            f"(validation_per_chunk + test_per_chunk + min_train_per_chunk); add rows or lower them")
        val += items[: d.validation_per_chunk]
        test += items[d.validation_per_chunk: d.validation_per_chunk + d.test_per_chunk]
        train[name] = items[d.validation_per_chunk + d.test_per_chunk:]
    held_out = {r["prompt"] for r in val + test}
    dropped = 0
    for name, items in train.items():
        kept = [r for r in items if r["prompt"] not in held_out]
        dropped += len(items) - len(kept)
        train[name] = kept
    return train, val, test, dropped


def _alpaca(rows: list[dict]) -> list[dict]:
    return [{"instruction": r["prompt"], "output": r["response"], "chunk": r["chunk"],
             "source": r["source"], "row_id": r["row_id"]} for r in rows]


def prepare(cfg: RunConfig) -> list[str]:
    """Write runs/<name>/data/ and return the chunk names."""
    rows = []
    for i, src in enumerate(cfg.data.sources):
        label = f"{src.type}:{i}"
        rows += _normalise(READERS[src.type](src, i), src.columns, cfg.data.chunk_by, i, label)
    if not rows:
        raise UserError("data.sources: no rows; check the query or file")
    train, val, test, dropped = split_chunks(rows, cfg)
    data_dir = cfg.out / "data"
    columns = {"prompt": "instruction", "response": "output"}
    info = {}
    for name, items in {**train, "validation": val, "test": test}.items():
        write_json(data_dir / f"{name}.json", _alpaca(items))
        info[name] = {"file_name": f"{name}.json", "columns": columns}
    write_json(data_dir / "dataset_info.json", info)
    _print_table(train, val, test, dropped)
    return list(train)


def _print_table(train, val, test, dropped) -> None:
    count = lambda rows, c: sum(r["chunk"] == c for r in rows)
    print(f"{'chunk':<20} {'train':>6} {'validation':>10} {'test':>6}")
    for c, items in train.items():
        print(f"{c:<20} {len(items):>6} {count(val, c):>10} {count(test, c):>6}")
    if dropped:
        print(f"removed {dropped} training rows whose prompt is also in validation or test")


def load_split(cfg: RunConfig, split: str) -> list[dict]:
    from .io import read_json

    rows = read_json(cfg.out / "data" / f"{split}.json")
    if rows is None:
        raise UserError(f"{cfg.out / 'data' / (split + '.json')} missing; run `autollm prepare` first")
    return [{"prompt": r["instruction"], "response": r["output"], "chunk": r["chunk"]} for r in rows]
