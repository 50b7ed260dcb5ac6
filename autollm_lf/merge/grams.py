"""search.merge: regmean's data: each chunk's Gram matrices, from one forward pass over its training rows on the
base the deltas were trained from, cached in search/grams/<chunk>.safetensors (a re-run reads them back).

A Gram file is whole or absent: it is written into a folder of the writing process's own (.tmp-<host>-<pid>/),
flushed to disk and renamed into place, so a killed writer leaves only that folder, which the next run removes; a
file safetensors cannot open whole (cut short) or with another fingerprint is computed again."""
from __future__ import annotations

import hashlib
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Mapping

from ..errors import UserError
from ..evaluate import encode_turns
from ..fileio import (
    _alive,  # a process id still running here
    file_digest,
    fingerprint,
    read_json,
)
from ..log import get_logger
from ..train.deltas import model_fingerprint
from ..train.render import training_cutoff_len
from .regmean import GramCollector, GramFiles, cached_fingerprint, padded_batches, save_grams

logger = get_logger(__name__)


def training_sequences(cfg, tokenizer, chunk: str) -> list[list[int]]:
    """A chunk's training rows as token ids, prompt and answer (a preference row's chosen one), formatted with the
    chat template and cut to cutoff_len as LLaMA-Factory does for training; a pretraining row is its text."""
    records = read_json(cfg.run.split(chunk)) or []
    cutoff = training_cutoff_len(cfg)
    sequences = []
    for r in records:
        if "text" in r and "instruction" not in r:
            sequences.append(tokenizer(r["text"], add_special_tokens=True)["input_ids"][:cutoff])
            continue
        if "instruction" not in r:
            raise UserError(f"search.merge: regmean reads chunk {chunk!r}'s training rows in alpaca form "
                            f"(instruction/output); {cfg.run.split(chunk)} is in another format: pick another "
                            f"search.merge for this data")
        answer = r.get("output", r.get("chosen", ""))
        history = [{"role": role, "content": c} for pair in r.get("history") or []
                   for role, c in zip(("user", "assistant"), pair)]
        prompt, target, _ = encode_turns(tokenizer, cfg.base_model.template, r["instruction"], answer, history,
                                         r.get("system") or None, cutoff)
        if prompt and target:
            sequences.append(prompt + target)
    return sequences


def grams_fingerprint(cfg, chunk: str, layer_names: list[str], projections: dict | None) -> str:
    """What a chunk's Grams depend on: base, data, formatting, modules and (core space) the A_u projected on."""
    projected = None if projections is None else hashlib.sha256(
        b"".join(p.detach().float().cpu().numpy().tobytes() for p in projections.values())).hexdigest()
    return fingerprint("grams-v1", model_fingerprint(cfg.base_model.path), file_digest([cfg.run.split(chunk)]),
                       cfg.base_model.template, training_cutoff_len(cfg), layer_names, projected)


def gram_path(cfg, chunk: str, space: str = "full") -> Path:
    """search/grams/<chunk>.safetensors (full space) or <chunk>.<space>.safetensors."""
    suffix = "" if space == "full" else f".{space}"
    return cfg.run.search / "grams" / f"{chunk}{suffix}.safetensors"


TMP_PREFIX = ".tmp-"


def _own_tmp(folder: Path) -> Path:
    return folder / f"{TMP_PREFIX}{socket.gethostname()}-{os.getpid()}"


def remove_stale(folder: Path) -> None:
    """What killed writers on this host left: their .tmp-<host>-<pid>/ folders (and an older version's <chunk>.tmp)."""
    host = f"{TMP_PREFIX}{socket.gethostname()}-"
    for tmp in folder.glob(f"{TMP_PREFIX}*"):
        pid = tmp.name[len(host):] if tmp.name.startswith(host) else ""
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)
    for tmp in folder.glob("*.tmp"):
        tmp.unlink(missing_ok=True)


def write_grams(path: Path, collector: GramCollector, fingerprint: str, rows: int) -> None:
    """save_grams into this process's own folder, flushed to disk, then renamed into place (whole or absent)."""
    tmp = _own_tmp(path.parent)
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        save_grams(tmp / path.name, collector, fingerprint, rows)
        with open(tmp / path.name, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp / path.name, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename itself
        finally:
            os.close(dir_fd)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def ensure_grams(cfg, weighted, chunks: list[str], space: str = "full", deltas=(),
                 batch_rows: int = 16) -> dict[str, Path]:
    """Every chunk's Gram file, computed where missing, cut short or stale (data, base, modules or, in core space,
    the deltas' A rows changed). Core space: each module's input projected on the A rows of `deltas`."""
    paths = {c: gram_path(cfg, c, space) for c in chunks}
    if cfg.run.search.joinpath("grams").is_dir():
        remove_stale(cfg.run.search / "grams")
    names = [weighted.layer_names[k] for k in weighted.bank.cat_index]
    projections = weighted.regmean_projections(deltas) if space == "core" else None
    fps = {c: grams_fingerprint(cfg, c, names, projections) for c in chunks}
    todo = [c for c in chunks if cached_fingerprint(paths[c]) != fps[c]]
    if not todo:
        return paths
    weighted.set_weights({d: 0.0 for d in weighted.names}, method="linear")  # the base the deltas trained from
    for chunk in todo:
        started = time.perf_counter()
        sequences = training_sequences(cfg, weighted.tokenizer, chunk)
        if not sequences:
            raise UserError(f"search.merge: regmean needs training rows of chunk {chunk!r}; "
                            f"{cfg.run.split(chunk)} has none")
        layers = {n: weighted.bank.layers[k] for n, k in zip(names, weighted.bank.cat_index)}
        collector = GramCollector(layers, projections)
        collector.run(weighted.model, padded_batches(sequences, weighted.pad_token_id or 0, batch_rows))
        write_grams(paths[chunk], collector, fps[chunk], len(sequences))
        size = sum(g.nbytes for g in collector.grams.values())
        logger.info(f"search: regmean ({space}) Grams of {chunk}: {len(sequences)} rows, "
                    f"{len(collector.grams)} matrices, {size / 2**20:.1f} MB, {time.perf_counter() - started:.0f} s")
    return paths


def use_regmean(cfg, weighted, chunk_of: Mapping[str, str], alpha: float, space: str = "full") -> None:
    """Load (or compute) the Grams of the deltas' chunks and give `weighted` RegMean's A rows (full or core space)."""
    chunks = list(dict.fromkeys(chunk_of.values()))
    files = GramFiles(ensure_grams(cfg, weighted, chunks, space, list(chunk_of)))
    try:
        weighted.use_regmean(files, chunk_of, alpha, space)
    finally:
        files.close()
