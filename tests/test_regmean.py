"""RegMean: the pure maths against its dense definition, the Grams against X^T X of the real layer inputs, and the
in-place merge and its exported adapter against the dense reference on the tiny model (adapters with non-zero B)."""
import pytest
import torch
from conftest import in_place_and_exported_logits
from peft import PeftModel
from transformers import AutoModelForCausalLM

from autollm_lf.merge import CAT, WeightedDeltas
from autollm_lf.merge.regmean import (
    GramCollector,
    GramFiles,
    padded_batches,
    regmean_A,
    regmean_core_A,
    regmean_delta,
    save_grams,
    shrink,
)

torch.manual_seed(0)


def random_case(n=3, d_in=12, d_out=7, r=3, rows=40):
    factors = [(torch.randn(r, d_in, dtype=torch.float64), torch.randn(d_out, r, dtype=torch.float64), 0.5 + i)
               for i in range(n)]
    grams = []
    for i in range(n):
        X = torch.randn(rows, d_in, dtype=torch.float64) * (1 + torch.arange(d_in) % (i + 2))
        grams.append(X.T @ X)
    return factors, grams


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.9, 1.0])
def test_new_A_rows_give_the_dense_regmean(alpha):
    factors, grams = random_case()
    new_A = regmean_A([A for A, _, _ in factors], grams, alpha)
    merged = sum(s * B @ A for (_, B, s), A in zip(factors, new_A))
    dense = regmean_delta([s * B @ A for A, B, s in factors], grams, alpha)
    assert new_A[0].shape == factors[0][0].shape
    assert torch.allclose(merged, dense, atol=1e-9), (merged - dense).abs().max()


def test_one_delta_is_itself_and_equal_grams_average():
    factors, grams = random_case(n=3)
    (A, B, s) = factors[0]
    alone = regmean_A([A], [grams[0]], 0.7)[0]
    assert torch.allclose(alone, A, rtol=1e-5, atol=1e-5)  # up to the ridge
    same = regmean_A([A for A, _, _ in factors], [grams[0]] * 3, 0.7)
    merged = sum(s * B @ A for (_, B, s), A in zip(factors, same))
    mean = sum(s * B @ A for A, B, s in factors) / 3
    assert torch.allclose(merged, mean, rtol=1e-5, atol=1e-5)


def test_each_delta_kept_on_its_own_inputs_when_inputs_are_disjoint():
    """Chunks whose inputs live in disjoint coordinates: the merge reproduces each delta on its own chunk's inputs
    exactly (the plain sum would add the other delta's output there)."""
    d_in = 8
    factors, _ = random_case(n=2, d_in=d_in)
    X1 = torch.zeros(30, d_in, dtype=torch.float64)
    X1[:, :4] = torch.randn(30, 4, dtype=torch.float64)
    X2 = torch.zeros(30, d_in, dtype=torch.float64)
    X2[:, 4:] = torch.randn(30, 4, dtype=torch.float64)
    dense = regmean_delta([s * B @ A for A, B, s in factors], [X1.T @ X1, X2.T @ X2], 1.0)
    for (A, B, s), X in zip(factors, (X1, X2)):
        assert torch.allclose(X @ dense.T, X @ (s * B @ A).T, atol=1e-5)


def test_shrink_keeps_the_diagonal():
    _, grams = random_case(n=1)
    C = grams[0]
    assert torch.allclose(torch.diagonal(shrink(C, 0.3)), torch.diagonal(C), rtol=1e-12)
    assert torch.allclose(shrink(C, 1.0), C)
    assert torch.count_nonzero(shrink(C, 0.0) - torch.diag(torch.diagonal(C))) == 0


