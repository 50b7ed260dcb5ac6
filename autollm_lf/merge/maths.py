"""The merge maths as pure functions of LoRA factors and dense deltas (property-tested in tests/test_merge_math.py).

W = W0 + sum_i w_i * dW_i, with dW_i = s_i * B_i @ A_i (s_i = lora_alpha / r). Nothing here holds a model: the
bank (bank.py) holds the loaded factors, the apply modes (apply.py) write what these functions compute.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Sequence

if TYPE_CHECKING:  # torch is imported where it is used: importing this module stays light
    import torch

    Factors = tuple[torch.Tensor, torch.Tensor, float]  # (A [r, in], B [out, r], s)
    Pairs = Iterable[tuple[torch.Tensor, float]]


# ---- pure functions (property-tested in tests/test_merge_math.py) ---------------------------------

def delta_weight(A: torch.Tensor, B: torch.Tensor, s: float) -> torch.Tensor:
    return s * (B @ A)


def weighted_delta(factors: Sequence[Factors], weights: Sequence[float]) -> torch.Tensor:
    """sum_i w_i * s_i * B_i @ A_i: the true weighted sum of the deltas."""
    return sum(w * delta_weight(A, B, s) for (A, B, s), w in zip(factors, weights))


def cat_factors(factors: Sequence[Factors], weights: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """One LoRA pair (A, B), scaling 1, whose product is the weighted sum exactly (PEFT's `cat`)."""
    import torch
    A = torch.cat([A for A, _, _ in factors], dim=0)
    B = torch.cat([w * s * B for (_, B, s), w in zip(factors, weights)], dim=1)
    return A, B


# ---- merge methods on the true deltas dW_i (not on the A/B factors) ----------------------------------
# A method = how each unit delta is sparsified (weight-independent, so cached or seeded) + one `combine`
# function over the (sparsified delta, weight) pairs of one module. Semantics follow mergekit's
# `ties` / `dare_ties` / `dare_linear` with `normalize: false`, `lambda: 1`, majority sign method `sum`.
# `combine` gets the pairs one at a time (a delta may live in a reused buffer), so a module never holds
# more than one dense delta plus the accumulators.



def linear_sum(pairs: Pairs) -> torch.Tensor | None:
    """sum_i w_i d_i (task arithmetic)."""
    total = None
    for d, w in pairs:
        total = d * w if total is None else total.add_(d, alpha=w)
    return total


def ties_sum(pairs: Pairs) -> torch.Tensor | None:
    """TIES sign election: per entry keep only the weighted deltas whose sign agrees with the sign of their
    sum (0 counts as +), and add those. With S = sum_i w_i d_i and P = sum_i max(w_i d_i, 0) that is
    where(S >= 0, P, S - P): it streams over the deltas (no stack) in three passes per delta."""
    import torch
    total = pos = part = None
    for d, w in pairs:
        part = torch.empty_like(d) if part is None else part
        torch.clamp(d, min=0, out=part) if w > 0 else torch.clamp(d, max=0, out=part)  # where w*d > 0, over w
        if total is None:
            total, pos = d * w, part * w
        else:
            total.add_(d, alpha=w)
            pos.add_(part, alpha=w)
    return None if total is None else torch.where(total >= 0, pos, total.sub_(pos))


def ties_norm_sum(pairs: Pairs) -> torch.Tensor | None:
    """TIES with each entry divided by max(1, total |weight| of the deltas kept there) (mergekit's
    `normalize: true`, capped so that weights up to 1 keep their meaning: one delta alone is never scaled up).
    An entry the deltas share (same sign) is averaged, counted once; an entry only one delta kept after
    trimming keeps that delta in full. Streams like ties_sum, with two more accumulators (kept weight)."""
    import torch
    total = pos = part = kept_pos = kept_all = None
    for d, w in pairs:
        part = torch.empty_like(d) if part is None else part
        torch.clamp(d, min=0, out=part) if w > 0 else torch.clamp(d, max=0, out=part)  # where w*d > 0, over w
        positive, nonzero = (part != 0).to(d.dtype), (d != 0).to(d.dtype)
        if total is None:
            total, pos, kept_pos, kept_all = d * w, part * w, positive * abs(w), nonzero * abs(w)
        else:
            total.add_(d, alpha=w)
            pos.add_(part, alpha=w)
            kept_pos.add_(positive, alpha=abs(w))
            kept_all.add_(nonzero, alpha=abs(w))
    if total is None:
        return None
    elected = total >= 0
    merged = torch.where(elected, pos, total.sub_(pos))
    divisor = torch.where(elected, kept_pos, kept_all.sub_(kept_pos)).clamp_(min=1.0)
    return merged.div_(divisor)


def output_basis(B: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis [out, k] of the column space of B (the directions a LoRA delta writes to)."""
    import torch
    U, S, _ = torch.linalg.svd(B, full_matrices=False)
    keep = S > S.max() * 1e-6 if S.numel() and S.max() > 0 else S > 0
    return U[:, keep]


class OutputNorm:
    """`linear_norm`: M = f(sum_i |w_i| P_i) @ sum_i w_i dW_i, with P_i the projector onto delta i's output
    directions and f(x) = 1 / max(1, x) applied to the eigenvalues. An output direction written by several
    deltas is divided by the total weight on it (shared once, as mergekit's normalize does per entry); one
    written by a single delta keeps it fully; total weights up to 1 change nothing (a delta alone at weight w is
    w * dW). M = B' @ A with B' = f(...) @ B: rank <= sum of the ranks, so an exact LoRA adapter.
    Built once per module from the unit factors (B_cat [out, R], each column's delta `owner`); `apply` is the
    per-trial work: one eigh of a k x k matrix (k <= R) and an out x R x k product."""

    def __init__(self, B: torch.Tensor, owner: torch.Tensor, n_deltas: int):
        import torch
        B64 = B.double()
        bases = [output_basis(B64[:, owner == i]) for i in range(n_deltas)]
        self.basis_owner = torch.cat([torch.full((b.shape[1],), i) for i, b in enumerate(bases)])
        U_cat = torch.cat(bases, dim=1)  # [out, sum k_i]
        P, S, Vh = torch.linalg.svd(U_cat, full_matrices=False)
        keep = S > (S.max() * 1e-9 if S.numel() else 0)
        self.Q = P[:, keep]  # orthonormal basis of the span of every delta's output directions
        self.R = S[keep, None] * Vh[keep]  # U_cat = Q @ R
        self.QtB = self.Q.T @ B64
        self.B = B64

    def apply(self, w: torch.Tensor) -> torch.Tensor:
        """B' for the per-delta weights w (float64, one per delta): B + Q (f(H) - I) Q^T B."""
        import torch
        w = w.to(self.R.device)
        H = (self.R * w.abs()[self.basis_owner.to(w.device)]) @ self.R.T
        lam, E = torch.linalg.eigh(H)
        shrink = 1.0 / lam.clamp(min=1.0) - 1.0  # f - 1: zero where the total weight is <= 1
        return self.B + self.Q @ ((E * shrink) @ (E.T @ self.QtB))


def normalized_delta(factors: Sequence[Factors], weights: Sequence[float]) -> torch.Tensor:
    """linear_norm's merged delta for one module (the pure form of OutputNorm, for tests)."""
    import torch
    A = torch.cat([A for A, _, _ in factors], dim=0)
    B = torch.cat([s * B for _, B, s in factors], dim=1)
    owner = torch.cat([torch.full((A_.shape[0],), i) for i, (A_, _, _) in enumerate(factors)])
    w = torch.tensor(list(weights), dtype=torch.float64)
    return OutputNorm(B, owner, len(factors)).apply(w).to(A.dtype) @ (A * w[owner, None].to(A.dtype))


def magnitude_threshold(delta: torch.Tensor, density: float) -> float | None:
    """The largest |entry| TIES drops: keeping |d| > it keeps the int(density * numel) largest (mergekit's
    `magnitude`); None when everything is kept."""
    drop = delta.numel() - int(density * delta.numel())
    if drop <= 0:
        return None
    magnitude = delta.abs().view(-1)
    if magnitude.device.type == "cpu":  # numpy's introselect: 2.5x faster than torch.kthvalue on CPU
        import numpy as np
        return float(np.partition(magnitude.numpy(), drop - 1)[drop - 1])
    return magnitude.kthvalue(drop).values.item()


def trim(delta: torch.Tensor, threshold: float | None) -> torch.Tensor:
    import torch
    return delta if threshold is None else torch.nn.functional.hardshrink(delta, threshold)


def dare_mask(shape, density: float, generator: torch.Generator, device) -> torch.Tensor:
    """DARE's keep mask: each entry kept with probability `density`."""
    import torch
    return torch.rand(shape, generator=generator, device=device) < density


def dare_drop(delta: torch.Tensor, density: float, keep: torch.Tensor | torch.Generator) -> torch.Tensor:
    """DARE: drop each entry with probability 1 - density, rescale the rest by 1 / density (in place).
    `keep` is the mask, or the seeded generator that makes it."""
    import torch
    if density >= 1.0:
        return delta
    if isinstance(keep, torch.Generator):
        keep = dare_mask(delta.shape, density, keep, delta.device)
    return delta.mul_(keep).mul_(1.0 / density)


def dare_seed(seed: int, module: int, delta: int) -> int:
    """One fixed mask per (run seed, module, delta): the same weights always give the same merge."""
    return (seed * 1_000_003 + module * 10_007 + delta) % (2**63)


def svd_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-`rank` pair (A [rank, in], B [out, rank]) with B @ A ~ delta, and the relative Frobenius error."""
    import torch
    U, S, Vh = torch.linalg.svd(delta.float(), full_matrices=False)
    rank = min(rank, S.numel())
    root = S[:rank].sqrt()
    A, B = root[:, None] * Vh[:rank], U[:, :rank] * root
    norm = S.square().sum().sqrt().item()
    error = S[rank:].square().sum().sqrt().item() / norm if norm > 0 else 0.0
    return A, B, error
