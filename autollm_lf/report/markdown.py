"""report.md's text: the tables and the lines under them (evaluation sets, merge, intervals, paired differences,
cost)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..evaluate.intervals import (
    fmt,
)
from ..fileio import read_json
from ..granularity import per_delta
from ..merge import MERGE_METHODS, apply_switch
from ..paths import MIX_DELTA
from ..search.merge_choice import choice_line
from ..train.deltas import ALL_DELTA

if TYPE_CHECKING:
    pass

from .scores import IN_MEMORY, SHARED_BASE_ROW


def cost_line(rows: list[dict], trials: int) -> str:
    """The search's cost against one more retraining on a candidate mix (train@auto_mix's, else train@all's)."""
    seconds = {r["model"]: r.get("seconds") for r in rows}
    merge, auto = seconds.get("average_merge"), seconds.get("auto_merge")
    retrain_row = next((m for m in (f"train@{MIX_DELTA}", f"train@{ALL_DELTA}") if seconds.get(m) is not None), None)
    if merge is None or auto is None or retrain_row is None:
        return ""
    search = auto - merge
    retrain = seconds[retrain_row] - (auto if retrain_row == f"train@{MIX_DELTA}" else 0.0)
    return (f"Cost: the search scored {trials} weightings in {search:.0f} s (after {merge:.0f} s of delta training and "
            f"set-up shared by every merge); one more retraining on a candidate mix ({retrain_row}) took "
            f"{retrain:.0f} s, so each weighting cost {search / max(trials, 1) / max(retrain, 1e-9):.1%} "
            f"of a retraining.")


def eval_sets_line(cfg) -> str:
    """Which rows each number is computed on: held out per chunk, and/or the fixed evaluation sets."""
    summary = read_json(cfg.run.summary, {})
    line = f"Validation: {summary.get('validation_from', '?')}. Test: {summary.get('test_from', '?')}."
    if cfg.train.shared:
        line += (f" `raw` is the configured model and `train@all` is trained from it; `{SHARED_BASE_ROW}` is that "
                 f"model with a shared adapter ({cfg.train.shared.rows_per_chunk} training rows of every chunk) "
                 f"merged in ({cfg.run.shared_base}): every delta and merge starts from it.")
    return line


def _parts_table(rows: list[dict], cfg) -> list[str]:
    """With evaluation.objective: each part's score per row, on validation | test (the objective is their
    weighted sum minus any constraint's penalty)."""
    named = [r for r in rows if "parts" in r]
    if not named:
        return []
    names = list(named[0]["parts"]["test"])
    lines = ["", "Objective parts, validation | test:", "", "model | " + " | ".join(names) + " |",
             "---|" + "---|" * len(names)]
    lines += [f"{r['model']} | " + " | ".join(f"{r['parts']['validation'][n]:.4f} \\| {r['parts']['test'][n]:.4f}"
                                              for n in names) + " |" for r in named]
    return lines


def _seconds(row: dict) -> str:
    return "-" if row.get("seconds") is None else f"{row['seconds']:.0f}"


def merge_line(cfg) -> str:
    spec = MERGE_METHODS[cfg.search.merge]
    extra = (f" (alpha {cfg.search.regmean_alpha}; average_merge, every weight 1, is RegMean itself"
             + (", in the deltas' core space" if spec.data_aware == "core" else "") + ")"
             if spec.data_aware else " (average_merge, every weight 1, is the method itself at scale 1)"
             if spec.spectral else f" (density {cfg.search.density})" if spec.sparsify else "")
    switch = apply_switch(cfg.search.merge, cfg.search.apply) if cfg.search.apply != "auto" else ""
    chosen = cfg.run.read_best().get("select_line", "") if cfg.run.best.is_file() else ""
    alone = (f" The train@ rows are each delta alone as trained, not through `{cfg.search.merge}`."
             if cfg.search.merge != "linear" else "")
    logged = read_json(cfg.run.merge_choice) if cfg.run.merge_choice.is_file() else None
    auto = f" search.merge: auto: {choice_line(logged)}." if logged and logged["chosen"] == cfg.search.merge else ""
    return (f"Merges (average, human, auto) use `{cfg.search.merge}`{extra}.{auto}{alone}"
            + (f" {switch[0].upper()}{switch[1:]}." if switch else "") + (f" auto_merge: {chosen}." if chosen else "")
            + (" auto_merge is the exported adapter (a truncated SVD of the merge the search scored, which is "
               f"`{IN_MEMORY}`)." if not MERGE_METHODS[cfg.search.merge].low_rank else ""))


