"""search.granularity: which weight a LoRA module takes, and how weights are named. Light (no torch): the config
parses `search.granularity` here once into a `Granularity`, the merge groups modules with it, the search and the
report read weight names with `param_name` / `param_delta` / `param_group`.

A weight is named `<delta>` (granularity `delta`: every module) or `<delta>@<group>`; a module of group g takes
`<delta>@<g>` if given, else `<delta>`, else 0, so per-delta weights (baselines, human weights) work at every
granularity.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

ATTENTION_PARTS = ("attn", "attention", "q_proj", "k_proj", "v_proj", "o_proj", "query", "key", "value")
GROUP_SEPARATOR = "@"


def layer_index(name: str) -> int | None:
    """The first integer component of a module name (model.layers.3.mlp.up_proj -> 3)."""
    return next((int(part) for part in name.split(".") if part.isdigit()), None)


def module_kind(name: str, n_layers: int, n_blocks: int) -> str:
    """`attn` for attention projections, `mlp` for the rest."""
    return "attn" if any(part in ATTENTION_PARTS for part in name.split(".")) else "mlp"


def layer_block(name: str, n_layers: int, n_blocks: int) -> str:
    """`b<j>`: the j-th of n_blocks contiguous blocks of layers (`blocks:N`); modules outside layers: `other`."""
    index = layer_index(name)
    return "other" if index is None else f"b{index * n_blocks // max(n_layers, 1)}"


def each_module(name: str, n_layers: int, n_blocks: int) -> str:
    """`<layer>.<module>` (3.q_proj): every LoRA module its own weight (the finest; AdaMerging's layer-wise)."""
    index = layer_index(name)
    return name.rsplit(".", 1)[-1] if index is None else f"{index}.{name.rsplit('.', 1)[-1]}"


GRANULARITIES: dict[str, Callable[[str, int, int], str]] = {
    "delta": lambda name, n_layers, n_blocks: "",
    "module_kind": module_kind,
    "blocks": layer_block,
    "module": each_module,
}


@dataclass(frozen=True)
class Granularity:
    """A parsed `search.granularity`: its kind and, for `blocks:N`, N."""
    kind: str
    blocks: int = 1

    @classmethod
    def parse(cls, text: str | Granularity) -> Granularity:
        """'delta' | 'module_kind' | 'blocks:N' | 'module'; ValueError naming the choices otherwise."""
        if isinstance(text, Granularity):
            return text
        kind, _, n = str(text).partition(":")
        if kind not in GRANULARITIES or (kind == "blocks") != bool(n) or (n and not (n.isdigit() and int(n) >= 1)):
            raise ValueError(f"unknown granularity {text!r}; choose delta, module_kind, blocks:N (N >= 1 blocks of "
                             f"layers) or module")
        return cls(kind, int(n or 1))

    def __str__(self) -> str:
        return f"blocks:{self.blocks}" if self.kind == "blocks" else self.kind

    def groups(self, names: Sequence[str]) -> list[str]:
        """Each module's group ('' at granularity `delta`)."""
        n_layers = 1 + max((i for i in map(layer_index, names) if i is not None), default=0)
        return [GRANULARITIES[self.kind](name, n_layers, self.blocks) for name in names]


# search.granularity: auto takes the finest of these whose weights (one per searched delta and module group) are no
# more than the validation rows the optimiser fits on: hundreds of weights fitted on a few dozen rows rose on
# validation and fell on test (the Gemma example at `module`: 504 weights, 80 rows, +.037 and -.025)
AUTO = "auto"
AUTO_CANDIDATES = ("module", "module_kind", "delta")


def auto_granularity(weights_at: Callable[[str], int], fit_rows: int) -> str:
    """The finest candidate with at most `fit_rows` weights (`weights_at(granularity)` counts them)."""
    return next((g for g in AUTO_CANDIDATES if weights_at(g) <= fit_rows), AUTO_CANDIDATES[-1])


def parse_granularity(text: str) -> tuple[str, int]:
    """(kind, N) of a granularity string (ValueError naming the choices otherwise)."""
    g = Granularity.parse(text)
    return g.kind, g.blocks


def module_groups(names: Sequence[str], granularity: str | Granularity) -> list[str]:
    return Granularity.parse(granularity).groups(names)


def param_name(delta: str, group: str) -> str:
    return f"{delta}{GROUP_SEPARATOR}{group}" if group else delta


def param_delta(param: str) -> str:
    return param.split(GROUP_SEPARATOR, 1)[0]


def param_group(param: str) -> str | None:
    """The group of a `<delta>@<group>` weight; None for a per-delta weight."""
    _, sep, group = param.partition(GROUP_SEPARATOR)
    return group if sep else None


def per_delta(weights: dict[str, float]) -> dict[str, float]:
    """Weights by delta: as they are, or each delta's mean over its module groups (`delta@group` names), for what
    reads one number per delta (the report's weights table, train@auto_mix's data mix)."""
    groups: dict[str, list[float]] = {}
    for name, w in weights.items():
        groups.setdefault(param_delta(name), []).append(float(w))
    return {d: sum(ws) / len(ws) for d, ws in groups.items()}
