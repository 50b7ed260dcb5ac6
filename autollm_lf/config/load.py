"""Reading a config file: YAML and `key=value` overrides, the schema's errors all at once, paths made absolute,
the files it names checked; and the resolved config written back out with its secrets hidden."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import yaml
from pydantic import ValidationError

from ..errors import UserError, mask_secrets, mask_url, raw_at_problem, remember_secrets
from ..paths import RunDir
from ..yamlsafe import load_yaml, load_yaml_text
from .data_section import BadCasesSource, FileSource, GenerateSource, LlamaFactorySource, SqlSource
from .run import RunConfig


def _format_errors(err: ValidationError, file: Path) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not str(p).startswith(("function-", "tagged-union")))
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key; remove it or check its spelling"
        elif e["type"] == "missing":
            msg = "required key is missing"
        lines.append(f"{file}: {loc or '<top>'}: {msg}")
    return "\n".join(lines)


def _resolve_paths(cfg: RunConfig) -> RunConfig:
    """Make paths absolute (relative ones are relative to the working directory, as in LLaMA-Factory)."""
    cfg.run_dir = cfg.run_dir.resolve()
    if cfg.base_model.path is not None:  # a GGUF base's folder is set by checks.resolve_gguf
        cfg.base_model.path = cfg.base_model.path.resolve()
    cfg.export.saves_dir = cfg.export.saves_dir.resolve()
    if cfg.cluster and cfg.cluster.storage:
        cfg.cluster.storage = cfg.cluster.storage.resolve()
    if cfg.toy:
        cfg.toy.database = cfg.toy.database.resolve()
    sources = cfg.all_sources
    for src in sources + [s.documents for s in sources if isinstance(s, GenerateSource)]:
        if isinstance(src, FileSource):
            src.path = src.path.resolve()
        if isinstance(src, LlamaFactorySource):
            src.dataset_dir = src.dataset_dir.resolve()
        if isinstance(src, BadCasesSource):
            src.run = src.run.resolve()
        if isinstance(src, GenerateSource):
            src.cache_dir = (src.cache_dir or cfg.run.generate_cache).resolve()
    return cfg


def _model_folder_problems(path: Path) -> list[str]:
    config = path / "config.json"
    if not config.is_file():
        return [f"base_model.path: {path} is not a Hugging Face model folder (no config.json); "
                f"give the folder that holds the model's config.json and weights"]
    try:
        ok = isinstance(json.loads(config.read_text(encoding="utf-8")), dict)
    except (ValueError, UnicodeDecodeError):
        ok = False
    return [] if ok else [f"base_model.path: {config} is not a valid JSON object (cut off?); copy the model again"]


def _sql_url_problems(src: SqlSource, where: str) -> list[str]:
    """A URL that does not parse, or an SQLite file (any driver spelling) that is not there."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        url = make_url(src.url)
    except ArgumentError:
        return [f"{where}.url: {mask_secrets(src.url)!r} is not a database URL; write e.g. sqlite:///file.sqlite"]
    if (problem := raw_at_problem(src.url)) is not None:
        return [f"{where}.url: {problem}"]
    if url.get_backend_name() == "sqlite" and url.database and not Path(url.database).is_file():
        return [f"{where}.url: SQLite file {url.database} not found"]
    return []


def path_problems(cfg: RunConfig) -> list[str]:
    """Problems pydantic cannot see: files that must exist before anything runs (checks.load_config reports them
    with the stage checks', all at once)."""
    problems = []
    if cfg.run_dir.exists() and not cfg.run_dir.is_dir():
        problems.append(f"run_dir: {cfg.run_dir} is a file, not a folder; name a folder for the runs")
    if cfg.toy is None and cfg.round == 1 and not cfg.base_model.gguf:
        problems += _model_folder_problems(cfg.base_model.path)
    keyed = [(f"data.sources.{i}", src) for i, src in enumerate(cfg.data.sources)]
    keyed += [(f"evaluation.{split}.{i}", src) for split in ("validation", "test")
              for i, src in enumerate(getattr(cfg.evaluation, split))]
    named = keyed + [(f"{key}.documents", src.documents) for key, src in keyed if isinstance(src, GenerateSource)]
    for key, src in keyed:
        if isinstance(src, GenerateSource):
            if src.api_key_env and not os.environ.get(src.api_key_env):
                problems.append(f"{key}.api_key_env: environment variable {src.api_key_env} is not set; "
                                f"export it with the endpoint's API key")
        if isinstance(src, BadCasesSource) and not RunDir(src.run).bad_cases.is_file():
            problems.append(f"{key}.run: {RunDir(src.run).bad_cases} not found; run `autollm run` on "
                            f"that run first (its report stage writes it)")
    for i, src in named:
        if isinstance(src, FileSource) and not src.path.is_file():
            problems.append(f"{i}.path: {src.path} not found")
        if isinstance(src, LlamaFactorySource) and not (src.dataset_dir / "dataset_info.json").is_file():
            problems.append(f"{i}.dataset_dir: {src.dataset_dir} has no dataset_info.json")
        if isinstance(src, SqlSource) and cfg.toy is None:
            problems += _sql_url_problems(src, i)
    if cfg.cluster and cfg.cluster.storage and not cfg.cluster.storage.is_dir():
        problems.append(f"cluster.storage: {cfg.cluster.storage} is not a folder here; mount the shared storage at "
                        f"that path (every node mounts it there) or leave cluster.storage out")
    return problems


