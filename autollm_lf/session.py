"""One run's state within a process: config, chunks, deltas and (lazily) the base model with every delta loaded
once, its tokenizer and the evaluators of each split; what every stage after prepare works on. Also the models as a
user loads them, scored (adapter_scorers), and the best merge exported as one PEFT adapter (exported_adapter): what
the report and export are given."""
from __future__ import annotations

import math
import time
from functools import cached_property
from pathlib import Path
from typing import Sequence

from .config import RunConfig
from .data.prepare import load_split
from .errors import UserError
from .evaluate import forget_templates
from .evaluate.metrics import make_evaluator
from .evaluate.objective import Objective
from .fileio import file_digest, fingerprint, read_json, write_json
from .granularity import AUTO, AUTO_CANDIDATES, auto_granularity
from .hostmem import SEARCH_MMAP_THRESHOLD, HeldTokenizer, free_host_memory, set_mmap_threshold
from .log import get_logger
from .merge import MERGE_METHODS, WeightedDeltas, load_base, merge_candidates, param_delta
from .merge.grams import use_regmean
from .paths import ADAPTER_FILE, is_fresh
from .search.holdout import halves_of
from .search.loop import search_fingerprint
from .search.merge_choice import logged_choice, with_merge
from .train.deltas import ALL_DELTA, DONE_MARKER, DeltaSpec, delta_specs

logger = get_logger(__name__)


