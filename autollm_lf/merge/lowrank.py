"""Low-rank merges written into the cat factors: `linear`, `linear_norm` (B' per trial), the data-aware `regmean`
and `regmean_core` (RegMean's A rows in place of the deltas' own) and the spectral `tsv` and `iso_c` (A_cat = Q_A^T,
B_cat = Q_B M*: spectral.py). Exact LoRA: the export is the same adapter."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping

from ..lazytorch import no_grad
from .bank import DeltaBank
from .maths import OutputNorm
from .registry import MergeMethod
from .regmean import RIDGE, regmean_A, regmean_core_A, weighted_core_A
from .spectral import CoreSpace

if TYPE_CHECKING:
    import torch

    from .bank import CatModule


@dataclass
class CorePieces:
    """One cat module's RegMean in the deltas' core space, kept for the weights-inside form (weighted_core_A):
    the basis U = A_u, each merged delta's shrunk Gram H_j in it, its rows within U and of A_cat, and the ridge."""
    U: torch.Tensor
    H: list
    within: list[slice]
    cat_rows: list[slice]
    deltas: list[int]
    ridge: float


def core_pieces(slices, A_u, within, grams_of, diags, alpha: float) -> CorePieces:
    """The weights-inside form's pieces of one cat module: each delta's H_i = alpha C_i' + (1 - alpha) D_i in core
    space, and a ridge scaled to the mean diagonal of their sum."""
    import torch
    H = [alpha * G.double() + (1.0 - alpha) * D for G, D in zip(grams_of, diags)]
    total = torch.stack(H).sum(0) if H else torch.zeros(0, 0, dtype=torch.float64)
    scale = float(torch.diagonal(total).mean()) if total.numel() else 0.0
    return CorePieces(A_u.double(), H, within, [sl for _, _, sl in slices], [i for i, _, _ in slices],
                      RIDGE * (scale if scale > 0 else 1.0))


