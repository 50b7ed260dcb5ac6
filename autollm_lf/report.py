"""Stage 4: the AutoLLM README's table on validation and test, the weights table, a convergence plot."""
from __future__ import annotations

import json

from .errors import UserError
from .io import atomic_write_text, file_digest, fingerprint, read_json, read_jsonl, write_json
from .mix import MIX_DELTA, mix_spec
from .search import per_delta
from .train import ALL_DELTA, DONE_MARKER


def report_rows(session) -> list[dict]:
    """Every row is a weight vector over the loaded deltas, scored in place on the same model."""
    cfg, chunks = session.cfg, session.deltas
    best = read_json(cfg.out / "search" / "best.json")
    if best is None:
        raise UserError(f"{cfg.out / 'search' / 'best.json'} missing; run `autollm search` first")
    rows = [("raw", {c: 0.0 for c in chunks}, False)]
    if ALL_DELTA in session.adapters:
        rows.append((f"train@{ALL_DELTA}", {ALL_DELTA: 1.0}, False))
    rows += [(f"train@{c}", {d: float(d == c) for d in chunks}, False) for c in chunks]
    rows.append(("average_merge", {c: 1.0 for c in chunks}, True))
    if cfg.search.human_weights:
        rows.append(("human_merge", session.human_weights(), True))
    rows.append(("auto_merge", best["weights"], True))
    result = []
    for name, w, show in rows:
        method = None if show else "linear"  # raw and train@ rows are the models as trained; merges use search.merge
        validation, _ = session.score_by_chunk(w, "validation", method)
        test, test_by_chunk = session.score_by_chunk(w, "test", method)
        result.append({"model": name, "validation": validation, "test": test, "test_by_chunk": test_by_chunk,
                       **({"weights": w} if show else {})})
    mix = _mix_dir(cfg)
    if mix is not None:
        result.append(_adapter_row(cfg, f"train@{MIX_DELTA}", mix))
    return result


def _mix_dir(cfg):
    """train@auto_mix's adapter if the mix stage trained it (it is not one of the search's loaded deltas)."""
    mix = cfg.out / "deltas" / MIX_DELTA
    return mix if cfg.train.auto_mix and (mix / DONE_MARKER).is_file() else None


def _adapter_row(cfg, name: str, adapter_dir) -> dict:
    """A row for an adapter the search never loaded: scored on its own, loaded as a user would load it."""
    from .export import adapter_score

    row = {"model": name}
    for split in ("validation", "test"):
        evaluator = adapter_score(cfg, adapter_dir, split)
        row[split], by_chunk = split_by_chunk(evaluator.row_scores(), [r["chunk"] for r in evaluator.rows])
    row["test_by_chunk"] = by_chunk
    return row


def split_by_chunk(scores: list[float], chunks: list[str]) -> tuple[float, dict[str, float]]:
    """Mean score overall and on each chunk's rows."""
    by_chunk = {c: sum(f for f, k in zip(scores, chunks) if k == c) / chunks.count(c) for c in dict.fromkeys(chunks)}
    return sum(scores) / max(len(scores), 1), by_chunk