class Session:
    """One run's state: config, chunks, deltas and (lazily) the base model with every delta loaded."""

    def __init__(self, cfg: RunConfig, force: frozenset[str] = frozenset(), keep_going: bool = False,
                 full: bool = False):
        self.requested_merge = cfg.search.merge  # `auto` until the search chooses (search/merge_choice.py)
        self.base_cfg = cfg  # prepare's: the base as configured
        self.cfg = cfg.on_shared_base() if cfg.train.shared else cfg  # every later stage's (train.shared)
        self.force, self.keep_going = force, keep_going
        self.full = full  # export also merges into full weights with `llamafactory-cli export` and checks them
        self._weighted = None
        self.held_tokenizer = HeldTokenizer(self.cfg.base_model.path)  # shared with the loaded deltas
        self.setup_seconds: float | None = None
        self._scorers: dict[str, object] = {}
        self._row_scores: dict[tuple, tuple[float, list[float]]] = {}  # (split, point): the report reuses trials
        self._parts: dict[str, dict[str, float]] = {}  # split: the objective's parts at the point last scored there
        if chosen := logged_choice(cfg):  # search.merge: auto, chosen by an earlier search
            self.use_merge(chosen)

    @property
    def shapes(self) -> dict[str, str]:
        manifest = read_json(self.cfg.run.manifest)
        if manifest is None:
            raise UserError(f"{self.cfg.run.data} has no prepared data; run `autollm prepare` first")
        return manifest["shapes"]

    @property
    def chunks(self) -> list[str]:
        return list(self.shapes)

    @cached_property
    def specs(self) -> dict[str, DeltaSpec]:
        """Every delta the config asks for, by name: <chunk>-<method>, then train@all's."""
        return {spec.name: spec for spec in delta_specs(self.cfg, self.shapes)}

    def human_weights(self) -> dict[str, float]:
        """search.human_weights keyed by delta, or by chunk for all of its deltas."""
        human = self.cfg.search.human_weights
        return {d: float(human.get(d, human.get(self.specs[d].chunk, 0.0))) for d in self.deltas}

    def search_human(self) -> dict[str, float]:
        """The human point the search starts from: human_weights where search.human_weights is set, else none."""
        return self.human_weights() if self.cfg.search.human_weights else {}

    @cached_property
    def adapters(self) -> dict[str, Path]:
        """The trained deltas (with --keep-going, those that failed are left out, saying so)."""
        names = [n for n in self.specs if not self.all_on_user_base(n)]
        return trained_adapters(self.cfg, names, self.keep_going)

    def all_on_user_base(self, name: str) -> bool:
        """train@all with train.shared: trained from the configured base (what a user would train), so not loaded
        beside the deltas on the shared base but scored on its own (train_all_adapter)."""
        return name == ALL_DELTA and bool(self.cfg.train.shared)

    @property
    def train_all_adapter(self) -> Path | None:
        path = self.cfg.run.delta(ALL_DELTA)
        return path if self.all_on_user_base(ALL_DELTA) and (path / DONE_MARKER).is_file() else None

    @property
    def deltas(self) -> list[str]:
        """The chunk deltas the search weighs (train@all is a baseline, not a search dimension)."""
        return [d for d in self.specs if d != ALL_DELTA and d in self.adapters]

    @property
    def weighted(self):
        if self._weighted is None:
            started = time.perf_counter()
            self._weighted = load_merge(self)
            self.setup_seconds = time.perf_counter() - started
        return self._weighted

    @property
    def tokenizer(self):
        """The base's tokenizer, loaded again after release_tokenizer if something needs it (the report's answers)."""
        return self.held_tokenizer.get()

    @property
    def search_params(self) -> list[str]:
        """The weights the search sets: one per chunk delta, or per delta and module group (search.granularity)."""
        return [p for p in self.weighted.params if param_delta(p) in self.deltas]

    def scorer(self, split: str):
        """The split's evaluator: evaluation.metric on every row, or the evaluation.objective over its parts."""
        if split not in self._scorers:
            w, rows = self.weighted, load_split(self.cfg, split)
            raw = lambda objective: raw_constraints(self, objective, split)
            self._scorers[split] = Objective(self.cfg, w.model, self.tokenizer, rows, raw) \
                if self.cfg.evaluation.objective else make_evaluator(self.cfg, w.model, self.tokenizer, rows)
        return self._scorers[split]

    def release_tokenizer(self) -> None:
        release_tokenizer(self.weighted, list(self._scorers.values()))

    def ready_for_trials(self) -> None:
        """Before the first trial: the validation rows as token ids, the tokenizer freed if no trial needs it, the
        apply mode picked (that runs the model: by then only what trials hold is loaded)."""
        self.scorer("validation")
        self.release_tokenizer()
        pick_apply_mode(self)

    def score(self, weights: dict[str, float], split: str) -> float:
        if not self.cfg.evaluation.objective:
            return self.scored_rows(weights, split)[0]
        scorer = self.scorer(split)  # built first: an objective's constraints measure the raw model once
        self.weighted.set_weights(weights)
        return scorer.score()

    def scored_rows(self, weights: dict[str, float], split: str,
                    method: str | None = None) -> tuple[float, list[float]]:
        """Overall score and every row's score (merged with `method`, default search.merge). With an
        evaluation.objective the overall score is the objective's; the rows are scored by evaluation.metric.
        A point is scored once per process (with an objective every time: part_scores reads the parts last scored)."""
        scorer = self.scorer(split)
        key = None if self.cfg.evaluation.objective else (split, self.weighted.point(weights, method))
        if key in self._row_scores:
            return self._row_scores[key]
        self.weighted.set_weights(weights, method)
        scores = scorer.row_scores()
        if self.cfg.evaluation.objective:  # the parts once: the objective is their total, part_scores reads them
            self._parts[split] = scorer.part_scores()
            overall = scorer.total(self._parts[split])
        else:
            overall = sum(scores) / max(len(scores), 1)
        if key is not None:
            self._row_scores[key] = (overall, scores)
        return overall, scores

    def validation_rows(self) -> int:
        return len(self.scorer("validation").rows)

    def row_chunks(self, split: str) -> list[str]:
        return [r["chunk"] for r in self.scorer(split).rows]

    def part_scores(self, split: str) -> dict[str, float]:
        """Each objective part's score at the point scored_rows last scored on `split` (none without an objective)."""
        return self._parts.get(split, {}) if self.cfg.evaluation.objective else {}

    def use_merge(self, method: str) -> None:
        """search.merge: auto resolved to `method` for every later stage (and on the loaded model)."""
        self.cfg, self.base_cfg = with_merge(self.cfg, method), with_merge(self.base_cfg, method)
        if self._weighted is not None:
            self._weighted.use_method(method, self.cfg.search.density)

    def search_fingerprint(self, merge: str | None = None) -> str:
        """The search's fingerprint (with search.merge as `merge`: the auto choice's, before it is resolved)."""
        delta_fps = {n: read_json(p / DONE_MARKER)["fingerprint"] for n, p in self.adapters.items()}
        cfg = with_merge(self.cfg, merge) if merge else self.cfg
        return search_fingerprint(cfg, self.deltas, delta_fps, file_digest([self.cfg.run.split("validation")]))


def raw_constraints(s: Session, objective, split: str) -> dict[str, float]:
    """The raw model's score on each constraint part (every weight 0), recorded for reloaded adapters."""
    s.weighted.set_weights({d: 0.0 for d in s.deltas})
    scores = objective.constraint_scores()
    write_json(s.cfg.run.raw_constraints(split), scores)
    return scores


