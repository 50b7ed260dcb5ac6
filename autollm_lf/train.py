"""Stage 2: render one LLaMA-Factory YAML per delta and run `llamafactory-cli train` on each, one at a time."""
from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
import yaml

from .errors import UserError
from .io import atomic_write_text, file_digest, fingerprint, read_json, read_jsonl, write_json
from .methods import AUTO_METHODS, METHODS, SHAPE_WORDS
from .paths import ADAPTER_FILE, is_fresh
from .scheduler import device_groups, run_on_devices, visible_gpus

TEMPLATES_DIR = Path(__file__).resolve().parent.parent / "templates"

DONE_MARKER = "autollm_delta.json"
ALL_DELTA = "all"
TOP_LEVEL_KEY = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*):")


@dataclass
class DeltaSpec:
    """One training run: a LoRA delta trained with one method on some chunks' datasets."""
    name: str
    datasets: list[str]
    method: str = "sft"
    args: dict[str, Any] = field(default_factory=dict)

    @property
    def chunk(self) -> str | None:
        """The one chunk a per-chunk delta trains on (None for train@all and train@auto_mix)."""
        return self.datasets[0] if len(self.datasets) == 1 and self.name != ALL_DELTA else None


LF_DEFAULT_CUTOFF = 2048  # LLaMA-Factory's DataArguments.cutoff_len
CUTOFF_LINE = re.compile(r"^cutoff_len:\s*(\d+)", re.M)


def training_cutoff_len(cfg) -> int:
    """The cutoff_len the SFT deltas train with: train.method_args.sft, else train.args, else their template's."""
    for args in (cfg.train.method_args.get("sft", {}), cfg.train.args):
        if "cutoff_len" in args:
            return int(args["cutoff_len"])
    path = find_template(cfg.train.template_for("sft"))
    found = CUTOFF_LINE.search(path.read_text(encoding="utf-8")) if path else None
    return int(found.group(1)) if found else LF_DEFAULT_CUTOFF


def find_template(name: str) -> Path | None:
    for candidate in (Path(name), TEMPLATES_DIR / name):
        if candidate.is_file():
            return candidate
    return None


def llamafactory_cli() -> str:
    """The CLI next to this interpreter (the .venv's), else the one on PATH."""
    local = Path(sys.executable).with_name("llamafactory-cli")
    if local.exists():
        return str(local)
    found = shutil.which("llamafactory-cli")
    if not found:
        raise UserError("llamafactory-cli not found; run `sh autollm.sh` to install it into .venv")
    return found


def apply_overrides(text: str, overrides: dict[str, Any]) -> str:
    """Replace top-level `key: value` lines in place (keeping the template's comments); append new keys.

    Values are written as JSON, which is valid YAML and keeps e.g. "no" a string.
    """
    remaining = dict(overrides)
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = TOP_LEVEL_KEY.match(line)
        if m and m.group(1) in remaining:
            lines[i] = f"{m.group(1)}: {json.dumps(remaining.pop(m.group(1)))}"
    if remaining:
        lines += ["", "### overrides from the autollm config"]
        lines += [f"{k}: {json.dumps(v)}" for k, v in remaining.items()]
    return "\n".join(lines) + "\n"


def hardware_defaults() -> dict[str, Any]:
    """bf16 where a GPU supports it; on CPU no half precision and no gradient checkpointing."""
    import torch

    gpu = torch.cuda.is_available()
    return {"bf16": bool(gpu and torch.cuda.is_bf16_supported()), "cpu": not gpu}


# What config_for_delta hands every template (besides the method's own args), with sample values.
TEMPLATE_SAMPLE = {"delta": "chunk-sft", "model_name_or_path": "model", "template": "default", "dataset_dir": "data",
                   "dataset": "chunk", "output_dir": "deltas/chunk-sft", "seed": 0, "bf16": False, "cpu": True}


def template_problem(template_file: str, method: str) -> str | None:
    """Why a training template would fail when rendered (syntax, or a variable nobody sets), else None:
    found at `validate`, not when the first training starts. Rendered once with sample values."""
    path = find_template(template_file)
    if path is None:
        return f"no template {template_file!r} in templates/; name a file there or give a path"
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    try:
        env.from_string(path.read_text(encoding="utf-8")).render(**TEMPLATE_SAMPLE, **METHODS[method].args)
    except jinja2.TemplateSyntaxError as e:
        return f"{path} line {e.lineno}: {e.message}; fix the template"
    except jinja2.UndefinedError as e:
        return (f"{path}: {e.message}; autollm sets only "
                f"{', '.join(sorted(set(TEMPLATE_SAMPLE) | set(METHODS[method].args)))}")
    except UnicodeDecodeError:
        return f"{path}: not UTF-8 text"
    return None


def render_template(template_file: str, overrides: dict[str, Any], **variables: Any) -> str:
    path = find_template(template_file)
    if path is None:
        raise UserError(f"train.template: no template {template_file!r} in {TEMPLATES_DIR}; "
                        f"name a file there or give a path")
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    text = env.from_string(path.read_text(encoding="utf-8")).render(**variables)
    return apply_overrides(text, overrides)


