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
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

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


# ---- merge methods on the true deltas dW_i (not on the A/B factors) ----------------------------------
# A method = how each unit delta is sparsified (weight-independent, so cached or seeded) + one `combine`
# function over the (sparsified delta, weight) pairs of one module. Semantics follow mergekit's
# `ties` / `dare_ties` / `dare_linear` with `normalize: false`, `lambda: 1`, majority sign method `sum`.
# `combine` gets the pairs one at a time (a delta may live in a reused buffer), so a module never holds
# more than one dense delta plus the accumulators.

Pairs = Iterable[tuple[torch.Tensor, float]]


def linear_sum(pairs: Pairs) -> torch.Tensor | None:
    """sum_i w_i d_i (task arithmetic)."""
    total = None
    for d, w in pairs:
        total = d * w if total is None else total.add_(d, alpha=w)
    return total


def ties_sum(pairs: Pairs) -> torch.Tensor | None:
    """TIES sign election: per entry keep only the weighted deltas whose sign agrees with the sign of their
    sum (0 counts as +), and add those. With S = sum_i w_i d_i and P = sum_i max(w_i d_i, 0) that is
    where(S >= 0, P, S - P): it streams over the deltas (no stack) in three passes per delta."""
    total = pos = part = None
    for d, w in pairs:
        part = torch.empty_like(d) if part is None else part
        torch.clamp(d, min=0, out=part) if w > 0 else torch.clamp(d, max=0, out=part)  # where w*d > 0, over w
        if total is None:
            total, pos = d * w, part * w
        else:
            total.add_(d, alpha=w)
            pos.add_(part, alpha=w)
    return None if total is None else torch.where(total >= 0, pos, total.sub_(pos))


def magnitude_threshold(delta: torch.Tensor, density: float) -> float | None:
    """The largest |entry| TIES drops: keeping |d| > it keeps the int(density * numel) largest (mergekit's
    `magnitude`); None when everything is kept."""
    drop = delta.numel() - int(density * delta.numel())
    if drop <= 0:
        return None
    magnitude = delta.abs().view(-1)
    if magnitude.device.type == "cpu":  # numpy's introselect: 2.5x faster than torch.kthvalue on CPU
        import numpy as np
        return float(np.partition(magnitude.numpy(), drop - 1)[drop - 1])
    return magnitude.kthvalue(drop).values.item()


def trim(delta: torch.Tensor, threshold: float | None) -> torch.Tensor:
    return delta if threshold is None else torch.nn.functional.hardshrink(delta, threshold)


def dare_mask(shape, density: float, generator: torch.Generator, device) -> torch.Tensor:
    """DARE's keep mask: each entry kept with probability `density`."""
    return torch.rand(shape, generator=generator, device=device) < density


def dare_drop(delta: torch.Tensor, density: float, keep: torch.Tensor | torch.Generator) -> torch.Tensor:
    """DARE: drop each entry with probability 1 - density, rescale the rest by 1 / density (in place).
    `keep` is the mask, or the seeded generator that makes it."""
    if density >= 1.0:
        return delta
    if isinstance(keep, torch.Generator):
        keep = dare_mask(delta.shape, density, keep, delta.device)
    return delta.mul_(keep).mul_(1.0 / density)


@dataclass(frozen=True)
class MergeMethod:
    combine: Callable[[Pairs], torch.Tensor | None]
    sparsify: str | None  # None, "magnitude" (TIES trim, threshold cached) or "random" (DARE, seeded mask)


MERGE_METHODS: dict[str, MergeMethod] = {
    "linear": MergeMethod(linear_sum, None),
    "ties": MergeMethod(ties_sum, "magnitude"),
    "dare_linear": MergeMethod(linear_sum, "random"),
    "dare_ties": MergeMethod(ties_sum, "random"),
}


def dare_seed(seed: int, module: int, delta: int) -> int:
    """One fixed mask per (run seed, module, delta): the same weights always give the same merge."""
    return (seed * 1_000_003 + module * 10_007 + delta) % (2**63)