def load_merge(s: Session) -> WeightedDeltas:
    """The base model with every delta loaded once, at the search's granularity (auto: resolved) and, for a
    data-aware merge, with RegMean's A rows from each delta's chunk's Grams."""
    search = s.cfg.search
    if search.memory == "lean":  # before the model's tensors are allocated (hostmem)
        set_mmap_threshold(SEARCH_MMAP_THRESHOLD)
    auto = search.granularity == AUTO
    # search.merge: auto not chosen yet: loaded as a candidate that needs `cat` (merge_choice switches between them)
    method = next((m for m in merge_candidates(search.merge) if MERGE_METHODS[m].needs_cat),
                  merge_candidates(search.merge)[0])
    weighted = WeightedDeltas(s.cfg.base_model.path, s.adapters, search.apply, method=method,
                              density=search.density, seed=s.cfg.seed,
                              granularity="delta" if auto else search.granularity, tokenizer=s.held_tokenizer)
    if auto:
        resolve_granularity(weighted, s.cfg, s.deltas)
    space = MERGE_METHODS[search.merge].data_aware if search.merge in MERGE_METHODS else None
    if space:
        use_regmean(s.cfg, weighted, {d: s.specs[d].chunk for d in s.deltas}, search.regmean_alpha, space)
    return weighted


def resolve_granularity(w: WeightedDeltas, cfg: RunConfig, deltas: list[str]) -> None:
    """search.granularity: auto (granularity.auto_granularity) on the loaded deltas, said in the log."""
    fit_rows = len(halves_of(cfg, len(load_split(cfg, "validation"))).fit)

    def weights_at(granularity: str) -> int:
        w.use_granularity(granularity)
        return len([p for p in w.params if param_delta(p) in deltas])
    counts = {g: weights_at(g) for g in AUTO_CANDIDATES}
    chosen = auto_granularity(counts.__getitem__, fit_rows)
    w.use_granularity(chosen)
    logger.info(f"search: granularity auto -> {chosen} ({counts[chosen]} weights for {fit_rows} fit rows; "
                + ", ".join(f"{g} {n}" for g, n in counts.items()) + ")")


def pick_apply_mode(s: Session) -> None:
    """search.apply: auto -> time one trial each way on the validation split and keep the cheaper."""
    if not MERGE_METHODS[s.weighted.method].low_rank:
        logger.info(f"search: merge {s.cfg.search.merge} (density {s.cfg.search.density}), "
                    f"folded into the base weights")
    elif s.cfg.search.apply == "auto":
        w = s.weighted
        mode = w.pick_mode(s.scorer("validation").score, {n: 0.5 for n in s.deltas})
        why = "" if w.fold_fits() else (f"; `fold` would copy {w.bank.fold_copy_bytes() / 2**20:.0f} MB of base "
                                        f"weights: search.apply: fold to use it anyway")
        logger.info(f"search: applying weights with `{mode}` (search.apply: auto{why})")


def release_tokenizer(weighted: WeightedDeltas, scorers: list) -> None:
    """Frees the tokenizer when every scorer has its rows as token ids and needs no tokenizer to score them
    (teacher-forced metrics): ~0.45 GB of host memory for a 262k vocabulary, which would otherwise sit beside the
    model for the whole search. Whatever needs it later (the report's generations) loads it again."""
    if any(getattr(scorer, "trials_need_tokenizer", True) for scorer in scorers):
        return
    for scorer in scorers:
        scorer.tokenizer = None
    weighted.release_tokenizer()
    forget_templates()
    free_host_memory()


def trained_adapters(cfg: RunConfig, names: list[str], keep_going: bool) -> dict[str, Path]:
    """The deltas `names` that are trained, each checked to be trained on cfg's base; one not trained stops the run
    unless keep_going (then it is left out, saying so)."""
    found = {n: cfg.run.delta(n) for n in names}
    missing = [n for n, p in found.items() if not (p / DONE_MARKER).exists() or not (p / ADAPTER_FILE).exists()]
    if missing and not keep_going:
        raise UserError(f"deltas not trained: {', '.join(missing)}; run `autollm train` first "
                        f"(or pass --keep-going to search over the others)")
    if missing:
        logger.info(f"left out (not trained): {', '.join(missing)}")
    found = {n: p for n, p in found.items() if n not in missing}
    if not [n for n in found if n != ALL_DELTA]:
        raise UserError("no trained chunk delta to search over; see the training errors above")
    for path in found.values():
        check_adapter_base(path, cfg.base_model.path)
    return found


