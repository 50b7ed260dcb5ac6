"""The bank: the base model with every delta loaded once, and their factors laid out for the merge.

PEFT's `cat` adapter (A_cat = the deltas' A rows stacked, B_cat = their B side by side) is built once; each delta's
own factors become views of it, so the deltas are held once. What the apply modes, the data-aware methods and the
gradient optimiser read of it is public and typed here: `CatModule`, `row_index`, `table`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

from ..granularity import module_groups, param_name
from ..hostmem import load_tokenizer
from ..lazytorch import no_grad

if TYPE_CHECKING:  # torch is imported where it is used: importing this module stays light
    import torch

CAT = "autollm_cat"  # the name of the concatenated adapter every trial rewrites


def load_base(path: Path):
    """The base model (on the GPU if there is one, in eval mode) and its tokenizer."""
    return load_model(path), load_tokenizer(path)


def load_model(path: Path):
    import torch
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return AutoModelForCausalLM.from_pretrained(path, dtype="auto").to(device).eval()


@dataclass
class CatModule:
    """One LoRA-targeted module's share of the cat adapter."""
    layer: object               # the PEFT LoraLayer
    index: int                  # its position in DeltaBank.layers (and so its module group)
    A: torch.Tensor             # A_cat's weight: what a trial writes (unit rows times w_i * s_i)
    unit: torch.Tensor          # the deltas' own A rows, unscaled (each delta's lora_A is a view of its rows)
    owner: torch.Tensor         # the delta index of each row (len(names) on PEFT's zero padding rows)
    scale: torch.Tensor         # each row's LoRA scaling s_i, float64 (0 on padding rows)
    scaling: dict[str, float]   # the deltas' LoRA scalings in this module, by name

    @property
    def B(self) -> torch.Tensor:
        return self.layer.lora_B[CAT].weight

    def slices(self, names: list[str]) -> list[tuple[int, str, slice]]:
        """(delta index, name, its rows of A_cat / columns of B_cat) for the deltas this module has, in PEFT's `cat`
        order; rows past the last are PEFT's zero padding."""
        out, row = [], 0
        for i, name in enumerate(names):
            if name in self.layer.lora_A:
                out.append((i, name, slice(row, row + self.layer.r[name])))
                row += self.layer.r[name]
        return out


