"""Stage 4: the AutoLLM README's table on validation and test, the weights table, a convergence plot."""
from __future__ import annotations

import json
from typing import TYPE_CHECKING

from ..evaluate.intervals import (
    by_chunk_intervals,
    fmt,
    mean_interval,
    paired_by_chunk,
    paired_difference,
    resample_index,
    split_by_chunk,
)
from ..fileio import atomic_write_text, file_digest, fingerprint, read_json, read_jsonl, write_json
from ..granularity import param_group, param_name, per_delta
from ..log import get_logger, progress
from ..merge import MERGE_METHODS, apply_switch
from ..paths import MIX_DELTA, SHARED, find_template, is_fresh
from ..search.merge_choice import choice_line
from ..session import adapter_scorers, exported_adapter
from ..train.auto_mix import mix_spec
from ..train.deltas import ALL_DELTA, DONE_MARKER

if TYPE_CHECKING:
    from ..session import Session

logger = get_logger(__name__)

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


def _plot(trials: list[dict], rows: list[dict], path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scores = [t["validation"] for t in trials]
    best_so_far = [max(scores[: i + 1]) for i in range(len(scores))]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.scatter(range(len(scores)), scores, s=12, alpha=0.6, label="trial")
    ax.plot(best_so_far, color="C1", label="best so far")
    for r in rows:
        if r["model"] in ("raw", f"train@{ALL_DELTA}", "average_merge", "human_merge"):
            ax.axhline(r["validation"], ls="--", lw=0.8, color="gray")
            ax.annotate(r["model"], (len(scores) - 1, r["validation"]), fontsize=7, ha="right", va="bottom")
    ax.set_xlabel("trial")
    ax.set_ylabel("validation score")
    ax.set_title("auto_merge search")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_weights(rows: list[dict], deltas: list[str], path) -> None:
    """One bar group per delta: the weights of each merge row side by side."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    merges = [r for r in rows if "weights" in r]
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(deltas) + 2), 4))
    width = 0.8 / max(len(merges), 1)
    for i, r in enumerate(merges):
        ax.bar([j + i * width for j in range(len(deltas))], [per_delta(r["weights"]).get(d, 0.0) for d in deltas],
               width, label=r["model"])
    ax.set_xticks([j + width * (len(merges) - 1) / 2 for j in range(len(deltas))], deltas, rotation=20, ha="right")
    ax.set_ylabel("weight")
    ax.set_title("merge weights per delta")
    top = max([w for r in merges for w in r["weights"].values()] + [1.0])
    ax.set_ylim(top=top * 1.25)  # room for the legend above the bars
    ax.legend(ncol=len(merges), loc="upper center")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_heatmap(weights: dict[str, float], deltas: list[str], path) -> None:
    """auto_merge's weights at a finer granularity: one row per delta, one column per module group."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys(g for g in map(param_group, weights) if g is not None))
    grid = [[weights.get(param_name(d, g), float("nan")) for g in groups] for d in deltas]
    fig, ax = plt.subplots(figsize=(max(6, 0.3 * len(groups) + 3), 0.5 * len(deltas) + 2))
    image = ax.imshow(grid, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(groups)), groups, rotation=90, fontsize=7)
    ax.set_yticks(range(len(deltas)), deltas, fontsize=8)
    ax.set_title("auto_merge weight per delta and module group")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def train_only_note(rows: list[dict], chunks: list[str]) -> str:
    """The chunks without test rows (train_only sources, bad cases): their test cells say '-', not 0."""
    missing = [c for c in chunks if any(c not in r["test_by_chunk"] for r in rows)]
    return (f"Chunks without test rows ({', '.join(missing)}): training rows only (train_only sources, bad cases); "
            f"'-' is no score, not 0." if missing else "")


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
