"""The run a bench part measures: a finished run's Session (its best.json written), loaded once."""
from __future__ import annotations

from pathlib import Path

from ..checks import load_config
from ..fileio import read_json
from ..session import Session


def finished_session(cfg_path: Path | None) -> Session | None:
    """The Session of the finished run `cfg_path` configures (search.merge: auto as that run resolved it, in
    session.cfg and session.base_cfg), or None where there is no config or no finished search yet."""
    cfg = load_config(cfg_path) if cfg_path and cfg_path.exists() else None
    return Session(cfg) if cfg is not None and cfg.run.best.exists() else None


def report_rows(cfg) -> dict[str, dict]:
    """The run's report rows by model (raw, train@all, ...: scored on the same test rows), {} before its report."""
    return {r["model"]: r for r in read_json(cfg.run.report_json, {}).get("rows", [])}


def report_row_scores(cfg, model: str, split: str = "test") -> list[float] | None:
    """One report row's score on every held-out row of `split` (report/row_scores.json), None before the report."""
    return read_json(cfg.run.row_scores, {}).get("scores", {}).get(model, {}).get(split)
