"""`regmean_w`: RegMean with the weights inside its sum (regmean.weighted_core_A). The pure maths against its dense
definition and its promised properties (0 drops a delta, one-hot is that delta, all ones is RegMean, a common factor
changes nothing); the in-place merge on the tiny model against the dense reference, its exported adapter exact, and
its gradient in the weights against finite differences."""
import pytest
import torch
from conftest import in_place_and_exported_logits

from autollm_lf.merge import CAT, MERGE_METHODS, WeightedDeltas
from autollm_lf.merge.regmean import (
    RIDGE,
    GramCollector,
    GramFiles,
    padded_batches,
    regmean_core_A,
    save_grams,
    shrink,
    weighted_core_A,
    weighted_regmean_delta,
)


def case(n=3, d_in=9, d_out=5, r=3, seed=0):
    """Deltas whose A rows together span every input (R = d_in, orthogonal: the core basis is the full space)."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d_in, d_in, dtype=torch.float64, generator=g))
    factors = [(Q[r * i: r * i + r], torch.randn(d_out, r, dtype=torch.float64, generator=g), 0.5 + i)
               for i in range(n)]
    grams = []
    for i in range(n):
        X = torch.randn(30, d_in, dtype=torch.float64, generator=g) * (1 + torch.arange(d_in) % (i + 2))
        grams.append(X.T @ X)
    return factors, grams


def core(factors, grams, alpha):
    U = torch.cat([A for A, _, _ in factors])
    ends = torch.tensor([0] + [A.shape[0] for A, _, _ in factors]).cumsum(0).tolist()
    within = [slice(a, b) for a, b in zip(ends, ends[1:])]
    H = [U @ shrink(C, alpha) @ U.T for C in grams]
    ridge = RIDGE * float(torch.diagonal(sum(H)).mean())
    return U, within, H, ridge


def merged(factors, new_A, w):
    return sum(wi * s * B @ A for wi, (_, B, s), A in zip(w, factors, new_A))


@pytest.mark.parametrize("w", [[1.0, 0.5, 0.2], [0.3, 0.0, 0.9], [1.0, 1.0, 1.0]])
def test_weights_inside_equal_the_dense_definition(w):
    factors, grams = case()
    U, within, H, ridge = core(factors, grams, 0.5)
    got = merged(factors, weighted_core_A(H, within, U, torch.tensor(w, dtype=torch.float64), ridge), w)
    want = weighted_regmean_delta([s * B @ A for A, B, s in factors], grams, 0.5, w)
    assert want.abs().max() > 1e-2
    assert torch.allclose(got, want, atol=1e-6 * want.abs().max().item())


def test_zero_drops_a_delta_and_its_gram():
    factors, grams = case(seed=1)
    U, within, H, ridge = core(factors, grams, 0.5)
    w = torch.tensor([0.7, 0.0, 0.4], dtype=torch.float64)
    three = merged(factors, weighted_core_A(H, within, U, w, ridge), w.tolist())
    kept = [0, 2]  # the same merge of the other two alone (same basis, same ridge)
    two = weighted_core_A([H[i] for i in kept], [within[i] for i in kept], U, w[kept], ridge)
    assert torch.allclose(three, merged([factors[i] for i in kept], two, w[kept].tolist()), atol=1e-9)
    # the old form (weights outside) cannot do this: delta 1's Gram still takes its share of the sum
    outside = merged(factors, regmean_core_A(within, U, H, H, 1.0), w.tolist())
    assert (outside - three).abs().max() > 1e-3


def test_one_hot_is_that_delta_all_ones_is_regmean_and_a_common_factor_changes_nothing():
    factors, grams = case(seed=2)
    U, within, H, ridge = core(factors, grams, 0.5)
    solve = lambda w: merged(factors, weighted_core_A(H, within, U, torch.tensor(w, dtype=torch.float64), ridge), w)
    alone = factors[1][2] * factors[1][1] @ factors[1][0]
    assert torch.allclose(solve([0.0, 1.0, 0.0]), alone, atol=1e-4 * alone.abs().max().item())
    regmean = merged(factors, regmean_core_A(within, U, H, H, 1.0), [1.0] * 3)  # H already shrunk
    assert torch.allclose(solve([1.0, 1.0, 1.0]), regmean, atol=1e-9)
    assert torch.allclose(solve([0.8, 0.4, 0.2]), solve([0.4, 0.2, 0.1]), atol=1e-4 * regmean.abs().max().item())


@pytest.fixture(scope="module")
def regmean_w(tiny_model, tiny_adapters, tmp_path_factory):
    """The tiny model with the three adapters and core-space Grams of three different token sets."""
    w = WeightedDeltas(tiny_model, tiny_adapters, mode="cat", method="linear")
    root = tmp_path_factory.mktemp("core_grams")
    names = [w.layer_names[k] for k in w.bank.cat_index]
    projections = w.regmean_projections(["a", "b", "c"])
    paths = {}
    for i, chunk in enumerate(("ca", "cb", "cc")):
        collector = GramCollector({n: w.bank.layers[k] for n, k in zip(names, w.bank.cat_index)}, projections)
        w.set_weights({d: 0.0 for d in w.names}, method="linear")
        seqs = [[(7 * i + 3 * j + t) % 90 + 3 for t in range(6 + j % 4)] for j in range(12)]
        collector.run(w.model, padded_batches(seqs, 0, 4))
        save_grams(root / f"{chunk}.safetensors", collector, "fp", len(seqs))
        paths[chunk] = root / f"{chunk}.safetensors"
    files = GramFiles(paths)
    chunk_of = {"a": "ca", "b": "cb", "c": "cc"}
    w.use_regmean(files, chunk_of, 0.5, "core")
    w.use_method("regmean_w")
    yield w, files, chunk_of
    files.close()


def dense_reference(w, files, chunk_of, weights):
    """Per targeted module, weighted_regmean_delta's definition in the core basis, built densely from the Grams."""
    out = {}
    for k, layer in zip(w.bank.cat_index, w.bank.cat_layers):
        name = w.layer_names[k]
        present = [d for d in w.names if d in layer.lora_A]
        U = torch.cat([layer.lora_A[d].weight.double() for d in present])
        H = [0.5 * files.gram(chunk_of[d], name).double()
             + 0.5 * (U * files.diag(chunk_of[d], name).double()) @ U.T for d in present]
        ridge = RIDGE * float(torch.diagonal(sum(H)).mean())
        S = sum(weights[d] * Hd for d, Hd in zip(present, H)) + ridge * torch.eye(U.shape[0], dtype=torch.float64)
        # sum_i w_i dW_i restricted: M = (sum_i w_i s_i B_i E_i H_i) S^-1, the merge M U
        rows = torch.tensor([0] + [layer.r[d] for d in present]).cumsum(0).tolist()
        numerator = sum(weights[d] * w.bank.unit_scaling[k][d] * layer.lora_B[d].weight.double()
                        @ Hd[rows[j]:rows[j + 1]] for j, (d, Hd) in enumerate(zip(present, H)))
        out[name] = numerator @ torch.linalg.inv(S) @ U
    return out


