"""`search.optimizer: gradient`: the merge weights as differentiable scalars (AdaMerging / LoRA Soups style).

One Adam trajectory over the weights, started at the baseline or random point with the best fit score: each
trial takes STEPS more steps (the optimiser's moments carry over) on the teacher-forced cross-entropy of the
reference answers of the *fit half* of validation (holdout.py), on minibatches drawn from (seed, trial number),
projected onto search.bounds after each step. The search loop scores each point like any other trial; it returns
the trial best on the holdout half, which no step saw (so the trajectory is stopped early where the holdout says).
Resuming replays the trajectory (the steps, not the evaluations), so a killed search continues to the same points.

Differentiable in place: in `cat` mode each module's A_cat rows are a function of the weights (the deltas' A rows
times their LoRA scaling and weight, or RegMean's weights-inside rows: LowRankWriter.trial_rows), written by
set_weights; the backward gives A_cat's gradient, and the weights' follows by the chain rule through trial_rows,
one module at a time. Nothing is copied per step, and the decoder layers can be checkpointed.
For `linear_norm`, B' is recomputed from the current weights before each step and held fixed within it.
"""
from __future__ import annotations

import contextlib
import functools
from typing import TYPE_CHECKING, Callable

import numpy as np

from ...errors import UserError
from ...evaluate import ChunkedHead, logits_bytes, logsumexp_and_label_logits, rows_per_call
from ...hostmem import FIT_MMAP_THRESHOLD, mmap_threshold
from ...merge import MERGE_METHODS, differentiable_methods, param_name
from ..holdout import seen_score, validation_halves
from .protocol import FitSession, Need, Setting, unmet_needs

if TYPE_CHECKING:  # torch is imported where it is used: importing this module stays light
    import torch

STEPS = 5          # Adam steps per trial
BATCH_ROWS = 64    # rows per step
LEARNING_RATE = 0.05  # Adam's step size with a long budget (the toy's 40 trials)
CROSSINGS = 2      # a short budget's step is sized so that its trajectory could cross search.bounds twice


class GradientOptimizer:
    parallel = False  # one Adam trajectory: each point starts from the one before
    needs = (
        Need(lambda s: s.merge_spec.differentiable,
             "gradient cannot fit search.merge {merge!r} (its merge is not differentiable in the weights); use it "
             f"with {', '.join(differentiable_methods())}, or pick bayes or cmaes"),
        Need(lambda s: getattr(s.metric_cls, "reference_tokens", False),
             "gradient fits the teacher-forced loss of reference answers, which evaluation.metric {metric!r} does "
             "not give; pick bayes or cmaes"),
        Need(lambda s: not s.objective,
             "gradient fits one loss over the validation rows, not an evaluation.objective's parts and "
             "constraints; pick bayes or cmaes, or drop the objective"),
    )

    def __init__(self, params: list[str], bounds, seed: int, session: FitSession):
        problems = unmet_needs(type(self), setting_of(session.cfg))
        if problems:
            raise UserError(f"search.optimizer: {problems[0]}")
        self.params, self.bounds, self.seed, self.session = params, tuple(bounds), seed, session
        self.best: tuple[dict, float] | None = None
        self.x = self.adam = None
        # the fit half of validation (holdout.py): the search chooses on the other half, which no step sees
        search, objective = session.cfg.search, bool(session.cfg.evaluation.objective)
        self.fit_rows = validation_halves(session.validation_rows(), seed, search.select, objective).fit

    def suggest(self, number: int) -> dict:
        import torch
        if self.x is None:  # the trajectory starts at the best point registered so far
            lo, hi = self.bounds
            start = self.best[0] if self.best else {p: (lo + hi) / 2 for p in self.params}
            self.x = torch.tensor([float(start[p]) for p in self.params], requires_grad=True)
            self.adam = torch.optim.Adam([self.x], lr=learning_rate(self.session.cfg.search))
        fit_steps(self.session, self.params, self.x, self.adam, self.bounds, self.fit_rows,
                  np.random.default_rng([self.seed, number, 11]))
        return {p: float(v) for p, v in zip(self.params, self.x.detach().tolist())}

    def register(self, weights: dict, score: float, own: bool) -> None:
        if self.best is None or score > self.best[1]:
            self.best = (weights, score)

    def replay(self, trial: dict, own: bool) -> None:
        if own:
            self.suggest(trial["trial"])  # the same steps again: the trajectory goes on from where it was
        self.register(trial["weights"], seen_score(trial), own)


def learning_rate(search) -> float:
    """Adam's step size, about the most a weight moves per step: LEARNING_RATE, or more where the budget is short, so
    that its STEPS x n_iter steps could cross search.bounds CROSSINGS times. At .05 three trials move a weight .75 at
    most: a harmful delta at weight 1 could not reach 0 (on the conflict example it went 1, .75, .51, .29 over the
    three, its holdout score still rising). Read from the search's whole budget (the session's config, not a merge
    race's first round); search_fingerprint holds it, since n_iter is not in it."""
    lo, hi = search.bounds
    return max(LEARNING_RATE, CROSSINGS * (hi - lo) / (STEPS * max(1, search.n_iter)))


