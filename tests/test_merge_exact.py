"""In-place weighting == PEFT's add_weighted_adapter(..., "cat") on logits, and the exported adapter matches."""
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from autollm_lf.merge import WeightedDeltas
from autollm_lf.merge.apply import FoldMode

INPUT = torch.tensor([[5, 17, 33, 40, 71, 2, 9, 60, 61, 62], [40, 41, 42, 5, 6, 7, 8, 9, 10, 11]])

# float64 checks the maths: ours and PEFT's `cat` then agree to rounding (~1e-15). In float32 the rounding alone
# moves these logits (|logit| < 0.6) by up to 1.4e-5 on some CPUs (seen on a Xeon with AMX, `scaling` mode: one
# path per delta added up, where PEFT's reference runs one concatenated path), so there 1e-5 would test the CPU's
# kernels, not the merge; float32 is checked to what its rounding allows.
ATOL = {torch.float64: 1e-9, torch.float32: 5e-5}


@pytest.fixture(scope="module", params=[torch.float64, torch.float32], ids=["float64", "float32"])
def tiny_base(request, tiny_model, tmp_path_factory) -> Path:
    """The tiny model saved in this dtype (the float32 adapters load into it as they are)."""
    if request.param == torch.float32:
        return tiny_model
    out = tmp_path_factory.mktemp("tiny64") / "model"
    AutoModelForCausalLM.from_pretrained(tiny_model).to(request.param).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(out)
    return out


def load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype="auto")


def atol(model) -> float:
    """The tolerance for this model's dtype; its adapters must be in that dtype too (else float64 proves little)."""
    dtypes = {p.dtype for p in model.parameters()}
    assert len(dtypes) == 1, dtypes
    return ATOL[dtypes.pop()]


def logits(model):
    with torch.no_grad():
        return model(input_ids=INPUT).logits


def peft_reference(base_path, adapters, weights):
    model = PeftModel.from_pretrained(load(base_path), str(adapters["a"]), adapter_name="a")
    for name in ("b", "c"):
        model.load_adapter(str(adapters[name]), adapter_name=name)
    model.add_weighted_adapter(list(weights), list(weights.values()), "ref", combination_type="cat")
    model.set_adapter("ref")
    return logits(model.eval())


@pytest.fixture(scope="module", params=["cat", "fold", "scaling"])
def weighted(request, tiny_base, tiny_adapters):
    return WeightedDeltas(tiny_base, tiny_adapters, mode=request.param)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_in_place_equals_peft_cat(weighted, tiny_base, tiny_adapters, seed):
    g = torch.Generator().manual_seed(seed)
    weights = dict(zip("abc", (torch.rand(3, generator=g) * 3 - 1).tolist()))  # in [-1, 2], negatives included
    weighted.set_weights(weights)
    ours = logits(weighted.model)
    ref = peft_reference(tiny_base, tiny_adapters, weights)
    base = logits(load(tiny_base))
    assert (ref - base).abs().max() > 1e-2, "deltas must change the logits or the test proves nothing"
    torch.testing.assert_close(ours, ref, atol=atol(weighted.model), rtol=0)


def test_zero_weights_give_base_and_one_hot_gives_that_adapter(weighted, tiny_base, tiny_adapters):
    weighted.set_weights({})
    torch.testing.assert_close(logits(weighted.model), logits(load(tiny_base)), atol=atol(weighted.model), rtol=0)
    weighted.set_weights({"b": 1.0})
    single = PeftModel.from_pretrained(load(tiny_base), str(tiny_adapters["b"])).eval()
    torch.testing.assert_close(logits(weighted.model), logits(single), atol=atol(weighted.model), rtol=0)


def test_exported_adapter_gives_same_logits(weighted, tiny_base, tmp_path):
    weights = {"a": 0.3, "b": -0.45, "c": 1.2}
    weighted.set_weights(weights)
    expected = logits(weighted.model)
    out = weighted.export(weights, tmp_path / "merged")
    assert (out / "adapter_model.safetensors").exists() and (out / "adapter_config.json").exists()
    torch.testing.assert_close(logits(weighted.model), expected, atol=0, rtol=0)  # export left the weights as set
    loaded = PeftModel.from_pretrained(load(tiny_base), str(out)).eval()
    torch.testing.assert_close(logits(loaded), expected, atol=atol(weighted.model), rtol=0)


