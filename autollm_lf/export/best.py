"""Stage 5: the best merge as one ordinary PEFT adapter in runs/<name>/merged/ (session.exported_adapter: written and
checked by reloading it), handed to LLaMA-Factory: the WebUI's saves/ layout (webui.py), export.yaml (full weights)
and chat.yaml."""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from ..errors import UserError
from ..fileio import file_digest, fingerprint, read_json, write_json
from ..log import get_logger
from ..paths import MIX_DELTA, is_fresh
from ..session import adapter_score, exported_adapter
from ..train.lfcli import full_export
from ..train.render import render_lf_yaml
from .webui import ADAPTER_FILES, place_in_webui

if TYPE_CHECKING:
    from ..session import Session

logger = get_logger(__name__)

FULL_MARKER = "autollm_full.json"


def export_best(session: Session, force: bool = False) -> dict:
    cfg = session.cfg
    merged = cfg.run.merged
    info = exported_adapter(session, force)
    yamls = write_lf_yamls(cfg, merged)
    place_in_webui(cfg, {"best": merged, **_baseline_adapters(session)})
    if session.full:
        info = {**info, "full": full_export_checked(cfg, merged, yamls["export"], info["exported_validation"])}
    return info


def _baseline_adapters(session: Session) -> dict[str, Path]:
    """Every delta of this config (train@all included) and train@auto_mix, when export.deltas is on."""
    if not session.cfg.export.deltas:
        return {}
    mix = session.cfg.run.delta(MIX_DELTA)
    return {**session.adapters, **({MIX_DELTA: mix} if (mix / ADAPTER_FILES[1]).is_file() else {})}


# ---- LLaMA-Factory YAMLs ---------------------------------------------------------------------------------


def write_lf_yamls(cfg, adapter_dir: Path) -> dict[str, Path]:
    """runs/<name>/export.yaml and chat.yaml: `llamafactory-cli export|chat FILE` runs them as they are."""
    common = dict(run=cfg.name, model_name_or_path=cfg.base_model.path, adapter_name_or_path=adapter_dir,
                  template=cfg.base_model.template)
    return {"export": render_lf_yaml("export.yaml.j2", cfg.run.export_yaml, export_dir=cfg.run.merged_full, **common),
            "chat": render_lf_yaml("chat.yaml.j2", cfg.run.chat_yaml, **common)}


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
