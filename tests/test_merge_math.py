"""Property tests of the pure merge functions."""
import pytest
import torch

from autollm_lf.merge import cat_factors, delta_weight, weighted_delta


def random_factors(n, seed, d_in=12, d_out=10):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(r, d_in, generator=g, dtype=torch.float64),
             torch.randn(d_out, r, generator=g, dtype=torch.float64),
             float(torch.rand(1, generator=g)) + 0.5) for r in (2, 4, 3)[:n]]


@pytest.mark.parametrize("seed", range(5))
def test_weight_zero_is_base(seed):
    assert torch.count_nonzero(weighted_delta(random_factors(3, seed), [0.0, 0.0, 0.0])) == 0


@pytest.mark.parametrize("seed", range(5))
def test_one_hot_is_that_delta(seed):
    f = random_factors(3, seed)
    for i in range(3):
        w = [float(i == j) for j in range(3)]
        torch.testing.assert_close(weighted_delta(f, w), delta_weight(*f[i]))


@pytest.mark.parametrize("seed", range(5))
def test_w_and_minus_w_cancel(seed):
    (A, B, s), *_ = random_factors(3, seed)
    total = weighted_delta([(A, B, s), (A, B, s)], [0.7, -0.7])
    assert total.abs().max() < 1e-12


@pytest.mark.parametrize("seed", range(5))
def test_cat_product_is_weighted_sum(seed):
    f = random_factors(3, seed)
    w = torch.randn(3, generator=torch.Generator().manual_seed(100 + seed)).tolist()
    A, B = cat_factors(f, w)
    assert A.shape[0] == B.shape[1] == sum(a.shape[0] for a, _, _ in f)
    torch.testing.assert_close(B @ A, weighted_delta(f, w))


def test_cat_differs_from_merging_factors_separately():
    """Averaging A and B separately (LoraHub-style) is not the weighted sum: the test can tell them apart."""
    f = random_factors(2, 7)
    f = [(f[0][0][:2], f[0][1][:, :2], f[0][2]), (f[1][0][:2], f[1][1][:, :2], f[1][2])]
    w = [0.5, 0.5]
    A = sum(wi * a for wi, (a, _, _) in zip(w, f))
    B = sum(wi * s * b for wi, (_, b, s) in zip(w, f))
    assert not torch.allclose(B @ A, weighted_delta(f, w))
