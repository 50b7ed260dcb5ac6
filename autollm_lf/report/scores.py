"""The report's numbers: every model's scores on validation and test (the exported auto_merge as a user loads it, the
yardsticks, the baselines), their intervals and paired differences, and what each row cost in seconds."""
from __future__ import annotations

from ..evaluate.intervals import (
    by_chunk_intervals,
    mean_interval,
    paired_by_chunk,
    paired_difference,
    resample_index,
    split_by_chunk,
)
from ..fileio import read_json, read_jsonl
from ..log import progress
from ..merge import MERGE_METHODS
from ..paths import MIX_DELTA, SHARED
from ..session import Session, adapter_scorers, exported_adapter
from ..train.deltas import ALL_DELTA, DONE_MARKER

SHARED_BASE_ROW = "shared_base"  # train.shared: the configured base with the shared adapter merged in


SEARCH_START = "search start"  # the baseline point the search would return without its optimiser (best.json start)


IN_MEMORY = "auto_merge (in memory)"  # ties/dare: the full-rank merge the search scored, beside the exported adapter


def _exported_auto_merge(session: Session, rows: list[dict], per_row: dict) -> tuple[list[dict], dict]:
    """ties/dare: auto_merge becomes the exported adapter (runs/<name>/merged/, a truncated SVD), loaded as a user
    loads it; the merge the search scored stays beside it as IN_MEMORY."""
    merged = session.cfg.run.merged
    exported_adapter(session)
    at = next(i for i, r in enumerate(rows) if r["model"] == "auto_merge")
    in_memory = {**rows[at], "model": IN_MEMORY}
    row, per_row_exported = _adapter_row(session.cfg, "auto_merge", merged)
    rows = rows[:at] + [{**row, "weights": in_memory["weights"], "exported": True}, in_memory] + rows[at + 1:]
    per_row = {**per_row, IN_MEMORY: per_row["auto_merge"], "auto_merge": per_row_exported}
    return rows, per_row


def report_rows(session: Session) -> tuple[list[dict], dict]:
    """Every row is a weight vector over the loaded deltas, scored in place on the same model; also returns every
    row's per-row scores ({model: {split: [score per held-out row]}}) for the intervals."""
    cfg, chunks = session.cfg, session.deltas
    best = cfg.run.read_best()
    shared = bool(cfg.train.shared)
    rows = [(SHARED_BASE_ROW if shared else "raw", {c: 0.0 for c in chunks}, False)]
    if ALL_DELTA in session.adapters:
        rows.append((f"train@{ALL_DELTA}", {ALL_DELTA: 1.0}, False))
    rows += [(f"train@{c}", {d: float(d == c) for d in chunks}, False) for c in chunks]
    rows.append(("average_merge", {c: 1.0 for c in chunks}, True))
    if cfg.search.human_weights:
        rows.append(("human_merge", session.human_weights(), True))
    rows.append(("auto_merge", best["weights"], True))
    result, per_row = [], {}
    if shared:  # the yardsticks on the configured base: raw as it is, train@all as trained from it
        for name, adapter in (("raw", None), (f"train@{ALL_DELTA}", session.train_all_adapter)):
            if name == "raw" or adapter is not None:
                row, per_row[name] = _adapter_row(session.base_cfg, name, adapter)
                result.append(row)
    for name, w, show in progress(rows, desc="report", unit="model", leave=False):
        method = None if show else "linear"  # raw and train@ rows are the models as trained; merges use search.merge
        row, per_row[name] = {"model": name}, {}
        for split in ("validation", "test"):
            row[split], per_row[name][split] = session.scored_rows(w, split, method)
        row["test_by_chunk"] = split_by_chunk(per_row[name]["test"], session.row_chunks("test"))[1]
        parts = {split: session.part_scores(split) for split in ("validation", "test")}
        result.append({**row, **({"weights": w} if show else {}), **({"parts": parts} if parts["test"] else {})})
    if not MERGE_METHODS[cfg.search.merge].low_rank:  # the adapter a user gets is a truncated SVD of this merge
        result, per_row = _exported_auto_merge(session, result, per_row)
    start = best.get("start")
    if start is not None:  # the search's own gain is auto_merge - this point (scored once if it is a row already)
        per_row[SEARCH_START] = {split: session.scored_rows(start["weights"], split)[1]
                                 for split in ("validation", "test")}
    mix = _mix_dir(cfg)
    if mix is not None:
        row, per_row[f"train@{MIX_DELTA}"] = _adapter_row(cfg, f"train@{MIX_DELTA}", mix)
        result.append(row)
    seconds = row_seconds(session)
    return [{**r, "seconds": seconds.get(r["model"])} for r in result], per_row


