"""report.html: the same numbers and notes as report.md, rendered from templates/report.html.j2."""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..evaluate.intervals import (
    fmt,
)
from ..granularity import per_delta
from ..paths import find_template

if TYPE_CHECKING:
    pass

from .markdown import (
    _seconds,
    eval_sets_line,
    granularity_text,
    interval_line,
    merge_line,
    paired_lines,
    train_only_note,
)


def html_view(report: dict, chunks: list[str], deltas: list[str], cfg) -> dict:
    """What report.html shows, from the same numbers and notes as report.md: scores with their intervals, the
    paired difference, '-' for chunks without test rows, the weights per delta (means over module groups when
    search.granularity is not `delta`), the shared-base, evaluation-set, merge and interval notes."""
    rows = report["rows"]
    notes = [f"Metric: {report['metric']}. Validation is what the search tuned on; test was never tuned on.",
             eval_sets_line(cfg), merge_line(cfg), interval_line(rows, cfg)]
    granularity = report.get("granularity", cfg.search.granularity)
    weight_note = (f"Weights per delta are means over its module groups (search.granularity: "
                   f"{granularity_text(cfg, granularity)}); search/best.json holds each." if granularity != "delta"
                   else "")
    paired = [line.strip("|").split(" | ") for line in paired_lines(report.get("paired") or {})[4:]
              if line and not line.startswith("---")]
    return {"notes": [n for n in notes if n], "weight_note": weight_note, "chunk_note": train_only_note(rows, chunks),
            "scores": [(r["model"], fmt(r["validation"], r.get("validation_ci")), fmt(r["test"], r.get("test_ci")),
                        _seconds(r)) for r in rows],
            "paired_title": (paired_lines(report["paired"])[1] if report.get("paired") else ""),
            "paired": [[c.strip() for c in p] for p in paired],
            "by_chunk": [(r["model"], [f"{r['test_by_chunk'][c]:.2f}" if c in r["test_by_chunk"] else "-"
                                       for c in chunks]) for r in rows],
            "weights": [(r["model"], [f"{per_delta(r['weights']).get(d, 0.0):.4g}" for d in deltas])
                        for r in rows if "weights" in r]}


def _html(report: dict, chunks: list[str], deltas: list[str], mix_probs: dict | None, images: dict, cfg) -> str:
    """report.html: self-contained (plots inlined as data: URIs), readable offline."""
    import base64

    import jinja2

    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    uris = [(title, "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode())
            for title, path in images.items()]
    stats = report["evaluation_stats"] if any(report["evaluation_stats"].values()) else None
    return env.from_string(find_template("report.html.j2").read_text(encoding="utf-8")).render(
        name=report["name"], rows=report["rows"], chunks=chunks, deltas=deltas, mix_probs=mix_probs, images=uris,
        evaluation_stats=stats, cost=report.get("cost", ""), **html_view(report, chunks, deltas, cfg))
