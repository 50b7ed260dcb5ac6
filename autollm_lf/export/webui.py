"""The LLaMA-Factory WebUI: the exported adapters placed in its saves/ layout, its model list pointed at the base."""
from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from ..fileio import file_digest, write_if_changed
from ..log import get_logger
from ..paths import ADAPTER_FILE, webui_name

logger = get_logger(__name__)


ADAPTER_FILES = ("adapter_config.json", ADAPTER_FILE)
WEBUI_CONFIG = Path("llamaboard_cache") / "user_config.yaml"  # LLaMA-Factory webui/common.py, next to saves/


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
        dst = lora_dir / webui_name(cfg.run_label, name)
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
