"""Stage 4: the AutoLLM README's table on validation and test, the weights table, a convergence plot: report.md
(markdown.py), report.json, report.html (page.py) and the figures (plots.py), from the scores (scores.py)."""
from __future__ import annotations

import json
from typing import TYPE_CHECKING

from ..fileio import atomic_write_text, file_digest, fingerprint, read_json, read_jsonl, write_json
from ..log import get_logger
from ..paths import is_fresh
from ..train.auto_mix import mix_spec
from ..train.deltas import DONE_MARKER
from .markdown import _markdown, cost_line
from .page import _html
from .plots import _plot, _plot_heatmap, _plot_weights
from .scores import _mix_dir, add_intervals, report_rows, search_gain

if TYPE_CHECKING:
    from ..session import Session

logger = get_logger(__name__)


def report_fingerprint(session: Session) -> str:
    cfg = session.cfg
    mix = _mix_dir(cfg)
    return fingerprint(session.search_fingerprint(), read_json(cfg.run.best),
                       file_digest([cfg.run.split("test")]), cfg.search.human_weights,
                       read_json(mix / DONE_MARKER) if mix else None)


def write_report(session: Session, force: bool = False) -> str:
    """report.json, report.html and the plots (unless up to date); returns report.md's main section, which the
    report stage writes together with the sections of rounds and bad cases."""
    cfg, chunks, run = session.cfg, session.chunks, session.cfg.run
    fp = report_fingerprint(session)
    report = read_json(run.report_json, {})
    if not force and is_fresh(report, fp, run.report_html):
        logger.info(f"report: {run.report} up to date")
    else:
        report = _write_report_files(session, fp)
    md = _markdown(report["rows"], chunks, session.deltas, cfg, report.get("cost", ""),  # the line report.json holds
                   report.get("paired") or {}, report.get("search_gain") or {},
                   report.get("granularity", cfg.search.granularity))
    logger.info(md.split("\n\n![")[0])
    if any(report["evaluation_stats"].values()):  # e.g. how many judge answers held no score
        md += ("\nEvaluator counts (over every row scored for this report): "
               + json.dumps(report["evaluation_stats"]) + "\n")
    return md


def _write_report_files(session: Session, fp: str) -> dict:
    cfg, run = session.cfg, session.cfg.run
    rows, per_row = report_rows(session)
    chunks = {split: session.row_chunks(split) for split in ("validation", "test")}
    paired = add_intervals(rows, per_row, chunks, cfg)
    gain = search_gain(per_row, chunks, cfg, run.read_best().get("start"))
    write_json(run.row_scores, {"chunks": chunks, "scores": per_row})
    auto = next(r for r in rows if r["model"] == "auto_merge")
    stats = {split: dict(session.scorer(split).stats) for split in ("validation", "test")}
    trials = read_jsonl(run.trials)
    report = {"name": cfg.name, "metric": cfg.evaluation.metric, "rows": rows,
              "merge": {"method": cfg.search.merge, "density": cfg.search.density},
              "best": {"weights": auto["weights"], "validation": auto["validation"], "test": auto["test"],
                       "validation_ci": auto.get("validation_ci"), "test_ci": auto.get("test_ci")},
              "paired": paired, "search_gain": gain, "granularity": session.weighted.granularity,
              "evaluation_stats": stats, "cost": cost_line(rows, len(trials)), "fingerprint": fp}
    write_json(run.report_json, report)
    images = {"Search convergence": run.report / "convergence.png", "Merge weights": run.report / "weights.png"}
    _plot(trials, rows, images["Search convergence"])
    _plot_weights(rows, session.deltas, images["Merge weights"])
    if session.weighted.granularity != "delta":
        images["Weights per module group"] = run.report / "weights_heatmap.png"
        _plot_heatmap(auto["weights"], session.deltas, images["Weights per module group"])
    mix = mix_spec(cfg, session.shapes, auto["weights"]) if _mix_dir(cfg) else None
    atomic_write_text(run.report_html, _html(report, session.chunks, session.deltas, mix and mix[1], images, cfg))
    return report
