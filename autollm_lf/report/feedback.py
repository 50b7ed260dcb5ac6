"""Bad-case feedback: what the best merge got wrong on validation, and the `bad_cases` source that
feeds it to the next run (or round).

Only validation rows are listed, never test rows: the next round trains on them, and the test split
must stay unseen. The next round also keeps every bad-case prompt out of its validation and test
splits (rows from this source are `train_only`).

report/bad_cases.jsonl, one line per wrong validation row: prompt, reference, prediction (the best
merge's greedy answer), score, chunk, source, row_id, history, system.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import UserError
from ..evaluate import Contains, ExactMatch
from ..evaluate.metrics import METRICS
from ..fileio import atomic_write_text, fingerprint, read_json, read_jsonl, write_json
from ..log import get_logger
from ..paths import is_fresh
from ..rows import Row

if TYPE_CHECKING:
    from ..session import Session

logger = get_logger(__name__)

MARKER = "report/bad_cases.json"
SECTION = "\n## Bad cases (validation)\n"


def write_bad_cases(session: Session, force: bool = False) -> str:
    """Score the best merge per validation row, generate greedy answers for the wrong ones, write
    report/bad_cases.jsonl (skipped when up to date); returns report.md's bad-case section."""
    cfg = session.cfg
    best = cfg.run.read_best()
    report = read_json(cfg.run.report_json)
    if report is None:
        raise UserError(f"{cfg.run.report_json} missing; run `autollm report` first")
    fp = fingerprint(report.get("fingerprint"), best["weights"], cfg.evaluation.model_dump(mode="json"))
    done = read_json(cfg.run.root / MARKER, {})
    path = cfg.run.bad_cases
    if not force and is_fresh(done, fp, path):
        cases = read_jsonl(path)
    else:
        scorer = session.scorer("validation")
        scores = session.scored_rows(best["weights"], "validation")[1]  # the search's or the report's, if scored
        session.weighted.set_weights(best["weights"])  # the greedy answers below are this merge's
        if not METRICS[cfg.evaluation.metric].right_or_wrong:  # loss: use exact match
            correct = ExactMatch(scorer.model, session.tokenizer, cfg.base_model.template, scorer.rows,
                                 cfg.evaluation).correct()
        else:
            correct = [s >= 1.0 for s in scores]
        wrong = [i for i, ok in enumerate(correct) if not ok]
        predictions = _greedy(session, [scorer.rows[i] for i in wrong])
        cases = [{"prompt": scorer.rows[i]["prompt"], "reference": scorer.rows[i]["response"], "prediction": p,
                  "score": scores[i], "chunk": scorer.rows[i]["chunk"], "source": scorer.rows[i].get("source"),
                  "row_id": scorer.rows[i].get("row_id"), "history": scorer.rows[i].get("history") or [],
                  "system": scorer.rows[i].get("system")} for i, p in zip(wrong, predictions)]
        atomic_write_text(path, "".join(json.dumps(c, ensure_ascii=False) + "\n" for c in cases))
        write_json(cfg.run.root / MARKER, {"fingerprint": fp, "bad_cases": len(cases), "validation_rows": len(scores),
                                      "split": "validation", "weights": best["weights"]})
    logger.info(f"bad cases: {len(cases)} validation rows the best merge got wrong -> {path}")
    return bad_cases_section(cases, path.relative_to(cfg.run.root))


def _greedy(session: Session, rows: list[Row]) -> list[str]:
    """The best merge's greedy answers (what the user would see), batched."""
    if not rows:
        return []

    gen = Contains(session.weighted.model, session.tokenizer, session.cfg.base_model.template, rows,
                   session.cfg.evaluation)
    return gen.predictions()


def bad_cases_section(cases: list[dict], listed_in: Path, shown: int = 10) -> str:
    """The bad-case listing with provenance, a section of report.md."""
    by_chunk: dict[str, int] = {}
    for c in cases:
        by_chunk[c["chunk"]] = by_chunk.get(c["chunk"], 0) + 1
    lines = [SECTION, f"The best merge got {len(cases)} validation rows wrong (all in `{listed_in}`, with its "
             f"greedy answers; test rows are never listed). A next round trains on them with a `bad_cases` source.", "",
             "chunk | wrong |", "---|---|"] + [f"{c} | {n} |" for c, n in sorted(by_chunk.items())]
    lines += ["", "source | row_id | chunk | prompt | reference | prediction |", "---|---|---|---|---|---|"]
    esc = lambda s: str(s).replace("|", "\\|").replace("\n", " ")[:60]
    lines += [f"{esc(c['source'])} | {esc(c['row_id'])} | {c['chunk']} | {esc(c['prompt'])} | {esc(c['reference'])} | "
              f"{esc(c['prediction'])} |" for c in cases[:shown]]
    return "\n".join(lines) + "\n"