def override_keys(raw: dict, overrides: list[str]) -> dict:
    """`key.sub=value` arguments over the YAML, as LLaMA-Factory's CLI takes them; each value read as YAML
    (`search.n_iter=10`, `cluster.address=auto`, `search.bounds=[0,2]`)."""
    for item in overrides:
        key, sep, text = item.partition("=")
        parts = key.split(".")
        if not sep or not all(parts):
            raise UserError(f"{item!r}: not an override; write KEY=VALUE with a dotted key, e.g. search.n_iter=10")
        node = raw
        for i, part in enumerate(parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"{item!r}: {'.'.join(parts[:i + 1])} is not a mapping in the config; "
                                f"override it whole instead")
        node[parts[-1]] = load_yaml_text(text, f"override {key}")  # the same guard as a config file
    return raw


def parse_config(path: str | Path, round: int | None = None, overrides: list[str] = (),
                 name_problems: Callable[[dict], list[str]] = lambda raw: []) -> RunConfig:
    """Load a config and check its shape (as round `round`, over its `round:` key; `key=value` overrides over its
    keys); raise UserError listing every schema problem, with those `name_problems` finds in the same mapping (the
    names only stages know: checks.load_config, the entry point every command uses, passes them in)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: config file not found; pass the path of a run YAML (e.g. examples/toy.yaml)")
    raw = load_yaml(path)
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of keys at the top level")
    raw = override_keys(raw, list(overrides))
    names = [f"{path}: {p}" for p in name_problems(raw)]
    try:
        cfg = RunConfig.model_validate(raw)
    except ValidationError as e:
        raise UserError("\n".join([_format_errors(e, path), *names])) from None
    if names:
        raise UserError("\n".join(names))
    if round is not None:
        if round < 1:
            raise UserError(f"--round: {round} is not a round; rounds count from 1")
        cfg.round = round
    cfg = _resolve_paths(cfg)
    remember_secrets(*source_urls(cfg))
    return cfg


def source_urls(cfg: RunConfig) -> list[str]:
    """Every database URL the config names (sources, fixed evaluation sets, generate's documents)."""
    sources = cfg.all_sources
    return [s.url for s in sources + [s.documents for s in sources if isinstance(s, GenerateSource)]
            if isinstance(s, SqlSource)]


def _mask_urls(node):
    if isinstance(node, dict):
        return {k: (mask_url(v) if k in ("url", "base_url") and isinstance(v, str) else _mask_urls(v))
                for k, v in node.items()}
    return [_mask_urls(v) for v in node] if isinstance(node, list) else node


def dump_config(cfg: RunConfig) -> str:
    """The resolved config as YAML, every URL rendered by SQLAlchemy with its password and secret parameters
    hidden (it is written beside the outputs), and any remembered secret masked wherever else it appears."""
    return mask_secrets(yaml.safe_dump(_mask_urls(cfg.model_dump(mode="json")), sort_keys=False, allow_unicode=True))


def without_secrets(cfg: RunConfig) -> RunConfig:
    """A copy whose database URLs are masked: what travels to other processes (Ray actors) that only read the
    prepared data."""
    copy = cfg.model_copy(deep=True)
    sources = copy.all_sources
    for src in sources + [s.documents for s in sources if isinstance(s, GenerateSource)]:
        if isinstance(src, SqlSource):
            src.url = mask_url(src.url)
    return copy
