"""Spectral merges in the LoRA core space: TSV-M (task singular vectors, Gargiulo et al. 2025), Iso-C and Iso-CTS
(isotropic merging, with task-specific subspaces: Marczak et al. 2025), each an exact LoRA adapter (the "core
space" of Panariello et al. 2025).

Every delta of a module reads within the span of the stacked A rows (A_u) and writes within that of the side-by-side
B columns (B_u). With orthonormal bases Q_A, Q_B of those spans, dW_i = Q_B M_i Q_A^T, where the core
M_i = Q_B^T (s_i B_i A_i) Q_A is at most R x R (R: the sum of the ranks). Orthonormal factors on both sides keep
singular values and carry singular vectors along, so an SVD-based merge of the dW_i is Q_B (the same merge of the
M_i) Q_A^T: a LoRA pair of rank <= R (B' = Q_B M*, A' = Q_A^T), exported as it is applied. Per trial a module costs
SVDs of R x R matrices, not of d_out x d_in ones.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

if TYPE_CHECKING:
    import torch

    Spectrum = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # U, S, Vh of one core, nonzero part only

RANK_TOL = 1e-9  # singular values below this share of the largest count as zero (float64 cores)
ISO_CTS_COMMON = 0.8  # Iso-CTS: share of the merged rank given to the common subspace (the paper's default)


# ---- pure functions (tests/test_spectral.py; tests/conftest.py's ref_merge is the dense reference) ---------------

def kept_svd(M: torch.Tensor, tol: float = RANK_TOL) -> Spectrum:
    """The SVD of M without its (numerically) zero singular values."""
    import torch
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    keep = S > S.max() * tol if S.numel() else S > 0
    return U[:, keep], S[keep], Vh[keep]


def orthonormal_basis(X: torch.Tensor, tol: float = RANK_TOL) -> torch.Tensor:
    """An orthonormal basis of X's column space."""
    return kept_svd(X, tol)[0]


def polar(X: torch.Tensor) -> torch.Tensor:
    """The matrix with orthonormal columns (rows, if X is wide) nearest to X: U Vh of its SVD (TSV-M's whitening)."""
    import torch
    U, _, Vh = torch.linalg.svd(X, full_matrices=False)
    return U @ Vh


def tsv_merge(spectra: Sequence[Spectrum], weights: Sequence[float]) -> torch.Tensor | None:
    """TSV-M: each weighted delta's singular vectors, the left ones side by side and the right ones side by side,
    each set made orthonormal (polar), then recombined with the weighted singular values. Deltas at weight 0 take no
    part. A LoRA delta keeps all its singular vectors (its rank is at most R / T, TSV-M's share per task). Deltas
    whose singular vectors are already orthogonal to one another merge as their plain sum; one delta alone is
    itself."""
    import torch
    kept = [(U, S * w, Vh) for (U, S, Vh), w in zip(spectra, weights) if w != 0 and S.numel()]
    if not kept:
        return None
    U = polar(torch.cat([U for U, _, _ in kept], dim=1))
    Vh = polar(torch.cat([Vh for _, _, Vh in kept], dim=0).T).T
    return (U * torch.cat([S for _, S, _ in kept])) @ Vh


def iso_c_merge(cores: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor | None:
    """Iso-C: the weighted sum's singular vectors with one singular value for all, their mean (a flat spectrum:
    directions few deltas write get as much as the dominant ones). The weights set the sum's subspace and,
    together, the overall scale."""
    terms = [M * w for M, w in zip(cores, weights) if w != 0]
    if not terms:
        return None
    U, S, Vh = kept_svd(sum(terms))
    return S.mean() * U @ Vh if S.numel() else None


def iso_cts_merge(cores: Sequence[torch.Tensor], weights: Sequence[float],
                  common_share: float = ISO_CTS_COMMON) -> torch.Tensor | None:
    """Iso-CTS: the weighted sum's top `common_share` of singular directions (the common subspace), plus, for each
    weighted delta, the top directions of what it writes outside that subspace (an equal share each of the rest
    of the sum's rank), the left and the right sets each made orthonormal (polar), all with one singular value, the
    mean of the ones kept: directions only one delta writes are not crowded out by the common ones."""
    import torch
    kept = [M * w for M, w in zip(cores, weights) if w != 0 and M.any()]  # a delta not in the module: no share
    if not kept:
        return None
    U, S, Vh = kept_svd(sum(kept))
    # every delta gets at least one direction of its own (a core space is small: R = 32 for 4 rank-8 deltas)
    per_delta = max(1, round((1 - common_share) * S.numel() / len(kept)))
    common = max(1, S.numel() - per_delta * len(kept))
    lefts, rights, values = [U[:, :common]], [Vh[:common]], [S[:common]]
    if S.numel() > common:
        project = torch.eye(U.shape[0], dtype=U.dtype) - U[:, :common] @ U[:, :common].T
        for M in kept:
            U_i, S_i, Vh_i = kept_svd(project @ M)
            lefts.append(U_i[:, :per_delta]), rights.append(Vh_i[:per_delta]), values.append(S_i[:per_delta])
    sigma = torch.cat(values).mean()
    return sigma * polar(torch.cat(lefts, dim=1)) @ polar(torch.cat(rights, dim=0).T).T


# ---- one module's core space, built once from the unit factors -------------------------------------------------

def tsv_core(space: CoreSpace, weights: Sequence[float]) -> torch.Tensor | None:
    return tsv_merge(space.spectra, weights)


def iso_c_core(space: CoreSpace, weights: Sequence[float]) -> torch.Tensor | None:
    return iso_c_merge(space.cores, weights)


def iso_cts_core(space: CoreSpace, weights: Sequence[float]) -> torch.Tensor | None:
    return iso_cts_merge(space.cores, weights)


class CoreSpace:
    """Q_A, Q_B and each delta's core (and its SVD) for one cat module. `A_rows` (Q_A^T, k_A x d_in) is what A_cat
    holds for these methods whatever the weights; a trial computes the merged core and B' = Q_B M*. The cores stay
    on the CPU in float64 (R x R SVDs are faster there than on a GPU); Q_A^T and Q_B, in the model's dtype and on
    its device, cost one more copy of the adapters' factors."""

    def __init__(self, A: torch.Tensor, B: torch.Tensor, owner: torch.Tensor, scale: torch.Tensor, n_deltas: int):
        """A: the unit A rows [R, d_in]; B: the unit B_cat [d_out, R]; owner/scale: each row's delta and s_i."""
        A64, B64 = A.detach().double().cpu(), B.detach().double().cpu()
        Q_A, Q_B = orthonormal_basis(A64.T), orthonormal_basis(B64)
        read, write = A64 @ Q_A, Q_B.T @ (B64 * scale.cpu())  # [R, k_A], [k_B, R]
        owner = owner.cpu()
        self.cores = [write[:, owner == i] @ read[owner == i] for i in range(n_deltas)]
        self.spectra = [kept_svd(M) for M in self.cores]
        self.A_rows, self.Q_B = Q_A.T.to(A.device, A.dtype), Q_B.to(B.device, B.dtype)

    def merged_B(self, merge: Callable[[CoreSpace, Sequence[float]], torch.Tensor | None],
                 weights: Sequence[float]) -> torch.Tensor:
        """B' [d_out, k_A] for the per-delta weights: Q_B M*, zero where no delta has weight."""
        import torch
        M = merge(self, weights)
        if M is None:
            return torch.zeros(self.Q_B.shape[0], self.A_rows.shape[0], dtype=self.Q_B.dtype, device=self.Q_B.device)
        return self.Q_B @ M.to(self.Q_B.dtype)