def test_grams_are_the_layer_inputs_gram_without_padding(tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    layer = model.model.layers[0]
    layers = {"q": layer.self_attn.q_proj, "k": layer.self_attn.k_proj, "o": layer.self_attn.o_proj}
    sequences = [[5, 6, 7, 8, 9], [10, 11, 12], [40, 41, 42, 43, 44, 45, 46]]
    collector = GramCollector(layers)
    collector.run(model, padded_batches(sequences, pad_id=0, rows=2))
    with torch.no_grad():
        X = torch.cat([layer.input_layernorm(model.model.embed_tokens(torch.tensor([s])))[0] for s in sequences])
    assert collector.alias == {"q": "q", "k": "q", "o": "o"}  # q and k read the same input: one Gram
    assert set(collector.grams) == {"q", "o"}
    assert torch.allclose(collector.grams["q"], X.T @ X, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def regmean_weighted(tiny_model, tiny_adapters, tmp_path_factory):
    """The tiny model with the three adapters, RegMean rows from Grams of three different token sets."""
    w = WeightedDeltas(tiny_model, tiny_adapters, mode="cat", method="regmean")
    root = tmp_path_factory.mktemp("grams")
    names = [w.layer_names[k] for k in w.bank.cat_index]
    paths = {}
    for i, chunk in enumerate(("ca", "cb", "cc")):
        collector = GramCollector({n: w.bank.layers[k] for n, k in zip(names, w.bank.cat_index)})
        w.set_weights({d: 0.0 for d in w.names}, method="linear")
        seqs = [[(7 * i + 3 * j + t) % 90 + 3 for t in range(6 + j % 4)] for j in range(12)]
        collector.run(w.model, padded_batches(seqs, 0, 4))
        save_grams(root / f"{chunk}.safetensors", collector, "fp", len(seqs))
        paths[chunk] = root / f"{chunk}.safetensors"
    files = GramFiles(paths)
    chunk_of = {"a": "ca", "b": "cb", "c": "cc"}
    w.use_regmean(files, chunk_of, 0.5)
    yield w, files, chunk_of
    files.close()


def dense_reference(w, files, chunk_of, weights):
    """Per targeted module: sum_i w_i times delta i's term of (sum_i dW_i C_i')(sum C_i')^-1, built densely."""
    out = {}
    for k, layer in zip(w.bank.cat_index, w.bank.cat_layers):
        name = w.layer_names[k]
        present = [d for d in w.names if d in layer.lora_A]
        grams = [files.gram(chunk_of[d], name).double() for d in present]
        terms = []
        for j, d in enumerate(present):
            delta = layer.scaling.get(d, 0) and w.bank.unit_scaling[k][d] * (
                layer.lora_B[d].weight.double() @ layer.lora_A[d].weight.double())
            only = [delta if jj == j else torch.zeros_like(delta) for jj in range(len(present))]
            terms.append(weights[d] * regmean_delta(only, grams, 0.5))
        out[name] = sum(terms)
    return out


def test_in_place_regmean_equals_the_dense_reference(regmean_weighted):
    w, files, chunk_of = regmean_weighted
    weights = {"a": 1.0, "b": 0.6, "c": 0.3}
    w.set_weights(weights)
    reference = dense_reference(w, files, chunk_of, weights)
    checked = 0
    for k, layer in zip(w.bank.cat_index, w.bank.cat_layers):
        B, A = layer.lora_B[CAT].weight.double(), layer.lora_A[CAT].weight.double()
        got = layer.scaling[CAT] * B @ A
        want = reference[w.layer_names[k]]
        assert want.abs().max() > 1e-3  # a real delta, not zeros
        assert torch.allclose(got, want, atol=1e-5 * want.abs().max().item()), w.layer_names[k]
        checked += 1
    assert checked == len(w.bank.cat_layers) > 0


def test_regmean_is_not_the_plain_sum_and_deltas_alone_stay_as_trained(regmean_weighted, tiny_model, tiny_adapters):
    w, _, _ = regmean_weighted
    ids = torch.tensor([[5, 17, 33, 40, 71, 2, 9]])
    with torch.no_grad():
        w.set_weights({"a": 1.0, "b": 1.0, "c": 1.0})
        regmean = w.model(input_ids=ids).logits.clone()
        w.set_weights({"a": 1.0, "b": 1.0, "c": 1.0}, method="linear")
        plain = w.model(input_ids=ids).logits.clone()
        w.set_weights({"a": 1.0, "b": 0.0, "c": 0.0}, method="linear")
        only_a = w.model(input_ids=ids).logits.clone()
    assert (regmean - plain).abs().max() > 1e-3
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), str(tiny_adapters["a"]))
    with torch.no_grad():
        assert torch.allclose(only_a, reference.eval()(input_ids=ids).logits, atol=5e-5)


