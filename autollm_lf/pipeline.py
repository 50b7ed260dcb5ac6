"""The stages in order, sharing one loaded model within a process (a trial never reloads it)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from .config import RunConfig, dump_config
from .errors import UserError
from .io import atomic_write_text, file_digest, read_json, write_json
from .train import ALL_DELTA, ADAPTER_FILE, DONE_MARKER


class Session:
    """One run's state: config, chunks, deltas and (lazily) the base model with every delta loaded."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self._weighted = None
        self._scorers: dict[str, object] = {}

    @property
    def chunks(self) -> list[str]:
        manifest = read_json(self.cfg.out / "data" / "manifest.json")
        if manifest is None:
            raise UserError(f"{self.cfg.out / 'data'} has no prepared data; run `autollm prepare` first")
        return manifest["chunks"]

    @property
    def adapters(self) -> dict[str, Path]:
        names = self.chunks + ([ALL_DELTA] if self.cfg.train.train_all else [])
        found = {n: self.cfg.out / "deltas" / n for n in names}
        missing = [n for n, p in found.items() if not (p / DONE_MARKER).exists() or not (p / ADAPTER_FILE).exists()]
        if missing:
            raise UserError(f"deltas not trained: {', '.join(missing)}; run `autollm train` first")
        return found

    @property
    def weighted(self):
        if self._weighted is None:
            from .merge import WeightedDeltas
            self._weighted = WeightedDeltas(self.cfg.base_model.path, self.adapters)
        return self._weighted

    def scorer(self, split: str):
        if split not in self._scorers:
            from .evaluate import METRICS
            from .prepare import load_split
            ev = self.cfg.evaluation
            self._scorers[split] = METRICS[ev.metric](self.weighted.model, self.weighted.tokenizer,
                                                      self.cfg.base_model.template, load_split(self.cfg, split),
                                                      ev.batch_size)
        return self._scorers[split]

    def score(self, weights: dict[str, float], split: str) -> float:
        self.weighted.set_weights(weights)
        return self.scorer(split).score()

    def score_by_chunk(self, weights: dict[str, float], split: str) -> tuple[float, dict[str, float]]:
        """Overall score and the score on each chunk's rows."""
        from .prepare import load_split
        self.weighted.set_weights(weights)
        flags = self.scorer(split).correct()
        chunks = [r["chunk"] for r in load_split(self.cfg, split)]
        by_chunk = {c: sum(f for f, k in zip(flags, chunks) if k == c) / chunks.count(c) for c in dict.fromkeys(chunks)}
        return sum(flags) / max(len(flags), 1), by_chunk

    def search_fingerprint(self) -> str:
        from .search import search_fingerprint
        delta_fps = {n: read_json(p / DONE_MARKER)["fingerprint"] for n, p in self.adapters.items()}
        return search_fingerprint(self.cfg, self.chunks, delta_fps,
                                  file_digest([self.cfg.out / "data" / "validation.json"]))


def stage_prepare(s: Session) -> None:
    from .prepare import prepare
    if s.cfg.toy:
        from .toy import ensure_toy
        ensure_toy(s.cfg)
    chunks = prepare(s.cfg)
    write_json(s.cfg.out / "data" / "manifest.json", {"chunks": chunks})


def check_chunk_keys(s: Session) -> None:
    """Config keys that name chunks can only be checked once the data says which chunks exist."""
    for key, names in {"train.chunk_args": s.cfg.train.chunk_args, "search.human_weights": s.cfg.search.human_weights}.items():
        unknown = sorted(set(names) - set(s.chunks))
        if unknown:
            raise UserError(f"{key}: unknown chunk {', '.join(map(repr, unknown))}; the chunks are {', '.join(s.chunks)}")


def stage_train(s: Session) -> None:
    from .train import train_all
    check_chunk_keys(s)
    train_all(s.cfg, s.chunks)


def stage_search(s: Session) -> None:
    from .search import run_search
    check_chunk_keys(s)
    best = run_search(s.cfg, s, s.chunks, s.search_fingerprint())
    print(f"search: best validation {best['validation']:.4f} at trial {best['trial']} ({best['kind']})")


def stage_report(s: Session) -> None:
    from .report import write_report
    write_report(s)


def stage_export(s: Session) -> None:
    from .export import export_best
    export_best(s)


STAGES: dict[str, Callable[[Session], None]] = {
    "prepare": stage_prepare,
    "train": stage_train,
    "search": stage_search,
    "report": stage_report,
    "export": stage_export,
}


def run_stages(cfg: RunConfig, stages: list[str]) -> Session:
    cfg.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(cfg.out / "config.resolved.yaml", dump_config(cfg))
    session = Session(cfg)
    for name in stages:
        print(f"== {name}")
        STAGES[name](session)
    return session
