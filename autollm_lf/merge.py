"""Merge maths and the in-place weighted model.

W = W0 + sum_i w_i * dW_i, with dW_i = s_i * B_i @ A_i (s_i = lora_alpha / r). With every adapter
active, PEFT computes y = W0 x + sum_i scaling_i * B_i A_i x, so setting scaling_i = w_i * s_i gives
exactly the weighted sum: no weight copies, no reloads, one float per adapter per layer per trial.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Mapping, Sequence

from .granularity import GRANULARITIES, Granularity, module_groups, param_delta, param_name, parse_granularity  # noqa: F401 (re-exported)
from .hostmem import load_tokenizer
from .lazytorch import no_grad
from .regmean import regmean_A, regmean_core_A

if TYPE_CHECKING:  # torch is imported where it is used: importing this module stays light
    import torch

    Factors = tuple[torch.Tensor, torch.Tensor, float]  # (A [r, in], B [out, r], s)
    Pairs = Iterable[tuple[torch.Tensor, float]]


# ---- pure functions (property-tested in tests/test_merge_math.py) ---------------------------------

def delta_weight(A: torch.Tensor, B: torch.Tensor, s: float) -> torch.Tensor:
    return s * (B @ A)


def weighted_delta(factors: Sequence[Factors], weights: Sequence[float]) -> torch.Tensor:
    """sum_i w_i * s_i * B_i @ A_i: the true weighted sum of the deltas."""
    return sum(w * delta_weight(A, B, s) for (A, B, s), w in zip(factors, weights))


def cat_factors(factors: Sequence[Factors], weights: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """One LoRA pair (A, B), scaling 1, whose product is the weighted sum exactly (PEFT's `cat`)."""
    import torch
    A = torch.cat([A for A, _, _ in factors], dim=0)
    B = torch.cat([w * s * B for (_, B, s), w in zip(factors, weights)], dim=1)
    return A, B


# ---- merge methods on the true deltas dW_i (not on the A/B factors) ----------------------------------
# A method = how each unit delta is sparsified (weight-independent, so cached or seeded) + one `combine`
# function over the (sparsified delta, weight) pairs of one module. Semantics follow mergekit's
# `ties` / `dare_ties` / `dare_linear` with `normalize: false`, `lambda: 1`, majority sign method `sum`.
# `combine` gets the pairs one at a time (a delta may live in a reused buffer), so a module never holds
# more than one dense delta plus the accumulators.



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
    import torch
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


def ties_norm_sum(pairs: Pairs) -> torch.Tensor | None:
    """TIES with each entry divided by max(1, total |weight| of the deltas kept there) (mergekit's
    `normalize: true`, capped so that weights up to 1 keep their meaning: one delta alone is never scaled up).
    An entry the deltas share (same sign) is averaged, counted once; an entry only one delta kept after
    trimming keeps that delta in full. Streams like ties_sum, with two more accumulators (kept weight)."""
    import torch
    total = pos = part = kept_pos = kept_all = None
    for d, w in pairs:
        part = torch.empty_like(d) if part is None else part
        torch.clamp(d, min=0, out=part) if w > 0 else torch.clamp(d, max=0, out=part)  # where w*d > 0, over w
        positive, nonzero = (part != 0).to(d.dtype), (d != 0).to(d.dtype)
        if total is None:
            total, pos, kept_pos, kept_all = d * w, part * w, positive * abs(w), nonzero * abs(w)
        else:
            total.add_(d, alpha=w)
            pos.add_(part, alpha=w)
            kept_pos.add_(positive, alpha=abs(w))
            kept_all.add_(nonzero, alpha=abs(w))
    if total is None:
        return None
    elected = total >= 0
    merged = torch.where(elected, pos, total.sub_(pos))
    divisor = torch.where(elected, kept_pos, kept_all.sub_(kept_pos)).clamp_(min=1.0)
    return merged.div_(divisor)


def output_basis(B: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis [out, k] of the column space of B (the directions a LoRA delta writes to)."""
    import torch
    U, S, _ = torch.linalg.svd(B, full_matrices=False)
    keep = S > S.max() * 1e-6 if S.numel() and S.max() > 0 else S > 0
    return U[:, keep]


class OutputNorm:
    """`linear_norm`: M = f(sum_i |w_i| P_i) @ sum_i w_i dW_i, with P_i the projector onto delta i's output
    directions and f(x) = 1 / max(1, x) applied to the eigenvalues. An output direction written by several
    deltas is divided by the total weight on it (shared once, as mergekit's normalize does per entry); one
    written by a single delta keeps it fully; total weights up to 1 change nothing (a delta alone at weight w is
    w * dW). M = B' @ A with B' = f(...) @ B: rank <= sum of the ranks, so an exact LoRA adapter.
    Built once per module from the unit factors (B_cat [out, R], each column's delta `owner`); `apply` is the
    per-trial work: one eigh of a k x k matrix (k <= R) and an out x R x k product."""

    def __init__(self, B: torch.Tensor, owner: torch.Tensor, n_deltas: int):
        import torch
        B64 = B.double()
        bases = [output_basis(B64[:, owner == i]) for i in range(n_deltas)]
        self.basis_owner = torch.cat([torch.full((b.shape[1],), i) for i, b in enumerate(bases)])
        U_cat = torch.cat(bases, dim=1)  # [out, sum k_i]
        P, S, Vh = torch.linalg.svd(U_cat, full_matrices=False)
        keep = S > (S.max() * 1e-9 if S.numel() else 0)
        self.Q = P[:, keep]  # orthonormal basis of the span of every delta's output directions
        self.R = S[keep, None] * Vh[keep]  # U_cat = Q @ R
        self.QtB = self.Q.T @ B64
        self.B = B64

    def apply(self, w: torch.Tensor) -> torch.Tensor:
        """B' for the per-delta weights w (float64, one per delta): B + Q (f(H) - I) Q^T B."""
        import torch
        w = w.to(self.R.device)
        H = (self.R * w.abs()[self.basis_owner.to(w.device)]) @ self.R.T
        lam, E = torch.linalg.eigh(H)
        shrink = 1.0 / lam.clamp(min=1.0) - 1.0  # f - 1: zero where the total weight is <= 1
        return self.B + self.Q @ ((E * shrink) @ (E.T @ self.QtB))


def normalized_delta(factors: Sequence[Factors], weights: Sequence[float]) -> torch.Tensor:
    """linear_norm's merged delta for one module (the pure form of OutputNorm, for tests)."""
    import torch
    A = torch.cat([A for A, _, _ in factors], dim=0)
    B = torch.cat([s * B for _, B, s in factors], dim=1)
    owner = torch.cat([torch.full((A_.shape[0],), i) for i, (A_, _, _) in enumerate(factors)])
    w = torch.tensor(list(weights), dtype=torch.float64)
    return OutputNorm(B, owner, len(factors)).apply(w).to(A.dtype) @ (A * w[owner, None].to(A.dtype))


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
    import torch
    return delta if threshold is None else torch.nn.functional.hardshrink(delta, threshold)


def dare_mask(shape, density: float, generator: torch.Generator, device) -> torch.Tensor:
    """DARE's keep mask: each entry kept with probability `density`."""
    import torch
    return torch.rand(shape, generator=generator, device=device) < density


def dare_drop(delta: torch.Tensor, density: float, keep: torch.Tensor | torch.Generator) -> torch.Tensor:
    """DARE: drop each entry with probability 1 - density, rescale the rest by 1 / density (in place).
    `keep` is the mask, or the seeded generator that makes it."""
    import torch
    if density >= 1.0:
        return delta
    if isinstance(keep, torch.Generator):
        keep = dare_mask(delta.shape, density, keep, delta.device)
    return delta.mul_(keep).mul_(1.0 / density)


@dataclass(frozen=True)
class MergeMethod:
    combine: Callable[[Pairs], torch.Tensor | None]
    sparsify: str | None  # None, "magnitude" (TIES trim, threshold cached) or "random" (DARE, seeded mask)
    low_rank: bool = False  # applied on the `cat` factors in place, exported exactly; else folded, exported by SVD
    normalize: bool = False  # shared parts counted once (divided by the total weight of the deltas sharing them)
    data_aware: str | None = None  # RegMean's A rows from the chunks' data: "full" (regmean_A), "core" (regmean_core_A)


MERGE_METHODS: dict[str, MergeMethod] = {
    "linear": MergeMethod(linear_sum, None, low_rank=True),
    "ties": MergeMethod(ties_sum, "magnitude"),
    "dare_linear": MergeMethod(linear_sum, "random"),
    "dare_ties": MergeMethod(ties_sum, "random"),
    # normalised: what several deltas share is counted once (see OutputNorm, ties_norm_sum)
    "linear_norm": MergeMethod(linear_sum, None, low_rank=True, normalize=True),
    "ties_norm": MergeMethod(ties_norm_sum, "magnitude", normalize=True),
    "dare_ties_norm": MergeMethod(ties_norm_sum, "random", normalize=True),
    # data-aware: RegMean's A_i C_i' S^-1 in place of each A_i (regmean.py), weights on top; all ones is RegMean;
    # regmean_core: the same least squares within the deltas' own input directions (R x R Grams: any model size)
    "regmean": MergeMethod(linear_sum, None, low_rank=True, data_aware="full"),
    "regmean_core": MergeMethod(linear_sum, None, low_rank=True, data_aware="core"),
}


def dare_seed(seed: int, module: int, delta: int) -> int:
    """One fixed mask per (run seed, module, delta): the same weights always give the same merge."""
    return (seed * 1_000_003 + module * 10_007 + delta) % (2**63)


def svd_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-`rank` pair (A [rank, in], B [out, rank]) with B @ A ~ delta, and the relative Frobenius error."""
    import torch
    U, S, Vh = torch.linalg.svd(delta.float(), full_matrices=False)
    rank = min(rank, S.numel())
    root = S[:rank].sqrt()
    A, B = root[:, None] * Vh[:rank], U[:, :rank] * root
    norm = S.square().sum().sqrt().item()
    error = S[rank:].square().sum().sqrt().item() / norm if norm > 0 else 0.0
    return A, B, error


# ---- the loaded model ----------------------------------------------------------------------------

def load_base(path: Path):
    import torch
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(path, dtype="auto").to(device).eval()
    return model, load_tokenizer(path)


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
    Weights may differ per module group (`granularity`, see GRANULARITIES): each module reads its own.
    Low-rank methods (`linear`, `linear_norm`: B_cat is replaced by OutputNorm's B' per trial) work on the
    `cat` factors and are exported exactly; `linear_norm` needs `cat` or `fold`. The other merge methods
    (MERGE_METHODS) are not low rank: their merge is computed module by module from the factors and always
    folded (W = W0 + merge, in place).
    """

    CAT = "autollm_cat"

    def __init__(self, base_path: Path, adapters: Mapping[str, Path], mode: str = "cat", method: str = "linear",
                 density: float = 1.0, seed: int = 0, granularity: str = "delta"):
        from peft import PeftModel
        from peft.tuners.lora import LoraLayer

        if mode not in APPLY_MODES + ("auto",):
            raise ValueError(f"unknown apply mode {mode!r}; choose one of {APPLY_MODES}")
        if method not in MERGE_METHODS:
            raise ValueError(f"unknown merge method {method!r}; choose one of {list(MERGE_METHODS)}")
        spec = MERGE_METHODS[method]
        # ties/dare merges are not low rank: they are always folded into the base weights; linear_norm changes
        # B_cat per trial, so it needs the `cat` factors
        mode = "fold" if not spec.low_rank else ("cat" if (spec.normalize or spec.data_aware) and mode == "scaling"
                                                 else mode)
        self.method, self.density, self.seed = method, density, seed
        self._thresholds: dict[tuple[int, int], float | None] = {}  # TIES trim per (module, delta): weight-free
        self._buffers: dict[tuple, torch.Tensor] = {}
        self._masks: dict[tuple[int, int], torch.Tensor] = {}  # DARE keep masks: weight-free, seeded
        self._norms: dict[int, OutputNorm] = {}  # linear_norm per cat module: weight-free
        self._mask_bytes = 0
        self._b_changed = False  # B_cat holds linear_norm's B', not the unit factors
        self._aware_units: dict[str, list[torch.Tensor]] = {}  # RegMean's A rows per cat module, by space
        base, self._tokenizer = load_base(base_path)
        self.base_path, self.pad_token_id = Path(base_path), self._tokenizer.pad_token_id
        names = list(adapters)
        model = PeftModel.from_pretrained(base, str(adapters[names[0]]), adapter_name=names[0])
        for name in names[1:]:
            model.load_adapter(str(adapters[name]), adapter_name=name)
        self.model, self.names, self.mode = model.eval(), names, mode
        named = [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]
        self.layers = [m for _, m in named]
        self.layer_names = [n for n, _ in named]
        self.unit_scaling = [dict(layer.scaling) for layer in self.layers]  # s_i = alpha_i / r_i per layer
        self.cat_rows = None
        self.use_granularity(granularity)
        if mode == "scaling":
            model.base_model.set_adapter(names)
        else:
            self._build_cat()
            self.mode = "cat"
            if mode == "fold":
                self._use_fold()
            if not spec.low_rank and self.mode != "fold":
                raise ValueError(f"merge method {method!r} needs the deltas folded into the base weights; "
                                 f"these adapters use transposed (fan_in_fan_out) weights")

    # ---- weights per module group -------------------------------------------------------------------

    @property
    def tokenizer(self):
        """The base's tokenizer, loaded again if release_tokenizer dropped it."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.base_path)
        return self._tokenizer

    def release_tokenizer(self) -> None:
        """Drops this object's tokenizer: a search whose trials only run token ids needs none, and a 262k-token
        vocabulary holds ~0.45 GB of host memory (measured on Gemma 3 270M), 0.4x of that model."""
        self._tokenizer = None

    def use_granularity(self, granularity: str) -> None:
        """Group the modules (search.granularity); the weights' names follow (`params`)."""
        self.granularity = granularity
        self.groups = module_groups(self.layer_names, granularity)
        self.group_names = list(dict.fromkeys(self.groups))
        self.params = [param_name(d, g) for d in self.names for g in self.group_names
                       if any(gk == g and d in layer.lora_A for gk, layer in zip(self.groups, self.layers))]
        if self.cat_rows is not None:
            self._index_cat_rows()

    def _weight_table(self, weights: Mapping[str, float]) -> list[list[float]]:
        """[group][delta] -> weight, with a zero column for cat padding rows."""
        unknown = sorted(k for k in weights if k not in self.names and k not in self.params)
        if unknown:
            raise KeyError(f"unknown deltas {unknown}; loaded: {self.names} "
                           f"(weights at this granularity: {self.params})")
        return [[float(weights.get(param_name(d, g), weights.get(d, 0.0))) for d in self.names] + [0.0]
                for g in self.group_names]

    def module_weights(self, weights: Mapping[str, float]) -> list[list[float]]:
        """Per LoRA layer (self.layers order): its weight for each delta."""
        table = self._weight_table(weights)
        index = {g: i for i, g in enumerate(self.group_names)}
        return [table[index[g]][:-1] for g in self.groups]

    # ---- apply modes ----------------------------------------------------------------------------------

    def _build_cat(self) -> None:
        self.model.add_weighted_adapter(self.names, [1.0] * len(self.names), self.CAT, combination_type="cat")
        self.model.base_model.set_adapter(self.CAT)
        # set_adapter makes the active adapter trainable: nothing here is (the gradient optimiser asks for A_cat's
        # gradient only while it fits), so no backward computes or keeps gradients for the factors
        self.model.requires_grad_(False)
        self.cat_rows = []  # (A_cat weight, the deltas' own A rows, index of the delta owning each row)
        self.cat_layers, self.cat_scaling, self.cat_index, self.cat_scale = [], [], [], []
        for k, (layer, unit) in enumerate(zip(self.layers, self.unit_scaling)):
            if self.CAT not in layer.lora_A:
                continue
            self.cat_scaling.append(unit)
            row, scale = self._share_factors(layer, unit)
            self.cat_rows.append(row)
            self.cat_scale.append(scale)
            self.cat_layers.append(layer)
            self.cat_index.append(k)  # its position in self.layers (and its group)
        self.base_copies = None
        self._index_cat_rows()

    def _cat_slices(self, layer) -> list[tuple[int, str, slice]]:
        """(delta index, name, its rows of A_cat / columns of B_cat) for the deltas this module has, in PEFT's `cat`
        order; rows past the last are PEFT's zero padding."""
        slices, row = [], 0
        for i, name in enumerate(self.names):
            if name in layer.lora_A:
                slices.append((i, name, slice(row, row + layer.r[name])))
                row += layer.r[name]
        return slices

    def _share_factors(self, layer, scaling: dict[str, float]) -> tuple[tuple, torch.Tensor]:
        """The cat factors of one module, and each delta's own factors made views of them, so that the deltas are
        held once: A_cat's rows are rewritten per trial from `unit` (the deltas' A rows, unscaled), and each
        delta's A is a view of its rows of `unit`, its B a view of its columns of B_cat (PEFT's `cat` lays B_cat
        out as the B_i side by side, unscaled). Returns (A_cat weight, unit, owner of each row) and each row's
        LoRA scaling s_i (0 on padding rows)."""
        import torch
        A_cat, B_cat = layer.lora_A[self.CAT].weight, layer.lora_B[self.CAT].weight
        unit = torch.zeros_like(A_cat, requires_grad=False)  # rows past the deltas' (PEFT's padding) stay 0
        owner = torch.full((A_cat.shape[0],), len(self.names))  # padding rows: the zero weight column
        scale = torch.zeros(A_cat.shape[0], dtype=torch.float64)
        for i, name, rows in self._cat_slices(layer):
            with torch.no_grad():
                unit[rows] = layer.lora_A[name].weight
            layer.lora_A[name].weight.data = unit[rows]
            layer.lora_B[name].weight.data = B_cat.data[:, rows]
            owner[rows], scale[rows] = i, scaling[name]
        return (A_cat, unit, owner.to(A_cat.device)), scale

    def _index_cat_rows(self) -> None:
        """Each cat row's entry in the flattened [group][delta] weight table (its module's group, its delta), and
        all modules' rows end to end (`_row_flat`, `_row_scale`, `_row_ends`): a trial casts the rows' weights once."""
        import torch
        width = len(self.names) + 1
        index = {g: i for i, g in enumerate(self.group_names)}
        self.cat_flat = [owner + width * index[self.groups[k]]
                         for (_, _, owner), k in zip(self.cat_rows, self.cat_index)]
        self._row_flat = torch.cat([f.cpu() for f in self.cat_flat])
        self._row_scale = torch.cat(self.cat_scale)
        self._row_ends = torch.tensor([len(f) for f in self.cat_flat]).cumsum(0).tolist()

    def _use_fold(self) -> None:
        if any(getattr(layer, "fan_in_fan_out", False) for layer in self.cat_layers):
            return  # transposed (Conv1D) weights: keep `cat`
        if self.base_copies is None:
            self.base_copies = [layer.get_base_layer().weight.detach().clone() for layer in self.cat_layers]
        self.model.base_model.disable_adapter_layers()  # a plain forward: the weights hold the merge
        self.mode = "fold"

    def _use_cat(self) -> None:
        import torch
        if self.mode == "fold":
            with torch.no_grad():
                for layer, w0 in zip(self.cat_layers, self.base_copies):
                    layer.get_base_layer().weight.copy_(w0)
            self.model.base_model.enable_adapter_layers()
        self.base_copies, self.mode = None, "cat"

    def use_mode(self, mode: str) -> str:
        """Apply weights by `cat` or `fold` from now on (the gradient fit needs `cat`; the bench times both). Returns
        the mode in use: `fold` stays `cat` on transposed (fan_in_fan_out) weights."""
        {"cat": self._use_cat, "fold": self._use_fold}[mode]()
        return self.mode

    def use_method(self, method: str, density: float | None = None) -> None:
        """Switch the merge method on the loaded model (the bench compares them without reloading)."""
        if method not in MERGE_METHODS:
            raise ValueError(f"unknown merge method {method!r}; choose one of {list(MERGE_METHODS)}")
        spec = MERGE_METHODS[method]
        if self.mode == "scaling" and spec.low_rank and (spec.normalize or spec.data_aware):
            raise ValueError(f"merge method {method!r} needs search.apply cat or fold")
        if not spec.low_rank:
            self._use_fold()
            if self.mode != "fold":
                raise ValueError(f"merge method {method!r} needs the deltas folded into the base weights")
        if spec.data_aware and not self.has_regmean(spec.data_aware):
            raise ValueError(f"merge method {method!r} needs its data first (use_regmean)")
        self.method, self.density = method, self.density if density is None else density
        self._thresholds.clear()
        self._masks.clear()
        self._mask_bytes = 0

    def _unshare_B(self, layer, B_cat: torch.Tensor) -> None:
        """B_cat is about to hold B', not the deltas' B side by side: their B become views of a copy instead."""
        unit_B = B_cat.detach().clone()
        for _, name, rows in self._cat_slices(layer):
            layer.lora_B[name].weight.data = unit_B[:, rows]

    @no_grad
    def _restore_unit_B(self) -> None:
        """B_cat back to the unit factors after a normalised method wrote B' there."""
        for k, layer in enumerate(self.cat_layers):
            weight = layer.lora_B[self.CAT].weight
            weight.copy_(self._norms[k].B.to(weight.dtype))
        self._b_changed = False

    def fold_copy_bytes(self) -> int:
        """What `fold` adds to memory: a copy of the base weights of every module a delta targets."""
        return sum(layer.get_base_layer().weight.nbytes for layer in self.cat_layers)

    def held_bytes(self) -> int:
        """The base model and every loaded adapter (the cat factors included), as held in memory now: each storage
        once (the deltas' factors are views of the cat ones)."""
        tensors = [p for p in self.model.parameters()] + [u for _, u, _ in self.cat_rows or []]
        return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())

    def fold_fits(self) -> bool:
        """`auto` tries `fold` only where its copy stays within FOLD_COPY_BUDGET of what is held anyway."""
        return self.fold_copy_bytes() <= FOLD_COPY_BUDGET * self.held_bytes()

    def pick_mode(self, evaluate: Callable[[], object], weights: Mapping[str, float]) -> str:
        """`auto`: time one trial (apply + evaluation pass) with `cat` and with `fold`; keep the cheaper. `fold` is
        tried only where its copy of the target weights fits (fold_fits): trying it would set the peak."""
        cost = {}
        modes = (("fold", self._use_fold), ("cat", self._use_cat)) if self.fold_fits() else (("cat", self._use_cat),)
        for mode, use in modes:
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

    @no_grad
    def set_weights(self, weights: Mapping[str, float], method: str | None = None) -> None:
        """Weights are named by delta or `delta@group` (see GRANULARITIES); adapters not named get weight 0.
        `method` overrides the merge method for this call (the report scores each delta alone with `linear`,
        i.e. as trained, not trimmed)."""
        import torch
        method = method or self.method
        spec = MERGE_METHODS[method]
        if not spec.low_rank:
            self._set_merged(self._cat_module_weights(weights), spec)
            return
        if self.mode == "scaling":
            for layer, unit, w in zip(self.layers, self.unit_scaling, self.module_weights(weights)):
                for i, name in enumerate(self.names):
                    if name in unit:
                        layer.scaling[name] = w[i] * unit[name]
            return
        self._write_cat(weights, spec)
        if self.mode == "fold":
            for layer, w0, (A, _, _) in zip(self.cat_layers, self.base_copies, self.cat_rows):
                torch.addmm(w0, layer.lora_B[self.CAT].weight, A, out=layer.get_base_layer().weight)

    def _write_cat(self, weights: Mapping[str, float], spec: MergeMethod) -> None:
        """The merge as the cat adapter's factors: A_cat's rows are the deltas' A rows times w_i * s_i, their
        delta's weight in their module and its LoRA scaling (and, for a normalised method, B_cat replaced by B')."""
        import torch
        # float64 here: a float32 tensor would round the weights before the cast to the model's dtype; every
        # module's rows are cast at once per (device, dtype), not module by module (~7 us a cast, times every module)
        w = torch.tensor([x for row in self._weight_table(weights) for x in row], dtype=torch.float64)
        rows = w[self._row_flat] * self._row_scale
        cast: dict[tuple, torch.Tensor] = {}
        start = 0
        for (A, _, _), unit, end in zip(self.cat_rows, self.trial_units(spec), self._row_ends):
            key = (A.device, A.dtype)
            if key not in cast:
                cast[key] = rows.to(*key)
            torch.mul(unit, cast[key][start:end].unsqueeze(1), out=A)
            start = end
        if spec.normalize:
            self._write_norm_B(w)
        elif self._b_changed:
            self._restore_unit_B()

    def trial_units(self, spec: MergeMethod | None = None) -> list[torch.Tensor]:
        """Per cat module, the A rows a trial scales by w_i * s_i: the deltas' own, or (data-aware) RegMean's."""
        spec = spec or MERGE_METHODS[self.method]
        if spec.data_aware:
            if not self.has_regmean(spec.data_aware):
                raise ValueError("merge method regmean needs its data first (use_regmean)")
            return self._aware_units[spec.data_aware]
        return [unit for _, unit, _ in self.cat_rows]

    def has_regmean(self, space: str) -> bool:
        return space in self._aware_units

    def _merged_rows(self, layer, unit: torch.Tensor, deltas) -> tuple[list, torch.Tensor, list[slice]]:
        """The cat slices of `deltas` in this module, their A rows stacked (A_u) and each one's rows within A_u."""
        import torch
        slices = [s for s in self._cat_slices(layer) if s[1] in deltas]
        A_u = torch.cat([unit[sl] for _, _, sl in slices]) if slices else unit[:0]
        ends = torch.tensor([0] + [sl.stop - sl.start for _, _, sl in slices]).cumsum(0).tolist()
        return slices, A_u, [slice(a, b) for a, b in zip(ends, ends[1:])]

    def regmean_projections(self, deltas) -> dict[str, torch.Tensor]:
        """regmean_core: per cat module (by name), the A_u its inputs are projected on while the Grams are taken."""
        return {self.layer_names[k]: self._merged_rows(layer, unit, deltas)[1]
                for k, layer, (_, unit, _) in zip(self.cat_index, self.cat_layers, self.cat_rows)}

    @no_grad
    def use_regmean(self, grams, chunk_of: Mapping[str, str], alpha: float, space: str = "full") -> None:
        """RegMean's A rows for every cat module, from `grams` (regmean.GramFiles: each chunk's Gram of each module's
        input, or in `core` space of its projection on A_u) and each delta's chunk: regmean_A (A_i C_i' S^-1) or
        regmean_core_A. Deltas not in chunk_of (train@all) keep their A and take no part; the deltas' own A rows
        stay as trained."""
        self._aware_units[space] = []
        for k, (layer, (_, unit, _)) in enumerate(zip(self.cat_layers, self.cat_rows)):
            name = self.layer_names[self.cat_index[k]]
            slices, A_u, within = self._merged_rows(layer, unit, chunk_of)
            chunks = [chunk_of[d] for _, d, _ in slices]
            if space == "core":
                diags = [grams.diag(c, name).to(unit.device) for c in chunks]
                new = regmean_core_A(within, A_u, [grams.gram(c, name).to(unit.device) for c in chunks],
                                     [(A_u.double() * d.double()) @ A_u.double().T for d in diags], alpha)
            else:
                new = regmean_A([unit[sl] for _, _, sl in slices], [grams.gram(c, name).to(unit.device)
                                                                     for c in chunks], alpha)
            rows = unit.clone()
            for (_, _, sl), A in zip(slices, new):
                rows[sl] = A
            self._aware_units[space].append(rows)

    def _write_norm_B(self, w: torch.Tensor) -> None:
        width = len(self.names) + 1
        index = {g: i for i, g in enumerate(self.group_names)}
        for k, (layer, (_, _, owner), kk) in enumerate(zip(self.cat_layers, self.cat_rows, self.cat_index)):
            B = layer.lora_B[self.CAT].weight
            if k not in self._norms:  # built once per module, from the unit B_cat (still in place at first use)
                self._norms[k] = OutputNorm(B.detach().clone(), owner.cpu(), len(self.names))
                self._unshare_B(layer, B)
            start = width * index[self.groups[kk]]
            B.copy_(self._norms[k].apply(w[start:start + width - 1]).to(B.dtype))
        self._b_changed = True

    def _cat_module_weights(self, weights: Mapping[str, float]) -> list[list[float]]:
        per_layer = self.module_weights(weights)
        return [per_layer[k] for k in self.cat_index]

    def _set_merged(self, w_modules: list[list[float]], method: MergeMethod) -> None:
        """W = W0 + merge of the true deltas, module by module, written in place into the base weights."""
        import torch
        for k, (layer, w0) in enumerate(zip(self.cat_layers, self.base_copies)):
            merged = self._merged_delta(k, w_modules[k], method)
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
        import torch
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
        import torch
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
        import torch
        key = (shape, str(device))
        if key not in self._buffers:
            self._buffers[key] = torch.empty(shape, device=device)
        return self._buffers[key]

    # ---- export ---------------------------------------------------------------------------------------

    def export(self, weights: Mapping[str, float], out_dir: Path) -> Path:
        """Save the merge as one ordinary PEFT adapter. Low-rank methods (linear, linear_norm; any granularity):
        the in-place `cat` factors as they stand for these weights, copied into an adapter PEFT's `cat` builds
        (same shapes, same scaling): exact. ties/dare: the merged dW of each module is not low rank, so its
        truncated SVD at the rank `cat` would have (the sum of the deltas' ranks, capped by min(d_in, d_out));
        `self.export_info` says the relative error."""
        import torch
        for layer, unit in zip(self.layers, self.unit_scaling):  # add_weighted_adapter reads the unit scalings
            layer.scaling.update(unit)
        merged, spec = "autollm_merged", MERGE_METHODS[self.method]
        if self.cat_rows is None:  # `scaling` mode has no cat factors yet
            self._build_cat()
            self.model.base_model.set_adapter(self.names)
        self.model.add_weighted_adapter(self.names, [1.0] * len(self.names), merged, combination_type="cat")
        if spec.low_rank:
            self._write_cat(weights, spec)
            with torch.no_grad():
                for layer in self.cat_layers:
                    layer.lora_A[merged].weight.copy_(layer.lora_A[self.CAT].weight)
                    layer.lora_B[merged].weight.copy_(layer.lora_B[self.CAT].weight)
            self.export_info = {"method": self.method, "granularity": self.granularity,
                                "how": "the in-place cat factors of the merge (PEFT cat layout), exact"}
        else:
            self._write_svd(merged, self._cat_module_weights(weights))
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

    @no_grad
    def _write_svd(self, adapter: str, w_modules: list[list[float]]) -> None:
        """Overwrite `adapter`'s factors with the truncated SVD of each module's merged delta."""
        errors, ranks = [], []
        for k, layer in enumerate(self.cat_layers):
            A_out, B_out = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
            A_out.zero_(), B_out.zero_()
            delta = self._merged_delta(k, w_modules[k], MERGE_METHODS[self.method])
            if delta is None:
                continue
            A, B, error = svd_factors(delta, A_out.shape[0])
            A_out[: A.shape[0]] = A.to(A_out.dtype)
            B_out[:, : B.shape[1]] = (B / layer.scaling[adapter]).to(B_out.dtype)
            errors.append(error)
            ranks.append(A.shape[0])
        self.export_info = {
            "method": self.method, "density": self.density, "granularity": self.granularity,
            "how": "truncated SVD of each module's merged true delta at the sum of the deltas' ranks "
                   "(capped by min(d_in, d_out)), saved as one LoRA adapter",
            "rank_max": max(ranks, default=0),
            "relative_frobenius_error_max": max(errors, default=0.0),
            "relative_frobenius_error_mean": sum(errors) / len(errors) if errors else 0.0}


APPLY_MODES = ("cat", "fold", "scaling")
# `fold` holds a copy of the target modules' base weights (most of a transformer's weights: 1.5-2x the memory of
# the model, where `cat` holds the adapters once more); `auto` considers it only when that copy is at most this
# share of the model and adapters. `search.apply: fold` uses it whatever it costs.
FOLD_COPY_BUDGET = 0.2
DARE_CACHE_BYTES = 4 * 2**30  # cached DARE masks (1 byte per entry): 0.5B shape x 4 deltas fits, x 16 does not