def model_fingerprint(model_dir: Path) -> str:
    """Config contents plus weight-file sizes and mtimes (hashing GBs of weights per run would be slow)."""
    model_dir = Path(model_dir)
    parts = []
    for p in sorted(model_dir.glob("*")):
        if p.is_file() and p.suffix in {".json", ".safetensors", ".bin", ".model"}:
            st = p.stat()
            parts.append([p.name, st.st_size, st.st_mtime_ns if st.st_size > 1 << 20 else p.read_text(errors="ignore")])
    return fingerprint(parts)


def _tail(path: Path, n: int = 25) -> str:
    if not path.exists():
        return "(no log written)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:])


def run_llamafactory(config_path: Path, output_dir: Path, desc: str, command: str = "train",
                     devices: dict[str, str] | None = None) -> float:
    """`llamafactory-cli COMMAND CONFIG` as an argument list, output to <output_dir>/<command>.log; returns its
    wall seconds. Progress comes from trainer_log.jsonl: a bar on a terminal, one line at the end otherwise."""
    from tqdm import tqdm

    output_dir.mkdir(parents=True, exist_ok=True)
    log_path = output_dir / f"{command}.log"
    progress_path = output_dir / "trainer_log.jsonl"
    env = dict(os.environ, WANDB_DISABLED="true", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               DISABLE_VERSION_CHECK="1", **(devices or {}))
    parallel = bool(devices)  # trainings side by side: one line each at the end, no bars drawn over each other
    started = time.perf_counter()
    with open(log_path, "w") as log, tqdm(total=None, desc=desc, unit="step", leave=True,
                                          disable=True if parallel else None) as bar:
        proc = subprocess.Popen([llamafactory_cli(), command, str(config_path)], stdout=log,
                                stderr=subprocess.STDOUT, env=env)
        while proc.poll() is None:
            time.sleep(0.5)
            _update_progress(bar, progress_path)
        _update_progress(bar, progress_path)
    if proc.returncode != 0:
        raise UserError(f"{desc} failed (exit {proc.returncode}); see {log_path}, last lines:\n{_tail(log_path)}")
    seconds = time.perf_counter() - started
    if bar.disable:
        print(f"{desc}: done in {seconds:.0f} s{_last_loss(progress_path)}")
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


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def config_for_delta(cfg, spec: DeltaSpec) -> tuple[Path, str]:
    """Render configs/<delta>.yaml unless the user edited it since we last rendered it (then keep theirs)."""
    run = cfg.run
    path, state_path = run.config(spec.name), run.rendered
    state = read_json(state_path, {})
    rendered = render_template(
        cfg.train.template_for(spec.method), {**cfg.train.args, **spec.args}, **METHODS[spec.method].args,
        delta=spec.name, model_name_or_path=str(cfg.base_model.path), template=cfg.base_model.template,
        dataset_dir=str(run.data), dataset=",".join(spec.datasets), output_dir=str(run.delta(spec.name)),
        seed=cfg.seed, **hardware_defaults(),
    )
    if path.exists() and _sha(path.read_text(encoding="utf-8")) != state.get(spec.name):
        print(f"keeping hand-edited {path} (delete it to go back to the template)")
        text = path.read_text(encoding="utf-8")
        _check_user_yaml(path, text, run.delta(spec.name))
        return path, text
    atomic_write_text(path, rendered)
    state[spec.name] = _sha(rendered)
    write_json(state_path, state)
    return path, rendered


def _check_user_yaml(path: Path, text: str, output_dir: Path) -> None:
    try:
        parsed = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({e}); fix it or delete it to re-render from the template") from None
    if not isinstance(parsed, dict) or Path(str(parsed.get("output_dir", ""))) != output_dir:
        raise UserError(f"{path}: output_dir must stay {output_dir} (autollm reads the delta from there)")


def chunk_methods(cfg, chunk: str, shape: str) -> list[str]:
    chosen = cfg.train.chunk_methods.get(chunk, cfg.train.methods)
    return AUTO_METHODS[shape] if chosen == "auto" else list(chosen)


def delta_specs(cfg, shapes: dict[str, str]) -> list[DeltaSpec]:
    """One delta per (chunk, method), named <chunk>-<method>, plus train@all (SFT on the SFT chunks).

    A method that does not fit a chunk's data is an error here, before anything trains."""
    specs = []
    for chunk, shape in shapes.items():
        for m in chunk_methods(cfg, chunk, shape):
            if METHODS[m].shape != shape:
                raise UserError(f"train: method {m!r} does not fit chunk {chunk!r}: its data is {SHAPE_WORDS[shape]}, "
                                f"{m} needs {SHAPE_WORDS[METHODS[m].shape]}; set train.chunk_methods.{chunk} "
                                f"(e.g. {AUTO_METHODS[shape]}) or give the chunk such data")
            name = f"{chunk}-{m}"
            args = {**cfg.train.method_args.get(m, {}), **cfg.train.chunk_args.get(chunk, {}),
                    **cfg.train.chunk_args.get(name, {})}
            specs.append(DeltaSpec(name, [chunk], m, args))
    sft_chunks = [c for c, shape in shapes.items() if shape == "sft"]
    if cfg.train.train_all and sft_chunks:
        specs.append(DeltaSpec(ALL_DELTA, sft_chunks, "sft", cfg.train.method_args.get("sft", {})))
    return specs