def interval_line(rows: list[dict], cfg) -> str:
    counted = next((r for r in rows if "test_rows" in r), None)
    if counted is None:
        return ""
    return (f"[low, high]: {cfg.report.interval:.0%} interval, bootstrap over the held-out rows within chunks "
            f"({cfg.report.bootstrap} resamples; {counted['validation_rows']} validation and {counted['test_rows']} "
            f"test rows).")


def paired_lines(paired: dict) -> list[str]:
    """a - b on the same rows (auto_merge - train@all, or the search's gain), overall and per chunk, with whether
    the interval excludes 0."""
    if not paired:
        return []
    said = lambda d: ("ahead" if d["interval"][0] > 0 else "behind") if d["excludes_zero"] else "not told apart"
    start = paired.get("start")
    b = f"{paired['b']} ({start['kind']}, trial {start['trial']})" if start else paired["b"]
    title = "The search's own gain" if start else "Paired difference"
    lines = ["", f"{title} {paired['a']} - {b} (same rows; {paired['interval']:.0%} interval):", "",
             "split | chunk | difference | interval | rows | verdict |", "---|---|---|---|---|---|"]
    for split in ("validation", "test"):
        parts = [("all", paired[split]["overall"])] + list(paired[split]["by_chunk"].items())
        lines += [f"{split} | {c} | {d['difference']:+.3f} | [{d['interval'][0]:+.3f}, {d['interval'][1]:+.3f}] | "
                  f"{d['rows']} | {said(d)} |" for c, d in parts]
    return lines


def granularity_text(cfg, granularity: str) -> str:
    return f"auto, here {granularity}" if cfg.search.granularity == "auto" else granularity


def _markdown(rows: list[dict], chunks: list[str], deltas: list[str], cfg, cost: str = "",
              paired: dict | None = None, gain: dict | None = None, granularity: str | None = None) -> str:
    granularity = granularity or cfg.search.granularity  # the resolved one (search.granularity: auto) when given
    lines = [f"# autollm-lf report: {cfg.run_label}", "",
             f"Metric: {cfg.evaluation.metric}. Validation is what the search tuned on; test was never tuned on.",
             eval_sets_line(cfg), merge_line(cfg), interval_line(rows, cfg), "",
             "model | validation | test | seconds |", "---|---|---|---|"]
    lines += [f"{r['model']} | {fmt(r['validation'], r.get('validation_ci'))} | {fmt(r['test'], r.get('test_ci'))} | "
              f"{_seconds(r)} |" for r in rows]
    lines += paired_lines(paired or {})
    lines += paired_lines(gain or {})
    lines += ["", cost] if cost else []
    lines += ["", "Test score by chunk:", "", "model | " + " | ".join(chunks) + " |", "---|" + "---|" * len(chunks)]
    lines += [f"{r['model']} | " + " | ".join(f"{r['test_by_chunk'][c]:.2f}" if c in r["test_by_chunk"] else "-"
                                              for c in chunks) + " |"  # "-": a training-only chunk (bad cases)
              for r in rows]
    lines += ["", note] if (note := train_only_note(rows, chunks)) else []
    lines += _parts_table(rows, cfg)
    lines += ["", "model | " + " | ".join(f"{d}_weight" for d in deltas) + " |", "---|" + "---|" * len(deltas)]
    lines += [f"{r['model']} | " + " | ".join(f"{per_delta(r['weights']).get(d, 0.0):.4g}" for d in deltas) + " |"
              for r in rows if "weights" in r]
    if granularity != "delta":
        lines += ["", f"Weights per delta are means over its module groups (search.granularity: "
                      f"{granularity_text(cfg, granularity)}); search/best.json holds each."]
    lines += ["", "![convergence](convergence.png)", "", "![weights](weights.png)", ""]
    if granularity != "delta":
        lines += ["![weights per module group](weights_heatmap.png)", ""]
    return "\n".join(lines)


def train_only_note(rows: list[dict], chunks: list[str]) -> str:
    """The chunks without test rows (train_only sources, bad cases): their test cells say '-', not 0."""
    missing = [c for c in chunks if any(c not in r["test_by_chunk"] for r in rows)]
    return (f"Chunks without test rows ({', '.join(missing)}): training rows only (train_only sources, bad cases); "
            f"'-' is no score, not 0." if missing else "")
