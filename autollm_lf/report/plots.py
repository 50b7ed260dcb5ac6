"""The report's figures: search convergence, the merge weights, the weights per module group."""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..granularity import param_group, param_name, per_delta
from ..train.deltas import ALL_DELTA

if TYPE_CHECKING:
    pass


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
