"""`WeightedDeltas`: the base model with every delta loaded once (the bank); `set_weights` is the only per-trial work.

It picks the apply mode (apply.py) and the merge method (registry.py) and hands a trial's weights to the part that
writes them: the low-rank writer (lowrank.py, on the cat factors) or the dense merger (dense.py, folded).
Weights may differ per module group (`granularity`, see granularity.GRANULARITIES): each module reads its own.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Mapping

from ..hostmem import HeldTokenizer
from ..lazytorch import no_grad
from ..log import get_logger
from .adapter import export_adapter
from .apply import APPLY_MODES, FOLD_COPY_BUDGET
from .bank import CAT, DeltaBank, load_model
from .dense import DenseMerger
from .lowrank import LowRankWriter
from .registry import MERGE_METHODS, apply_switch

logger = get_logger(__name__)


class WeightedDeltas:
    """`mode`: `scaling`, `cat` or `fold` (apply.py); `auto` starts as `cat` and `pick_mode` times one trial of
    `cat` and of `fold` and keeps the cheaper. Low-rank methods (`linear`, `linear_norm`, `regmean`, `tsv`, `iso_c`)
    work on the `cat` factors and are exported exactly; all but `linear` need `cat` or `fold`. The other methods are
    not low rank: their merge is computed module by module from the factors and always folded."""

    def __init__(self, base_path: Path, adapters: Mapping[str, Path], mode: str = "cat", method: str = "linear",
                 density: float = 1.0, seed: int = 0, granularity: str = "delta",
                 tokenizer: HeldTokenizer | None = None):
        """`tokenizer`: the session's (session.Session holds it); without one, this object holds its own."""
        if mode not in tuple(APPLY_MODES) + ("auto",):
            raise ValueError(f"unknown apply mode {mode!r}; choose one of {tuple(APPLY_MODES)}")
        spec = self._method_spec(method)
        # a method that is not low rank is always folded into the base weights; one that writes the cat factors per
        # trial (MergeMethod.needs_cat) needs them: said once in the log (apply_switch), and in the report
        if mode != "auto" and (switch := apply_switch(method, mode)):
            logger.info(f"search: {switch}")
        mode = "fold" if not spec.low_rank else ("cat" if spec.needs_cat and mode == "scaling" else mode)
        base = load_model(base_path)  # then the tokenizer, as from_pretrained leaves the heap (hostmem)
        self.held = tokenizer or HeldTokenizer(base_path)
        self.pad_token_id = self.held.get().pad_token_id
        self.bank = DeltaBank(base, adapters, granularity)
        self.lowrank = LowRankWriter(self.bank)
        self.dense = DenseMerger(self.bank, density, seed)
        self.modes = {name: make(self.bank, self.lowrank) for name, make in APPLY_MODES.items()}
        self.method, self.mode = method, "scaling" if mode == "scaling" else "cat"
        self.modes[self.mode].enter()
        if mode == "fold":
            self.use_mode("fold")
        if not spec.low_rank and self.mode != "fold":
            raise ValueError(f"merge method {method!r} needs the deltas folded into the base weights; "
                             f"these adapters use transposed (fan_in_fan_out) weights")

    @staticmethod
    def _method_spec(method: str):
        if method not in MERGE_METHODS:
            raise ValueError(f"unknown merge method {method!r}; choose one of {list(MERGE_METHODS)}")
        return MERGE_METHODS[method]

    # what the search, the report and the bench read of the loaded model
    names = property(lambda self: self.bank.names)
    model = property(lambda self: self.bank.model)
    params = property(lambda self: self.bank.params)
    layer_names = property(lambda self: self.bank.layer_names)
    group_names = property(lambda self: self.bank.group_names)
    granularity = property(lambda self: self.bank.granularity)
    density = property(lambda self: self.dense.density)

    @property
    def tokenizer(self):
        """The session's tokenizer (hostmem.HeldTokenizer), loaded again if it was released."""
        return self.held.get()

    def release_tokenizer(self) -> None:
        """A search whose trials only run token ids needs no tokenizer, and a 262k-token vocabulary holds ~0.45 GB
        of host memory (measured on Gemma 3 270M), 0.4x of that model."""
        self.held.release()

    def use_granularity(self, granularity: str) -> None:
        self.bank.use_granularity(granularity)

    def use_mode(self, mode: str) -> str:
        """Apply weights by `cat` or `fold` from now on (the gradient fit needs `cat`; the bench times both). Returns
        the mode in use: `fold` stays `cat` on transposed (fan_in_fan_out) weights."""
        if mode not in ("cat", "fold"):
            raise ValueError(f"use_mode switches between cat and fold, not {mode!r}")
        if mode != self.mode and self.modes[mode].enter():
            self.modes[self.mode].leave()
            self.mode = mode
        return self.mode

    def use_method(self, method: str, density: float | None = None) -> None:
        """Switch the merge method on the loaded model (the bench compares them without reloading)."""
        spec = self._method_spec(method)
        if self.mode == "scaling" and spec.needs_cat:
            raise ValueError(f"merge method {method!r} needs search.apply cat or fold")
        if not spec.low_rank and self.use_mode("fold") != "fold":
            raise ValueError(f"merge method {method!r} needs the deltas folded into the base weights")
        if spec.data_aware and not self.lowrank.has_regmean(spec.data_aware):
            raise ValueError(f"merge method {method!r} needs its data first (use_regmean)")
        self.method = method
        self.dense.reset(self.dense.density if density is None else density)

    def use_regmean(self, grams, chunk_of: Mapping[str, str], alpha: float, space: str = "full") -> None:
        self.lowrank.use_regmean(grams, chunk_of, alpha, space)

    def has_regmean(self, space: str) -> bool:
        return self.lowrank.has_regmean(space)

    def regmean_projections(self, deltas) -> dict:
        """regmean_core: per cat module (by name), the A_u its inputs are projected on while the Grams are taken."""
        return {self.bank.layer_names[m.index]: self.lowrank.merged_rows(m, deltas)[1] for m in self.bank.cat}

    def fold_fits(self) -> bool:
        """`auto` tries `fold` only where its copy stays within FOLD_COPY_BUDGET of what is held anyway."""
        return self.bank.fold_copy_bytes() <= FOLD_COPY_BUDGET * self.bank.held_bytes()

    def pick_mode(self, evaluate: Callable[[], object], weights: Mapping[str, float]) -> str:
        """`auto`: time one trial (apply + evaluation pass) with `cat` and with `fold`; keep the cheaper. `fold` is
        tried only where its copy of the target weights fits (fold_fits): trying it would set the peak. With `cat`
        the only candidate nothing is timed (an evaluation pass: 21 s on Gemma 3 270M here)."""
        if not self.fold_fits():
            self.set_weights(weights)
            return self.mode
        cost = {}
        for mode in ("fold", "cat"):
            if self.use_mode(mode) != mode:
                continue
            start = time.perf_counter()
            self.set_weights(weights)
            evaluate()
            cost[mode] = time.perf_counter() - start
        if cost.get("fold", float("inf")) < cost["cat"]:
            self.use_mode("fold")
        self.set_weights(weights)
        return self.mode

    def point(self, weights: Mapping[str, float], method: str | None = None) -> tuple:
        """What set_weights(weights, method) makes the model compute: the method applied (the quality bench switches
        it), its density, the apply mode and every LoRA layer's weight per delta (a weight per delta and that weight
        on each of its module groups are one point)."""
        layers = tuple(tuple(round(float(x), 9) for x in layer) for layer in self.bank.module_weights(weights))
        return method or self.method, self.dense.density, self.mode, layers

    @no_grad
    def set_weights(self, weights: Mapping[str, float], method: str | None = None) -> None:
        """Weights are named by delta or `delta@group` (see GRANULARITIES); adapters not named get weight 0.
        `method` overrides the merge method for this call (the report scores each delta alone with `linear`,
        i.e. as trained, not trimmed)."""
        spec = MERGE_METHODS[method or self.method]
        if spec.low_rank:
            self.modes[self.mode].write(weights, spec)
        else:
            self.dense.write(self.bank.cat_module_weights(weights), spec, self.modes["fold"].base_copies)

    def export(self, weights: Mapping[str, float], out_dir: Path) -> Path:
        """Save the merge as one ordinary PEFT adapter (merge/adapter.py); `export_info` says how it was made."""
        self.export_info = export_adapter(self.bank, self.lowrank, self.dense, self.method, weights, out_dir)
        self.bank.model.base_model.set_adapter(self.bank.names if self.mode == "scaling" else CAT)
        if self.mode == "fold":
            self.bank.model.base_model.disable_adapter_layers()
        self.set_weights(weights)
        return Path(out_dir)
