"""The merge methods' registry: one line per method (a `combine` over sparsified deltas, and its flags)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from .maths import linear_sum, ties_norm_sum, ties_sum
from .spectral import iso_c_core, iso_cts_core, tsv_core

if TYPE_CHECKING:
    import torch

    from .maths import Pairs
    from .spectral import CoreSpace


@dataclass(frozen=True)
class MergeMethod:
    combine: Callable[[Pairs], torch.Tensor | None]
    sparsify: str | None  # None, "magnitude" (TIES trim, threshold cached) or "random" (DARE, seeded mask)
    low_rank: bool = False  # applied on the `cat` factors in place, exported exactly; else folded, exported by SVD
    normalize: bool = False  # shared parts counted once (divided by the total weight of the deltas sharing them)
    data_aware: str | None = None  # RegMean's A rows from the chunks' data: "full" (regmean_A), "core" (regmean_core_A)
    spectral: Callable[[CoreSpace, list[float]], torch.Tensor | None] | None = None  # the merged core (spectral.py)
    weights_inside: bool = False  # data-aware: the weights weigh each delta's Gram inside RegMean's sum (0 drops it)

    @property
    def differentiable(self) -> bool:
        """The trial's A_cat rows are a differentiable function of the weights (LowRankWriter.trial_rows): what the
        gradient optimiser fits."""
        return self.low_rank and self.spectral is None

    @property
    def needs_cat(self) -> bool:
        """Writes more than the adapters' scalings: needs search.apply cat or fold."""
        return self.low_rank and bool(self.normalize or self.data_aware or self.spectral)


MERGE_METHODS: dict[str, MergeMethod] = {
    "linear": MergeMethod(linear_sum, None, low_rank=True),
    "ties": MergeMethod(ties_sum, "magnitude"),
    "dare_linear": MergeMethod(linear_sum, "random"),
    "dare_ties": MergeMethod(ties_sum, "random"),
    # normalised: what several deltas share is counted once (see OutputNorm, ties_norm_sum)
    "linear_norm": MergeMethod(linear_sum, None, low_rank=True, normalize=True),
    "ties_norm": MergeMethod(ties_norm_sum, "magnitude", normalize=True),
    "dare_ties_norm": MergeMethod(ties_norm_sum, "random", normalize=True),
    # data-aware: RegMean's A_i C_i' S^-1 in place of each A_i (regmean.py), weights on top; all ones is RegMean;
    # regmean_core: the same least squares within the deltas' own input directions (R x R Grams: any model size)
    "regmean": MergeMethod(linear_sum, None, low_rank=True, data_aware="full"),
    "regmean_core": MergeMethod(linear_sum, None, low_rank=True, data_aware="core"),
    # regmean_w: the weights inside RegMean's sum (core space, regmean.weighted_core_A): w_i weighs chunk i's rows in
    # the least squares, so 0 drops delta i, one-hot is that delta alone, all ones is regmean_core
    "regmean_w": MergeMethod(linear_sum, None, low_rank=True, data_aware="core", weights_inside=True),
    # spectral, in the deltas' core space (spectral.py): exact LoRA; the weights scale each delta before the merge
    "tsv": MergeMethod(linear_sum, None, low_rank=True, spectral=tsv_core),
    "iso_c": MergeMethod(linear_sum, None, low_rank=True, spectral=iso_c_core),
    "iso_cts": MergeMethod(linear_sum, None, low_rank=True, spectral=iso_cts_core),
}


# search.merge: auto: the search races these on the holdout rows (search/merge_choice.py). linear first: a tie (the
# best point is one where they compute the same, e.g. raw or a delta alone) keeps the plain sum; regmean_w's weight
# 0 drops a delta (regmean's cannot), regmean solves in the full input space (a stronger start on Gemma 3 270M)
AUTO_MERGE = "auto"
AUTO_MERGES = ("linear", "regmean_w", "regmean")


def merge_candidates(merge: str) -> tuple[str, ...]:
    """The methods search.merge may end as: AUTO_MERGES for `auto`, else the one named."""
    return AUTO_MERGES if merge == AUTO_MERGE else (merge,)


def data_space(merge: str) -> str | None:
    """The Grams the run's merge (any candidate of `auto`) needs: `full`, `core` or None (footprint, load)."""
    spaces = [MERGE_METHODS[m].data_aware for m in merge_candidates(merge) if m in MERGE_METHODS]
    return next((s for s in spaces if s), None)


def differentiable_methods() -> list[str]:
    """The methods whose trial rows are differentiable in the weights: those the gradient optimiser can fit."""
    return [name for name, spec in MERGE_METHODS.items() if spec.differentiable]


def apply_switch(method: str, apply: str) -> str:
    """The apply mode a merge method overrides (search.apply), said in one line; empty when it keeps it. Read by
    WeightedDeltas (which switches) for its log line and by the report for its own."""
    spec = MERGE_METHODS[method]
    if not spec.low_rank and apply != "fold":
        return (f"search.apply {apply} switched to fold: {method} is not low rank, so its merge is folded into the "
                f"base weights (and exported as a truncated SVD)")
    if spec.needs_cat and apply == "scaling":
        return (f"search.apply scaling switched to cat: {method} writes more than each adapter's scaling (the "
                f"cat factors' rows), which scaling cannot")
    return ""
