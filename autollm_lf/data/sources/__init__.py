"""Every source type in one registry: type -> reader(src, where, cfg) -> raw rows (dicts). The readers of
databases (sqlsource), LLaMA-Factory data dirs (lfdata) and LLM-written rows (generate) live in their own
modules; files and last round's bad cases are read here."""
from __future__ import annotations

from typing import Callable

from ...config import BadCasesSource, FileSource, RunConfig
from ...errors import UserError
from ...fileio import read_jsonl
from ...log import get_logger
from ...paths import RunDir
from ...rows import Record, Row
from .generate import read_generate
from .llamafactory import read_llamafactory
from .sql import read_sql

logger = get_logger(__name__)

FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def read_file(src: FileSource, where: str) -> list[Record]:
    import datasets

    builder = FILE_BUILDERS.get(src.path.suffix.lower())
    if builder is None:
        raise UserError(f"{where}.path: {src.path} is not one of {sorted(FILE_BUILDERS)}")
    if not src.path.is_file():
        raise UserError(f"{where}.path: {src.path} not found")
    # datasets' own error log and progress bars would add lines to a one-line error
    verbosity, bars = datasets.utils.logging.get_verbosity(), datasets.is_progress_bar_enabled()
    datasets.utils.logging.set_verbosity(datasets.utils.logging.CRITICAL + 1)
    datasets.disable_progress_bars()
    try:
        return list(datasets.load_dataset(builder, data_files=str(src.path), split="train"))
    except Exception as e:  # datasets wraps parser errors; the cause says which row and column
        cause = e.__cause__ or e
        first = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        raise UserError(f"{where}.path: cannot load {src.path} ({first}); "
                        f"fix the file (UTF-8, one format) or convert it") from None
    finally:
        datasets.utils.logging.set_verbosity(verbosity)
        if bars:
            datasets.enable_progress_bars()


def read_bad_cases(src: BadCasesSource, where: str) -> list[Record]:
    """Rows of a previous run's report/bad_cases.jsonl: prompt/response (SFT), or with `rejected: true`
    prompt/chosen (the reference)/rejected (the model's wrong answer) for a DPO/ORPO chunk. Training rows only."""
    path = RunDir(src.run).bad_cases
    if not path.is_file():
        raise UserError(f"{where}.run: {path} not found; run `autollm run` on that run first")
    rows, skipped = [], 0
    for n, c in enumerate(read_jsonl(path)):
        row = {"prompt": c["prompt"], "history": c.get("history") or None, "system": c.get("system"),
               "chunk_value": src.chunk, "chunk_fixed": src.chunk, "train_only": True,
               "id": f"{c.get('source')}/{c.get('row_id', n)}"}
        if src.rejected:
            if not (c.get("prediction") or "").strip() or c["prediction"].strip() == c["reference"].strip():
                skipped += 1  # no usable wrong answer to penalise
                continue
            row.update(chosen=c["reference"], rejected=c["prediction"])
        else:
            row["response"] = c["reference"]
        rows.append(row)
    logger.info(f"bad_cases ({where}): {len(rows)} rows from {path}"
                + (f"; {skipped} without a usable wrong answer skipped" if skipped else ""))
    return rows


def read_rows(src, where: str, cfg: RunConfig) -> list[Row]:
    return READERS[src.type](src, where, cfg)


READERS: dict[str, Callable] = {
    "sql": lambda src, i, cfg: read_sql(src, i),
    "file": lambda src, i, cfg: read_file(src, i),
    "llamafactory": lambda src, i, cfg: read_llamafactory(src, i),
    "generate": lambda src, i, cfg: read_generate(src, i, cfg, read_rows(src.documents, i, cfg)),
    "bad_cases": lambda src, i, cfg: read_bad_cases(src, i),
}
