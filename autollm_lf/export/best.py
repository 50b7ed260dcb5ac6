"""Stage 5: the best merge as one ordinary PEFT adapter in runs/<name>/merged/, checked by reloading it, and
handed to LLaMA-Factory: the WebUI's saves/ layout, export.yaml (full weights) and chat.yaml."""
from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import yaml

from ..data.prepare import load_split
from ..errors import UserError
from ..evaluate.metrics import make_evaluator
from ..evaluate.objective import Objective
from ..fileio import file_digest, fingerprint, read_json, write_if_changed, write_json
from ..log import get_logger
from ..merge import MERGE_METHODS, load_base
from ..paths import ADAPTER_FILE, RunDir, is_fresh
from ..train.auto_mix import MIX_DELTA
from ..train.deltas import render_template, run_llamafactory

if TYPE_CHECKING:
    from ..session import Session

logger = get_logger(__name__)

EXPORT_MARKER = "autollm_export.json"
FULL_MARKER = "autollm_full.json"
ADAPTER_FILES = ("adapter_config.json", ADAPTER_FILE)
WEBUI_CONFIG = Path("llamaboard_cache") / "user_config.yaml"  # LLaMA-Factory webui/common.py, next to saves/


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


def export_best(session: Session, force: bool = False) -> dict:
    cfg = session.cfg
    merged = cfg.run.merged
    info = exported_adapter(session, force)
    yamls = write_lf_yamls(cfg, merged)
    place_in_webui(cfg, {"best": merged, **_baseline_adapters(session)})
    if session.full:
        info = {**info, "full": full_export_checked(cfg, merged, yamls["export"], info["exported_validation"])}
    return info


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


def _baseline_adapters(session: Session) -> dict[str, Path]:
    """Every delta of this config (train@all included) and train@auto_mix, when export.deltas is on."""
    if not session.cfg.export.deltas:
        return {}
    mix = session.cfg.run.delta(MIX_DELTA)
    return {**session.adapters, **({MIX_DELTA: mix} if (mix / ADAPTER_FILES[1]).is_file() else {})}


# ---- LLaMA-Factory YAMLs ---------------------------------------------------------------------------------

def render_lf_yaml(template_file: str, path: Path, **variables) -> Path:
    """Render autollm_lf/templates/<template_file> to path (only rewritten if its text changed)."""
    write_if_changed(path, render_template(template_file, {}, yaml_path=path, **variables))
    return path


def write_lf_yamls(cfg, adapter_dir: Path) -> dict[str, Path]:
    """runs/<name>/export.yaml and chat.yaml: `llamafactory-cli export|chat FILE` runs them as they are."""
    common = dict(run=cfg.name, model_name_or_path=cfg.base_model.path, adapter_name_or_path=adapter_dir,
                  template=cfg.base_model.template)
    return {"export": render_lf_yaml("export.yaml.j2", cfg.run.export_yaml, export_dir=cfg.run.merged_full, **common),
            "chat": render_lf_yaml("chat.yaml.j2", cfg.run.chat_yaml, **common)}


def full_export(yaml_path: Path, export_dir: Path) -> Path:
    """`llamafactory-cli export YAML`: the adapter merged into full weights in export_dir (log: export.log)."""

    shutil.rmtree(export_dir, ignore_errors=True)  # never a half-old folder
    run_llamafactory(yaml_path, export_dir, desc=f"llamafactory-cli export {yaml_path.name}", command="export")
    if not (export_dir / "config.json").is_file():
        raise UserError(f"llamafactory-cli export wrote no model to {export_dir}; see {export_dir / 'export.log'}")
    return export_dir


def full_export_checked(cfg, adapter_dir: Path, yaml_path: Path, adapter_validation: float) -> dict:
    """--full: merge into full weights once per adapter, and check the full model scores what the adapter does."""
    export_dir = Path(yaml.safe_load(yaml_path.read_text(encoding="utf-8"))["export_dir"])
    fp = fingerprint(file_digest([adapter_dir / f for f in ADAPTER_FILES]), yaml_path.read_text(encoding="utf-8"))
    done = read_json(export_dir / FULL_MARKER, {})
    if is_fresh(done, fp, export_dir / "config.json"):
        logger.info(f"export --full: {export_dir} up to date (validation {done['full_validation']:.4f})")
        return done
    full_export(yaml_path, export_dir)
    score = adapter_score(cfg, None, model_dir=export_dir).score()
    info = {"fingerprint": fp, "export_dir": str(export_dir), "full_validation": score,
            "adapter_validation": adapter_validation}
    if not math.isclose(score, adapter_validation, rel_tol=1e-4, abs_tol=1e-6):
        raise UserError(f"the full model in {export_dir} scores {score:.4f} on validation, "
                        f"the adapter {adapter_validation:.4f}; "
                        f"check the export log {export_dir / 'export.log'}")
    write_json(export_dir / FULL_MARKER, info)
    logger.info(f"export --full: {export_dir} (validation {score:.4f}, same as the adapter)")
    return info


# ---- LLaMA-Factory WebUI ---------------------------------------------------------------------------------

def model_label(cfg) -> str:
    """The WebUI's model name: export.model_label, else the LLaMA-Factory name of a known base, else Custom."""
    if cfg.export.model_label:
        return cfg.export.model_label
    from llamafactory.extras.constants import SUPPORTED_MODELS

    folder = cfg.base_model.path.name.lower()
    for label, hub_ids in SUPPORTED_MODELS.items():
        if any(str(hub_id).rsplit("/", 1)[-1].lower() == folder for hub_id in hub_ids.values()):
            return label
    return "Custom"


def place_in_webui(cfg, adapters: dict[str, Path]) -> list[Path]:
    """Copy each adapter to <saves>/<label>/lora/<run>-<name>/ (the WebUI's checkpoint list reads that folder)
    and point the WebUI's model path for <label> at the base model."""
    label = model_label(cfg)
    lora_dir = cfg.export.saves_dir / label / "lora"
    placed = []
    for name, src in adapters.items():
        dst = lora_dir / RunDir.webui_name(cfg.run_label, name)
        for f in ADAPTER_FILES:
            _copy_if_changed(src / f, dst / f)
        placed.append(dst)
    _point_webui_at_base(cfg.export.saves_dir.parent / WEBUI_CONFIG, label, cfg.base_model.path)
    logger.info(f"export: WebUI checkpoints in {lora_dir} ({', '.join(p.name for p in placed)}); start "
                f"`llamafactory-cli webui` in {cfg.export.saves_dir.parent}, pick model {label}, "
                f"finetuning method lora")
    return placed


def _copy_if_changed(src: Path, dst: Path) -> None:
    if dst.exists() and file_digest([dst]) == file_digest([src]):
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.copyfile(src, tmp)
    tmp.replace(dst)


def _point_webui_at_base(config_path: Path, label: str, base_path: Path) -> None:
    """Set path_dict[label] (and last_model if unset) in the WebUI's user config, keeping everything else."""
    user = {"lang": None, "hub_name": None, "last_model": None, "path_dict": {}, "cache_dir": None}
    if config_path.is_file():
        user.update(yaml.safe_load(config_path.read_text(encoding="utf-8")) or {})
    if user.get("path_dict", {}).get(label) == str(base_path) and user.get("last_model"):
        return
    user["path_dict"] = {**(user.get("path_dict") or {}), label: str(base_path)}
    user["last_model"] = user.get("last_model") or label
    write_if_changed(config_path, yaml.safe_dump(user, sort_keys=False))