def add_intervals(rows: list[dict], per_row: dict, chunks: dict[str, list[str]], cfg) -> dict:
    """Each row's validation_ci / test_ci / test_by_chunk_ci (cfg.report's coverage, a bootstrap over held-out rows
    within chunks), and the paired difference auto_merge - train@all overall and per chunk on both splits. None with
    an evaluation.objective: it combines parts (and constraints) that a mean over rows does not bound."""
    if cfg.evaluation.objective:
        return {}
    level, n_boot, seed = cfg.report.interval, cfg.report.bootstrap, cfg.seed
    index = {split: resample_index(chunks[split], n_boot, seed) for split in ("validation", "test")}
    for row in rows:
        scores = per_row.get(row["model"])
        if not scores:
            continue
        for split in ("validation", "test"):
            row[f"{split}_ci"] = mean_interval(scores[split], index[split], level)
            row[f"{split}_rows"] = len(scores[split])
        row["test_by_chunk_ci"] = by_chunk_intervals(scores["test"], chunks["test"], n_boot, seed, level)
    return paired_block("auto_merge", f"train@{ALL_DELTA}", per_row, chunks, index, cfg)


def paired_block(a: str, b: str, per_row: dict, chunks: dict, index: dict, cfg) -> dict:
    """a - b on the same rows, overall and per chunk, on validation and test ({} where either was not scored)."""
    if cfg.evaluation.objective or a not in per_row or b not in per_row:
        return {}
    level, n_boot, seed = cfg.report.interval, cfg.report.bootstrap, cfg.seed
    return {"a": a, "b": b, "interval": level, "bootstrap": n_boot, **{
        split: {"overall": paired_difference(per_row[a][split], per_row[b][split], index[split], level),
                "by_chunk": paired_by_chunk(per_row[a][split], per_row[b][split], chunks[split], n_boot, seed, level)}
        for split in ("validation", "test")}}


def search_gain(per_row: dict, chunks: dict, cfg, start: dict | None) -> dict:
    """The search's own gain: auto_merge - its start (best.json's `start`), paired, on validation and test."""
    if start is None:
        return {}
    index = {split: resample_index(chunks[split], cfg.report.bootstrap, cfg.seed) for split in ("validation", "test")}
    block = paired_block("auto_merge", SEARCH_START, per_row, chunks, index, cfg)
    return {**block, "start": {k: start[k] for k in ("kind", "trial", "validation", "holdout")}} if block else {}


def row_seconds(session: Session) -> dict[str, float | None]:
    """Wall seconds behind each row: its training for train@ rows; for merges every delta's training, the
    search's shared set-up (model and deltas loaded once) and, for auto_merge, its trials; train@auto_mix
    adds its own training to auto_merge's."""
    run = session.cfg.run
    trained = {n: read_json(run.delta(n) / DONE_MARKER, {}).get("seconds")
               for n in dict.fromkeys([*session.adapters, ALL_DELTA, MIX_DELTA])}
    deltas = [trained[d] for d in session.deltas]
    merge = None if None in deltas else sum(deltas) + read_json(run.search_cost, {}).get("setup_seconds", 0.0)
    search = sum(t.get("seconds", t.get("eval_seconds", 0.0)) for t in read_jsonl(run.trials))
    auto = None if merge is None else merge + search
    mix = None if auto is None or trained[MIX_DELTA] is None else auto + trained[MIX_DELTA]
    rows = {"raw": 0.0, "average_merge": merge, "human_merge": merge, "auto_merge": auto, f"train@{MIX_DELTA}": mix}
    rows = {**{f"train@{n}": s for n, s in trained.items()}, **rows}
    # train.shared: every row but the configured base's (raw, train@all) starts from the shared base: its training
    # is in each one
    shared = read_json(run.delta(SHARED) / DONE_MARKER, {}).get("seconds") if session.cfg.train.shared else None
    if shared is None:
        return rows
    own = {"raw", f"train@{ALL_DELTA}"}
    return {k: v if k in own or v is None else v + shared for k, v in {**rows, SHARED_BASE_ROW: 0.0}.items()}


def _mix_dir(cfg):
    """train@auto_mix's adapter if the mix stage trained it (it is not one of the search's loaded deltas)."""
    mix = cfg.run.delta(MIX_DELTA)
    return mix if cfg.train.auto_mix and (mix / DONE_MARKER).is_file() else None


def _adapter_row(cfg, name: str, adapter_dir) -> tuple[dict, dict]:
    """A row for an adapter the search never loaded: scored on its own, loaded as a user would load it."""

    row, per_row = {"model": name}, {}
    for split, evaluator in adapter_scorers(cfg, adapter_dir, ("validation", "test")).items():
        per_row[split] = evaluator.row_scores()
        row[split], by_chunk = split_by_chunk(per_row[split], [r["chunk"] for r in evaluator.rows])
        if cfg.evaluation.objective:
            row[split] = evaluator.score()
    row["test_by_chunk"] = by_chunk
    return row, per_row
