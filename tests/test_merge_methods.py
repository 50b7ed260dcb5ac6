"""Every registered merge method (search.merge) on tiny models, against a straightforward dense reference
(mergekit's ties / dare with normalize: false, stacked deltas, argsort top-k)."""
import pytest
import torch
from conftest import ref_magnitude, ref_merge, true_delta
from peft import PeftModel
from transformers import AutoModelForCausalLM

from autollm_lf.merge import (
    MERGE_METHODS,
    WeightedDeltas,
    dare_drop,
    dare_seed,
    linear_sum,
    magnitude_threshold,
    ties_sum,
    trim,
)

INPUT = torch.tensor([[5, 17, 33, 40, 71, 2, 9, 60, 61, 62], [40, 41, 42, 5, 6, 7, 8, 9, 10, 11]])
METHODS = [m for m, spec in MERGE_METHODS.items() if not spec.data_aware]  # regmean*: tests/test_regmean.py


def logits(model):
    with torch.no_grad():
        return model(input_ids=INPUT).logits


# ---- pure functions ----------------------------------------------------------------------------------------

def dense(seed, n=3, shape=(12, 10)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(n)], \
        (torch.rand(n, generator=g, dtype=torch.float64) * 3 - 1).tolist()


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("combine,method", [(linear_sum, "linear"), (ties_sum, "ties")])
def test_combine_equals_reference(seed, combine, method):
    deltas, w = dense(seed)
    torch.testing.assert_close(combine(zip(deltas, w)), ref_merge(deltas, w, method))


@pytest.mark.parametrize("density", [0.1, 0.5, 0.9, 1.0])
def test_trim_keeps_the_top_density_fraction(density):
    d = torch.randn(30, 20, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(trim(d, magnitude_threshold(d, density)), ref_magnitude(d, density))


def test_dare_drop_is_seeded_and_rescaled():
    d = torch.randn(200, 100, generator=torch.Generator().manual_seed(4))
    a = dare_drop(d.clone(), 0.3, torch.Generator().manual_seed(7))
    b = dare_drop(d.clone(), 0.3, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    kept = a != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.02
    torch.testing.assert_close(a[kept], d[kept] / 0.3)


def test_ties_of_w_and_minus_w_does_not_cancel():
    """Sign election keeps one side: each entry of TIES(w*d, -w*d) is +|w*d| or -|w*d|, never 0 (which side
    depends on the rounding of the exact tie w*d - w*d)."""
    (d, *_), _ = dense(5)
    torch.testing.assert_close(ties_sum([(d, 0.7), (d, -0.7)]).abs(), (0.7 * d).abs())


# ---- on a tiny model -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def base_logits(tiny_model):
    return logits(AutoModelForCausalLM.from_pretrained(tiny_model))


@pytest.fixture(scope="module", params=METHODS)
def weighted(request, tiny_model, tiny_adapters):
    return WeightedDeltas(tiny_model, tiny_adapters, mode="fold", method=request.param, density=0.5, seed=3)


def test_zero_weights_give_base(weighted, base_logits):
    weighted.set_weights({"a": 0.0, "b": 0.0})
    torch.testing.assert_close(logits(weighted.model), base_logits, atol=1e-5, rtol=0)


# iso_c, iso_cts flatten even one delta's spectrum (tests/test_spectral.py)
@pytest.mark.parametrize("method", [m for m in METHODS if not m.startswith("iso_")])
def test_one_hot_at_density_one_is_that_delta(method, tiny_model, tiny_adapters):
    w = WeightedDeltas(tiny_model, tiny_adapters, method=method, density=1.0)
    single = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), str(tiny_adapters["b"])).eval()
    w.set_weights({"b": 1.0})
    torch.testing.assert_close(logits(w.model), logits(single), atol=1e-5, rtol=0)


def test_merge_equals_dense_reference(weighted):
    """Each module's weight - W0 is the reference merge of its dense true deltas (DARE with the same seeds)."""
    weights = {"a": 0.8, "b": -0.6, "c": 1.3}
    weighted.set_weights(weights)
    for k, (layer, w0) in enumerate(zip(weighted.bank.cat_layers, weighted.modes["fold"].base_copies)):
        idx = [i for i, n in enumerate(weighted.names) if n in layer.lora_A]
        deltas = [true_delta(layer, weighted.names[i], weighted.bank.cat[k].scaling[weighted.names[i]],
                             weighted.method) for i in idx]
        expected = ref_merge(deltas, [weights[weighted.names[i]] for i in idx], weighted.method, weighted.density,
                             [dare_seed(weighted.dense.seed, k, i) for i in idx])
        torch.testing.assert_close(layer.get_base_layer().weight - w0, expected.to(w0.dtype), atol=1e-5, rtol=1e-4)