class LowRankWriter:
    """Writes a low-rank method's merge into the bank's cat factors: A_cat's rows are the unit rows (the deltas' own,
    or RegMean's) times their delta's weight in their module and its LoRA scaling; a normalised method also replaces
    B_cat by OutputNorm's B'; a spectral one writes both factors from its core space. Holds what is weight-free and
    built once: the OutputNorms, RegMean's rows, the core spaces."""

    def __init__(self, bank: DeltaBank):
        self.bank = bank
        self.norms: dict[int, OutputNorm] = {}  # linear_norm per cat module
        self.spaces: dict[int, CoreSpace] = {}  # tsv, iso_c per cat module
        self.unit_B: dict[int, torch.Tensor] = {}  # the unit B_cat, kept once B_cat has held a B'
        self.b_changed = False  # B_cat holds a B' (linear_norm's, a spectral one's), not the unit factors
        self.aware_units: dict[str, list[torch.Tensor]] = {}  # RegMean's A rows per cat module, by space
        self.core: list[CorePieces] = []  # per cat module, once RegMean's core space is loaded (weights inside)

    @no_grad
    def write(self, weights: Mapping[str, float], spec: MergeMethod) -> None:
        import torch
        bank = self.bank
        if spec.spectral:
            self._write_spectral(weights, spec)
            return
        w = bank.flat_table(weights)
        if spec.weights_inside:
            for k, m in enumerate(bank.cat):
                m.A.copy_(self.trial_rows(spec, k, w))
            if self.b_changed:
                self._restore_unit_B()
            return
        rows = w[bank.row_flat] * bank.row_scale
        # every module's rows are cast at once per (device, dtype), not module by module (~7 us a cast, times modules)
        cast: dict[tuple, torch.Tensor] = {}
        start = 0
        for m, unit, end in zip(bank.cat, self.trial_units(spec), bank.row_ends):
            key = (m.A.device, m.A.dtype)
            if key not in cast:
                cast[key] = rows.to(*key)
            torch.mul(unit, cast[key][start:end].unsqueeze(1), out=m.A)
            start = end
        if spec.normalize:
            self._write_norm_B(w)
        elif self.b_changed:
            self._restore_unit_B()

    def trial_units(self, spec: MergeMethod) -> list[torch.Tensor]:
        """Per cat module, the A rows a trial scales by w_i * s_i: the deltas' own, or (data-aware) RegMean's."""
        if spec.data_aware:
            if not self.has_regmean(spec.data_aware):
                raise ValueError("merge method regmean needs its data first (use_regmean)")
            return self.aware_units[spec.data_aware]
        return [m.unit for m in self.bank.cat]

    def trial_rows(self, spec: MergeMethod, k: int, flat: torch.Tensor) -> torch.Tensor:
        """Cat module k's A_cat rows for the flat weight table `flat` (bank.flat_table), float64 and differentiable in
        `flat` (what the gradient optimiser fits): the unit rows times w_i * s_i; with the weights inside RegMean's
        sum (weights_inside), the unit rows of the merged deltas are first A_i~(w) of this module's weights."""
        import torch
        bank, m = self.bank, self.bank.cat[k]
        unit = self.trial_units(spec)[k] if not spec.weights_inside else m.unit
        flat = flat.to(m.unit.device)
        scaled = flat[bank.row_index[k]] * m.scale.to(flat.device)
        rows = unit.double()
        if spec.weights_inside:
            if not self.core:
                raise ValueError("a weights-inside RegMean needs its core-space data first (use_regmean, core)")
            pieces = self.core[k]
            width = len(bank.names) + 1
            offset = width * bank.group_names.index(bank.groups[m.index])
            new = weighted_core_A(pieces.H, pieces.within, pieces.U, flat[offset + torch.tensor(pieces.deltas)],
                                  pieces.ridge)
            parts, at = [], 0
            for sl, A in sorted(zip(pieces.cat_rows, new), key=lambda x: x[0].start):
                parts += [rows[at:sl.start], A]
                at = sl.stop
            rows = torch.cat(parts + [rows[at:]])
        return rows * scaled.unsqueeze(1)

    def has_regmean(self, space: str) -> bool:
        return space in self.aware_units

    def merged_rows(self, m: CatModule, deltas) -> tuple[list, torch.Tensor, list[slice]]:
        """The cat slices of `deltas` in this module, their A rows stacked (A_u) and each one's rows within A_u."""
        import torch
        slices = [s for s in m.slices(self.bank.names) if s[1] in deltas]
        A_u = torch.cat([m.unit[sl] for _, _, sl in slices]) if slices else m.unit[:0]
        ends = torch.tensor([0] + [sl.stop - sl.start for _, _, sl in slices]).cumsum(0).tolist()
        return slices, A_u, [slice(a, b) for a, b in zip(ends, ends[1:])]

    @no_grad
    def use_regmean(self, grams, chunk_of: Mapping[str, str], alpha: float, space: str = "full") -> None:
        """RegMean's A rows for every cat module, from `grams` (regmean.GramFiles: each chunk's Gram of each module's
        input, or in `core` space of its projection on A_u) and each delta's chunk: regmean_A (A_i C_i' S^-1) or
        regmean_core_A. Deltas not in chunk_of (train@all) keep their A and take no part; the deltas' own A rows
        stay as trained."""
        self.aware_units[space] = []
        if space == "core":
            self.core = []
        for m in self.bank.cat:
            name = self.bank.layer_names[m.index]
            slices, A_u, within = self.merged_rows(m, chunk_of)
            chunks = [chunk_of[d] for _, d, _ in slices]
            grams_of = [grams.gram(c, name).to(m.unit.device) for c in chunks]
            if space == "core":
                diags = [grams.diag(c, name).to(m.unit.device) for c in chunks]
                diags = [(A_u.double() * d.double()) @ A_u.double().T for d in diags]
                new = regmean_core_A(within, A_u, grams_of, diags, alpha)
                self.core.append(core_pieces(slices, A_u, within, grams_of, diags, alpha))  # in cat order
            else:
                new = regmean_A([m.unit[sl] for _, _, sl in slices], grams_of, alpha)
            rows = m.unit.clone()
            for (_, _, sl), A in zip(slices, new):
                rows[sl] = A
            self.aware_units[space].append(rows)

    def _write_norm_B(self, w: torch.Tensor) -> None:
        bank = self.bank
        width = len(bank.names) + 1
        index = {g: i for i, g in enumerate(bank.group_names)}
        for k, m in enumerate(bank.cat):
            if k not in self.norms:  # built once per module, from the unit B_cat
                self.norms[k] = OutputNorm(self._keep_unit_B(k, m), m.owner.cpu(), len(bank.names))
            start = width * index[bank.groups[m.index]]
            m.B.copy_(self.norms[k].apply(w[start:start + width - 1]).to(m.B.dtype))
        self.b_changed = True

    def _write_spectral(self, weights: Mapping[str, float], spec: MergeMethod) -> None:
        for k, (m, w) in enumerate(zip(self.bank.cat, self.bank.cat_module_weights(weights))):
            if k not in self.spaces:  # built once per module, from the unit factors
                self.spaces[k] = CoreSpace(m.unit, self._keep_unit_B(k, m), m.owner, m.scale, len(self.bank.names))
            space = self.spaces[k]
            rows = space.A_rows.shape[0]
            m.A.zero_()[:rows] = space.A_rows
            m.B.zero_()[:, :rows] = space.merged_B(spec.spectral, w)
        self.b_changed = True

    def _keep_unit_B(self, k: int, m: CatModule) -> torch.Tensor:
        """The unit B_cat, copied before B_cat first holds a B': the deltas' B become views of the copy."""
        if k not in self.unit_B:
            self.unit_B[k] = m.B.detach().clone()
            for _, name, rows in m.slices(self.bank.names):
                m.layer.lora_B[name].weight.data = self.unit_B[k][:, rows]
        return self.unit_B[k]

    def _restore_unit_B(self) -> None:
        """B_cat back to the unit factors after a method wrote a B' there."""
        for k, m in enumerate(self.bank.cat):
            if k in self.unit_B:
                m.B.copy_(self.unit_B[k])
        self.b_changed = False