def _markdown(rows: list[dict], chunks: list[str], deltas: list[str], cfg) -> str:
    lines = [f"# autollm-lf report: {cfg.run_label}", "",
             f"Metric: {cfg.evaluation.metric}. Validation is what the search tuned on; test was never tuned on.",
             f"Merges (average, human, auto) use `{cfg.search.merge}`"
             + (f" (density {cfg.search.density})." if cfg.search.merge != "linear" else "."), "",
             "model | validation | test |", "---|---|---|"]
    lines += [f"{r['model']} | {r['validation']:.4f} | {r['test']:.4f} |" for r in rows]
    lines += ["", "Test score by chunk:", "", "model | " + " | ".join(chunks) + " |", "---|" + "---|" * len(chunks)]
    lines += [f"{r['model']} | " + " | ".join(f"{r['test_by_chunk'][c]:.2f}" if c in r["test_by_chunk"] else "-"
                                              for c in chunks) + " |"  # "-": a training-only chunk (bad cases)
              for r in rows]
    lines += ["", "model | " + " | ".join(f"{d}_weight" for d in deltas) + " |", "---|" + "---|" * len(deltas)]
    lines += [f"{r['model']} | " + " | ".join(f"{per_delta(r['weights']).get(d, 0.0):.4g}" for d in deltas) + " |"
              for r in rows if "weights" in r]
    if cfg.search.granularity != "delta":
        lines += ["", f"Weights per delta are means over its module groups (search.granularity: "
                      f"{cfg.search.granularity}); search/best.json holds each."]
    lines += ["", "![convergence](convergence.png)", "", "![weights](weights.png)", ""]
    if cfg.search.granularity != "delta":
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
        ax.bar([j + i * width for j in range(len(deltas))], [per_delta(r["weights"]).get(d, 0.0) for d in deltas], width,
               label=r["model"])
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

    groups = list(dict.fromkeys(k.split("@", 1)[1] for k in weights if "@" in k))
    grid = [[weights.get(f"{d}@{g}", float("nan")) for g in groups] for d in deltas]
    fig, ax = plt.subplots(figsize=(max(6, 0.3 * len(groups) + 3), 0.5 * len(deltas) + 2))
    image = ax.imshow(grid, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(groups)), groups, rotation=90, fontsize=7)
    ax.set_yticks(range(len(deltas)), deltas, fontsize=8)
    ax.set_title("auto_merge weight per delta and module group")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _html(report: dict, chunks: list[str], deltas: list[str], mix_probs: dict | None, images: dict) -> str:
    """report.html: self-contained (plots inlined as data: URIs), readable offline."""
    import base64

    import jinja2

    from .train import find_template
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    uris = [(title, "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()) for title, path in images.items()]
    stats = report["evaluation_stats"] if any(report["evaluation_stats"].values()) else None
    return env.from_string(find_template("report.html.j2").read_text(encoding="utf-8")).render(
        name=report["name"], metric=report["metric"], rows=report["rows"], chunks=chunks, deltas=deltas,
        mix_probs=mix_probs, images=uris, evaluation_stats=stats)


def report_fingerprint(session) -> str:
    cfg = session.cfg
    mix = _mix_dir(cfg)
    return fingerprint(session.search_fingerprint(), read_json(cfg.out / "search" / "best.json"),
                       file_digest([cfg.out / "data" / "test.json"]), cfg.search.human_weights,
                       read_json(mix / DONE_MARKER) if mix else None)


def write_report(session) -> dict:
    cfg, chunks = session.cfg, session.chunks
    out = cfg.out / "report"
    fp = report_fingerprint(session)
    done = read_json(out / "report.json", {})
    if "report" not in session.force and done.get("fingerprint") == fp and (out / "report.html").exists():
        print((out / "report.md").read_text(encoding="utf-8").split("\n\n![")[0])
        print(f"report: {out} up to date")
        return done
    rows = report_rows(session)
    auto = next(r for r in rows if r["model"] == "auto_merge")
    stats = {split: dict(session.scorer(split).stats) for split in ("validation", "test")}
    report = {"name": cfg.name, "metric": cfg.evaluation.metric, "rows": rows,
              "merge": {"method": cfg.search.merge, "density": cfg.search.density},
              "best": {"weights": auto["weights"], "validation": auto["validation"], "test": auto["test"]},
              "evaluation_stats": stats, "fingerprint": fp}
    write_json(out / "report.json", report)
    images = {"Search convergence": out / "convergence.png", "Merge weights": out / "weights.png"}
    _plot(read_jsonl(cfg.out / "search" / "trials.jsonl"), rows, images["Search convergence"])
    _plot_weights(rows, session.deltas, images["Merge weights"])
    if cfg.search.granularity != "delta":
        images["Weights per module group"] = out / "weights_heatmap.png"
        _plot_heatmap(auto["weights"], session.deltas, images["Weights per module group"])
    mix = mix_spec(cfg, session.shapes, auto["weights"]) if _mix_dir(cfg) else None
    atomic_write_text(out / "report.html", _html(report, chunks, session.deltas, mix and mix[1], images))
    md = _markdown(rows, chunks, session.deltas, cfg)
    if any(stats.values()):  # e.g. how many judge answers held no score
        md += "\nEvaluator counts (over every row scored for this report): " + json.dumps(stats) + "\n"
    atomic_write_text(out / "report.md", md)
    print(_markdown(rows, chunks, session.deltas, cfg).split("\n\n![")[0])
    return report
