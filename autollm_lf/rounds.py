"""Continual rounds. Round 1 is an ordinary run in runs/<name>/. Round K >= 2 lives in runs/<name>/round-K/:
its base model is round K-1's best merge merged into full weights (`llamafactory-cli export`, rendered from
autollm_lf/templates/export.yaml.j2 into round K-1's export.yaml, the same as `autollm export --full` of that round:
runs/<name>[/round-<K-1>]/merged_full/), and its data are data.sources + round K-1's bad cases +
rounds.sources. Its report ends with the score across rounds."""
from __future__ import annotations

from pathlib import Path

from .config import BadCasesSource, RunConfig, path_problems
from .errors import UserError
from .export.best import full_export_checked, write_lf_yamls
from .fileio import read_json, write_json
from .log import get_logger
from .paths import ADAPTER_FILE, RunDir
from .session import EXPORT_MARKER

logger = get_logger(__name__)

SECTION = "\n## Score across rounds\n"


def _command(file, k: int) -> str:
    return f"autollm run {file}" + (f" --round {k}" if k > 1 else "")


def apply_round(cfg: RunConfig, file) -> RunConfig:
    """Turn a loaded config into round cfg.round's: new base, bad cases and new sources added."""
    k = cfg.round
    cfg.record_first_base()
    prev_run = cfg.round_run(k - 1)
    prev_dir = prev_run.root
    needed = [prev_run.merged / ADAPTER_FILE, prev_run.merged / "autollm_export.json", prev_run.bad_cases]
    missing = [p for p in needed if not p.exists()]
    if missing:
        raise UserError(f"{file}: round {k} starts from round {k - 1}'s best merge, but round {k - 1} is not finished "
                        f"({missing[0]} missing); run `{_command(file, k - 1)}` first")
    cfg.base_model.path = prev_run.merged_full
    cfg.toy = None  # the toy's database and base were built by round 1
    added = []
    if cfg.rounds.bad_cases:
        added.append(BadCasesSource(type="bad_cases", name=f"bad_cases:round-{k - 1}", run=prev_dir,
                                    rejected=cfg.rounds.rejected, chunk=cfg.rounds.chunk))
    cfg.data.sources = cfg.data.sources + added + [s.model_copy(deep=True) for s in cfg.rounds.sources]
    problems = path_problems(cfg)  # the sources this round added
    if problems:
        raise UserError("\n".join(f"{file}: {p}" for p in problems))
    return cfg


def previous(cfg: RunConfig) -> RunConfig:
    """Round K-1's config (its base: the first base, or round K-2's full merge)."""
    prev = cfg.model_copy(deep=True)
    prev.round = cfg.round - 1
    prev.base_model.path = cfg.first_base if prev.round == 1 else cfg.round_run(prev.round - 1).merged_full
    return prev


def ensure_round_base(cfg: RunConfig) -> Path:
    """Round K-1's best merge as full weights (exported once, checked to score what the adapter scores)."""

    prev = previous(cfg)
    merged = prev.run.merged
    info = read_json(merged / EXPORT_MARKER)
    yamls = write_lf_yamls(prev, merged)
    full_export_checked(prev, merged, yamls["export"], info["exported_validation"])
    return cfg.base_model.path


def check_round_base(cfg: RunConfig) -> None:
    if cfg.round > 1 and not (cfg.base_model.path / "config.json").is_file():
        raise UserError(f"round {cfg.round}: its base {cfg.base_model.path} is not exported yet; run "
                        f"`autollm prepare CONFIG --round {cfg.round}` (or `run`) first")


def _prompts(run: RunDir, split: str) -> set:
    return {r["instruction"] for r in read_json(run.split(split), [])}


def rounds_table(cfg: RunConfig) -> list[dict]:
    """One row per finished round 1..K: its raw base, train@all and auto_merge on its own validation and test."""
    first_test = _prompts(cfg.round_run(1), "test")
    table = []
    for k in range(1, cfg.round + 1):
        out = cfg.round_run(k)
        report = read_json(out.report_json)
        if report is None:
            continue
        rows = {r["model"]: r for r in report["rows"]}
        test = _prompts(out, "test")
        table.append({
            "round": k, "base": "first base" if k == 1 else f"round {k - 1} auto_merge (full weights)",
            "validation_rows": len(_prompts(out, "validation")), "test_rows": len(test),
            "test_rows_shared_with_round_1": len(test & first_test),
            **{f"{m}_{split}": rows[m][split] for m in ("raw", "train@all", "auto_merge") if m in rows
               for split in ("validation", "test")}})
    return table


def rounds_section(cfg: RunConfig) -> str:
    """'Score across rounds': a section of report.md, and `rounds` in report.json."""
    table = rounds_table(cfg)
    report = read_json(cfg.run.report_json)
    if report is not None and report.get("rounds") != table:
        write_json(cfg.run.report_json, {**report, "rounds": table})
    f = lambda r, key: f"{r[key]:.4f}" if key in r else "-"
    lines = [SECTION, "Each round's numbers are on that round's own splits: `validation` is what its search tuned on, "
             "`test` was never tuned on. Validation differs by round: round K's bad cases from round K-1's validation "
             "are training rows in round K, so other rows replace them in its validation. Test rows stay the same "
             "when the data do (the column says how many are shared with round 1; new data in a chunk reshuffle it). "
             "Round K's raw is round K-1's auto_merge as full weights: on a shared test split, raw test(K) equals "
             "auto_merge test(K-1).", "",
             "round | base | validation rows | test rows | test rows shared with round 1 | raw validation | raw test | "
             "train@all test | auto_merge validation | auto_merge test |", "---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"{r['round']} | {r['base']} | {r['validation_rows']} | {r['test_rows']} | "
              f"{r['test_rows_shared_with_round_1']} | {f(r, 'raw_validation')} | {f(r, 'raw_test')} | "
              f"{f(r, 'train@all_test')} | {f(r, 'auto_merge_validation')} | {f(r, 'auto_merge_test')} |"
              for r in table]
    logger.info("\n".join(lines[3:]))
    return "\n".join(lines) + "\n"
