"""`exact_match` and `loss` by teacher forcing: one forward pass per batch scores a trial."""
from __future__ import annotations

import copy
from typing import TYPE_CHECKING

from ..lazytorch import inference_mode
from .base import Batch, Evaluator
from .batches import plan_batches, prefix_worth_sharing, shared_prefix
from .logits import ChunkedHead, greedy_tokens, label_logprobs, logits_bytes, row_slices, rows_per_call
from .prefix import PromptKeysOnly, has_sliding_window, last_decoder_layer

if TYPE_CHECKING:  # torch is imported where it is used: importing this module stays light
    import torch


class TeacherForced(Evaluator):
    """One forward pass over prompt + reference per batch; subclasses read the logits.

    Rows are grouped so the pass computes as few positions as possible: either by length (least padding)
    or by prompt (rows that start alike together: chat template, system prompt, instruction), whichever
    is cheaper for these rows. A prefix every row of a batch shares is run once and its key/value cache
    reused by every row (as prefix caching in inference servers does), so a long system prompt costs
    one row, not a batch. The distinct prefixes of all batches run together in one forward call, first.
    The last layer computes only keys and values at prompt positions (PromptKeysOnly). A batch whose logits
    would exceed evaluation.logits_budget is reduced over vocabulary slices (ChunkedHead), or run as calls of
    fewer rows (row_slices) where those slices are not the model's own head bit for bit."""

    trials_need_tokenizer = False

    def __init__(self, *args, share_prefix: bool = True, keys_only_prompts: bool = True):
        import torch
        super().__init__(*args)
        self.device = next(self.model.parameters()).device
        pad = self.tokenizer.pad_token_id
        # The bench's comparisons: share_prefix=False batches by length with no prefix cache; keys_only_prompts=False
        # runs the whole last layer everywhere. Sliding-window layers keep a cache whose length is not the
        # prefix's, so neither there.
        sliding = has_sliding_window(self.model.config)
        fast = getattr(self.cfg, "fast_path", True)  # evaluation.fast_path: false turns both off
        share_prefix, keys_only_prompts = share_prefix and fast, keys_only_prompts and fast
        self.share_prefix = share_prefix and not sliding
        implementation = getattr(self.model.config, "_attn_implementation", None)
        self.last_layer = last_decoder_layer(self.model) if keys_only_prompts and not sliding and \
            implementation in ("sdpa", "eager") else None
        self.trim = PromptKeysOnly(implementation)
        self.batches = [self._collate(idx, pad) for idx in self._grouping()]
        self.head = ChunkedHead(self.model) if ChunkedHead.fits(self.model) else None
        self.head_checked = False
        # per batch, once: the vocabulary columns its logits may have in one piece; one width for every vocabulary
        # slice (the largest batch's), the width the exactness check runs
        self.batch_columns = [self._columns(b) for b in self.batches]
        self.columns = max(1, min(self.batch_columns, default=1))
        prefixes = sorted({b.prefix for b in self.batches if b.prefix})
        self.prefix_row = {prefix: row for row, prefix in enumerate(prefixes)}
        longest = max(map(len, prefixes), default=0)  # right padding: no prefix position ever sees a pad
        self.prefixes = torch.tensor([list(p) + [pad] * (longest - len(p)) for p in prefixes], device=self.device)

    def _grouping(self) -> list[list[int]]:
        """The cheapest of a few row orders (by length; by prompt; by the first k prompt tokens, then length),
        each cut into batches by plan_batches."""
        enc = self.encoded
        total = lambda i: len(enc[i][0]) + len(enc[i][1])
        if not self.share_prefix:
            return self._batches(total)
        keys = [total, lambda i: enc[i][0]] + [lambda i, k=k: (enc[i][0][:k], total(i)) for k in (8, 16, 32)]
        plans = [plan_batches(enc, sorted(range(len(enc)), key=key), self.cfg.batch_size) for key in keys]
        return min(plans, key=lambda plan: plan[0])[1]

    def _collate(self, index: list[int], pad_id: int) -> Batch:
        import torch
        items = [self.encoded[i] for i in index]
        length = max(len(p) + len(r) for p, r in items)
        ids = torch.full((len(items), length), pad_id, dtype=torch.long)
        target = torch.zeros((len(items), length - 1), dtype=torch.bool)
        for row, (p, r) in enumerate(items):
            ids[row, : len(p) + len(r)] = torch.tensor(p + r)
            target[row, len(p) - 1: len(p) + len(r) - 1] = True
        shared = prefix_worth_sharing(len(items), shared_prefix([p for p, _ in items])) if self.share_prefix else 0
        # Only answer positions are scored: the LM head (vocab-wide, a large share of a small model's
        # flops) runs on that span of the batch, not on the prompts (`logits_to_keep`). The last token of
        # the longest row is only a label: no input position for it.
        lo, hi = min(len(p) for p, _ in items) - 1, length - 1
        device = self.device
        return Batch(ids[:, shared:hi].to(device), target[:, lo:hi].to(device), ids[:, lo + 1: hi + 1].to(device),
                     hi - lo, index, tuple(ids[0, :shared].tolist()))

    def _prefix_cache(self):
        """Keys and values of every distinct shared prefix, from one forward call (they depend on the weights)."""
        if not len(self.prefixes):
            return None
        return self.model(input_ids=self.prefixes, use_cache=True, logits_to_keep=1).past_key_values

    def _forward(self, module, b: Batch, prefixes, **kwargs):
        """`module` (the model, or the decoder alone) on the batch after its shared prefix.
        No padding mask: padding is on the right, so under the causal mask no real position ever sees a pad;
        the scored logits are the same and, without a prefix, attention takes its plain causal path."""
        self.trim.split = b.input_ids.shape[1] - b.scored
        if not b.prefix:  # a cache only to hold the cut last layer's prompt keys and values
            return module(input_ids=b.input_ids, use_cache=self.last_layer is not None, **kwargs)
        return module(input_ids=b.input_ids, past_key_values=self._batch_cache(b, prefixes), use_cache=True, **kwargs)

    def _logits(self, b: Batch, prefixes) -> torch.Tensor:
        # The last layer's output has only the scored positions if PromptKeysOnly cut it, all otherwise: an int
        # `logits_to_keep` (the last positions) is right either way.
        return self._forward(self.model, b, prefixes, logits_to_keep=b.scored).logits

    def _batch_cache(self, b: Batch, prefixes):
        row, length, rows = self.prefix_row[b.prefix], len(b.prefix), b.input_ids.shape[0]
        cache = copy.copy(prefixes)  # the forward appends to its layers: give it its own
        cache.layers = [copy.copy(layer) for layer in prefixes.layers]
        for layer in cache.layers:  # this batch's prefix, the same for every row: a view, no copy
            layer.keys, layer.values = (t[row:row + 1, :, :length].expand(rows, -1, -1, -1)
                                        for t in (layer.keys, layer.values))
        return cache

    def _hidden(self, b: Batch, prefixes) -> torch.Tensor:
        """The last hidden states at the batch's scored positions (the decoder alone: no LM head)."""
        return self._forward(self.head.decoder, b, prefixes).last_hidden_state[:, -b.scored:]

    def _columns(self, b: Batch) -> int:
        """Vocabulary columns the batch's logits may have in one piece within evaluation.logits_budget."""
        head = self.model.get_output_embeddings().weight
        return logits_bytes(self.model, self.cfg.logits_budget) // (b.input_ids.shape[0] * b.scored *
                                                                    head.element_size())

    def _head_exact(self, b: Batch, prefixes) -> bool:
        """Once: does the chunked head give the model's own logits, bit for bit, on one row of this batch?"""
        import torch
        if not self.head_checked:
            one = row_slices(b, 1)[0]
            sliced = self.head.slices(self._hidden(one, prefixes), self.columns)
            self.head_ok = torch.equal(torch.cat([x for _, x in sliced], -1), self._logits(one, prefixes))
            self.head_checked = True
        return self.head_ok

    def batch_scores(self, b: Batch, prefixes, columns: int) -> list[float]:
        """The batch's row scores, its logits within evaluation.logits_budget (`columns` of them per row and
        position): whole; over vocabulary slices (ChunkedHead); or, where only the model's own head is exact, in
        calls of fewer rows."""
        head = self.model.get_output_embeddings().weight
        if columns >= head.shape[0]:
            return self.per_row([(0, self._logits(b, prefixes))], b)
        if self.head is not None and self._head_exact(b, prefixes):
            return self.per_row(self.head.slices(self._hidden(b, prefixes), self.columns), b)
        return [s for part in row_slices(b, rows_per_call(self.model, b.scored, self.cfg.logits_budget))
                for s in self.per_row([(0, self._logits(part, prefixes))], part)]

    def per_row(self, slices, b: Batch) -> list[float]:
        """Row scores from (first vocabulary id, logits) slices covering the vocabulary."""
        raise NotImplementedError

    @inference_mode
    def row_scores(self) -> list[float]:
        result = [0.0] * len(self.encoded)
        self.trim.split = 0  # the prefix call: every layer whole
        hook = self.last_layer.register_forward_pre_hook(self.trim, with_kwargs=True) if self.last_layer else None
        try:
            prefixes = self._prefix_cache()
            for b, columns in zip(self.batches, self.batch_columns):
                for i, s in zip(b.index, self.batch_scores(b, prefixes, columns)):
                    result[i] = s
        finally:
            if hook:
                hook.remove()
        return result


class ExactMatch(TeacherForced):
    """1 when the greedy answer equals the reference exactly, else 0."""

    def per_row(self, slices, b):
        hit = (greedy_tokens(slices) == b.labels) | ~b.target_mask
        return hit.all(-1).float().tolist()

    def correct(self) -> list[bool]:
        return [s == 1.0 for s in self.row_scores()]


class NegativeLoss(TeacherForced):
    right_or_wrong = False

    """Minus the mean token NLL of the reference (higher is better)."""

    def per_row(self, slices, b):
        mask = b.target_mask.float()
        return ((label_logprobs(slices, b.labels) * mask).sum(-1) / mask.sum(-1)).tolist()
