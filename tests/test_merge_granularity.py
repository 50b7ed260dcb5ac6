"""Finer weights (search.granularity) and linear_norm on the loaded model: in place == PEFT's `cat` built per
module group (or the dense normalised merge), in every apply mode, and the exported adapter gives the same logits."""
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from autollm_lf.merge import WeightedDeltas, module_groups, normalized_delta, parse_granularity

INPUT = torch.tensor([[5, 17, 33, 40, 71, 2, 9, 60, 61, 62], [40, 41, 42, 5, 6, 7, 8, 9, 10, 11]])
ATOL = 1e-9  # float64: the maths, not float32's rounding (test_merge_exact checks float32 to its rounding)


@pytest.fixture(scope="module")
def tiny64(tiny_model, tmp_path_factory):
    """The tiny model in float64 (the adapters load into it in float64 too)."""
    from transformers import AutoTokenizer
    out = tmp_path_factory.mktemp("tiny64") / "model"
    AutoModelForCausalLM.from_pretrained(tiny_model).to(torch.float64).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(out)
    return out


def logits(model):
    with torch.no_grad():
        return model(input_ids=INPUT).logits


def load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype="auto")


def test_module_groups():
    names = ["base_model.model.model.layers.0.self_attn.q_proj", "base_model.model.model.layers.0.mlp.down_proj",
             "base_model.model.model.layers.3.self_attn.v_proj", "base_model.model.model.layers.3.mlp.up_proj",
             "base_model.model.lm_head"]
    assert module_groups(names, "delta") == [""] * 5
    assert module_groups(names, "module_kind") == ["attn", "mlp", "attn", "mlp", "mlp"]
    assert module_groups(names, "blocks:2") == ["b0", "b0", "b1", "b1", "other"]
    assert module_groups(names, "blocks:4") == ["b0", "b0", "b3", "b3", "other"]
    for bad in ("blocks", "blocks:0", "layers:2", "module_kind:2"):
        with pytest.raises(ValueError, match="granularity"):
            parse_granularity(bad)


def random_weights(params, seed):
    g = torch.Generator().manual_seed(seed)
    return {p: float(x) for p, x in zip(params, torch.rand(len(params), generator=g) * 3 - 1)}


def per_module_reference(base_path, adapters, weighted, weights):
    """PEFT's add_weighted_adapter(..., "cat") once per group with that group's weights; each module then takes the
    factors of its own group's adapter."""
    model = PeftModel.from_pretrained(load(base_path), str(adapters["a"]), adapter_name="a")
    for name in ("b", "c"):
        model.load_adapter(str(adapters[name]), adapter_name=name)
    names = ["a", "b", "c"]
    for g in weighted.group_names:
        w = [weights.get(f"{d}@{g}" if g else d, weights.get(d, 0.0)) for d in names]
        model.add_weighted_adapter(names, w, f"ref_{g}", combination_type="cat")
    model.add_weighted_adapter(names, [1.0] * 3, "ref", combination_type="cat")
    layers = {n: m for n, m in model.named_modules() if hasattr(m, "lora_A") and "ref" in m.lora_A}
    groups = dict(zip(weighted.layer_names, weighted.bank.groups))
    with torch.no_grad():
        for name, layer in layers.items():
            g = groups[name]
            layer.lora_A["ref"].weight.copy_(layer.lora_A[f"ref_{g}"].weight)
            layer.lora_B["ref"].weight.copy_(layer.lora_B[f"ref_{g}"].weight)
    model.set_adapter("ref")
    return logits(model.eval())


