"""The merge saved as one ordinary PEFT adapter, from the loaded bank (no reload)."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Mapping

from ..lazytorch import no_grad
from .bank import DeltaBank
from .dense import DenseMerger
from .lowrank import LowRankWriter
from .maths import svd_factors
from .registry import MERGE_METHODS

MERGED = "autollm_merged"


def export_adapter(bank: DeltaBank, lowrank: LowRankWriter, dense: DenseMerger, method: str,
                   weights: Mapping[str, float], out_dir: Path) -> dict:
    """Saves the merge for `weights` to out_dir and returns how it was made (export_info). A low-rank method
    (`low_rank=True` in registry.MERGE_METHODS; any granularity): the in-place `cat` factors as they stand for these
    weights, copied into an adapter PEFT's `cat` builds (same shapes, same scaling): exact. Any other method (the
    sparsified ones): the merged dW of each module is not low rank, so its truncated SVD at the rank `cat` would
    have (the sum of the deltas' ranks, capped by min(d_in, d_out)); the info says the relative error. The model's
    adapters are left for the caller to set again (WeightedDeltas.export)."""
    spec = MERGE_METHODS[method]
    for layer, unit in zip(bank.layers, bank.unit_scaling):  # add_weighted_adapter reads the unit scalings
        layer.scaling.update(unit)
    if bank.cat is None:  # `scaling` mode has no cat factors yet
        bank.build_cat()
        bank.model.base_model.set_adapter(bank.names)
    bank.model.add_weighted_adapter(bank.names, [1.0] * len(bank.names), MERGED, combination_type="cat")
    if spec.low_rank:
        lowrank.write(weights, spec)
        copy_cat(bank)
        info = {"method": method, "granularity": bank.granularity,
                "how": "the in-place cat factors of the merge (PEFT cat layout), exact"}
    else:
        info = write_svd(bank, dense, method, bank.cat_module_weights(weights))
    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory(dir=out_dir.parent) as tmp:
        bank.model.save_pretrained(tmp, selected_adapters=[MERGED])
        shutil.rmtree(out_dir, ignore_errors=True)
        shutil.move(str(Path(tmp) / MERGED), out_dir)
    bank.model.delete_adapter(MERGED)
    return info


@no_grad
def copy_cat(bank) -> None:
    for m in bank.cat:
        m.layer.lora_A[MERGED].weight.copy_(m.A)
        m.layer.lora_B[MERGED].weight.copy_(m.B)


@no_grad
def write_svd(bank: DeltaBank, dense: DenseMerger, method: str, w_modules: list[list[float]]) -> dict:
    """Overwrite the merged adapter's factors with the truncated SVD of each module's merged delta."""
    errors, ranks = [], []
    for k, m in enumerate(bank.cat):
        A_out, B_out = m.layer.lora_A[MERGED].weight, m.layer.lora_B[MERGED].weight
        A_out.zero_(), B_out.zero_()
        delta = dense.merged_delta(k, w_modules[k], MERGE_METHODS[method])
        if delta is None:
            continue
        A, B, error = svd_factors(delta, A_out.shape[0])
        A_out[: A.shape[0]] = A.to(A_out.dtype)
        B_out[:, : B.shape[1]] = (B / m.layer.scaling[MERGED]).to(B_out.dtype)
        errors.append(error)
        ranks.append(A.shape[0])
    return {"method": method, "density": dense.density, "granularity": bank.granularity,
            "how": "truncated SVD of each module's merged true delta at the sum of the deltas' ranks "
                   "(capped by min(d_in, d_out)), saved as one LoRA adapter",
            "rank_max": max(ranks, default=0),
            "relative_frobenius_error_max": max(errors, default=0.0),
            "relative_frobenius_error_mean": sum(errors) / len(errors) if errors else 0.0}