def svd_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-`rank` pair (A [rank, in], B [out, rank]) with B @ A ~ delta, and the relative Frobenius error."""
    U, S, Vh = torch.linalg.svd(delta.float(), full_matrices=False)
    rank = min(rank, S.numel())
    root = S[:rank].sqrt()
    A, B = root[:, None] * Vh[:rank], U[:, :rank] * root
    norm = S.square().sum().sqrt().item()
    error = S[rank:].square().sum().sqrt().item() / norm if norm > 0 else 0.0
    return A, B, error


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
    Those are for `linear`. The other merge methods (MERGE_METHODS) are not low rank: their merge is
    computed module by module from the factors and always folded (W = W0 + merge, in place).
    """

    CAT = "autollm_cat"

    def __init__(self, base_path: Path, adapters: Mapping[str, Path], mode: str = "cat", method: str = "linear",
                 density: float = 1.0, seed: int = 0):
        from peft import PeftModel
        from peft.tuners.lora import LoraLayer

        if mode not in APPLY_MODES + ("auto",):
            raise ValueError(f"unknown apply mode {mode!r}; choose one of {APPLY_MODES}")
        if method not in MERGE_METHODS:
            raise ValueError(f"unknown merge method {method!r}; choose one of {list(MERGE_METHODS)}")
        # ties/dare merges are not low rank: they are always folded into the base weights
        mode = mode if method == "linear" else "fold"
        self.method, self.density, self.seed = method, density, seed
        self._thresholds: dict[tuple[int, int], float | None] = {}  # TIES trim per (module, delta): weight-free
        self._buffers: dict[tuple, torch.Tensor] = {}
        self._masks: dict[tuple[int, int], torch.Tensor] = {}  # DARE keep masks: weight-free, seeded
        self._mask_bytes = 0
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
            if self.method != "linear" and self.mode != "fold":
                raise ValueError(f"merge method {method!r} needs the deltas folded into the base weights; "
                                 f"these adapters use transposed (fan_in_fan_out) weights")

    def _build_cat(self) -> None:
        self.model.add_weighted_adapter(self.names, [1.0] * len(self.names), self.CAT, combination_type="cat")
        self.model.base_model.set_adapter(self.CAT)
        self.cat_rows = []  # (A_cat weight, its unit copy, index of the delta owning each row)
        self.cat_layers, self.cat_scaling = [], []
        for layer, unit in zip(self.layers, self.unit_scaling):
            if self.CAT not in layer.lora_A:
                continue
            self.cat_scaling.append(unit)
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

    def use_method(self, method: str, density: float | None = None) -> None:
        """Switch the merge method on the loaded model (the bench compares them without reloading)."""
        if method not in MERGE_METHODS:
            raise ValueError(f"unknown merge method {method!r}; choose one of {list(MERGE_METHODS)}")
        if method != "linear":
            self._use_fold()
            if self.mode != "fold":
                raise ValueError(f"merge method {method!r} needs the deltas folded into the base weights")
        self.method, self.density = method, self.density if density is None else density
        self._thresholds.clear()
        self._masks.clear()
        self._mask_bytes = 0

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
    def set_weights(self, weights: Mapping[str, float], method: str | None = None) -> None:
        """Adapters not named get weight 0. `method` overrides the merge method for this call (the report
        scores each delta alone with `linear`, i.e. as trained, not trimmed)."""
        unknown = set(weights) - set(self.names)
        if unknown:
            raise KeyError(f"unknown deltas {sorted(unknown)}; loaded: {self.names}")
        method = method or self.method
        if method != "linear":
            self._set_merged([float(weights.get(n, 0.0)) for n in self.names], MERGE_METHODS[method])
            return
        if self.mode in ("cat", "fold"):
            # float64 here: a float32 tensor would round the weights before the cast to the model's dtype; cast
            # once per (device, dtype), not once per module (a real cast costs ~7 us, times every module)
            w = torch.tensor([float(weights.get(n, 0.0)) for n in self.names] + [0.0], dtype=torch.float64)
            cast: dict[tuple, torch.Tensor] = {}
            for A, unit, owner in self.cat_rows:
                key = (A.device, A.dtype)
                if key not in cast:
                    cast[key] = w.to(*key)
                torch.mul(unit, cast[key][owner].unsqueeze(1), out=A)
            if self.mode == "fold":
                for layer, w0, (A, _, _) in zip(self.cat_layers, self.base_copies, self.cat_rows):
                    torch.addmm(w0, layer.lora_B[self.CAT].weight, A, out=layer.get_base_layer().weight)
            return
        for layer, unit in zip(self.layers, self.unit_scaling):
            for name, s in unit.items():
                layer.scaling[name] = float(weights.get(name, 0.0)) * s

    def _set_merged(self, w: list[float], method: MergeMethod) -> None:
        """W = W0 + merge of the true deltas, module by module, written in place into the base weights."""
        for k, (layer, w0) in enumerate(zip(self.cat_layers, self.base_copies)):
            merged = self._merged_delta(k, w, method)
            weight = layer.get_base_layer().weight
            if merged is None:
                weight.copy_(w0)
            else:
                torch.add(w0, merged.to(weight.dtype), out=weight)

    def _merged_delta(self, k: int, w: list[float], method: MergeMethod) -> torch.Tensor | None:
        return method.combine(self._module_deltas(k, w, method.sparsify))

    def _module_deltas(self, k: int, w: list[float], sparsify: str | None):
        """(sparsified unit delta s_i B_i A_i, w_i) of module k for every delta with a non-zero weight, made
        one at a time from the factors (dense deltas of every module would not fit in memory at 16 deltas)."""
        layer = self.cat_layers[k]
        for i, name in enumerate(self.names):
            if w[i] == 0.0 or name not in layer.lora_A:
                continue  # a zero weight adds nothing in every method, and sign election ignores zeros
            A, B = layer.lora_A[name].weight, layer.lora_B[name].weight
            buf = self._buffer((B.shape[0], A.shape[1]), A.device)
            d = torch.addmm(buf, B.float(), A.float(), beta=0, alpha=self.cat_scaling[k][name], out=buf)
            if sparsify == "magnitude":
                if (k, i) not in self._thresholds:
                    self._thresholds[(k, i)] = magnitude_threshold(d, self.density)
                d = trim(d, self._thresholds[(k, i)])
            elif sparsify == "random":
                d = dare_drop(d, self.density, self._dare_mask(k, i, d))
            yield d, w[i]

    def _dare_mask(self, k: int, i: int, d: torch.Tensor) -> torch.Tensor | torch.Generator:
        """The mask of delta i in module k: cached (1 byte per entry) while the cache stays under
        DARE_CACHE_BYTES, beyond that remade from its seed each trial (the same mask, at the cost of the RNG)."""
        if (k, i) in self._masks:
            return self._masks[(k, i)]
        generator = torch.Generator(device=d.device).manual_seed(dare_seed(self.seed, k, i))
        if self.density >= 1.0 or self._mask_bytes + d.numel() > DARE_CACHE_BYTES:
            return generator
        self._masks[(k, i)] = mask = dare_mask(d.shape, self.density, generator, d.device)
        self._mask_bytes += d.numel()
        return mask

    def _buffer(self, shape: tuple, device) -> torch.Tensor:
        """One reused fp32 buffer per module shape: no fresh allocation (and page faults) per delta."""
        key = (shape, str(device))
        if key not in self._buffers:
            self._buffers[key] = torch.empty(shape, device=device)
        return self._buffers[key]

    def export(self, weights: Mapping[str, float], out_dir: Path) -> Path:
        """Save the merge as one ordinary PEFT adapter. linear: PEFT's exact `cat` combination. ties/dare: the
        merged dW of each module is not low rank, so its truncated SVD at the rank `cat` would have (the sum of
        the deltas' ranks, capped by min(d_in, d_out)); `self.export_info` says the relative error."""
        names = [n for n, w in weights.items() if w != 0.0] or self.names[:1]
        for layer, unit in zip(self.layers, self.unit_scaling):  # add_weighted_adapter reads the unit scalings
            layer.scaling.update(unit)
        merged = "autollm_merged"
        if self.method == "linear":
            self.model.add_weighted_adapter(names, [float(weights.get(n, 0.0)) for n in names], merged,
                                            combination_type="cat")
            self.export_info = {"method": "linear", "how": "PEFT cat of the weighted deltas (exact)"}
        else:
            self.model.add_weighted_adapter(self.names, [1.0] * len(self.names), merged, combination_type="cat")
            self._write_svd(merged, [float(weights.get(n, 0.0)) for n in self.names])
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

    @torch.no_grad()
    def _write_svd(self, adapter: str, w: list[float]) -> None:
        """Overwrite `adapter`'s factors with the truncated SVD of each module's merged delta."""
        errors, ranks = [], []
        for k, layer in enumerate(self.cat_layers):
            A_out, B_out = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
            A_out.zero_(), B_out.zero_()
            delta = self._merged_delta(k, w, MERGE_METHODS[self.method])
            if delta is None:
                continue
            A, B, error = svd_factors(delta, A_out.shape[0])
            A_out[: A.shape[0]] = A.to(A_out.dtype)
            B_out[:, : B.shape[1]] = (B / layer.scaling[adapter]).to(B_out.dtype)
            errors.append(error)
            ranks.append(A.shape[0])
        self.export_info = {
            "method": self.method, "density": self.density,
            "how": "truncated SVD of each module's merged true delta at the sum of the deltas' ranks "
                   "(capped by min(d_in, d_out)), saved as one LoRA adapter",
            "rank_max": max(ranks, default=0),
            "relative_frobenius_error_max": max(errors, default=0.0),
            "relative_frobenius_error_mean": sum(errors) / len(errors) if errors else 0.0}


APPLY_MODES = ("cat", "fold", "scaling")
DARE_CACHE_BYTES = 4 * 2**30  # cached DARE masks (1 byte per entry): 0.5B shape x 4 deltas fits, x 16 does not
