"""RegMean for LoRA deltas: the merge that best reproduces each delta's outputs on its own chunk's inputs.

Per LoRA-targeted linear layer, with C_i = X_i^T X_i the Gram matrix of the layer's inputs over chunk i's training
rows (on the base the deltas were trained from) and C_i' = alpha C_i + (1 - alpha) diag(C_i) (RegMean's shrinkage
of the off-diagonal part), the least-squares merge is

    dW* = (sum_i dW_i C_i') (sum_j C_j')^-1 = sum_i s_i B_i (A_i C_i' S^-1),   S = sum_j C_j'.

So dW* is again a sum of LoRA products with each delta's own B and a new A_i~ = A_i C_i' S^-1 of the same shape:
an exact LoRA adapter of rank at most the sum of the ranks, applied and exported through the same `cat` factors as
a linear merge (merge.WeightedDeltas swaps the A rows a trial reads). A weight w_i per delta (and module group) on
top scales delta i's term; all ones is RegMean itself.

Memory: one d_in x d_in Gram per distinct layer input (q/k/v read the same input, as do gate/up) per chunk,
accumulated in float32 while one forward pass per chunk runs, cached in the run dir (search/grams/) and read back
one module at a time for the solve.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Mapping, Sequence

if TYPE_CHECKING:
    import torch

RIDGE = 1e-6  # times the mean diagonal of S: input directions no row uses stay solvable (and change nothing)


# ---- pure maths (property-tested in tests/test_regmean.py) ------------------------------------------------

def shrink(C: torch.Tensor, alpha: float) -> torch.Tensor:
    """RegMean's C' = alpha C + (1 - alpha) diag(C): alpha 1 the plain Gram, 0 only its diagonal."""
    import torch
    return alpha * C + (1.0 - alpha) * torch.diag(torch.diagonal(C))


def ridged_sum(shrunk: Sequence[torch.Tensor]) -> torch.Tensor:
    """S = sum of the shrunk Grams, plus RIDGE times its mean diagonal on the diagonal (so it is always solvable)."""
    import torch
    S = torch.stack(list(shrunk)).sum(0)
    scale = float(torch.diagonal(S).mean()) if S.numel() else 0.0
    return S + RIDGE * (scale if scale > 0 else 1.0) * torch.eye(S.shape[0], dtype=S.dtype, device=S.device)


def regmean_A(As: Sequence[torch.Tensor], grams: Sequence[torch.Tensor], alpha: float) -> list[torch.Tensor]:
    """Each delta's new A_i~ = A_i C_i' S^-1 (float64 solve, returned in A_i's dtype); grams[i] is delta i's
    chunk's Gram (several deltas of one chunk share it)."""
    import torch
    shrunk = [shrink(C.double(), alpha) for C in grams]
    factor = torch.linalg.cholesky(ridged_sum(shrunk))
    # A~ = A C' S^-1  <=>  S A~^T = C' A^T (S and C' symmetric)
    return [torch.cholesky_solve(C @ A.double().T, factor).T.to(A.dtype) for A, C in zip(As, shrunk)]


def regmean_core_A(slices: Sequence[slice], A_u: torch.Tensor, grams: Sequence[torch.Tensor],
                   diags: Sequence[torch.Tensor], alpha: float) -> list[torch.Tensor]:
    """RegMean restricted to the deltas' own input directions, the rows of A_u (all deltas' A stacked, R x d_in):
    the least-squares merge of the form M A_u. It needs only R x R matrices per module: G_i = A_u C_i A_u^T and
    D_i = A_u diag(C_i) A_u^T (so memory does not grow with d_in^2). With G_i' = alpha G_i + (1 - alpha) D_i and
    S = sum_i G_i', delta i's new A is (G_i'[its rows] S^-1) A_u, of A_i's shape. Equals regmean_A where A_u spans
    every input direction."""
    import torch
    shrunk = [alpha * G.double() + (1.0 - alpha) * D.double() for G, D in zip(grams, diags)]
    S = ridged_sum(shrunk)
    inverse_rows = [torch.linalg.solve(S, G[sl].T).T for G, sl in zip(shrunk, slices)]  # G_i'[rows] S^-1 (S sym.)
    return [(M @ A_u.double()).to(A_u.dtype) for M in inverse_rows]


def weighted_core_A(H: Sequence[torch.Tensor], rows: Sequence[slice], U: torch.Tensor, w: torch.Tensor,
                    ridge: float) -> list[torch.Tensor]:
    """RegMean with the weights inside its sum, in a basis U (k x d_in) of the deltas' inputs: delta i's new A is
    A_i~(w) = H_i[rows_i] S_w^-1 U with S_w = sum_j w_j H_j + ridge I, H_j = U C_j' U^T its chunk's shrunk Gram in
    that basis, rows_i its A rows within U (A_i = U[rows_i]). The merge sum_i w_i s_i B_i A_i~(w) is then the least
    squares of sum_j w_j |(dW - dW_j) X_j|^2: w_i = 0 drops delta i (its term and its Gram), one-hot is that delta
    alone, all ones is RegMean (regmean_core_A), and a common factor on every w changes nothing. Differentiable in w
    (torch.linalg.solve), float64."""
    import torch
    S = sum(w[j] * H[j] for j in range(len(H))) + ridge * torch.eye(U.shape[0], dtype=torch.float64)
    return [torch.linalg.solve(S, Hj[r].T).T @ U for Hj, r in zip(H, rows)]  # S symmetric


def weighted_regmean_delta(deltas: Sequence[torch.Tensor], grams: Sequence[torch.Tensor], alpha: float,
                           w: Sequence[float]) -> torch.Tensor:
    """The dense reference of the weights-inside form: (sum_i w_i dW_i C_i') (sum_j w_j C_j' + ridge)^-1, the ridge
    as regmean_delta's (from the unweighted sum), for tests."""
    import torch
    shrunk = [shrink(C.double(), alpha) for C in grams]
    ridge = ridged_sum(shrunk) - torch.stack(shrunk).sum(0)
    S = sum(wj * C for wj, C in zip(w, shrunk)) + ridge
    numerator = sum(wj * d.double() @ C for wj, d, C in zip(w, deltas, shrunk))
    return torch.linalg.solve(S, numerator.T).T


def regmean_delta(deltas: Sequence[torch.Tensor], grams: Sequence[torch.Tensor], alpha: float) -> torch.Tensor:
    """The dense reference: (sum_i dW_i C_i') (sum_j C_j' + ridge)^-1, for tests."""
    import torch
    shrunk = [shrink(C.double(), alpha) for C in grams]
    S = ridged_sum(shrunk)
    numerator = sum(d.double() @ C for d, C in zip(deltas, shrunk))
    return torch.linalg.solve(S, numerator.T).T


# ---- the Grams: one forward pass per chunk --------------------------------------------------------------

class GramCollector:
    """Forward pre-hooks on the named linear layers that add X^T X of their inputs (padding left out) into float32
    accumulators. Layers fed the very same tensor object one after the other (q/k/v, gate/up) share one Gram:
    `alias` maps each layer to the one whose Gram it reads. (Identity, not the data pointer: a freed input's memory
    is reused by a later layer's input of the same shape.)"""

    def __init__(self, layers: Mapping[str, torch.nn.Module], project: Mapping[str, torch.Tensor] | None = None):
        self.layers = dict(layers)
        # core space: per layer the A_u [R, d_in] its inputs are projected on; the Gram is then R x R, plus the
        # diagonal of the full Gram as a vector (`diag:<layer>`), and layers share nothing
        self.project = dict(project or {})
        self.grams: dict[str, torch.Tensor] = {}
        self.alias: dict[str, str] = {}
        self.mask: torch.Tensor | None = None  # [batch, seq] bool: the real tokens of the batch being run
        self._last: tuple | None = None  # (the input the previous hooked layer got, that layer)

    def _hook(self, name: str):
        import torch

        def hook(module, args):
            x = args[0]
            flat = lambda: (x[self.mask] if self.mask is not None else x.reshape(-1, x.shape[-1])).float()
            if name in self.project:
                rows = flat()
                self._add(f"diag:{name}", rows.square().sum(0))
                self.alias.setdefault(name, name)
                rows = rows @ self.project[name].float().T
                self._add(name, rows.T @ rows)
                return None
            if self._last is not None and self._last[0] is x:  # the input the previous layer got
                self.alias.setdefault(name, self.alias[self._last[1]])
                return None
            self._last = (x, name)
            self.alias.setdefault(name, name)
            rows = flat()
            if name not in self.grams:
                self.grams[name] = torch.zeros(x.shape[-1], x.shape[-1], device=x.device)
            self.grams[name].addmm_(rows.T, rows)
            return None
        return hook

    def _add(self, key: str, value: torch.Tensor) -> None:
        if key in self.grams:
            self.grams[key].add_(value)
        else:
            self.grams[key] = value.clone()

    @contextlib.contextmanager
    def hooked(self):
        handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in self.layers.items()]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def run(self, model, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Forward each (input ids, attention mask) batch through `model` (as it stands: callers set the merge to 0)."""
        import torch
        device = next(model.parameters()).device
        with self.hooked(), torch.no_grad():
            for ids, mask in batches:
                self._last = None
                self.mask = mask.bool().to(device)
                model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
        self.mask, self._last = None, None


def padded_batches(sequences: Sequence[list[int]], pad_id: int, rows: int = 16):
    """Right-padded (ids, mask) batches of the token sequences, sorted by length so little is padding."""
    import torch
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    for start in range(0, len(order), rows):
        group = [sequences[i] for i in order[start:start + rows]]
        width = max(len(s) for s in group)
        ids = torch.full((len(group), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for r, s in enumerate(group):
            ids[r, : len(s)] = torch.tensor(s)
            mask[r, : len(s)] = 1
        yield ids, mask


def save_grams(path: Path, collector: GramCollector, fingerprint: str, rows: int) -> None:
    """One chunk's Grams (the distinct ones) and the alias map, atomically."""
    import json

    from safetensors.torch import save_file
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous().cpu() for k, v in collector.grams.items()}, str(tmp),
              metadata={"fingerprint": fingerprint, "alias": json.dumps(collector.alias), "rows": str(rows)})
    tmp.replace(path)


def cached_fingerprint(path: Path) -> str | None:
    from safetensors import safe_open
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            return (f.metadata() or {}).get("fingerprint")
    except Exception:  # a torn or foreign file: computed again
        return None


class GramFiles:
    """Every chunk's cached Grams, read one module at a time (never all modules of all chunks at once)."""

    def __init__(self, paths: Mapping[str, Path]):
        import json

        from safetensors import safe_open
        self._stack = contextlib.ExitStack()
        self.files = {c: self._stack.enter_context(safe_open(str(p), "pt")) for c, p in paths.items()}
        self.alias = {c: json.loads(f.metadata()["alias"]) for c, f in self.files.items()}

    def gram(self, chunk: str, layer: str) -> torch.Tensor:
        return self.files[chunk].get_tensor(self.alias[chunk][layer])

    def diag(self, chunk: str, layer: str) -> torch.Tensor:
        """Core space: the diagonal of the layer's full Gram (a vector)."""
        return self.files[chunk].get_tensor(f"diag:{layer}")

    def close(self) -> None:
        self._stack.close()
