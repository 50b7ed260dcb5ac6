"""Running `llamafactory-cli` (train, export) as an argument list, with its YAML's top-level keys overridden.

Used where trainings run: on this machine (deltas.py) and inside a Ray task on a cluster node (cluster.py).
"""
from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from ..errors import UserError
from ..fileio import read_jsonl
from ..log import get_logger, progress

logger = get_logger(__name__)


def llamafactory_cli() -> str:
    """The CLI next to this interpreter (the .venv's), else the one on PATH."""
    local = Path(sys.executable).with_name("llamafactory-cli")
    if local.exists():
        return str(local)
    found = shutil.which("llamafactory-cli")
    if not found:
        raise UserError("llamafactory-cli not found; run `sh autollm.sh` to install it into .venv")
    return found


def yaml_value(value: Any) -> str:
    """JSON, which is valid YAML and keeps e.g. "no" a string; a float in exponent form gets the dot YAML 1.1 needs
    (PyYAML, and so LLaMA-Factory, reads `1e-07` as a string, `1.0e-07` as a float)."""
    text = json.dumps(value)
    if isinstance(value, float) and "e" in text:
        mantissa, exponent = text.split("e")
        mantissa = mantissa if "." in mantissa else mantissa + ".0"
        text = f"{mantissa}e{exponent if exponent[0] in '+-' else '+' + exponent}"
    return text


def last_line(node: yaml.Node) -> int:
    """The line a YAML value ends on: its last scalar's (a block collection's own end is the next key's line)."""
    while isinstance(node, (yaml.MappingNode, yaml.SequenceNode)) and node.value and not node.flow_style:
        last = node.value[-1]
        node = last[1] if isinstance(last, tuple) else last
    return node.end_mark.line - 1 if node.end_mark.column == 0 else node.end_mark.line


def top_level_lines(text: str) -> dict[str, tuple[int, int]]:
    """Each top-level key of a YAML mapping -> the first and last line its `key: value` spans (PyYAML's composer:
    a value written over several lines, a block list say, is one span). The first of a repeated key counts."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        raise UserError(f"a rendered LLaMA-Factory config is not valid YAML ({e}); fix its template") from None
    if root is None:
        return {}
    if not isinstance(root, yaml.MappingNode):
        raise UserError("a rendered LLaMA-Factory config is not a mapping of keys; fix its template")
    spans = {}
    for key, value in root.value:
        spans.setdefault(key.value, (key.start_mark.line, max(key.start_mark.line, last_line(value))))
    return spans


def apply_overrides(text: str, overrides: dict[str, Any]) -> str:
    """Replace top-level keys' `key: value` in place (keeping the template's comments and key order); append new
    keys. Values are written by yaml_value, so a config renders to the same text as ever (its fingerprint too)."""
    lines = text.splitlines()
    spans = top_level_lines(text)
    found = sorted(((spans[k], k) for k in overrides if k in spans), reverse=True)
    for (first, last), key in found:  # from the bottom up: earlier spans keep their line numbers
        lines[first:last + 1] = [f"{key}: {yaml_value(overrides[key])}"]
    added = [k for k in overrides if k not in spans]
    if added:
        lines += ["", "### overrides from the autollm config"]
        lines += [f"{k}: {yaml_value(overrides[k])}" for k in added]
    return "\n".join(lines) + "\n"


def _tail(path: Path, n: int = 25) -> str:
    if not path.exists():
        return "(no log written)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:])


def die_with_parent() -> None:
    """In the child, before exec (Linux): SIGKILL when the process that started it dies. A training whose Ray
    worker is lost with its node, or whose `autollm` is killed, stops too instead of holding the cores."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def run_llamafactory(config_path: Path, output_dir: Path, desc: str, command: str = "train",
                     devices: dict[str, str] | None = None) -> float:
    """`llamafactory-cli COMMAND CONFIG` as an argument list, output to <output_dir>/<command>.log; returns its
    wall seconds. Progress comes from trainer_log.jsonl: a bar on a terminal, one line at the end otherwise."""
    output_dir.mkdir(parents=True, exist_ok=True)
    log_path = output_dir / f"{command}.log"
    progress_path = output_dir / "trainer_log.jsonl"
    env = dict(os.environ, WANDB_DISABLED="true", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               DISABLE_VERSION_CHECK="1", **(devices or {}))
    parallel = bool(devices)  # trainings side by side: one line each at the end, no bars drawn over each other
    started = time.perf_counter()
    with open(log_path, "w") as log, progress(total=None, desc=desc, unit="step", leave=True,
                                              disable=True if parallel else None) as bar:
        proc = subprocess.Popen([llamafactory_cli(), command, str(config_path)], stdout=log,
                                stderr=subprocess.STDOUT, env=env, preexec_fn=die_with_parent)
        while proc.poll() is None:
            time.sleep(0.5)
            _update_progress(bar, progress_path)
        _update_progress(bar, progress_path)
    if proc.returncode != 0:
        raise UserError(f"{desc} failed (exit {proc.returncode}); see {log_path}, last lines:\n{_tail(log_path)}")
    seconds = time.perf_counter() - started
    if bar.disable:
        logger.info(f"{desc}: done in {seconds:.0f} s{_last_loss(progress_path)}")
    return seconds


def _last_loss(progress_path: Path) -> str:
    losses = [r["loss"] for r in read_jsonl(progress_path) if "loss" in r]
    return f", last logged loss {losses[-1]:.4f}" if losses else ""


def _update_progress(bar, progress_path: Path) -> None:
    if bar.disable or not progress_path.exists():
        return
    lines = progress_path.read_text(errors="ignore").strip().splitlines()
    try:
        last = json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        return
    if last and last.get("current_steps") != bar.n:
        bar.total = last.get("total_steps", bar.total)
        bar.n = last["current_steps"]
        if "loss" in last:
            bar.set_postfix(loss=round(last["loss"], 4), refresh=False)
        bar.refresh()


def full_export(yaml_path: Path, export_dir: Path) -> Path:
    """`llamafactory-cli export YAML`: the adapter merged into full weights in export_dir (log: export.log)."""

    shutil.rmtree(export_dir, ignore_errors=True)  # never a half-old folder
    run_llamafactory(yaml_path, export_dir, desc=f"llamafactory-cli export {yaml_path.name}", command="export")
    if not (export_dir / "config.json").is_file():
        raise UserError(f"llamafactory-cli export wrote no model to {export_dir}; see {export_dir / 'export.log'}")
    return export_dir
