"""Merges that are not low rank (`ties`, `dare_*`, their normalised forms): computed module by module from the true
deltas and written into the base weights (W = W0 + merge, in place), one dense delta at a time."""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazytorch import no_grad
from .bank import DeltaBank
from .maths import dare_drop, dare_mask, dare_seed, magnitude_threshold, trim
from .registry import MergeMethod

if TYPE_CHECKING:
    import torch

DARE_CACHE_BYTES = 4 * 2**30  # cached DARE masks (1 byte per entry): 0.5B shape x 4 deltas fits, x 16 does not


class DenseMerger:
    """Holds what a dense method computes once and reuses every trial: TIES thresholds and DARE masks (weight-free),
    one fp32 buffer per module shape."""

    def __init__(self, bank: DeltaBank, density: float, seed: int):
        self.bank, self.density, self.seed = bank, density, seed
        self.thresholds: dict[tuple[int, int], float | None] = {}  # TIES trim per (module, delta)
        self.masks: dict[tuple[int, int], torch.Tensor] = {}  # DARE keep masks, seeded
        self.mask_bytes = 0
        self.buffers: dict[tuple, torch.Tensor] = {}

    def reset(self, density: float) -> None:
        """A new density (or method): the cached thresholds and masks no longer hold."""
        self.density = density
        self.thresholds.clear()
        self.masks.clear()
        self.mask_bytes = 0

    @no_grad
    def write(self, w_modules: list[list[float]], method: MergeMethod, base_copies: list) -> None:
        """W = W0 + merge of the true deltas, module by module, written in place into the base weights."""
        import torch
        for k, (m, w0) in enumerate(zip(self.bank.cat, base_copies)):
            merged = self.merged_delta(k, w_modules[k], method)
            weight = m.layer.get_base_layer().weight
            if merged is None:
                weight.copy_(w0)
            else:
                torch.add(w0, merged.to(weight.dtype), out=weight)

    def merged_delta(self, k: int, w: list[float], method: MergeMethod) -> torch.Tensor | None:
        return method.combine(self._module_deltas(k, w, method.sparsify))

    def _module_deltas(self, k: int, w: list[float], sparsify: str | None):
        """(sparsified unit delta s_i B_i A_i, w_i) of module k for every delta with a non-zero weight, made
        one at a time from the factors (dense deltas of every module would not fit in memory at 16 deltas)."""
        import torch
        m = self.bank.cat[k]
        for i, name in enumerate(self.bank.names):
            if w[i] == 0.0 or name not in m.layer.lora_A:
                continue  # a zero weight adds nothing in every method, and sign election ignores zeros
            A, B = m.layer.lora_A[name].weight, m.layer.lora_B[name].weight
            buf = self._buffer((B.shape[0], A.shape[1]), A.device)
            d = torch.addmm(buf, B.float(), A.float(), beta=0, alpha=m.scaling[name], out=buf)
            if sparsify == "magnitude":
                if (k, i) not in self.thresholds:
                    self.thresholds[(k, i)] = magnitude_threshold(d, self.density)
                d = trim(d, self.thresholds[(k, i)])
            elif sparsify == "random":
                d = dare_drop(d, self.density, self._dare_mask(k, i, d))
            yield d, w[i]

    def _dare_mask(self, k: int, i: int, d: torch.Tensor) -> torch.Tensor | torch.Generator:
        """The mask of delta i in module k: cached (1 byte per entry) while the cache stays under
        DARE_CACHE_BYTES, beyond that remade from its seed each trial (the same mask, at the cost of the RNG)."""
        import torch
        if (k, i) in self.masks:
            return self.masks[(k, i)]
        generator = torch.Generator(device=d.device).manual_seed(dare_seed(self.seed, k, i))
        if self.density >= 1.0 or self.mask_bytes + d.numel() > DARE_CACHE_BYTES:
            return generator
        self.masks[(k, i)] = mask = dare_mask(d.shape, self.density, generator, d.device)
        self.mask_bytes += d.numel()
        return mask

    def _buffer(self, shape: tuple, device) -> torch.Tensor:
        """One reused fp32 buffer per module shape: no fresh allocation (and page faults) per delta."""
        import torch
        key = (shape, str(device))
        if key not in self.buffers:
            self.buffers[key] = torch.empty(shape, device=device)
        return self.buffers[key]
