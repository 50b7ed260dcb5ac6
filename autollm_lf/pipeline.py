"""The stages in order, sharing one loaded model within a process (a trial never reloads it)."""
from __future__ import annotations

import contextlib
from typing import Callable

from .config import RunConfig, dump_config, without_secrets
from .data.prepare import prepare
from .data.toy import ensure_toy
from .errors import UserError
from .evaluate.judge import JudgeClient
from .export.best import export_best
from .fileio import atomic_write_text, read_json, write_if_changed, write_json
from .footprint import check_before_training
from .log import get_logger
from .merge import AUTO_MERGE
from .models.gguf import ensure_converted
from .report.claims import claims_lines
from .report.feedback import write_bad_cases
from .report.write import write_report
from .rounds import check_round_base, ensure_round_base, rounds_section
from .search.holdout import halves_of, trial_scores
from .search.loop import run_search
from .search.merge_choice import choose_merge
from .session import Session
from .train.auto_mix import train_auto_mix
from .train.cluster import TrialPool
from .train.deltas import ALL_DELTA, delta_specs, train_deltas
from .train.shared_base import build_shared_base

logger = get_logger(__name__)


def stage_prepare(s: Session) -> None:
    if s.base_cfg.round > 1:  # round K's base: round K-1's best merge as full weights
        ensure_round_base(s.base_cfg)
    if s.base_cfg.toy:
        ensure_toy(s.base_cfg)
    prepare(s.base_cfg)


def check_chunk_keys(s: Session) -> None:
    """Config keys that name chunks can only be checked once the data says which chunks exist."""
    known = set(s.chunks) | set(s.specs)
    for key, names, allowed in (("train.chunk_args", s.cfg.train.chunk_args, known),
                                ("search.human_weights", s.cfg.search.human_weights, known),
                                ("train.chunk_methods", s.cfg.train.chunk_methods, set(s.chunks))):
        unknown = sorted(set(names) - allowed)
        if unknown:
            raise UserError(f"{key}: unknown chunk {', '.join(map(repr, unknown))}; "
                            f"the chunks are {', '.join(s.chunks)}"
                            f" (deltas: {', '.join(d for d in s.specs if d != ALL_DELTA)})")


def stage_train(s: Session) -> None:
    check_chunk_keys(s)
    s.specs  # a method that does not fit its chunk stops here, before any training
    check_before_training(s.base_cfg, s.full)  # a disk too small for the run stops it here too
    if s.cfg.train.shared:  # trained on the configured base; the deltas then train on the base it makes
        build_shared_base(s.base_cfg, force="train" in s.force)
    specs = delta_specs(s.cfg, s.shapes)
    own = [spec for spec in specs if s.all_on_user_base(spec.name)]  # train@all from the configured base
    train_deltas(s.cfg, [spec for spec in specs if spec not in own], force="train" in s.force, keep_going=s.keep_going)
    train_deltas(s.base_cfg, own, force="train" in s.force, keep_going=s.keep_going)


def validation_scorer(cfg: RunConfig, keep_going: bool) -> Callable[[dict[str, float]], dict]:
    """A search actor's scorer (cluster.TrialPool): this run's base model and every delta, loaded once."""
    session = Session(cfg, keep_going=keep_going)
    session.scorer("validation")  # the model and the validation rows now, not in the first trial
    session.release_tokenizer()
    halves = halves_of(cfg, session.validation_rows())
    return lambda weights: trial_scores(session, weights, halves)


def trial_pool(s: Session) -> TrialPool | None:
    """cluster.search_actors > 1: that many actors, each with the apply mode this process picked."""
    cluster = s.cfg.cluster
    if cluster is None or cluster.search_actors == 1:
        return None
    search = s.cfg.search.model_copy(update={"apply": s.weighted.mode})
    cfg = s.base_cfg.model_copy(update={"search": search})
    reads = [s.cfg.base_model.path, s.cfg.out]
    return TrialPool(cluster, validation_scorer, (without_secrets(cfg), s.keep_going), reads)  # no password to Ray


def stage_search(s: Session) -> None:
    check_chunk_keys(s)
    choose_merge(s, force="search" in s.force)  # search.merge: auto: its race ran the chosen search (forced or not)
    s.ready_for_trials()
    with trial_pool(s) or contextlib.nullcontext() as pool:
        force = "search" in s.force and s.requested_merge != AUTO_MERGE
        best = run_search(s.cfg, s, s.search_params, s.search_fingerprint(), force=force,
                          human=s.search_human(), pool=pool)
    if s.setup_seconds is not None:  # measured when this stage loaded the model (the report's cost column)
        write_json(s.cfg.run.search_cost, {"setup_seconds": round(s.setup_seconds, 1)})
    start = best["start"]
    logger.info(f"search: returns trial {best['trial']} ({best['kind']}): validation {best['validation']:.4f}, "
                f"holdout {best['holdout']:.4f}; its start, trial {start['trial']} ({start['kind']}): validation "
                f"{start['validation']:.4f}, holdout {start['holdout']:.4f}")


def stage_mix(s: Session) -> None:
    train_auto_mix(s, force="mix" in s.force)


def stage_report(s: Session) -> None:
    """report.md is written once, from its sections: the tables, the score across rounds, the bad cases."""
    force = "report" in s.force
    sections = [write_report(s, force)]
    if s.cfg.round > 1:
        sections.append(rounds_section(s.cfg))
    sections.append(write_bad_cases(s, force))  # report/bad_cases.jsonl: the next round's `bad_cases` source
    write_if_changed(s.cfg.run.report_md, "".join(sections))
    if s.cfg.toy is not None:  # the quick start: what the README promises on any machine, checked here
        for line in claims_lines(read_json(s.cfg.run.report_json)):
            logger.info(line)


def stage_export(s: Session) -> None:
    export_best(s, force="export" in s.force)


STAGES: dict[str, Callable[[Session], None]] = {
    "prepare": stage_prepare,
    "train": stage_train,
    "search": stage_search,
    "mix": stage_mix,
    "report": stage_report,
    "export": stage_export,
}


def run_stages(cfg: RunConfig, stages: list[str], force: frozenset[str] = frozenset(),
               keep_going: bool = False, full: bool = False) -> Session:
    if cfg.evaluation.judge and {"search", "report", "export"} & set(stages):
        JudgeClient(cfg.evaluation.judge)  # an endpoint that does not answer stops the run before any work
    if cfg.base_model.gguf:  # converted once into the cache (cfg.base_model.path); later runs reuse it
        ensure_converted(cfg.base_model.gguf)
    if "prepare" not in stages:
        check_round_base(cfg)
    if cfg.train.shared and not {"prepare", "train"} & set(stages) and \
            not (cfg.run.shared_base / "config.json").is_file():
        raise UserError(f"train.shared: {cfg.run.shared_base} is not built yet; run `autollm train` (or `run`) first")
    session = Session(cfg, force, keep_going, full)
    for name in stages:
        logger.info(f"== {name}")
        STAGES[name](session)
        # Saved next to the outputs once a stage has produced some, never by a run that failed at once.
        atomic_write_text(cfg.run.resolved_config, dump_config(cfg))
    return session
