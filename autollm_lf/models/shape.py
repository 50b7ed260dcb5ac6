"""The shape a base model has, known before it is loaded: its config.json, or (a GGUF not converted yet) the GGUF's
metadata and tensor table, read from the file's pieces; what the footprint sizes adapters, Grams and full weights by."""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ..fileio import read_json
from .gguf_source import gguf_source

F32 = 4
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}
TOKENIZER_BYTES_PER_TOKEN = 130  # a GGUF not converted yet: its tokenizer files (Gemma 3: 33 MB for 262k tokens)
WEIGHT_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".gguf"}

# per decoder layer: a LoRA-targetable linear module -> (d_in, d_out) in config sizes
LINEAR = {"q_proj": ("hidden", "q"), "k_proj": ("hidden", "kv"), "v_proj": ("hidden", "kv"), "o_proj": ("q", "hidden"),
          "gate_proj": ("hidden", "inter"), "up_proj": ("hidden", "inter"), "down_proj": ("inter", "hidden")}
# config.json key -> the GGUF metadata key (after "<architecture>.") that holds it
GGUF_KEYS = {"hidden_size": "embedding_length", "intermediate_size": "feed_forward_length",
             "num_hidden_layers": "block_count", "num_attention_heads": "attention.head_count",
             "num_key_value_heads": "attention.head_count_kv", "head_dim": "attention.key_length"}


class ShapeUnknown(Exception):
    """The model's shapes cannot be read (yet): sizes are not given, nothing is refused."""


@dataclass(frozen=True)
class ModelShape:
    layers: int
    linear: dict[str, tuple[int, int]]  # per layer: module -> (d_in, d_out)
    params: int
    dtype_bytes: int
    extra_bytes: int  # tokenizer and config files, saved beside every adapter and full model

    @property
    def weight_bytes(self) -> int:
        return self.params * self.dtype_bytes


def shape_from_config(c: dict, params: int | None = None, extra_bytes: int = 0,
                      dtype_bytes: int | None = None) -> ModelShape:
    """A decoder's shapes from config.json keys (Llama, Gemma, Qwen, Mistral names)."""
    c = c.get("text_config") or c
    try:
        hidden, heads, layers = c["hidden_size"], c["num_attention_heads"], c["num_hidden_layers"]
        head = c.get("head_dim") or hidden // heads
        size = {"hidden": hidden, "q": heads * head, "kv": (c.get("num_key_value_heads") or heads) * head,
                "inter": c["intermediate_size"]}
        vocab = c["vocab_size"]
    except KeyError as e:
        raise ShapeUnknown(f"the model's config has no {e.args[0]}") from None
    linear = {m: (size[i], size[o]) for m, (i, o) in LINEAR.items()}
    per_layer = sum(i * o for i, o in linear.values()) + 2 * hidden  # the linears and two norms
    params = params or vocab * hidden * (1 if c.get("tie_word_embeddings", True) else 2) + layers * per_layer + hidden
    dtype = DTYPE_BYTES.get(str(c.get("torch_dtype") or c.get("dtype")), F32)
    return ModelShape(layers, linear, params, dtype_bytes or dtype, extra_bytes)


def model_shape(cfg) -> ModelShape:
    """The base model's shapes: its folder's config.json, else (not converted yet) its GGUF's metadata."""
    folder = Path(cfg.base_model.path)
    if (folder / "config.json").is_file():
        extra = sum(f.stat().st_size for f in folder.iterdir() if f.is_file() and f.suffix not in WEIGHT_SUFFIXES)
        return shape_from_config(read_json(folder / "config.json"), extra_bytes=extra)
    if cfg.base_model.gguf:
        return gguf_shape(gguf_pieces(cfg.base_model.gguf))
    raise ShapeUnknown(f"{folder} has no config.json yet" + (" (the toy builds it at prepare)" if cfg.toy else ""))


def gguf_pieces(spec: str) -> list[Path]:
    return list(gguf_source(spec).pieces)


def gguf_shape(pieces: list[Path]) -> ModelShape:
    """Shapes of a GGUF model (as converted: float32) from its metadata and tensor table, read from its pieces."""
    meta, tensors = read_gguf_header(pieces)
    arch = meta.get("general.architecture", "")
    c = {k: meta[f"{arch}.{g}"] for k, g in GGUF_KEYS.items() if f"{arch}.{g}" in meta}
    c = {k: max(v) if isinstance(v, list) else v for k, v in c.items()}  # per-layer sizes: the largest
    vocab = len(meta.get("tokenizer.ggml.tokens", [])) or meta.get(f"{arch}.vocab_size", 0)
    c.update(vocab_size=vocab, tie_word_embeddings="output.weight" not in tensors)
    params = sum(_product(dims) for dims in tensors.values())
    return shape_from_config(c, params, vocab * TOKENIZER_BYTES_PER_TOKEN, F32)


def _product(dims) -> int:
    n = 1
    for d in dims:
        n *= d
    return n


# ---- GGUF header: metadata and tensor table, streamed across a file's pieces --------------------------------

SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
STRING, ARRAY = 8, 9


class _Stream:
    """The pieces of one file read as one stream (a GGUF shipped in .partNN pieces is never joined for this)."""

    def __init__(self, pieces: list[Path]):
        self.blocks, self.buf, self.pos = self._blocks(pieces), b"", 0

    @staticmethod
    def _blocks(pieces) -> Iterator[bytes]:
        for p in pieces:
            with open(p, "rb") as f:
                yield from iter(lambda f=f: f.read(1 << 20), b"")

    def read(self, n: int) -> bytes:
        while len(self.buf) - self.pos < n:
            block = next(self.blocks, None)
            if block is None:
                raise ShapeUnknown("the GGUF file ends inside its header")
            self.buf, self.pos = self.buf[self.pos:] + block, 0
        self.pos += n
        return self.buf[self.pos - n:self.pos]

    def unpack(self, fmt: str):
        return struct.unpack("<" + fmt, self.read(struct.calcsize("<" + fmt)))

    def string(self) -> str:
        return self.read(self.unpack("Q")[0]).decode("utf-8", "replace")

    def value(self, kind: int):
        if kind == STRING:
            return self.string()
        if kind == ARRAY:
            item, n = self.unpack("IQ")
            return list(self.unpack(f"{n}{SCALARS[item]}")) if item in SCALARS else [self.value(item) for _ in range(n)]
        return self.unpack(SCALARS[kind])[0]


def read_gguf_header(pieces: list[Path]) -> tuple[dict, dict[str, tuple[int, ...]]]:
    """(metadata key -> value, tensor name -> dims) of a GGUF file (version 2 or 3)."""
    s = _Stream(pieces)
    magic, version = s.read(4), s.unpack("I")[0]
    if magic != b"GGUF" or version < 2:
        raise ShapeUnknown("not a GGUF file of version 2 or later")
    n_tensors, n_kv = s.unpack("QQ")
    meta = {}
    for _ in range(n_kv):
        key = s.string()
        meta[key] = s.value(s.unpack("I")[0])
    tensors = {}
    for _ in range(n_tensors):
        name = s.string()
        tensors[name] = s.unpack(f"{s.unpack('I')[0]}Q")
        s.unpack("IQ")  # type, offset
    return meta, tensors
