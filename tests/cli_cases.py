"""A bad-input case as a user meets it: a config written to a file, `autollm <command>` called through the CLI's main,
its exit code and what it printed on stderr (shared by test_safety.py and test_db_servers.py)."""
from __future__ import annotations

from pathlib import Path

import yaml

from autollm_lf.cli import main


def config(root: Path, sources: list[dict], **data) -> dict:
    (root / "model").mkdir(exist_ok=True)
    (root / "model" / "config.json").write_text("{}")
    return {"name": "t", "run_dir": str(root / "runs"), "base_model": {"path": str(root / "model")},
            "data": {"sources": sources, "validation_per_chunk": 2, "test_per_chunk": 2, **data}}


def run_cli(root: Path, cfg: dict, command: str = "prepare", capsys=None) -> tuple[int, str]:
    path = root / "case.yaml"
    path.write_text(yaml.safe_dump(cfg))
    if capsys:
        capsys.readouterr()
    code = main([command, str(path)])
    return code, capsys.readouterr().err if capsys else ""