@pytest.fixture(scope="module", params=[("module_kind", "cat"), ("module_kind", "fold"), ("module_kind", "scaling"),
                                        ("blocks:2", "cat"), ("blocks:2", "fold"), ("blocks:2", "scaling")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def granular(request, tiny64, tiny_adapters):
    granularity, mode = request.param
    weighted = WeightedDeltas(tiny64, tiny_adapters, mode=mode, granularity=granularity)
    assert {p.dtype for p in weighted.model.parameters()} == {torch.float64}  # adapters too, or 1e-9 proves little
    return weighted


def test_params_name_each_delta_and_group(granular):
    expected = {"module_kind": {"attn", "mlp"}, "blocks:2": {"b0", "b1"}}[granular.granularity]
    assert set(granular.group_names) == expected
    assert {p.split("@")[1] for p in granular.params} == expected
    assert {p.split("@")[0] for p in granular.params} == {"a", "b", "c"}


@pytest.mark.parametrize("seed", [0, 1])
def test_granular_in_place_equals_peft_cat_per_module(granular, tiny64, tiny_adapters, seed):
    weights = random_weights(granular.params, seed)
    granular.set_weights(weights)
    ours = logits(granular.model)
    ref = per_module_reference(tiny64, tiny_adapters, granular, weights)
    uniform = per_module_reference(tiny64, tiny_adapters, granular, {d: 0.5 for d in "abc"})
    assert (ref - uniform).abs().max() > 1e-2, "per-group weights must matter or the test proves nothing"
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)


def test_granular_per_delta_weights_still_apply_everywhere(granular, tiny64, tiny_adapters):
    """A weight named by delta only applies to all of its groups (baselines, human weights)."""
    granular.set_weights({"b": 1.0})
    single = PeftModel.from_pretrained(load(tiny64), str(tiny_adapters["b"])).eval()
    torch.testing.assert_close(logits(granular.model), logits(single), atol=ATOL, rtol=0)
    granular.set_weights({})
    torch.testing.assert_close(logits(granular.model), logits(load(tiny64)), atol=ATOL, rtol=0)


def test_granular_export_is_exact(granular, tiny64, tmp_path):
    weights = random_weights(granular.params, 7)
    granular.set_weights(weights)
    expected = logits(granular.model)
    out = granular.export(weights, tmp_path / "merged")
    torch.testing.assert_close(logits(granular.model), expected, atol=0, rtol=0)  # export left the weights as set
    loaded = PeftModel.from_pretrained(load(tiny64), str(out)).eval()
    torch.testing.assert_close(logits(loaded), expected, atol=ATOL, rtol=0)


# ---- linear_norm in place ------------------------------------------------------------------------------

def dense_norm_model(base_path, adapters, weighted, weights):
    """The base model with W0 + normalized_delta(...) written into each module (pure maths, no cat factors)."""
    peft = PeftModel.from_pretrained(load(base_path), str(adapters["a"]), adapter_name="a")
    for name in ("b", "c"):
        peft.load_adapter(str(adapters[name]), adapter_name=name)
    groups = dict(zip(weighted.layer_names, weighted.bank.groups))
    deltas = {}
    for name, layer in peft.named_modules():
        if not (hasattr(layer, "lora_A") and name in groups):
            continue
        present = [d for d in "abc" if d in layer.lora_A]
        factors = [(layer.lora_A[d].weight.double(), layer.lora_B[d].weight.double(), layer.scaling[d])
                   for d in present]
        g = groups[name]
        w = [weights.get(f"{d}@{g}" if g else d, weights.get(d, 0.0)) for d in present]
        deltas[name.removeprefix("base_model.model.") + ".weight"] = normalized_delta(factors, w)
    plain = load(base_path)
    state = plain.state_dict()
    for key, d in deltas.items():
        state[key] = state[key] + d.to(state[key].dtype)
    plain.load_state_dict(state)
    return logits(plain.eval())


@pytest.fixture(scope="module", params=[("delta", "cat"), ("delta", "fold"), ("module_kind", "cat")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def normed(request, tiny64, tiny_adapters):
    granularity, mode = request.param
    return WeightedDeltas(tiny64, tiny_adapters, mode=mode, method="linear_norm", granularity=granularity)


@pytest.mark.parametrize("seed", [0, 1])
def test_linear_norm_in_place_equals_dense(normed, tiny64, tiny_adapters, seed):
    weights = {p: w + 1.0 for p, w in random_weights(normed.params, seed).items()}  # in [0, 3]: normalisation bites
    normed.set_weights(weights)
    ours = logits(normed.model)
    ref = dense_norm_model(tiny64, tiny_adapters, normed, weights)
    normed.set_weights(weights, method="linear")
    plain_sum = logits(normed.model)
    assert (ref - plain_sum).abs().max() > 1e-2, "normalisation must change the merge or the test proves nothing"
    normed.set_weights(weights)
    torch.testing.assert_close(logits(normed.model), ours, atol=0, rtol=0)  # back from linear: B' again
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)


def test_linear_norm_one_hot_is_that_adapter_and_export_is_exact(normed, tiny64, tiny_adapters, tmp_path):
    normed.set_weights({"c": 1.0})
    single = PeftModel.from_pretrained(load(tiny64), str(tiny_adapters["c"])).eval()
    torch.testing.assert_close(logits(normed.model), logits(single), atol=ATOL, rtol=0)
    weights = {p: 1.0 for p in normed.params}
    normed.set_weights(weights)
    expected = logits(normed.model)
    out = normed.export(weights, tmp_path / "merged")
    loaded = PeftModel.from_pretrained(load(tiny64), str(out)).eval()
    torch.testing.assert_close(logits(loaded), expected, atol=ATOL, rtol=0)