def setting_of(cfg) -> Setting:
    """The Setting a run's config asks an optimiser to work in."""
    from ...evaluate.metrics import METRICS
    merge, metric = cfg.search.merge, cfg.evaluation.metric
    return Setting(merge, MERGE_METHODS[merge], metric, METRICS[metric], bool(cfg.evaluation.objective))


def fit_steps(session: FitSession, params: list[str], x: torch.Tensor, adam, bounds, fit_rows: list[int], rng) -> None:
    """STEPS projected Adam steps of x (the weights, in `params` order) on the teacher-forced loss."""
    import torch
    weighted = session.weighted
    encoded = session.scorer("validation").encoded
    mode = weighted.mode
    if mode == "fold":
        weighted.use_mode("cat")
    lo, hi = bounds
    budget = session.cfg.evaluation.logits_budget
    lean = session.cfg.search.memory == "lean"
    on_gpu = next(weighted.model.parameters()).device.type == "cuda"
    try:  # lean: see hostmem (a backward's many mid-sized blocks fragment the heap)
        with mmap_threshold(FIT_MMAP_THRESHOLD) if lean else contextlib.nullcontext():
            for _ in range(STEPS):
                weighted.set_weights(dict(zip(params, x.detach().tolist())))  # A_cat = unit * w (B' for linear_norm)
                batch = [encoded[i] for i in rng.choice(fit_rows, size=min(BATCH_ROWS, len(fit_rows)), replace=False)]
                adam.zero_grad()
                backward_mean_nll(weighted, lambda: full_table(weighted, params, x), batch, budget,
                                  checkpoint=lean or on_gpu, sliced=lean or on_gpu)
                adam.step()
                with torch.no_grad():
                    x.clamp_(lo, hi)
    finally:
        if mode == "fold":
            weighted.use_mode("fold")


def full_table(weighted, params: list[str], x: torch.Tensor) -> torch.Tensor:
    """The flattened [group][delta + padding] weight table as a differentiable function of the searched weights
    (weights not searched, e.g. train@all's, are 0)."""
    import torch

    index = {p: i for i, p in enumerate(params)}
    entries = []
    for g in weighted.group_names:
        for d in weighted.names + [None]:
            key = None if d is None else (param_name(d, g) if param_name(d, g) in index else d)
            entries.append(x[index[key]] if key in index else x.new_zeros(()))
    return torch.stack(entries)


def backward_mean_nll(weighted, table: Callable[[], torch.Tensor], batch, budget: float,
                      checkpoint: bool = True, sliced: bool = True) -> float:
    """Backpropagates the mean cross-entropy of the batch's reference tokens into the weights `table()` is built
    from (the model's A_cat must hold unit * table(), as set_weights writes it); returns that mean.

    The gradient reaches the weights through A_cat's own gradient (A_cat = unit * s * w[owner], or for a
    weights-inside RegMean A_i~(w) * s * w_i: dL/dw = <dL/dA_cat, dA_cat/dw>, LowRankWriter.trial_rows). That lets
    the decoder layers be checkpointed (`checkpoint`): a backward then keeps each layer's input, not its
    activations, and runs each layer twice.
    Calls take as many rows as keep [rows x answer span x vocabulary] logits within `budget` of the model
    (evaluation.logits_budget); `sliced`: the LM head's logits are only ever held a vocabulary slice at a time
    (sliced_nll). Both are search.memory: lean's (and a GPU's); on Gemma 3 270M on 2 CPU cores they take the fit's
    peak from 1.64x to 1.20x of base + deltas, and its time 1.6x, most of that the allocator's page faults."""
    tokens = sum(len(t) for _, t in batch)
    rows = rows_per_call(weighted.model, max(len(p) + len(t) for p, t in batch) - min(len(p) for p, _ in batch) + 1,
                         budget)
    total = 0.0
    with differentiable_cat(weighted, checkpoint):
        for start in range(0, len(batch), rows):
            loss = answer_nll(weighted, batch[start:start + rows], budget if sliced else None) / tokens
            loss.backward()
            total += loss.item()
        flat = table()
        spec = MERGE_METHODS[weighted.method]
        # A_cat = rows(w), differentiable in the weights (LowRankWriter.trial_rows): dL/dw = sum <dL/dA_cat, dA_cat/dw>
        # module by module, so only one module's float64 rows are held at once
        for k, m in enumerate(weighted.bank.cat):
            if m.A.grad is not None:  # None: a module the batch never reached
                rows = weighted.lowrank.trial_rows(spec, k, flat.double())
                (rows * m.A.grad.double()).sum().backward(retain_graph=True)
    return total


