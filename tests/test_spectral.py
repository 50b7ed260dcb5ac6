"""The spectral merges in the LoRA core space (merge/spectral.py) against the same merges on the full deltas
(conftest.ref_tsv / ref_iso_c / ref_iso_cts), and their properties: weight 0 is the base, one delta alone under
TSV-M is that delta, deltas in orthogonal subspaces merge as their sum, the isotropic spectra are flat."""
import pytest
import torch
from conftest import ref_iso_c, ref_iso_cts, ref_tsv

from autollm_lf.merge import CoreSpace, iso_c_merge, tsv_merge
from autollm_lf.merge.spectral import iso_c_core, iso_cts_core, kept_svd, polar, tsv_core


def lora_deltas(seed, ranks=(3, 2, 4), d_out=14, d_in=11, shared_A=0.0):
    """LoRA factors with non-zero B; `shared_A` mixes one common A into every delta's (as one init seed does)."""
    g = torch.Generator().manual_seed(seed)
    common = torch.randn(max(ranks), d_in, generator=g, dtype=torch.float64)
    factors = []
    for r in ranks:
        A = (1 - shared_A) * torch.randn(r, d_in, generator=g, dtype=torch.float64) + shared_A * common[:r]
        factors.append((A, torch.randn(d_out, r, generator=g, dtype=torch.float64), 2.0 / r))
    return factors


def core_space(factors):
    A = torch.cat([A for A, _, _ in factors])
    B = torch.cat([B for _, B, _ in factors], dim=1)
    owner = torch.cat([torch.full((A_.shape[0],), i) for i, (A_, _, _) in enumerate(factors)])
    scale = torch.cat([torch.full((A_.shape[0],), s, dtype=torch.float64) for A_, _, s in factors])
    return CoreSpace(A, B, owner, scale, len(factors))


def merged(space, merge, weights):
    return space.merged_B(merge, weights) @ space.A_rows


def dense(factors):
    return [s * B @ A for A, B, s in factors]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("merge,reference", [(tsv_core, ref_tsv), (iso_c_core, ref_iso_c),
                                             (iso_cts_core, ref_iso_cts)])
@pytest.mark.parametrize("shared_A", [0.0, 0.9])
def test_core_space_equals_the_merge_of_the_full_deltas(seed, merge, reference, shared_A):
    factors = lora_deltas(seed, shared_A=shared_A)
    weights = [0.7, -0.4, 1.2]
    torch.testing.assert_close(merged(core_space(factors), merge, weights), reference(dense(factors), weights))


@pytest.mark.parametrize("merge", [tsv_core, iso_c_core, iso_cts_core])
def test_weight_zero_is_the_base_and_drops_the_delta(merge):
    factors = lora_deltas(1)
    space = core_space(factors)
    assert merged(space, merge, [0.0, 0.0, 0.0]).abs().max() == 0
    without = core_space(factors[:2])
    torch.testing.assert_close(merged(space, merge, [0.5, 0.8, 0.0]), merged(without, merge, [0.5, 0.8]))


@pytest.mark.parametrize("seed", range(3))
def test_tsv_of_one_delta_is_that_delta(seed):
    factors = lora_deltas(seed)
    torch.testing.assert_close(merged(core_space(factors), tsv_core, [0, 0.6, 0]), 0.6 * dense(factors)[1])


def test_tsv_of_deltas_in_orthogonal_subspaces_is_their_sum():
    """Nothing to decorrelate: singular vectors already orthogonal across deltas, so TSV-M is task arithmetic."""
    eye_in, eye_out = torch.eye(12, dtype=torch.float64), torch.eye(10, dtype=torch.float64)
    g = torch.Generator().manual_seed(5)
    factors = [(torch.randn(2, 2, generator=g, dtype=torch.float64) @ eye_in[2 * i:2 * i + 2],
                eye_out[:, 3 * i:3 * i + 3] @ torch.randn(3, 2, generator=g, dtype=torch.float64), 1.0)
               for i in range(3)]
    weights = [0.3, 1.0, -0.5]
    expected = sum(w * d for w, d in zip(weights, dense(factors)))
    torch.testing.assert_close(merged(core_space(factors), tsv_core, weights), expected)


def test_iso_c_flattens_the_spectrum_of_the_sum():
    factors = lora_deltas(2)
    weights = [0.9, 0.5, 0.2]
    out = merged(core_space(factors), iso_c_core, weights)
    _, S, _ = kept_svd(out, 1e-6)
    total = sum(w * d for w, d in zip(weights, dense(factors)))
    _, S_sum, _ = kept_svd(total, 1e-6)
    assert S.numel() == S_sum.numel() == 9
    torch.testing.assert_close(S, torch.full_like(S, S_sum.mean().item()))
    torch.testing.assert_close(merged(core_space(factors), iso_c_core, [2 * w for w in weights]), 2 * out)


def test_iso_cts_keeps_a_direction_for_a_delta_the_sum_drowns():
    """A rank-1 delta at weight .05 beside three rank-3 ones: the sum's top directions (the common subspace, 6 of
    10) leave it out, its own share outside them brings it back; one singular value for all 10 directions."""
    factors = lora_deltas(3, ranks=(3, 3, 3, 1))
    out = merged(core_space(factors), iso_cts_core, [1.0, 1.0, 1.0, 0.05])
    U, S, _ = kept_svd(out, 1e-6)
    assert S.numel() == 10
    torch.testing.assert_close(S, torch.full_like(S, S[0].item()))
    small = kept_svd(dense(factors)[3], 1e-6)[0][:, 0]
    assert (small @ U).norm() > 0.99  # its output direction lies in the merge's


def test_polar_is_orthonormal_and_the_pure_merges_skip_zero_weights():
    X = torch.randn(7, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(polar(X).T @ polar(X), torch.eye(4, dtype=torch.float64))
    assert tsv_merge([kept_svd(X)], [0.0]) is None and iso_c_merge([X], [0.0]) is None