def train_one(cfg, spec: DeltaSpec, base_fp: str, force: bool, devices: dict[str, str] | None = None) -> Path:
    """Train one delta unless it is already trained with the same config text, data and base model."""
    cfg_path, text = config_for_delta(cfg, spec)
    data_files = [cfg.run.split(d) for d in spec.datasets] + [cfg.run.dataset_info]
    fp = fingerprint(text, file_digest(data_files), base_fp)
    delta_dir = cfg.run.delta(spec.name)
    done = read_json(delta_dir / DONE_MARKER, {})
    if not force and is_fresh(done, fp, delta_dir / ADAPTER_FILE):
        print(f"delta {spec.name}: up to date, not retrained")
        return delta_dir
    # A fresh folder: LLaMA-Factory would silently resume from stale checkpoint-* folders.
    shutil.rmtree(delta_dir, ignore_errors=True)
    seconds = run_llamafactory(cfg_path, delta_dir, desc=f"training delta {spec.name}", devices=devices)
    if not (delta_dir / ADAPTER_FILE).exists():
        raise UserError(f"training delta {spec.name} wrote no {ADAPTER_FILE} in {delta_dir}; "
                        f"is finetuning_type lora in {cfg_path}?")
    write_json(delta_dir / DONE_MARKER, {"fingerprint": fp, "config": str(cfg_path), "seconds": round(seconds, 1)})
    return delta_dir


PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "video_preprocessor_config.json")


def _layout(template) -> tuple:
    """What a chat template writes around a conversation (two templates with the same layout train alike)."""
    slots = tuple(repr(getattr(template, f).slots) for f in ("format_user", "format_assistant", "format_system",
                                                              "format_prefix", "format_observation"))
    return slots, tuple(template.stop_words), template.replace_eos, template.efficient_eos, type(template)


def _is_multimodal(template) -> bool:
    return any(getattr(template.mm_plugin, t, None) for t in ("image_token", "video_token", "audio_token"))


def check_template(name: str, model_dir: Path) -> None:
    """base_model.template must be one of LLaMA-Factory's and fit the model. A multimodal template (its mm_plugin
    has image, video or audio tokens) needs the model's processor: on a text-only model LLaMA-Factory stops every
    training with "Processor was not found". Say so before any training, naming the text-only template that
    writes the same conversation (gemma3 -> gemma)."""
    from llamafactory.data.template import TEMPLATES

    template = TEMPLATES.get(name)
    if template is None:
        close = difflib.get_close_matches(name, list(TEMPLATES), n=3)
        raise UserError(f"base_model.template: LLaMA-Factory has no template {name!r}"
                        + (f"; did you mean {' or '.join(close)}?" if close
                           else "; see LLaMA-Factory's data/template.py"))
    if not _is_multimodal(template) or any((Path(model_dir) / f).is_file() for f in PROCESSOR_FILES):
        return
    twins = [n for n, t in TEMPLATES.items() if not _is_multimodal(t) and _layout(t) == _layout(template)]
    instead = f"use template {twins[0]!r} instead (the same conversation format, text only)" if twins else \
        "use a text-only template with the same format"
    raise UserError(f"base_model.template: {name!r} is a multimodal template and {model_dir} has no processor "
                    f"(a text-only model; LLaMA-Factory would stop with 'Processor was not found'); {instead}")


def train_all(cfg, shapes: dict[str, str], force: bool = False, keep_going: bool = False) -> dict[str, Path]:
    """Train the deltas, one per free device group (one at a time on a CPU). With keep_going a failed delta is
    reported and left out; the others train."""
    check_template(cfg.base_model.template, cfg.base_model.path)
    base_fp = model_fingerprint(cfg.base_model.path)
    groups = device_groups(visible_gpus(), cfg.train.gpus_per_delta)
    jobs = {spec.name: (lambda devices, spec=spec: train_one(cfg, spec, base_fp, force, devices or None))
            for spec in delta_specs(cfg, shapes)}
    if len(groups) > 1:
        print(f"train: {len(jobs)} deltas on {len(groups)} device groups "
              f"({', '.join(g['CUDA_VISIBLE_DEVICES'] for g in groups)})")
    adapters, failed = run_on_devices(jobs, groups, keep_going)
    if failed:
        print(f"left out (training failed): {', '.join(failed)}; the search uses the other deltas", file=sys.stderr)
    return adapters
