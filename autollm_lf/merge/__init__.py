"""The merge stage: the deltas added to the base with one weight per delta (and module group), in place.

W = W0 + sum_i w_i * dW_i, with dW_i = s_i * B_i @ A_i (s_i = lora_alpha / r). With every adapter active, PEFT
computes y = W0 x + sum_i scaling_i * B_i A_i x, so setting scaling_i = w_i * s_i gives exactly the weighted sum:
no weight copies, no reloads, one float per adapter per layer per trial.

Parts: maths.py (pure functions), registry.py (the merge methods' registry), bank.py (base and adapters loaded
once, the cat factors), apply.py (one object per apply mode), lowrank.py, spectral.py and dense.py (what a trial
writes), adapter.py (one PEFT adapter), weighted.py (WeightedDeltas, the one object the pipeline holds), regmean.py
(RegMean's Grams and solve) and grams.py (each chunk's Grams, from its training rows).
"""
from ..granularity import GRANULARITIES, Granularity, module_groups, param_delta, param_name, parse_granularity
from .apply import APPLY_MODES, FOLD_COPY_BUDGET
from .bank import CAT, CatModule, DeltaBank, load_base
from .dense import DARE_CACHE_BYTES
from .maths import (
    OutputNorm,
    cat_factors,
    dare_drop,
    dare_mask,
    dare_seed,
    delta_weight,
    linear_sum,
    magnitude_threshold,
    normalized_delta,
    output_basis,
    svd_factors,
    ties_norm_sum,
    ties_sum,
    trim,
    weighted_delta,
)
from .registry import (
    AUTO_MERGE,
    AUTO_MERGES,
    MERGE_METHODS,
    MergeMethod,
    apply_switch,
    data_space,
    differentiable_methods,
    merge_candidates,
)
from .spectral import CoreSpace, iso_c_merge, tsv_merge
from .weighted import WeightedDeltas

__all__ = [
    "APPLY_MODES", "AUTO_MERGE", "AUTO_MERGES", "CAT", "data_space", "merge_candidates",
    "DARE_CACHE_BYTES", "FOLD_COPY_BUDGET", "GRANULARITIES", "MERGE_METHODS", "CatModule",
    "CoreSpace", "apply_switch", "iso_c_merge", "differentiable_methods", "tsv_merge",
    "DeltaBank", "Granularity", "MergeMethod", "OutputNorm", "WeightedDeltas", "cat_factors", "dare_drop", "dare_mask",
    "dare_seed", "delta_weight", "linear_sum", "load_base", "magnitude_threshold", "module_groups", "normalized_delta",
    "output_basis", "param_delta", "param_name", "parse_granularity", "svd_factors", "ties_norm_sum", "ties_sum",
    "trim", "weighted_delta",
]
