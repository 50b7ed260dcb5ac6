"""Stage 4: the AutoLLM README's table on validation and test, the weights table, a convergence plot."""
from __future__ import annotations

import json

from .errors import UserError
from .io import atomic_write_text, file_digest, fingerprint, read_json, read_jsonl, write_json
from .train import ALL_DELTA


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
    return result


def _markdown(rows: list[dict], chunks: list[str], deltas: list[str], cfg) -> str:
    lines = [f"# autollm-lf report: {cfg.name}", "",
             f"Metric: {cfg.evaluation.metric}. Validation is what the search tuned on; test was never tuned on.",
             f"Merges (average, human, auto) use `{cfg.search.merge}`"
             + (f" (density {cfg.search.density})." if cfg.search.merge != "linear" else "."), "",
             "model | validation | test |", "---|---|---|"]
    lines += [f"{r['model']} | {r['validation']:.4f} | {r['test']:.4f} |" for r in rows]
    lines += ["", "Test score by chunk:", "", "model | " + " | ".join(chunks) + " |", "---|" + "---|" * len(chunks)]
    lines += [f"{r['model']} | " + " | ".join(f"{r['test_by_chunk'].get(c, 0.0):.2f}" for c in chunks) + " |"
              for r in rows]
    lines += ["", "model | " + " | ".join(f"{d}_weight" for d in deltas) + " |", "---|" + "---|" * len(deltas)]
    lines += [f"{r['model']} | " + " | ".join(f"{r['weights'].get(d, 0.0):.4g}" for d in deltas) + " |"
              for r in rows if "weights" in r]
    lines += ["", "![convergence](convergence.png)", ""]
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


def report_fingerprint(session) -> str:
    cfg = session.cfg
    return fingerprint(session.search_fingerprint(), read_json(cfg.out / "search" / "best.json"),
                       file_digest([cfg.out / "data" / "test.json"]), cfg.search.human_weights)


def write_report(session) -> dict:
    cfg, chunks = session.cfg, session.chunks
    out = cfg.out / "report"
    fp = report_fingerprint(session)
    done = read_json(out / "report.json", {})
    if "report" not in session.force and done.get("fingerprint") == fp and (out / "report.md").exists():
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
    _plot(read_jsonl(cfg.out / "search" / "trials.jsonl"), rows, out / "convergence.png")
    md = _markdown(rows, chunks, session.deltas, cfg)
    if any(stats.values()):  # e.g. how many judge answers held no score
        md += "\nEvaluator counts (over every row scored for this report): " + json.dumps(stats) + "\n"
    atomic_write_text(out / "report.md", md)
    print(_markdown(rows, chunks, session.deltas, cfg).split("\n\n![")[0])
    return report