def check_adapter_base(adapter_dir: Path, base_path: Path) -> None:
    cfg = read_json(adapter_dir / "adapter_config.json", {})
    trained_on = cfg.get("base_model_name_or_path")
    if trained_on and Path(trained_on).resolve() != Path(base_path).resolve():
        raise UserError(f"{adapter_dir} was trained on {trained_on}, not on base_model.path {base_path}; "
                        f"run `autollm train` to retrain it on this base")


# ---- models as a user loads them: the exported merge, any adapter or full model, scored --------------------------
# The session scores; the report (its exported auto_merge, train@all, raw) and export (the adapter it hands over, the
# full weights it checks) are given these scorers and the adapter from here.

EXPORT_MARKER = "autollm_export.json"


def adapter_score(cfg, adapter_dir: Path | None, split: str = "validation", model_dir: Path | None = None):
    """Score an adapter the way a user would load it (fresh base + PeftModel.from_pretrained), or a full
    model folder; returns the evaluator, whose row_scores()/rows give per-chunk scores."""
    return adapter_scorers(cfg, adapter_dir, (split,), model_dir)[split]


def adapter_scorers(cfg, adapter_dir: Path | None, splits: Sequence[str], model_dir: Path | None = None) -> dict:
    """adapter_score's evaluator for each split, on one model loaded once."""
    model, tokenizer = load_base(model_dir or cfg.base_model.path)
    if adapter_dir is not None:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    model.eval()
    scorers = {}
    for split in splits:
        rows = load_split(cfg, split)
        scorers[split] = (  # an objective's constraints: their raw scores, as the search measured them
            Objective(cfg, model, tokenizer, rows, lambda _, split=split: read_raw_constraints(cfg, split))
            if cfg.evaluation.objective else make_evaluator(cfg, model, tokenizer, rows))
    return scorers


def read_raw_constraints(cfg, split: str) -> dict[str, float]:
    path = cfg.run.raw_constraints(split)
    if not path.is_file():
        raise UserError(f"{path} missing: the raw model's scores for evaluation.objective's constraints; run "
                        f"`autollm search` (or `report`) first")
    return read_json(path)


def exported_adapter(session: Session, force: bool = False) -> dict:
    """runs/<name>/merged/: the best merge as one PEFT adapter, written (and checked) unless up to date; its
    export info. The report reads it too where the adapter can differ from the merge the search scored (ties, dare:
    a truncated SVD), so that the auto_merge a user reads is the adapter they get."""
    cfg = session.cfg
    best = cfg.run.read_best()
    merged = cfg.run.merged
    fp = fingerprint(best["weights"], session.search_fingerprint())
    done = read_json(merged / EXPORT_MARKER, {})
    if not force and is_fresh(done, fp, merged / ADAPTER_FILE):
        logger.info(f"export: {merged} up to date")
        return done
    return _export_adapter(session, best, merged, fp)


def _export_adapter(session: Session, best: dict, merged: Path, fp: str) -> dict:
    cfg = session.cfg
    session.weighted.export(best["weights"], merged)
    score = adapter_score(cfg, merged).score()
    info = {"fingerprint": fp, "weights": best["weights"], "search_validation": best["validation"],
            "exported_validation": score, "base_model": str(cfg.base_model.path),
            "merge": session.weighted.export_info}
    write_json(merged / EXPORT_MARKER, info)
    if not MERGE_METHODS[cfg.search.merge].low_rank:  # a truncated SVD of a full-rank merge: report the loss
        m = info["merge"]
        logger.info(f"export: {merged} ({cfg.search.merge} as rank <= {m['rank_max']} SVD: relative error per module "
                    f"max {m['relative_frobenius_error_max']:.3g}, mean {m['relative_frobenius_error_mean']:.3g}; "
                    f"validation {score:.4f} vs the search's {best['validation']:.4f})")
        return info
    if not math.isclose(score, best["validation"], rel_tol=1e-4, abs_tol=1e-6):  # one flipped row is far more
        raise UserError(f"exported adapter scores {score:.4f} on validation, "
                        f"the search found {best['validation']:.4f}; "
                        f"the merge is not exact for these adapters (see {merged / EXPORT_MARKER})")
    logger.info(f"export: {merged} (validation {score:.4f}, same as the search's best)")
    return info
