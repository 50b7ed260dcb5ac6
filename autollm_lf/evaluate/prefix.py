"""The shared prompt prefix's keys and values, stored by running the decoder up to its last layer only."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it is used: importing this module stays light
    import torch


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


def last_decoder_layer(model):
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