def test_in_place_regmean_w_equals_the_dense_reference(regmean_w):
    w, files, chunk_of = regmean_w
    weights = {"a": 1.0, "b": 0.0, "c": 0.3}
    w.set_weights(weights)
    reference = dense_reference(w, files, chunk_of, weights)
    for k, layer in zip(w.bank.cat_index, w.bank.cat_layers):
        got = layer.scaling[CAT] * layer.lora_B[CAT].weight.double() @ layer.lora_A[CAT].weight.double()
        want = reference[w.layer_names[k]]
        assert want.abs().max() > 1e-3
        assert torch.allclose(got, want, atol=1e-5 * want.abs().max().item()), w.layer_names[k]


def test_exported_regmean_w_adapter_is_exact(regmean_w, tiny_model, tmp_path):
    w, _, _ = regmean_w
    weights = {"a": 0.9, "b": 0.2, "c": 0.6}
    in_place, exported = in_place_and_exported_logits(w, weights, tiny_model, tmp_path / "merged")
    assert torch.allclose(in_place, exported, atol=5e-5), (in_place - exported).abs().max()


def test_trial_rows_gradient_matches_finite_differences(regmean_w):
    w, _, _ = regmean_w
    spec = MERGE_METHODS["regmean_w"]
    flat = w.bank.flat_table({"a": 0.7, "b": 0.4, "c": 0.5}).requires_grad_(True)
    probe = [torch.randn(m.A.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(k))
             for k, m in enumerate(w.bank.cat)]
    value = lambda f: sum((w.lowrank.trial_rows(spec, k, f) * p).sum() for k, p in enumerate(probe))
    value(flat).backward()
    for i in (0, 1, 2):  # the weights of a, b and c (one group: granularity delta)
        step = torch.zeros_like(flat)
        step[i] = 1e-6
        numeric = (value(flat.detach() + step) - value(flat.detach() - step)) / 2e-6
        assert abs(float(numeric)) > 1e-6
        assert abs(float(flat.grad[i]) - float(numeric)) < 1e-4 * max(1.0, abs(float(numeric)))