def test_unknown_delta_name_is_refused(weighted):
    with pytest.raises(KeyError, match="zzz"):
        weighted.set_weights({"zzz": 1.0})


def test_auto_mode_tries_fold_only_where_its_copy_fits(tiny_base, tiny_adapters, monkeypatch):
    """`fold` copies the target modules' base weights: `auto` never makes that copy (the search's peak memory)
    unless it fits merge.FOLD_COPY_BUDGET of the model and adapters."""
    import autollm_lf.merge.weighted as merge
    weighted = WeightedDeltas(tiny_base, tiny_adapters, mode="auto")
    base = sum(p.nbytes for n, p in weighted.model.named_parameters() if "lora_" not in n)
    assert 0 < weighted.bank.fold_copy_bytes() < base < weighted.bank.held_bytes()
    monkeypatch.setattr(merge, "FOLD_COPY_BUDGET", weighted.bank.fold_copy_bytes() / weighted.bank.held_bytes() * 0.99)
    copies = []
    monkeypatch.setattr(FoldMode, "enter", lambda self: copies.append(1) or False)
    assert not weighted.fold_fits()
    timed = []
    assert weighted.pick_mode(lambda: timed.append(1), {"a": 0.5}) == "cat" and copies == [] == timed  # one candidate
    monkeypatch.setattr(merge, "FOLD_COPY_BUDGET", weighted.bank.fold_copy_bytes() / weighted.bank.held_bytes() * 1.01)
    assert weighted.fold_fits()
    weighted.pick_mode(lambda: logits(weighted.model), {"a": 0.5})
    assert copies  # timed both ways


def test_auto_mode_picks_a_mode_and_stays_exact(tiny_base, tiny_adapters, monkeypatch):
    import autollm_lf.merge.weighted as merge
    monkeypatch.setattr(merge, "FOLD_COPY_BUDGET", 10.0)  # both modes timed
    weighted = WeightedDeltas(tiny_base, tiny_adapters, mode="auto")
    weights = {"a": 0.8, "b": -0.3, "c": 0.5}
    mode = weighted.pick_mode(lambda: logits(weighted.model), weights)
    assert mode in ("cat", "fold")
    reference = peft_reference(tiny_base, tiny_adapters, weights)
    weighted.set_weights(weights)
    torch.testing.assert_close(logits(weighted.model), reference, atol=atol(weighted.model), rtol=0)
    weighted.use_mode("cat" if mode == "fold" else "fold")  # switching back and forth keeps it exact
    weighted.set_weights(weights)
    torch.testing.assert_close(logits(weighted.model), reference, atol=atol(weighted.model), rtol=0)


def test_the_deltas_are_held_once_as_views_of_the_cat_factors(tiny_base, tiny_adapters):
    """`cat` holds each delta's factors once: its A is a view of the cat's unit rows, its B of B_cat's columns, with
    the values the adapter has when loaded alone (`scaling` mode builds no cat), and a trial's A_cat is those rows
    times w_i * s_i."""
    weighted = WeightedDeltas(tiny_base, tiny_adapters, mode="cat")
    alone = WeightedDeltas(tiny_base, tiny_adapters, mode="scaling")
    naive = sum(p.nbytes for p in weighted.model.parameters()) + sum(m.unit.nbytes for m in weighted.bank.cat)
    assert weighted.bank.held_bytes() < naive
    weights = {n: 0.25 * (i + 1) for i, n in enumerate(weighted.names)}
    weighted.set_weights(weights)
    for m in weighted.bank.cat:
        layer, k, A_cat, unit = m.layer, m.index, m.A, m.unit
        B_cat, own = m.B, alone.bank.layers[k]
        names = [n for n in weighted.names if n in layer.lora_A]
        for name in names:
            A, B = layer.lora_A[name].weight, layer.lora_B[name].weight
            assert A.untyped_storage().data_ptr() == unit.untyped_storage().data_ptr()
            assert B.untyped_storage().data_ptr() == B_cat.untyped_storage().data_ptr()
            assert torch.equal(A, own.lora_A[name].weight) and torch.equal(B, own.lora_B[name].weight)
            assert B.abs().sum() > 0
        expected = torch.cat([layer.lora_A[n].weight * (weights[n] * layer.scaling[n]) for n in names])
        torch.testing.assert_close(A_cat[: expected.shape[0]], expected, atol=1e-7, rtol=1e-6)
        assert not A_cat[expected.shape[0]:].any()  # PEFT's padding rows: weight 0