def test_same_weights_give_same_logits(weighted, base_logits):
    """Masks (DARE) and trims (TIES) are fixed once: a trial is a function of its weights only."""
    weighted.set_weights({"a": 0.4, "b": 0.9, "c": -0.2})
    first = logits(weighted.model)
    weighted.set_weights({"a": 1.0, "b": 0.1})
    assert (logits(weighted.model) - first).abs().max() > 1e-3
    weighted.set_weights({"a": 0.4, "b": 0.9, "c": -0.2})
    torch.testing.assert_close(logits(weighted.model), first, atol=0, rtol=0)
    assert (first - base_logits).abs().max() > 1e-2


@pytest.mark.parametrize("method,density", [("linear", 0.5), ("dare_linear", 1.0)])
def test_w_and_minus_w_of_one_delta_cancel(method, density, tiny_model, tiny_adapters, base_logits):
    """Holds where the merge is linear in the deltas with one mask per copy: linear, and dare_linear at density 1
    (two copies of a delta get independent DARE masks below 1, and TIES never cancels: see above)."""
    w = WeightedDeltas(tiny_model, {"a": tiny_adapters["a"], "a2": tiny_adapters["a"]}, method=method,
                       density=density)
    w.set_weights({"a": 0.7, "a2": -0.7})
    torch.testing.assert_close(logits(w.model), base_logits, atol=1e-5, rtol=0)


def test_report_can_score_a_delta_as_trained(weighted, tiny_model, tiny_adapters):
    """set_weights(..., method="linear") on a ties/dare model gives the untrimmed delta (the report's train@ rows)."""
    single = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), str(tiny_adapters["c"])).eval()
    weighted.set_weights({"c": 1.0}, method="linear")
    torch.testing.assert_close(logits(weighted.model), logits(single), atol=1e-5, rtol=0)


def test_export_records_its_error(weighted, tiny_model, tmp_path):
    weights = {"a": 0.5, "b": -0.4, "c": 1.1}
    weighted.set_weights(weights)
    expected = logits(weighted.model)
    out = weighted.export(weights, tmp_path / "merged")
    torch.testing.assert_close(logits(weighted.model), expected, atol=0, rtol=0)  # export left the weights as set
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), str(out)).eval()
    info = weighted.export_info
    # compare the saved adapter's dW with the in-place merge per module (logits would mix in the float32 rounding
    # of a folded pass against a LoRA pass: up to 2e-4 on these deltas of norm ~500)
    errors = []
    saved = [m for m in loaded.modules() if hasattr(m, "lora_A") and "default" in m.lora_A]
    for layer, w0, m in zip(weighted.bank.cat_layers, weighted.modes["fold"].base_copies, saved):
        true = layer.get_base_layer().weight - w0
        got = m.scaling["default"] * m.lora_B["default"].weight @ m.lora_A["default"].weight
        errors.append(((got - true).norm() / true.norm()).item())
    assert len(saved) == len(weighted.bank.cat)
    if MERGE_METHODS[weighted.method].low_rank:  # linear, linear_norm, tsv, iso_c: the cat factors, exact
        assert max(errors) < 1e-6 and "relative_frobenius_error_max" not in info
        return
    assert abs(max(errors) - info["relative_frobenius_error_max"]) < 1e-4
    assert 0 < info["relative_frobenius_error_mean"] < 1


def test_dare_masks_remade_from_their_seed_equal_the_cached_ones(tiny_model, tiny_adapters, monkeypatch):
    """Past DARE_CACHE_BYTES the masks are remade each trial from the same seeds: the same merge."""
    import autollm_lf.merge.dense as merge

    weights = {"a": 0.6, "b": 0.3, "c": -0.9}
    cached = WeightedDeltas(tiny_model, tiny_adapters, method="dare_ties", density=0.4, seed=5)
    cached.set_weights(weights)
    assert cached.dense.masks
    monkeypatch.setattr(merge, "DARE_CACHE_BYTES", 0)
    remade = WeightedDeltas(tiny_model, tiny_adapters, method="dare_ties", density=0.4, seed=5)
    remade.set_weights(weights)
    assert not remade.dense.masks
    torch.testing.assert_close(logits(remade.model), logits(cached.model), atol=0, rtol=0)
