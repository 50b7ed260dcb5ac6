"""The merge methods' registry: one line per method (a `combine` over sparsified deltas, and its flags)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from .maths import linear_sum, ties_norm_sum, ties_sum

if TYPE_CHECKING:
    import torch

    from .maths import Pairs


@dataclass(frozen=True)
class MergeMethod:
    combine: Callable[[Pairs], torch.Tensor | None]
    sparsify: str | None  # None, "magnitude" (TIES trim, threshold cached) or "random" (DARE, seeded mask)
    low_rank: bool = False  # applied on the `cat` factors in place, exported exactly; else folded, exported by SVD
    normalize: bool = False  # shared parts counted once (divided by the total weight of the deltas sharing them)
    data_aware: str | None = None  # RegMean's A rows from the chunks' data: "full" (regmean_A), "core" (regmean_core_A)


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
}