@contextlib.contextmanager
def differentiable_cat(weighted, checkpointed: bool):
    """Within: the cat factors' A require grad (their gradients start at zero) and, if `checkpointed`, every decoder
    layer is checkpointed (torch.utils.checkpoint, recomputed in the backward); after: as before, gradients freed."""
    from torch.utils.checkpoint import checkpoint
    from transformers.modeling_layers import GradientCheckpointingLayer

    A_all = [m.A for m in weighted.bank.cat]
    layers = [m for m in weighted.model.modules() if isinstance(m, GradientCheckpointingLayer)] if checkpointed else []
    for A in A_all:
        A.requires_grad_(True)
        A.grad = None
    for layer in layers:  # an instance attribute: nn.Module.__call__ finds it before the class's forward
        layer.forward = functools.partial(checkpoint, type(layer).forward.__get__(layer), use_reentrant=False)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward
        for A in A_all:
            A.requires_grad_(False)
            A.grad = None


def answer_nll(weighted, batch, budget: float | None = None) -> torch.Tensor:
    """Summed cross-entropy of the reference tokens given their prompts, on the model as it stands. The LM head
    runs on the answer span only: with a 262k vocabulary it is most of the pass. With a `budget` a plain Linear
    head runs over vocabulary slices whose logits stay within that share of the model (sliced_nll): never held
    whole, nor kept for the backward. Without one, or with another head (a LoRA on it), the logits are whole,
    from the model's own forward."""
    import torch

    model = weighted.model
    device = next(model.parameters()).device
    length = max(len(p) + len(t) for p, t in batch)
    first = min(len(p) for p, _ in batch) - 1  # the first position whose logits predict an answer token
    pad = weighted.pad_token_id or 0
    ids = torch.full((len(batch), length), pad, dtype=torch.long)
    labels = torch.full((len(batch), length), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), length), dtype=torch.long)
    for row, (p, t) in enumerate(batch):
        ids[row, : len(p) + len(t)] = torch.tensor(p + t)
        labels[row, len(p): len(p) + len(t)] = torch.tensor(t)
        mask[row, : len(p) + len(t)] = 1
    ids, mask, labels = ids.to(device), mask.to(device), labels[:, first + 1:].to(device)
    # no KV cache: a checkpointed layer runs twice, and would append its keys to the cache again
    if budget is None or not ChunkedHead.fits(model):
        out = model(input_ids=ids, attention_mask=mask, logits_to_keep=length - first, use_cache=False)
        logits = out.logits[:, :-1].float()  # positions first .. length - 2, predicting first + 1 .. length - 1
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                 ignore_index=-100, reduction="sum")
    head = ChunkedHead(model)
    hidden = head.decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state[:, first:-1]
    scored = labels != -100
    columns = max(1, logits_bytes(model, budget) // (int(scored.sum()) * 4))
    return sliced_nll(hidden[scored], labels[scored], head, columns)


def sliced_nll(hidden, labels, head, columns: int):
    return _sliced_nll_function().apply(hidden, labels, head, columns)


@functools.cache
def _sliced_nll_function():
    """SlicedNLL, defined on first use: importing this module does not import torch."""
    import torch

    class SlicedNLL(torch.autograd.Function):
        """Summed cross-entropy of `labels` under the LM head's logits of `hidden` ([tokens, hidden]), reduced over
        vocabulary slices of `columns` ids (ChunkedHead: the head's columns, Gemma's final soft-capping). The
        backward computes each slice's logits again: d loss / d logits = softmax - one-hot, times the soft-cap's
        derivative 1 - tanh^2 = 1 - (capped / cap)^2, times the head's columns. At most two slices are alive at
        once; what autograd would keep (logits, soft-cap intermediates, log-softmax, their gradients: ~6 copies of
        the logits) is never held."""

        @staticmethod
        def forward(ctx, hidden, labels, head, columns):
            lse, picked = logsumexp_and_label_logits(head.slices(hidden, columns), labels)
            ctx.save_for_backward(hidden, labels, lse)
            ctx.head, ctx.columns = head, columns
            return (lse - picked).sum()

        @staticmethod
        def backward(ctx, grad):
            hidden, labels, lse = ctx.saved_tensors
            head, weight = ctx.head, ctx.head.linear.weight
            out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
            rows = torch.arange(len(labels), device=labels.device)
            for lo, x in head.slices(hidden, ctx.columns):
                x = x.float()
                p = (x - lse.unsqueeze(-1)).exp_()  # this slice of the softmax
                inside = (labels >= lo) & (labels < lo + x.shape[-1])
                p[rows[inside], labels[inside] - lo] -= 1
                if head.softcap is not None:
                    p.mul_(x.div_(head.softcap).square_().neg_().add_(1))
                del x
                out += (p.to(weight.dtype) @ weight[lo:lo + p.shape[-1]]).float()
                del p
            return (out * grad).to(hidden.dtype), None, None, None

    return SlicedNLL
