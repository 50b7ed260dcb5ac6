"""LLaMA-Factory YAMLs rendered from templates/ (a training's, export.yaml, chat.yaml), the cutoff they train with,
and the checks that a template renders and that base_model.template fits the model."""
from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any

import jinja2

from ..errors import UserError
from ..fileio import write_if_changed
from ..paths import TEMPLATES_DIR, find_template
from .lfcli import apply_overrides
from .methods import METHODS

LF_DEFAULT_CUTOFF = 2048  # LLaMA-Factory's DataArguments.cutoff_len


CUTOFF_LINE = re.compile(r"^cutoff_len:\s*(\d+)", re.M)


def training_cutoff_len(cfg) -> int:
    """The cutoff_len the SFT deltas train with: train.method_args.sft, else train.args, else their template's."""
    for args in (cfg.train.method_args.get("sft", {}), cfg.train.args):
        if "cutoff_len" in args:
            return int(args["cutoff_len"])
    path = find_template(method_template(cfg, "sft"))
    found = CUTOFF_LINE.search(path.read_text(encoding="utf-8")) if path else None
    return int(found.group(1)) if found else LF_DEFAULT_CUTOFF


def method_template(cfg, method: str) -> str:
    """The LLaMA-Factory config template `method` renders: train.templates' choice, else the method's own."""
    return cfg.train.templates.get(method, METHODS[method].template)


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
        return f"no template {template_file!r} in autollm_lf/templates/; name a file there or give a path"
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


def render_lf_yaml(template_file: str, path: Path, **variables) -> Path:
    """Render autollm_lf/templates/<template_file> to path (only rewritten if its text changed)."""
    write_if_changed(path, render_template(template_file, {}, yaml_path=path, **variables))
    return path
