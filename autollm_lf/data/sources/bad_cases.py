"""The `bad_cases` source: a previous run's report/bad_cases.jsonl (report/feedback.py writes it)."""
from __future__ import annotations

from ...config import BadCasesSource
from ...errors import UserError
from ...fileio import read_jsonl
from ...log import get_logger
from ...paths import RunDir
from ...rows import Record

logger = get_logger(__name__)


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
