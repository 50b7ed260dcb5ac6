"""The three exact ways to apply a trial's weights to the loaded model (config `search.apply`), one object each.

- `scaling`: every adapter active, scaling_i = w_i * s_i (one LoRA path per delta);
- `cat`: one concatenated path A_cat = [s_i A_i], B_cat = [B_i] (PEFT's `cat`), whose rows are rescaled in place by
  w_i per trial: O(R * d_in) per module, one matmul pair per module however many deltas there are;
- `fold`: W = W0 + B_cat @ A_cat written into the base weights per trial (R * d_in * d_out per module), so the
  evaluation pass is a plain one; costs a copy of W0 for the target modules.
"""
from __future__ import annotations

from typing import Mapping

from ..lazytorch import no_grad
from .bank import DeltaBank
from .lowrank import LowRankWriter

# `fold` holds a copy of the target modules' base weights (most of a transformer's weights: 1.5-2x the memory of
# the model, where `cat` holds the adapters once more); `auto` considers it only when that copy is at most this
# share of the model and adapters. `search.apply: fold` uses it whatever it costs.
FOLD_COPY_BUDGET = 0.2


class ScalingMode:
    def __init__(self, bank: DeltaBank, lowrank: LowRankWriter):
        self.bank = bank

    def enter(self) -> bool:
        self.bank.model.base_model.set_adapter(self.bank.names)
        return True

    def leave(self) -> None:
        pass

    def write(self, weights: Mapping[str, float], spec) -> None:
        bank = self.bank
        for layer, unit, w in zip(bank.layers, bank.unit_scaling, bank.module_weights(weights)):
            for i, name in enumerate(bank.names):
                if name in unit:
                    layer.scaling[name] = w[i] * unit[name]


class CatMode:
    def __init__(self, bank: DeltaBank, lowrank: LowRankWriter):
        self.bank, self.lowrank = bank, lowrank

    def enter(self) -> bool:
        if self.bank.cat is None:
            self.bank.build_cat()
        return True

    def leave(self) -> None:
        pass

    def write(self, weights: Mapping[str, float], spec) -> None:
        self.lowrank.write(weights, spec)


class FoldMode(CatMode):
    base_copies: list | None = None  # W0 of every module a delta targets, while folded

    def enter(self) -> bool:
        super().enter()
        if any(getattr(m.layer, "fan_in_fan_out", False) for m in self.bank.cat):
            return False  # transposed (Conv1D) weights: keep `cat`
        if self.base_copies is None:
            self.base_copies = [m.layer.get_base_layer().weight.detach().clone() for m in self.bank.cat]
        self.bank.model.base_model.disable_adapter_layers()  # a plain forward: the weights hold the merge
        return True

    @no_grad
    def leave(self) -> None:
        for m, w0 in zip(self.bank.cat, self.base_copies):
            m.layer.get_base_layer().weight.copy_(w0)
        self.bank.model.base_model.enable_adapter_layers()
        self.base_copies = None

    @no_grad
    def write(self, weights: Mapping[str, float], spec) -> None:
        import torch
        self.lowrank.write(weights, spec)
        for m, w0 in zip(self.bank.cat, self.base_copies):
            torch.addmm(w0, m.B, m.A, out=m.layer.get_base_layer().weight)


APPLY_MODES = {"cat": CatMode, "fold": FoldMode, "scaling": ScalingMode}
