"""Evaluators: score a model on held-out rows, batched and tokenised once, per row (so per chunk too).

`exact_match` and `loss` need no generation: with teacher forcing, greedy decoding reproduces the
reference (and then stops) exactly when the argmax at every reference position, end-of-sequence
included, is the reference token, so one forward pass per batch scores a trial. `contains`, `regex`,
`numeric`, `python` and `judge` score answers produced by batched greedy `generate`.
"""
from __future__ import annotations

import copy
import dataclasses
import importlib
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from .errors import UserError
from .lazytorch import inference_mode
from .rows import Row, Turn

if TYPE_CHECKING:  # torch is imported where it is used: importing this module stays light
    import torch

_templates: dict = {}


def forget_templates() -> None:
    """Drops the fixed templates, and with them the tokenizers they keep alive (see release_tokenizer)."""
    _templates.clear()


def _template(tokenizer, template_name: str):
    from llamafactory.data import get_template_and_fix_tokenizer
    from llamafactory.hparams import DataArguments

    # per tokenizer object: the fix sets its end-of-sequence token (gemma: <end_of_turn>), each tokenizer needs it
    key = (template_name, id(tokenizer))
    if key not in _templates:  # the tokenizer is kept with it, so that its id is never reused by another
        _templates[key] = (tokenizer, get_template_and_fix_tokenizer(tokenizer, DataArguments(template=template_name)))
    return _templates[key][1]


def truncate_turns(pairs: list[tuple[list[int], list[int]]], cutoff_len: int,
                   efficient_eos: bool = False) -> list[tuple[list[int], list[int]]]:
    """LLaMA-Factory's truncation of a supervised training row (data/processor/supervised.py, mask_history off):
    turns in order, each (prompt, answer) pair cut by `infer_seqlen` to what the turns before it left of cutoff_len
    (both keep their beginnings; a long answer takes its share first), turns past the cutoff dropped."""
    from llamafactory.data.processor.processor_utils import infer_seqlen

    total, kept = (1 if efficient_eos else 0), []
    for source, target in pairs:
        if total >= cutoff_len:
            break
        source_len, target_len = infer_seqlen(len(source), len(target), cutoff_len - total)
        kept.append((source[:source_len], target[:target_len]))
        total += source_len + target_len
    return kept


