"""Property tests of the normalised merges (shared parts counted once): linear_norm (OutputNorm) and ties_norm."""
import pytest
import torch

from autollm_lf.merge import delta_weight, normalized_delta, ties_norm_sum, weighted_delta

OUT, IN = 10, 12


def random_factors(n, seed, ranks=(2, 4, 3)):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(r, IN, generator=g, dtype=torch.float64),
             torch.randn(OUT, r, generator=g, dtype=torch.float64),
             float(torch.rand(1, generator=g)) + 0.5) for r in ranks[:n]]


def dense_reference(factors, weights):
    """f(sum_i |w_i| P_i) @ sum_i w_i dW_i with f(x) = 1 / max(1, x), P_i the projector onto B_i's columns: dense."""
    gram = torch.zeros(OUT, OUT, dtype=torch.float64)
    for (_, B, _), w in zip(factors, weights):
        Q, _ = torch.linalg.qr(B)
        gram += abs(w) * Q @ Q.T
    lam, E = torch.linalg.eigh(gram)
    return (E * (1 / lam.clamp(min=1))) @ E.T @ weighted_delta(factors, weights)


@pytest.mark.parametrize("seed", range(4))
def test_linear_norm_equals_dense_reference(seed):
    f = random_factors(3, seed)
    w = (torch.rand(3, generator=torch.Generator().manual_seed(50 + seed), dtype=torch.float64) * 2).tolist()
    torch.testing.assert_close(normalized_delta(f, w), dense_reference(f, w))


@pytest.mark.parametrize("seed", range(4))
def test_linear_norm_zero_is_base_and_one_hot_is_that_delta(seed):
    f = random_factors(3, seed)
    assert normalized_delta(f, [0.0, 0.0, 0.0]).abs().max() < 1e-12
    for i in range(3):
        for w in (1.0, 0.4):  # a total weight <= 1 on every direction: unchanged, linear in w
            weights = [w * (i == j) for j in range(3)]
            torch.testing.assert_close(normalized_delta(f, weights), w * delta_weight(*f[i]))


@pytest.mark.parametrize("seed", range(4))
def test_linear_norm_w_and_minus_w_cancel(seed):
    (A, B, s), *_ = random_factors(3, seed)
    assert normalized_delta([(A, B, s), (A, B, s)], [0.7, -0.7]).abs().max() < 1e-12


@pytest.mark.parametrize("seed", range(4))
def test_linear_norm_counts_a_shared_delta_once(seed):
    """The same delta twice at full weight is that delta once (a plain sum doubles it)."""
    f = random_factors(1, seed)
    twice = f + f
    torch.testing.assert_close(normalized_delta(twice, [1.0, 1.0]), delta_weight(*f[0]))
    torch.testing.assert_close(normalized_delta(twice, [0.5, 0.5]), delta_weight(*f[0]))  # total weight 1: linear
    assert (weighted_delta(twice, [1.0, 1.0]) - 2 * delta_weight(*f[0])).abs().max() < 1e-9


@pytest.mark.parametrize("seed", range(4))
def test_linear_norm_keeps_exclusive_parts_fully(seed):
    """Deltas writing to orthogonal output directions are each kept in full: the plain sum."""
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(OUT, OUT, generator=g, dtype=torch.float64))
    f = [(torch.randn(3, IN, generator=g, dtype=torch.float64),
          basis[:, 3 * i:3 * i + 3] @ torch.randn(3, 3, generator=g, dtype=torch.float64), 2.0)
         for i in range(3)]
    torch.testing.assert_close(normalized_delta(f, [1.0, 1.0, 1.0]), weighted_delta(f, [1.0, 1.0, 1.0]))


def test_linear_norm_shared_plus_exclusive_is_shared_once_plus_each_fully():
    """dW_i = S + T_i, S in directions both write, T_i in each one's own: the merge is S + T_1 + T_2, which no
    weighted sum of the two reaches (it gives (w_1 + w_2) S + w_1 T_1 + w_2 T_2)."""
    g = torch.Generator().manual_seed(9)
    basis, _ = torch.linalg.qr(torch.randn(OUT, OUT, generator=g, dtype=torch.float64))
    A_s, A_1, A_2 = (torch.randn(2, IN, generator=g, dtype=torch.float64) for _ in range(3))
    B_s, B_1, B_2 = basis[:, :2], basis[:, 2:4], basis[:, 4:6]
    f = [(torch.cat([A_s, A_1]), torch.cat([B_s, B_1], 1), 1.0), (torch.cat([A_s, A_2]), torch.cat([B_s, B_2], 1), 1.0)]
    target = B_s @ A_s + B_1 @ A_1 + B_2 @ A_2
    torch.testing.assert_close(normalized_delta(f, [1.0, 1.0]), target)


# ---- ties_norm -------------------------------------------------------------------------------------------

def ties_norm_reference(deltas, weights):
    """mergekit's ties with normalize: true, the divisor capped below at 1: stacked, dense."""
    d = torch.stack(deltas)
    w = torch.tensor(weights, dtype=d.dtype)[:, None, None]
    weighted = d * w
    majority = torch.where(weighted.sum(0) >= 0, 1.0, -1.0).to(d.dtype)
    mask = (weighted.sign() == majority)
    divisor = (w.abs() * mask).sum(0).clamp(min=1)
    return (weighted * mask).sum(0) / divisor


@pytest.mark.parametrize("seed", range(4))
def test_ties_norm_equals_reference(seed):
    g = torch.Generator().manual_seed(seed)
    deltas = [torch.randn(8, 6, generator=g, dtype=torch.float64) * (torch.rand(8, 6, generator=g) < 0.6)
              for _ in range(3)]
    w = (torch.rand(3, generator=g, dtype=torch.float64) * 2).tolist()
    torch.testing.assert_close(ties_norm_sum(zip(deltas, w)), ties_norm_reference(deltas, w))


def test_ties_norm_shared_once_exclusive_fully():
    g = torch.Generator().manual_seed(1)
    shared = torch.randn(6, 6, generator=g, dtype=torch.float64) * (torch.arange(36).view(6, 6) < 12)
    own = [torch.randn(6, 6, generator=g, dtype=torch.float64) * ((torch.arange(36).view(6, 6) // 12) == i + 1)
           for i in range(2)]
    merged = ties_norm_sum(zip([shared + own[0], shared + own[1]], [1.0, 1.0]))
    torch.testing.assert_close(merged, shared + own[0] + own[1])
    assert ties_norm_sum(zip([shared, shared], [0.0, 0.0])).abs().max() == 0
    torch.testing.assert_close(ties_norm_sum(zip([shared], [0.6])), 0.6 * shared)  # one delta: linear in w