class DeltaBank:
    """Base and adapters loaded once; module groups (search.granularity) and the weight table a trial writes."""

    def __init__(self, base, adapters: Mapping[str, Path], granularity: str = "delta"):
        """`base`: the loaded base model (load_base); every adapter in `adapters` is loaded onto it."""
        from peft import PeftModel
        from peft.tuners.lora import LoraLayer

        self.names = list(adapters)
        model = PeftModel.from_pretrained(base, str(adapters[self.names[0]]), adapter_name=self.names[0])
        for name in self.names[1:]:
            model.load_adapter(str(adapters[name]), adapter_name=name)
        self.model = model.eval()
        named = [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]
        self.layers = [m for _, m in named]
        self.layer_names = [n for n, _ in named]
        self.unit_scaling = [dict(layer.scaling) for layer in self.layers]  # s_i = alpha_i / r_i per layer
        self.cat: list[CatModule] | None = None
        self.use_granularity(granularity)

    def use_granularity(self, granularity: str) -> None:
        """Group the modules (search.granularity); the weights' names follow (`params`)."""
        self.granularity = granularity
        self.groups = module_groups(self.layer_names, granularity)
        self.group_names = list(dict.fromkeys(self.groups))
        self.params = [param_name(d, g) for d in self.names for g in self.group_names
                       if any(gk == g and d in layer.lora_A for gk, layer in zip(self.groups, self.layers))]
        if self.cat is not None:
            self._index_rows()

    def weight_table(self, weights: Mapping[str, float]) -> list[list[float]]:
        """[group][delta] -> weight, with a zero column for cat padding rows."""
        unknown = sorted(k for k in weights if k not in self.names and k not in self.params)
        if unknown:
            raise KeyError(f"unknown deltas {unknown}; loaded: {self.names} "
                           f"(weights at this granularity: {self.params})")
        return [[float(weights.get(param_name(d, g), weights.get(d, 0.0))) for d in self.names] + [0.0]
                for g in self.group_names]

    def flat_table(self, weights: Mapping[str, float]) -> torch.Tensor:
        """The weight table flattened, float64: a float32 tensor would round the weights before the model's cast."""
        import torch
        return torch.tensor([x for row in self.weight_table(weights) for x in row], dtype=torch.float64)

    def module_weights(self, weights: Mapping[str, float]) -> list[list[float]]:
        """Per LoRA layer (self.layers order): its weight for each delta."""
        table = self.weight_table(weights)
        index = {g: i for i, g in enumerate(self.group_names)}
        return [table[index[g]][:-1] for g in self.groups]

    def cat_module_weights(self, weights: Mapping[str, float]) -> list[list[float]]:
        per_layer = self.module_weights(weights)
        return [per_layer[m.index] for m in self.cat]

    def build_cat(self) -> None:
        """The cat adapter, active, with each delta's factors made views of it."""
        self.model.add_weighted_adapter(self.names, [1.0] * len(self.names), CAT, combination_type="cat")
        self.model.base_model.set_adapter(CAT)
        # set_adapter makes the active adapter trainable: nothing here is (the gradient optimiser asks for A_cat's
        # gradient only while it fits), so no backward computes or keeps gradients for the factors
        self.model.requires_grad_(False)
        self.cat = [self._share_factors(k, layer) for k, layer in enumerate(self.layers) if CAT in layer.lora_A]
        self._index_rows()

    @no_grad
    def _share_factors(self, k: int, layer) -> CatModule:
        """A_cat's rows are rewritten per trial from `unit` (the deltas' A rows, unscaled); each delta's A is a view of
        its rows of `unit`, its B a view of its columns of B_cat (PEFT's `cat` lays B_cat out as the B_i side by
        side, unscaled)."""
        import torch
        A_cat, B_cat = layer.lora_A[CAT].weight, layer.lora_B[CAT].weight
        unit = torch.zeros_like(A_cat, requires_grad=False)  # rows past the deltas' (PEFT's padding) stay 0
        owner = torch.full((A_cat.shape[0],), len(self.names))  # padding rows: the zero weight column
        scale = torch.zeros(A_cat.shape[0], dtype=torch.float64)
        module = CatModule(layer, k, A_cat, unit, owner, scale, self.unit_scaling[k])
        for i, name, rows in module.slices(self.names):
            unit[rows] = layer.lora_A[name].weight
            layer.lora_A[name].weight.data = unit[rows]
            layer.lora_B[name].weight.data = B_cat.data[:, rows]
            owner[rows], scale[rows] = i, module.scaling[name]
        module.owner = owner.to(A_cat.device)
        return module

    def _index_rows(self) -> None:
        """Each cat row's entry in the flat weight table (its module's group, its delta), per module (`row_index`),
        and all modules' rows end to end: a trial casts the rows' weights once, not module by module."""
        import torch
        width = len(self.names) + 1
        index = {g: i for i, g in enumerate(self.group_names)}
        self.row_index = [m.owner + width * index[self.groups[m.index]] for m in self.cat]
        self.row_flat = torch.cat([f.cpu() for f in self.row_index])
        self.row_scale = torch.cat([m.scale for m in self.cat])
        self.row_ends = torch.tensor([len(f) for f in self.row_index]).cumsum(0).tolist()

    @property
    def cat_layers(self) -> list:
        return [m.layer for m in self.cat]

    @property
    def cat_index(self) -> list[int]:
        return [m.index for m in self.cat]

    def fold_copy_bytes(self) -> int:
        """What `fold` adds to memory: a copy of the base weights of every module a delta targets."""
        return sum(m.layer.get_base_layer().weight.nbytes for m in self.cat)

    def held_bytes(self) -> int:
        """The base model and every loaded adapter (the cat factors included), as held in memory now: each storage
        once (the deltas' factors are views of the cat ones)."""
        tensors = [p for p in self.model.parameters()] + [m.unit for m in self.cat or []]
        return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())
