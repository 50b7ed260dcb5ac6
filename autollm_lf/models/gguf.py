"""`base_model.gguf`: a GGUF file (llama.cpp, Ollama) converted once into an ordinary Hugging Face folder.

The folder lives in a cache, `$AUTOLLM_LF_CACHE/gguf/<name>-<fingerprint>/` (default `~/.cache/autollm-lf`),
where the fingerprint is the GGUF file's sha256 and the converter's version: a second run, and every stage,
LLaMA-Factory training and export, use the folder as they would any `base_model.path`. The conversion writes to
a temporary folder beside it and renames it into place, so a killed conversion leaves nothing half-written.

Weights: transformers loads the GGUF (dequantised to float32) and saves them as safetensors.
Tokenizer: transformers' GGUF conversion builds a Unigram model from what are SentencePiece-*BPE* merge scores,
so text is cut into single characters. It is rebuilt as the BPE it is (gguf_tokenizer.py): the GGUF's vocabulary,
merges derived from it (every split of a normal token into two normal tokens, ranked by the merged token's score, as
SentencePiece merges the pair whose merge scores highest), byte fallback for characters outside the vocabulary,
control tokens (<bos>, <start_of_turn>, ...) special and user-defined tokens whole.

The source is a file path, or `pypi:<distribution>` (gguf_source.py).
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from ..errors import UserError
from ..fileio import _alive, fingerprint, write_json
from ..log import get_logger
from .gguf_source import KEY, cache_root, gguf_source
from .gguf_tokenizer import build_tokenizer, check_tokenizer, load_tokenizer_fields

logger = get_logger(__name__)

CONVERTER_VERSION = 1  # bump when the conversion's output changes: cached folders are then rebuilt
MARKER = "autollm_gguf.json"


def converted_path(spec: str) -> Path:
    """Where the Hugging Face folder for this GGUF lives (converted or not yet)."""
    src = gguf_source(spec)
    return cache_root() / f"{src.stem}-{fingerprint(src.sha256(), CONVERTER_VERSION)}"


# ---- conversion --------------------------------------------------------------------------------------------

def ensure_converted(spec: str) -> Path:
    """The converted folder, converting now if it is not in the cache yet."""
    target = converted_path(spec)
    if (target / MARKER).is_file():
        return target
    src = gguf_source(spec)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(target)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    started = time.perf_counter()
    logger.info(f"{KEY}: converting {spec} into {target} (once; dequantised, tokenizer rebuilt as BPE)")
    try:
        scratch = tmp / ".gguf"
        scratch.mkdir(parents=True)
        gguf_file = src.materialize(scratch)
        convert(gguf_file, tmp)
        shutil.rmtree(scratch)  # an assembled copy of the GGUF is not kept
        write_json(tmp / MARKER, {"source": spec, "sha256": src.sha256(), "converter_version": CONVERTER_VERSION,
                                  "seconds": round(time.perf_counter() - started, 1)})
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished the same conversion first: keep theirs
            if not (target / MARKER).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info(f"{KEY}: converted in {time.perf_counter() - started:.0f} s")
    return target


def _remove_stale(target: Path) -> None:
    """Temporary folders of conversions that were killed (their process is gone)."""
    for tmp in target.parent.glob(f".{target.name}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def convert(gguf_file: Path, out: Path) -> None:
    """GGUF -> Hugging Face folder: config and float weights by transformers, the tokenizer rebuilt."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    try:
        model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    except (ValueError, KeyError, NotImplementedError) as e:
        raise UserError(f"{KEY}: transformers cannot load {gguf_file.name} ({e}); only the architectures "
                        f"transformers reads from GGUF are supported") from None
    tok = load_tokenizer_fields(gguf_file)
    tokenizer = build_tokenizer(tok)
    model.config.bos_token_id, model.config.pad_token_id = tok.bos_id, tok.pad_id
    model.config.eos_token_id = tok.eos_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    # generation stops at end-of-sequence and, for chat models, at the end-of-turn token
    eos = [tok.eos_id] + [i for i in tok.end_of_turn_ids if i != tok.eos_id]
    GenerationConfig(bos_token_id=tok.bos_id, eos_token_id=eos if len(eos) > 1 else tok.eos_id,
                     pad_token_id=tok.pad_id).save_pretrained(out)
    check_tokenizer(out, tok)
