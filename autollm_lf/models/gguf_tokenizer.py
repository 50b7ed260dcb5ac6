"""A GGUF's tokenizer rebuilt as the SentencePiece-BPE it is (transformers' GGUF conversion makes a Unigram of it, which
cuts text into single characters): its vocabulary, merges derived from the scores, byte fallback, control and
user-defined tokens whole; checked by a round trip of a sample text."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from .gguf_source import KEY

# GGUF token types (llama.cpp's gguf.TokenType)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


@dataclass
class GgufTokenizer:
    tokens: list[str]
    scores: list[float]
    types: list[int]
    bos_id: int
    eos_id: int
    pad_id: int
    unk_id: int
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool
    context_length: int | None  # the model's positions: the tokenizer's model_max_length

    @property
    def end_of_turn_ids(self) -> list[int]:
        return [i for i, t in enumerate(self.tokens) if t in ("<end_of_turn>", "<|im_end|>", "<|eot_id|>")
                and self.types[i] == CONTROL]


def load_tokenizer_fields(gguf_file: Path) -> GgufTokenizer:
    from gguf import GGUFReader

    fields = GGUFReader(gguf_file).fields

    def values(key):
        f = fields[key]
        return [f.parts[i] for i in f.data]

    def scalar(key, default=None):
        if key not in fields:
            return default
        return values(key)[0][0].item()

    model = bytes(values("tokenizer.ggml.model")[0]).decode() if "tokenizer.ggml.model" in fields else None
    if model != "llama" or "tokenizer.ggml.scores" not in fields:
        raise UserError(f"{KEY}: {gguf_file.name} has a {model!r} tokenizer; only SentencePiece-style ('llama') "
                        f"tokenizers with scores are rebuilt (Gemma, Llama 2, Mistral)")
    tokens = [bytes(p).decode("utf-8") for p in values("tokenizer.ggml.tokens")]
    arch = bytes(values("general.architecture")[0]).decode() if "general.architecture" in fields else ""
    return GgufTokenizer(
        tokens=tokens, scores=[float(p[0]) for p in values("tokenizer.ggml.scores")],
        types=[int(p[0]) for p in values("tokenizer.ggml.token_type")],
        bos_id=scalar("tokenizer.ggml.bos_token_id"), eos_id=scalar("tokenizer.ggml.eos_token_id"),
        pad_id=scalar("tokenizer.ggml.padding_token_id", scalar("tokenizer.ggml.eos_token_id")),
        unk_id=scalar("tokenizer.ggml.unknown_token_id", 0),
        add_bos=bool(scalar("tokenizer.ggml.add_bos_token", True)),
        add_eos=bool(scalar("tokenizer.ggml.add_eos_token", False)),
        add_space_prefix=bool(scalar("tokenizer.ggml.add_space_prefix", True)),
        context_length=scalar(f"{arch}.context_length"),
    )


def bpe_merges(tok: GgufTokenizer) -> list[tuple[str, str]]:
    """Every split of a normal token into two normal tokens, best merged-token score first (then by the ids of
    the two halves, as transformers' SentencePiece extractor orders them). SentencePiece-BPE merges, at each
    step, the adjacent pair whose concatenation is the highest-scoring piece: this ranking does the same."""
    normal = {t: i for i, t in enumerate(tok.tokens) if tok.types[i] == NORMAL}
    found = []
    for merged, i in normal.items():
        for cut in range(1, len(merged)):
            left, right = merged[:cut], merged[cut:]
            if left in normal and right in normal:
                found.append((-tok.scores[i], i, normal[left], normal[right], left, right))
    found.sort()
    return [(left, right) for *_, left, right in found]


def build_tokenizer(tok: GgufTokenizer):
    """A `tokenizers` BPE with byte fallback, wrapped as a transformers fast tokenizer."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(tok.tokens)}
    backend = Tokenizer(BPE(vocab=vocab, merges=bpe_merges(tok), unk_token=tok.tokens[tok.unk_id], fuse_unk=True,
                            byte_fallback=True, dropout=None))
    spaces = [normalizers.Replace(" ", "▁")]
    backend.normalizer = normalizers.Sequence(([normalizers.Prepend("▁")] if tok.add_space_prefix else []) + spaces)
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
                                        + ([decoders.Strip(" ", 1, 0)] if tok.add_space_prefix else []))
    # control tokens (<bos>, <start_of_turn>) are special; user-defined ones ('\n', runs of spaces, '<table>')
    # are matched whole, as SentencePiece matches them, but are ordinary text
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for i, t in enumerate(tok.tokens)
                        if tok.types[i] == USER_DEFINED])
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for i, t in enumerate(tok.tokens)
                                if tok.types[i] in (CONTROL, UNKNOWN)])
    bos, eos = tok.tokens[tok.bos_id], tok.tokens[tok.eos_id]
    single = ([f"{bos}:0"] if tok.add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if tok.add_eos else [])
    pair = single + ([f"{bos}:1"] if tok.add_bos else []) + ["$B:1"] + ([f"{eos}:1"] if tok.add_eos else [])
    backend.post_processor = processors.TemplateProcessing(
        single=" ".join(single), pair=" ".join(pair),
        special_tokens=[(t, vocab[t]) for t in dict.fromkeys([bos, eos])])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=bos, eos_token=eos, pad_token=tok.tokens[tok.pad_id],
        unk_token=tok.tokens[tok.unk_id], add_bos_token=tok.add_bos, add_eos_token=tok.add_eos,
        padding_side="left", clean_up_tokenization_spaces=False,
        **({"model_max_length": tok.context_length} if tok.context_length else {}))


CHECK_TEXT = "The quick brown fox jumps over the lazy dog.\n\n  Indented  text, ünïcödé 漢字 and 12345!"


def check_tokenizer(folder: Path, tok: GgufTokenizer) -> None:
    """The saved tokenizer, loaded as LLaMA-Factory loads it, round-trips text and keeps control tokens whole."""
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(folder)
    ids = loaded(CHECK_TEXT, add_special_tokens=False)["input_ids"]
    problems = []
    if loaded.decode(ids) != CHECK_TEXT:
        problems.append(f"round trip gave {loaded.decode(ids)!r}")
    if len(ids) > len(CHECK_TEXT) // 2:
        problems.append(f"{len(ids)} tokens for {len(CHECK_TEXT)} characters (char-level?)")
    for i, t in enumerate(tok.tokens):
        if (tok.types[i] == CONTROL and not t.startswith("<unused")
                and loaded(t, add_special_tokens=False)["input_ids"] != [i]):
            problems.append(f"{t!r} is not the single token {i}")
    if problems:
        raise UserError(f"{KEY}: the rebuilt tokenizer in {folder} fails its check: {'; '.join(problems)}")
