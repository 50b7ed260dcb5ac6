"""In-place weighting == PEFT's add_weighted_adapter(..., "cat") on logits, and the exported adapter matches."""
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from autollm_lf.merge import WeightedDeltas

INPUT = torch.tensor([[5, 17, 33, 40, 71, 2, 9, 60, 61, 62], [40, 41, 42, 5, 6, 7, 8, 9, 10, 11]])


def logits(model):
    with torch.no_grad():
        return model(input_ids=INPUT).logits


def peft_reference(base_path, adapters, weights):
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), str(adapters["a"]), adapter_name="a")
    for name in ("b", "c"):
        model.load_adapter(str(adapters[name]), adapter_name=name)
    model.add_weighted_adapter(list(weights), list(weights.values()), "ref", combination_type="cat")
    model.set_adapter("ref")
    return logits(model.eval())


@pytest.fixture(scope="module", params=["cat", "fold", "scaling"])
def weighted(request, tiny_model, tiny_adapters):
    return WeightedDeltas(tiny_model, tiny_adapters, mode=request.param)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_in_place_equals_peft_cat(weighted, tiny_model, tiny_adapters, seed):
    g = torch.Generator().manual_seed(seed)
    weights = dict(zip("abc", (torch.rand(3, generator=g) * 3 - 1).tolist()))  # in [-1, 2], negatives included
    weighted.set_weights(weights)
    ours = logits(weighted.model)
    ref = peft_reference(tiny_model, tiny_adapters, weights)
    base = logits(AutoModelForCausalLM.from_pretrained(tiny_model))
    assert (ref - base).abs().max() > 1e-2, "deltas must change the logits or the test proves nothing"
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_zero_weights_give_base_and_one_hot_gives_that_adapter(weighted, tiny_model, tiny_adapters):
    weighted.set_weights({})
    torch.testing.assert_close(logits(weighted.model), logits(AutoModelForCausalLM.from_pretrained(tiny_model)),
                               atol=1e-5, rtol=0)
    weighted.set_weights({"b": 1.0})
    single = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), str(tiny_adapters["b"])).eval()
    torch.testing.assert_close(logits(weighted.model), logits(single), atol=1e-5, rtol=0)


def test_exported_adapter_gives_same_logits(weighted, tiny_model, tmp_path):
    weights = {"a": 0.3, "b": -0.45, "c": 1.2}
    weighted.set_weights(weights)
    expected = logits(weighted.model)
    out = weighted.export(weights, tmp_path / "merged")
    assert (out / "adapter_model.safetensors").exists() and (out / "adapter_config.json").exists()
    torch.testing.assert_close(logits(weighted.model), expected, atol=0, rtol=0)  # export left the weights as set
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), str(out)).eval()
    torch.testing.assert_close(logits(loaded), expected, atol=1e-5, rtol=0)


def test_unknown_delta_name_is_refused(weighted):
    with pytest.raises(KeyError, match="zzz"):
        weighted.set_weights({"zzz": 1.0})


def test_auto_mode_picks_a_mode_and_stays_exact(tiny_model, tiny_adapters):
    weighted = WeightedDeltas(tiny_model, tiny_adapters, mode="auto")
    weights = {"a": 0.8, "b": -0.3, "c": 0.5}
    mode = weighted.pick_mode(lambda: logits(weighted.model), weights)
    assert mode in ("cat", "fold")
    weighted.set_weights(weights)
    torch.testing.assert_close(logits(weighted.model), peft_reference(tiny_model, tiny_adapters, weights), atol=1e-5, rtol=0)
    weighted._use_cat() if mode == "fold" else weighted._use_fold()  # switching back and forth keeps it exact
    weighted.set_weights(weights)
    torch.testing.assert_close(logits(weighted.model), peft_reference(tiny_model, tiny_adapters, weights), atol=1e-5, rtol=0)