def encode_turns(tokenizer, template_name: str, prompt: str, response: str, history: list[Turn] | None = None,
                 system: str | None = None, cutoff_len: int | None = None) -> tuple[list[int], list[int], bool]:
    """(prompt ids, target ids, truncated): token ids exactly as LLaMA-Factory builds them for training with this
    chat template (earlier turns of a conversation in `history`), truncated as it truncates them to cutoff_len.

    The target is the response up to and including end-of-sequence: what greedy decoding must emit. Empty when
    the row cannot fit at all (earlier turns take the whole cutoff_len)."""
    template = _template(tokenizer, template_name)
    messages = list(history or []) + [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    pairs = template.encode_multiturn(tokenizer, messages, system)
    kept = truncate_turns(pairs, cutoff_len, template.efficient_eos) if cutoff_len else pairs
    truncated = kept != pairs
    if len(kept) < len(pairs):  # the last answer's turn did not fit
        return [t for pair in kept for part in pair for t in part], [], truncated
    prompt_ids = [t for pair in kept[:-1] for part in pair for t in part] + kept[-1][0]
    response_ids = kept[-1][1]
    if tokenizer.eos_token_id in response_ids:
        response_ids = response_ids[: response_ids.index(tokenizer.eos_token_id) + 1]
    return prompt_ids, response_ids, truncated


def encode_prompt_response(tokenizer, template_name: str, prompt: str, response: str,
                           history: list[Turn] | None = None, system: str | None = None,
                           cutoff_len: int | None = None) -> tuple[list[int], list[int]]:
    """encode_turns without the truncation flag."""
    return encode_turns(tokenizer, template_name, prompt, response, history, system, cutoff_len)[:2]


def model_positions(model) -> int | None:
    """How many positions the model has (its max_position_embeddings), if it says."""
    config = getattr(model, "config", None)
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    return getattr(text, "max_position_embeddings", None)


def row_name(row: Row, index: int) -> str:
    where = row.get("source") or row.get("chunk")
    return f"{where} row {row['row_id']}" if where and row.get("row_id") is not None else f"row {index}"


@dataclass
class Batch:
    input_ids: torch.Tensor     # the rows after their shared prefix, right-padded
    target_mask: torch.Tensor   # over the scored positions: True where the next position holds a reference token
    labels: torch.Tensor        # over the scored positions: the token each must predict
    scored: int                 # the last positions of input_ids, whose logits are computed (the answer span)
    index: list[int]            # row index of each sequence in the original order
    prefix: tuple[int, ...] = ()  # prompt tokens every row of the batch starts with (run once, cached)


class Evaluator:
    """Base: `row_scores()` gives one score per row (higher is better); `score()` their mean."""

    trials_need_tokenizer = True  # False: once the rows are token ids, scoring never encodes or decodes again

    def __init__(self, model, tokenizer, template_name: str, rows: list[Row], cfg):
        self.model, self.tokenizer, self.rows, self.cfg = model, tokenizer, rows, cfg
        # held-out rows as training saw them: cut to cutoff_len, never past the model's positions
        limits = [n for n in (getattr(cfg, "cutoff_len", None), model_positions(model)) if n]
        self.cutoff_len = min(limits) if limits else None
        encoded = [self.encode(template_name, r) for r in rows]
        unfit = [row_name(r, i) for i, (r, (p, t, _)) in enumerate(zip(rows, encoded)) if not p or not t]
        if unfit:
            raise UserError(f"evaluation: {len(unfit)} held-out row(s) cannot fit in cutoff_len {self.cutoff_len} even "
                            f"truncated (their earlier turns take all of it): {', '.join(unfit[:5])}"
                            f"{' ...' if len(unfit) > 5 else ''}; shorten their history or raise evaluation.cutoff_len")
        self.encoded = [(p, t) for p, t, _ in encoded]
        self.stats: dict[str, int] = {}
        truncated = sum(cut for *_, cut in encoded)
        if truncated:  # reported in report.json's evaluation_stats
            self.stats["truncated"] = truncated

    def encode(self, template_name: str, row: Row) -> tuple[list[int], list[int], bool]:
        """(prompt ids, answer ids, truncated) of one row, as LLaMA-Factory encodes and truncates it for training."""
        return encode_turns(self.tokenizer, template_name, row["prompt"], row["response"], row.get("history"),
                            row.get("system"), self.cutoff_len)

    def row_scores(self) -> list[float]:
        raise NotImplementedError

    def score(self) -> float:
        scores = self.row_scores()
        return sum(scores) / max(len(scores), 1)

    def _batches(self, key) -> list[list[int]]:
        """Row indices grouped in batches of similar length (less padding)."""
        order = sorted(range(len(self.encoded)), key=key)
        size = self.cfg.batch_size
        return [order[s:s + size] for s in range(0, len(order), size)]

    def prompt_length_batches(self) -> list[list[int]]:
        """Batches for `generate`: by prompt length, the least left padding."""
        return self._batches(lambda i: len(self.encoded[i][0]))


MIN_LOGITS_BYTES = 16 * 2**20  # logits this small are never cut: a char-level toy's never are


def logits_bytes(model, budget: float) -> int:
    """What the logits of one forward call may take: `budget` (evaluation.logits_budget) of the model's weight
    memory. A 262k vocabulary makes a 32-row, 12-position batch's logits 0.4 GB, 0.4x Gemma 3 270M's weights."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return max(MIN_LOGITS_BYTES, int(budget * weights))


def rows_per_call(model, positions: int, budget: float) -> int:
    """How many rows one forward call may take so that its logits (rows x positions x vocabulary) stay within
    logits_bytes; at least one."""
    head = model.get_output_embeddings().weight
    return max(1, logits_bytes(model, budget) // (positions * head.shape[0] * head.element_size()))


def row_slices(b: "Batch", rows: int) -> list["Batch"]:
    """The batch as forward calls of at most `rows` rows. Same padded length and prefix: each row's logits are
    the batch's, bit for bit on the CPUs measured (tests compare the scores)."""
    if len(b.index) <= rows:
        return [b]
    return [dataclasses.replace(b, input_ids=b.input_ids[s:s + rows], target_mask=b.target_mask[s:s + rows],
                                labels=b.labels[s:s + rows], index=b.index[s:s + rows])
            for s in range(0, len(b.index), rows)]


def _causal_lm(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model  # under a PeftModel


class ChunkedHead:
    """The LM head over slices of the vocabulary: a batch's logits are reduced slice by slice and never held
    whole, while the head's weights are still read once per batch (row slices read them once per call: 671 MB
    each time for Gemma 3's 262k x 640 head, which made a CPU trial 1.5x slower). Exact: the same columns of the
    same matmul and the same elementwise final soft-capping (Gemma) as the model's own head; TeacherForced
    compares the two on its first batch and runs row slices instead if they differ."""

    def __init__(self, model):
        causal = _causal_lm(model)
        self.decoder, self.linear = causal.get_decoder(), causal.get_output_embeddings()
        self.softcap = getattr(causal.config.get_text_config(), "final_logit_softcapping", None)

    @staticmethod
    def fits(model) -> bool:
        """A plain Linear head: not one a LoRA wraps (its weight would miss the delta)."""
        import torch
        return type(_causal_lm(model).get_output_embeddings()) is torch.nn.Linear

    def slices(self, hidden: torch.Tensor, columns: int):
        """(first vocabulary id, logits over the next `columns` ids) for the hidden states."""
        import torch
        weight, bias = self.linear.weight, self.linear.bias
        for lo in range(0, weight.shape[0], columns):
            part = slice(lo, lo + columns)
            x = torch.nn.functional.linear(hidden, weight[part], None if bias is None else bias[part])
            if self.softcap is not None:  # the model's forward's ops (divide, tanh, multiply), in place: no copies
                x.div_(self.softcap).tanh_().mul_(self.softcap)
            yield lo, x
            del x  # before the next slice: one slice alive at a time


def greedy_tokens(slices) -> torch.Tensor:
    """The argmax over the whole vocabulary from (first id, logits) slices; ties go to the lowest id, as argmax."""
    import torch
    best = top = None
    for lo, x in slices:
        i = x.argmax(-1)
        v = x.gather(-1, i.unsqueeze(-1)).squeeze(-1)
        if best is None:
            best, top = v, i + lo
        else:
            better = v > best
            best, top = torch.where(better, v, best), torch.where(better, i + lo, top)
        del x  # before the next slice is computed
    return top


def label_logprobs(slices, labels: torch.Tensor) -> torch.Tensor:
    """log softmax at each label over the whole vocabulary, from (first id, logits) slices (in float32)."""
    lse, picked = logsumexp_and_label_logits(slices, labels)
    return picked - lse


def logsumexp_and_label_logits(slices, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The logsumexp over the whole vocabulary and the logit at each label, from (first id, logits) slices
    (in float32)."""
    import torch
    lse = picked = None
    for lo, x in slices:
        x = x.float()
        part = x.logsumexp(-1)
        inside = (labels >= lo) & (labels < lo + x.shape[-1])
        got = x.gather(-1, (labels - lo).clamp(0, x.shape[-1] - 1).unsqueeze(-1)).squeeze(-1)
        lse = part if lse is None else torch.logaddexp(lse, part)
        picked = torch.where(inside, got, got.new_zeros(()) if picked is None else picked)
        del x  # before the next slice is computed
    return lse, picked


MIN_SHARED_PREFIX = 4  # shorter shared prefixes are not worth the cache's copy per row
CALL_COST = 256        # a forward call's fixed cost, in positions: keeps batches from getting needlessly small


def _common(a: list[int], b: list[int]) -> int:
    """Length of the prefix a and b share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def shared_prefix(prompts: list[list[int]]) -> int:
    """Length of the prefix all prompts share, leaving each prompt's last token out (its logits are scored)."""
    first = prompts[0]
    return min([_common(first, p) for p in prompts[1:]] + [len(p) - 1 for p in prompts])


def prefix_worth_sharing(rows: int, shared: int) -> int:
    """`shared` when running it once saves positions, else 0. All the prefixes of a pass run in one forward
    call, so a prefix costs its own positions and no call of its own."""
    return shared if shared >= MIN_SHARED_PREFIX and rows > 1 else 0


def plan_batches(encoded: list[tuple[list[int], list[int]]], order: list[int],
                 batch_size: int) -> tuple[float, list[list[int]]]:
    """Cut `order` into consecutive batches of at most batch_size rows so that one teacher-forced pass per batch
    computes the fewest positions: each batch costs its shared prompt prefix once (where prefix_worth_sharing;
    an upper bound, as batches with the same prefix share one copy) plus rows x (longest row - prefix), plus
    CALL_COST per forward call. Dynamic programming over the cut points; the shared prefix of consecutive rows
    is the minimum of their adjacent common prefixes."""
    n = len(order)
    adjacent = [_common(encoded[order[i]][0], encoded[order[i + 1]][0]) for i in range(n - 1)]
    best, cut = [0.0] + [float("inf")] * n, [0] * (n + 1)
    for j in range(1, n + 1):
        shared, longest, shortest_prompt = 1 << 30, 0, 1 << 30
        for i in range(j - 1, max(j - batch_size, 0) - 1, -1):
            p, r = encoded[order[i]]
            longest, shortest_prompt = max(longest, len(p) + len(r) - 1), min(shortest_prompt, len(p))
            if i < j - 1:
                shared = min(shared, adjacent[i])
            prefix = prefix_worth_sharing(j - i, min(shared, shortest_prompt - 1))
            cost = best[i] + (j - i) * (longest - prefix) + CALL_COST + prefix
            if cost < best[j]:
                best[j], cut[j] = cost, i
    batches, j = [], n
    while j:
        batches.append(order[cut[j]:j])
        j = cut[j]
    return best[n], batches[::-1]


def has_sliding_window(config) -> bool:
    """Whether any attention layer is not full attention (then its cache layer is not a plain DynamicLayer)."""
    text = config.get_text_config(decoder=True)
    layer_types = getattr(text, "layer_types", None)
    if layer_types is not None:  # e.g. Qwen2 keeps a sliding_window value while every layer is full attention
        return any(t != "full_attention" for t in layer_types)
    return bool(getattr(text, "sliding_window", None))


# what the last decoder layer is called with in a plain forward; any other argument (one more tensor over the
# sequence, say) leaves the layer whole
_LAYER_KWARGS = {"attention_mask", "position_ids", "past_key_values", "use_cache", "position_embeddings"}


def _sliced(kwargs: dict, start: int, stop: int, keys: int | None) -> dict:
    """The last decoder layer's arguments for query positions start:stop of its input, attending to the first
    `keys` cache positions (None: all, as the layer's own update leaves them)."""
    out = dict(kwargs)
    if kwargs.get("position_embeddings") is not None:
        out["position_embeddings"] = tuple(t[:, start:stop] for t in kwargs["position_embeddings"])
    if kwargs.get("position_ids") is not None:
        out["position_ids"] = kwargs["position_ids"][..., start:stop]
    if kwargs.get("attention_mask") is not None:
        out["attention_mask"] = kwargs["attention_mask"][:, :, start:stop, :keys]
    return out


def _causal_mask(queries: int, offset: int, like: torch.Tensor, implementation: str) -> torch.Tensor:
    """Causal mask of `queries` positions that come after `offset` others (the layer gets None when queries and
    keys line up; cut apart, they no longer do): bool for sdpa, additive for eager."""
    import torch
    allowed = torch.ones(queries, offset + queries, dtype=torch.bool, device=like.device).tril(offset)[None, None]
    if implementation == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=like.dtype, device=like.device).masked_fill(
        ~allowed, torch.finfo(like.dtype).min)


def _last_decoder_layer(model):
    """The last decoder layer, if it starts as Llama's does (input_layernorm, then self_attn): Llama, Qwen,
    Mistral, Gemma, Phi-3. Only then can PromptKeysOnly cut it; None otherwise (the layer stays whole)."""
    layers = getattr(model.get_decoder(), "layers", None) if hasattr(model, "get_decoder") else None
    last = layers[-1] if layers else None
    return last if hasattr(last, "input_layernorm") and hasattr(getattr(last, "self_attn", None), "layer_idx") else None


class _KeysStored(Exception):
    """Raised once the attention has stored its keys and values: the rest of its forward is not needed."""


class _StoreThenStop:
    """Stands in for the cache in one attention call: stores that call's keys and values in the real cache,
    then stops the call (as GPTQ's layer-input catcher stops a forward). Everything else goes to the cache."""

    def __init__(self, cache):
        self.cache = cache

    def update(self, *args, **kwargs):
        self.cache.update(*args, **kwargs)
        raise _KeysStored

    def __getattr__(self, name):
        return getattr(self.cache, name)


class PromptKeysOnly:
    """Forward pre-hook on the last decoder layer. No logit is read at a prompt position, so there the last
    layer's output is never used: all the answer positions need from it are its keys and values. The prompt
    positions (the first `split`) run the input norm and the key/value projections, stored in the cache, and
    skip attention, output projection and MLP; the layer itself then runs on the answer positions only,
    attending to the prompt through the cache. Exact: the same operations on the positions that are read."""

    def __init__(self, implementation: str):
        self.implementation, self.split = implementation, 0

    def __call__(self, layer, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        s, length = self.split, hidden.shape[1]
        cache, mask = kwargs.get("past_key_values"), kwargs.get("attention_mask")
        past = cache.get_seq_length(layer.self_attn.layer_idx) if cache is not None else 0
        # whole layer: nothing to cut, no cache to hold the prompt's keys, an argument this hook does not know, or
        # a None mask after a cache (not a plain causal mask then)
        if not 0 < s < length or cache is None or set(kwargs) - _LAYER_KWARGS or (mask is None and past):
            return (hidden, *args[1:]), kwargs
        prompt = _sliced(kwargs, 0, s, past + s)
        prompt["past_key_values"] = _StoreThenStop(cache)
        try:  # the attention stops once its keys and values are in the cache: no scores, no output projection
            layer.self_attn(hidden_states=layer.input_layernorm(hidden[:, :s]), **prompt)
        except _KeysStored:
            pass
        if cache.get_seq_length(layer.self_attn.layer_idx) != past + s:
            raise RuntimeError(f"{type(layer.self_attn).__name__} did not store its keys and values in the cache")
        rest = _sliced(kwargs, s, length, None)
        if mask is None:  # queries and keys lined up (no prefix): the answer positions now come after s others
            rest["attention_mask"] = _causal_mask(length - s, past + s, hidden, self.implementation)
        return (hidden[:, s:],), rest


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
        self.last_layer = _last_decoder_layer(self.model) if keys_only_prompts and not sliding and \
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
    """Minus the mean token NLL of the reference (higher is better)."""

    def per_row(self, slices, b):
        mask = b.target_mask.float()
        return ((label_logprobs(slices, b.labels) * mask).sum(-1) / mask.sum(-1)).tolist()


def greedy_generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """The new tokens of batched greedy `generate` for these prompt ids (left-padded, so all continue at once)."""
    import torch
    device, pad = next(model.parameters()).device, tokenizer.pad_token_id
    length = max(map(len, prompts))
    ids = torch.tensor([[pad] * (length - len(p)) + p for p in prompts], device=device)
    attn = torch.tensor([[0] * (length - len(p)) + [1] * len(p) for p in prompts], device=device)
    with torch.no_grad():
        gen = model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=pad)
    return gen[:, length:].tolist()


class Generated(Evaluator):
    """Greedy answers from batched `generate` (left padding), compared to the reference by `compare`."""

    def predictions(self) -> list[str]:
        out = [""] * len(self.rows)
        for index in self.prompt_length_batches():
            new = greedy_generate(self.model, self.tokenizer, [self.encoded[i][0] for i in index],
                                  self.cfg.max_new_tokens)
            for i, seq in zip(index, new):
                out[i] = self.tokenizer.decode(seq, skip_special_tokens=True).strip()
        return out

    def row_scores(self) -> list[float]:
        preds = self.predictions()
        return [float(self.compare(p, r["response"].strip(), r)) for p, r in zip(preds, self.rows)]

    def compare(self, prediction: str, reference: str, row: Row) -> float:
        raise NotImplementedError


class Contains(Generated):
    def compare(self, prediction, reference, row):
        return reference in prediction


class Regex(Generated):
    """Extract the answer with `evaluation.pattern` (group 1 if any) and compare it to the reference."""

    def compare(self, prediction, reference, row):
        m = re.search(self.cfg.pattern, prediction)
        return bool(m) and (m.group(1) if m.groups() else m.group(0)).strip() == reference


NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")


class Numeric(Generated):
    """The last number in the answer equals the reference within `evaluation.tolerance`."""

    def compare(self, prediction, reference, row):
        found = NUMBER.findall(prediction.replace(",", ""))
        try:
            return bool(found) and abs(float(found[-1]) - float(reference)) <= self.cfg.tolerance
        except ValueError:
            return False


def load_function(spec: str) -> Callable:
    """`package.module:function` -> the function, or a UserError saying what is wrong."""
    module_name, _, attr = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as e:
        raise UserError(f"evaluation.function: cannot import {spec!r} ({e}); give module:function on the Python path")
    except Exception as e:  # the user's module itself failed while importing (a syntax error, a raise at import)
        raise UserError(f"evaluation.function: importing {module_name!r} failed ({type(e).__name__}: {e}); "
                        f"fix that module") from None
    if not callable(fn):
        raise UserError(f"evaluation.function: {spec!r} is not callable")
    return fn


class Python(Generated):
    """The user's `module:function(predictions, references, rows)` returning one score per row."""

    def row_scores(self):
        scores = load_function(self.cfg.function)(self.predictions(), [r["response"] for r in self.rows], self.rows)
        scores = list(scores)
        if len(scores) != len(self.rows):
            raise UserError(f"evaluation.function: {self.cfg.function} returned {len(scores)} scores "
                            f"for {len(self.rows)} rows")
        return [float(s) for s in scores]
