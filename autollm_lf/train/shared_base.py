"""`train.shared`: one small adapter trained first on a few rows of every chunk, folded into the base.

Deltas trained on a base model that never saw the chat format each learn the format as well as their task;
a weighted sum of them then counts the format once per delta (measured on Gemma 3 270M: any two deltas added
together scored below either alone). The shared adapter learns what every chunk has in common, once; it is
merged into full weights (`llamafactory-cli export`, runs/<name>/shared_base/), and the deltas, train@auto_mix
and the search start from that base, so the deltas carry only their task. The yardsticks stay on the configured
base: `raw` in the report is that base as it is, and train@all is trained from it (what a user would train); the
shared base has rows of its own (`shared_base`, report.scores.SHARED_BASE_ROW). The exported merge is an adapter on the
shared base (export.yaml and the WebUI point there).
"""
from __future__ import annotations

from ..config import RunConfig
from ..fileio import fingerprint, read_json, write_json
from ..log import get_logger
from ..paths import SHARED, is_fresh
from .deltas import DONE_MARKER, DeltaSpec, config_fingerprints, train_one
from .lfcli import full_export
from .render import render_lf_yaml

logger = get_logger(__name__)

MARKER = "autollm_shared.json"


def build_shared_base(cfg: RunConfig, force: bool = False) -> None:
    """Train deltas/_shared on the base, then merge it into runs/<name>/shared_base/ (once per adapter)."""
    shared = cfg.train.shared
    spec = DeltaSpec(SHARED, [SHARED], "sft", {**cfg.train.method_args.get("sft", {}), **shared.args})
    adapter = train_one(cfg, spec, force)
    target = cfg.run.shared_base
    yaml_path = render_lf_yaml("export.yaml.j2", cfg.run.config(f"{SHARED}_export"), run=cfg.name,
                               model_name_or_path=cfg.base_model.path, adapter_name_or_path=adapter,
                               template=cfg.base_model.template, export_dir=target)
    trained = read_json(adapter / DONE_MARKER)["fingerprint"]
    fps = config_fingerprints(cfg, yaml_path.read_text(encoding="utf-8"), lambda t: fingerprint(trained, t))
    done = read_json(target / MARKER, {})
    if not force and any(is_fresh(done, f, target / "config.json") for f in fps):
        logger.info(f"shared base: {target} up to date")
        return
    full_export(yaml_path, target)
    write_json(target / MARKER, {"fingerprint": fps[0], "adapter": str(adapter)})
    logger.info(f"shared base: {adapter} merged into {target}; the deltas train on it")