def test_exported_regmean_adapter_is_exact(regmean_weighted, tiny_model, tmp_path):
    w, _, _ = regmean_weighted
    weights = {"a": 0.9, "b": 0.5, "c": 1.0}
    in_place, exported = in_place_and_exported_logits(w, weights, tiny_model, tmp_path / "merged")
    assert torch.allclose(in_place, exported, atol=5e-5), (in_place - exported).abs().max()


def core_inputs(factors, grams):
    A_u = torch.cat([A for A, _, _ in factors])
    ends = torch.tensor([0] + [A.shape[0] for A, _, _ in factors]).cumsum(0).tolist()
    within = [slice(a, b) for a, b in zip(ends, ends[1:])]
    G = [A_u @ C @ A_u.T for C in grams]
    D = [A_u @ torch.diag(torch.diagonal(C)) @ A_u.T for C in grams]
    return A_u, within, G, D


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_core_space_is_the_least_squares_merge_within_the_deltas_input_directions(alpha):
    factors, grams = random_case(n=3, d_in=20, r=3)  # R = 9 < d_in: a real restriction
    A_u, within, G, D = core_inputs(factors, grams)
    new_A = regmean_core_A(within, A_u, G, D, alpha)
    merged = sum(s * B @ A for (_, B, s), A in zip(factors, new_A))
    # the dense form: M = (sum_i dW_i C_i' A_u^T)(A_u S A_u^T)^-1, merge M A_u
    shrunk = [shrink(C, alpha) for C in grams]
    numerator = sum(s * B @ A @ C @ A_u.T for (A, B, s), C in zip(factors, shrunk))
    M = numerator @ torch.linalg.inv(A_u @ sum(shrunk) @ A_u.T)
    assert torch.allclose(merged, M @ A_u, atol=1e-5 * merged.abs().max().item())  # up to the ridge
    # within the rows of A_u: the projection of the merge off that span is zero
    Q, _ = torch.linalg.qr(A_u.T)
    assert torch.allclose(merged - merged @ Q @ Q.T, torch.zeros_like(merged), atol=1e-8)


def test_core_space_equals_full_regmean_when_the_deltas_span_every_input():
    factors, grams = random_case(n=3, d_in=9, r=3)  # R = d_in: A_u is invertible (orthogonal: well conditioned,
    Q, _ = torch.linalg.qr(torch.randn(9, 9, dtype=torch.float64))  # so the two ridges agree to rounding)
    factors = [(Q[3 * i: 3 * i + 3], B, s) for i, (_, B, s) in enumerate(factors)]
    A_u, within, G, D = core_inputs(factors, grams)
    core = regmean_core_A(within, A_u, G, D, 0.5)
    full = regmean_A([A for A, _, _ in factors], grams, 0.5)
    for a, b in zip(core, full):
        assert torch.allclose(a, b, atol=1e-5 * b.abs().max().item())


def test_core_grams_are_projections_of_the_full_ones(tiny_model, tiny_adapters):
    w = WeightedDeltas(tiny_model, tiny_adapters, mode="cat", method="linear")
    names = [w.layer_names[k] for k in w.bank.cat_index]
    layers = {n: w.bank.layers[k] for n, k in zip(names, w.bank.cat_index)}
    projections = w.regmean_projections(["a", "b", "c"])
    seqs = [[5, 6, 7, 8, 9], [10, 11, 12], [40, 41, 42, 43, 44, 45, 46]]
    w.set_weights({d: 0.0 for d in w.names}, method="linear")
    full, core = GramCollector(layers), GramCollector(layers, projections)
    full.run(w.model, padded_batches(seqs, 0, 2))
    core.run(w.model, padded_batches(seqs, 0, 2))
    for n in names:
        C, A_u = full.grams[full.alias[n]], projections[n]
        assert core.grams[n].shape == (A_u.shape[0], A_u.shape[0])
        assert torch.allclose(core.grams[n], A_u @ C @ A_u.T, rtol=1e-4, atol=1e-4)
        assert torch.allclose(core.grams[f"diag:{n}"], torch.diagonal(C), rtol=1e-4, atol=1e-4)
