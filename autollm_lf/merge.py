"""Merge maths and the in-place weighted model.

W = W0 + sum_i w_i * dW_i, with dW_i = s_i * B_i @ A_i (s_i = lora_alpha / r). With every adapter
active, PEFT computes y = W0 x + sum_i scaling_i * B_i A_i x, so setting scaling_i = w_i * s_i gives
exactly the weighted sum: no weight copies, no reloads, one float per adapter per layer per trial.
"""
from __future__ import annotations

import shutil
import time
import tempfile
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

Factors = tuple[torch.Tensor, torch.Tensor, float]  # (A [r, in], B [out, r], s)


# ---- pure functions (property-tested in tests/test_merge_math.py) ---------------------------------

def delta_weight(A: torch.Tensor, B: torch.Tensor, s: float) -> torch.Tensor:
    return s * (B @ A)


def weighted_delta(factors: Sequence[Factors], weights: Sequence[float]) -> torch.Tensor:
    """sum_i w_i * s_i * B_i @ A_i: the true weighted sum of the deltas."""
    return sum(w * delta_weight(A, B, s) for (A, B, s), w in zip(factors, weights))


def cat_factors(factors: Sequence[Factors], weights: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """One LoRA pair (A, B), scaling 1, whose product is the weighted sum exactly (PEFT's `cat`)."""
    A = torch.cat([A for A, _, _ in factors], dim=0)
    B = torch.cat([w * s * B for (_, B, s), w in zip(factors, weights)], dim=1)
    return A, B


# ---- the loaded model ----------------------------------------------------------------------------

def load_base(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(path, dtype="auto").to(device).eval()
    return model, AutoTokenizer.from_pretrained(path)


class WeightedDeltas:
    """The base model with every delta loaded once; `set_weights` is the only per-trial work.

    Three exact ways to apply weights (config `search.apply`):
    - `scaling`: every adapter active, scaling_i = w_i * s_i (one LoRA path per delta);
    - `cat`: one concatenated path A_cat = [s_i A_i], B_cat = [B_i] (PEFT's `cat`), whose rows are
      rescaled in place by w_i per trial: O(R * d_in) per module, one matmul pair per module however
      many deltas there are;
    - `fold`: W = W0 + B_cat @ A_cat written into the base weights per trial (R * d_in * d_out per
      module), so the evaluation pass is a plain one; costs a copy of W0 for the target modules.
    `auto` (default) times one trial of `cat` and of `fold` and keeps the cheaper (`pick_mode`).
    """

    CAT = "autollm_cat"

    def __init__(self, base_path: Path, adapters: Mapping[str, Path], mode: str = "cat"):
        from peft import PeftModel
        from peft.tuners.lora import LoraLayer

        if mode not in APPLY_MODES + ("auto",):
            raise ValueError(f"unknown apply mode {mode!r}; choose one of {APPLY_MODES}")
        base, self.tokenizer = load_base(base_path)
        names = list(adapters)
        model = PeftModel.from_pretrained(base, str(adapters[names[0]]), adapter_name=names[0])
        for name in names[1:]:
            model.load_adapter(str(adapters[name]), adapter_name=name)
        self.model, self.names, self.mode = model.eval(), names, mode
        self.layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
        self.unit_scaling = [dict(layer.scaling) for layer in self.layers]  # s_i = alpha_i / r_i per layer
        if mode == "scaling":
            model.base_model.set_adapter(names)
        else:
            self._build_cat()
            self.mode = "cat"
            if mode == "fold":
                self._use_fold()

    def _build_cat(self) -> None:
        self.model.add_weighted_adapter(self.names, [1.0] * len(self.names), self.CAT, combination_type="cat")
        self.model.base_model.set_adapter(self.CAT)
        self.cat_rows = []  # (A_cat weight, its unit copy, index of the delta owning each row)
        self.cat_layers = []
        for layer in self.layers:
            if self.CAT not in layer.lora_A:
                continue
            owner = [i for i, n in enumerate(self.names) if n in layer.lora_A for _ in range(layer.r[n])]
            A = layer.lora_A[self.CAT].weight
            owner += [len(self.names)] * (A.shape[0] - len(owner))  # zero padding rows: weight 0
            self.cat_rows.append((A, A.detach().clone(), torch.tensor(owner, device=A.device)))
            self.cat_layers.append(layer)
        self.base_copies = None

    def _use_fold(self) -> None:
        if any(getattr(layer, "fan_in_fan_out", False) for layer in self.cat_layers):
            return  # transposed (Conv1D) weights: keep `cat`
        if self.base_copies is None:
            self.base_copies = [layer.get_base_layer().weight.detach().clone() for layer in self.cat_layers]
        self.model.base_model.disable_adapter_layers()  # a plain forward: the weights hold the merge
        self.mode = "fold"

    def _use_cat(self) -> None:
        if self.mode == "fold":
            with torch.no_grad():
                for layer, w0 in zip(self.cat_layers, self.base_copies):
                    layer.get_base_layer().weight.copy_(w0)
            self.model.base_model.enable_adapter_layers()
        self.base_copies, self.mode = None, "cat"

    def pick_mode(self, evaluate: Callable[[], object], weights: Mapping[str, float]) -> str:
        """`auto`: time one trial (apply + evaluation pass) with `cat` and with `fold`; keep the cheaper."""
        cost = {}
        for mode, use in (("fold", self._use_fold), ("cat", self._use_cat)):
            use()
            if self.mode != mode:
                continue
            start = time.perf_counter()
            self.set_weights(weights)
            evaluate()
            cost[mode] = time.perf_counter() - start
        if cost.get("fold", float("inf")) < cost["cat"]:
            self._use_fold()
        self.set_weights(weights)
        return self.mode

    @torch.no_grad()
    def set_weights(self, weights: Mapping[str, float]) -> None:
        """Adapters not named get weight 0."""
        unknown = set(weights) - set(self.names)
        if unknown:
            raise KeyError(f"unknown deltas {sorted(unknown)}; loaded: {self.names}")
        if self.mode in ("cat", "fold"):
            w = torch.tensor([float(weights.get(n, 0.0)) for n in self.names] + [0.0])
            for A, unit, owner in self.cat_rows:
                torch.mul(unit, w.to(A.device, A.dtype)[owner].unsqueeze(1), out=A)
            if self.mode == "fold":
                for layer, w0, (A, _, _) in zip(self.cat_layers, self.base_copies, self.cat_rows):
                    torch.addmm(w0, layer.lora_B[self.CAT].weight, A, out=layer.get_base_layer().weight)
            return
        for layer, unit in zip(self.layers, self.unit_scaling):
            for name, s in unit.items():
                layer.scaling[name] = float(weights.get(name, 0.0)) * s

    def export(self, weights: Mapping[str, float], out_dir: Path) -> Path:
        """Save the weighted sum as one ordinary PEFT adapter (PEFT's exact `cat` combination)."""
        names = [n for n, w in weights.items() if w != 0.0] or self.names[:1]
        for layer, unit in zip(self.layers, self.unit_scaling):  # add_weighted_adapter reads the unit scalings
            layer.scaling.update(unit)
        merged = "autollm_merged"
        self.model.add_weighted_adapter(names, [float(weights.get(n, 0.0)) for n in names], merged,
                                        combination_type="cat")
        out_dir = Path(out_dir)
        with tempfile.TemporaryDirectory(dir=out_dir.parent) as tmp:
            self.model.save_pretrained(tmp, selected_adapters=[merged])
            shutil.rmtree(out_dir, ignore_errors=True)
            shutil.move(str(Path(tmp) / merged), out_dir)
        self.model.delete_adapter(merged)
        self.model.base_model.set_adapter(self.names if self.mode == "scaling" else self.CAT)
        if self.mode == "fold":
            self.model.base_model.disable_adapter_layers()
        self.set_weights(weights)
        return out_dir


APPLY_MODES = ("cat", "fold", "scaling")
