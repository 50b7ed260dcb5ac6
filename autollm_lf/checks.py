"""Everything checked before anything trains: the config's shape (config.parse_config), then what only the stages
know (their registries' names, templates, lm-eval tasks, a user's Python function, a GGUF base) and the files it
names, all reported at once. `config` knows no stage; this module is where the two meet, and every command loads its
config here (`load_config`)."""
from __future__ import annotations

from pathlib import Path

from .config import ONE_BASE, GenerateSource, RunConfig, parse_config, path_problems
from .errors import UserError
from .evaluate.metrics import METRICS
from .merge import AUTO_MERGE, MERGE_METHODS
from .models.gguf import converted_path
from .models.gguf_source import PYPI
from .paths import find_template
from .search.optimizers import OPTIMIZERS, optimizer_problems
from .train.deltas import LORA_INITS
from .train.methods import METHODS
from .train.render import method_template, template_problem, training_cutoff_len


def load_config(path: str | Path, round: int | None = None, overrides: list[str] = ()) -> RunConfig:
    """Load and validate a config (as round `round`, over its `round:` key; `key=value` overrides over its keys);
    raise UserError listing every problem. A round K >= 2 is then made from it by rounds.apply_round (its base and
    data depend on round K-1)."""
    cfg = parse_config(path, round, overrides, name_problems)
    try:
        resolve_gguf(cfg)
    except UserError as e:  # base_model.gguf: a file that is not there or not a GGUF
        raise UserError(f"{path}: {e}") from None
    problems = template_problems(cfg) + path_problems(cfg) + evaluation_problems(cfg)
    if problems:
        raise UserError("\n".join(f"{path}: {p}" for p in problems))
    if cfg.evaluation.cutoff_len is None:  # evaluate rows as the deltas were trained on them
        cfg.evaluation.cutoff_len = training_cutoff_len(cfg)
    return cfg


def resolve_gguf(cfg: RunConfig) -> None:
    """A GGUF base: the run sees its converted folder (converted by pipeline.run_stages if not yet)."""
    if not cfg.base_model.gguf:
        return
    if not cfg.base_model.gguf.startswith(PYPI):
        cfg.base_model.gguf = str(Path(cfg.base_model.gguf).expanduser().resolve())
    converted = converted_path(cfg.base_model.gguf)
    if cfg.base_model.path is not None and cfg.base_model.path.resolve() != converted:
        raise UserError(f"base_model: {ONE_BASE}")
    cfg.base_model.path = converted


def unknown(key: str, what: str, name, registry) -> list[str]:
    """A string not in the registry (a value of another type is the schema's to report)."""
    if not isinstance(name, str) or name in registry:
        return []
    return [f"{key}: unknown {what} {name!r}; choose one of {', '.join(registry)}"]


def section(raw: dict, key: str) -> dict:
    return raw.get(key) if isinstance(raw.get(key), dict) else {}


def name_problems(raw: dict) -> list[str]:
    """Every name the config mapping gives that no stage's registry holds (read from the YAML as written, so that
    they are reported with the schema's problems, all at once)."""
    train, search, evaluation = section(raw, "train"), section(raw, "search"), section(raw, "evaluation")
    problems = unknown("train.lora_init", "LoRA init", train.get("lora_init"), LORA_INITS)
    listed = train.get("methods")
    methods = [("train.methods", m) for m in (listed if isinstance(listed, list) else [])]
    methods += [(f"train.chunk_methods.{c}", m)
                for c, ms in section(train, "chunk_methods").items() if isinstance(ms, list) for m in ms]
    methods += [(f"train.templates.{m}", m) for m in section(train, "templates")]
    methods += [(f"train.method_args.{m}", m) for m in section(train, "method_args")]
    problems += [p for key, m in methods for p in unknown(key, "method", m, METHODS)]
    problems += unknown("search.merge", "merge method", search.get("merge"), [AUTO_MERGE, *MERGE_METHODS])
    problems += unknown("search.optimizer", "optimizer", search.get("optimizer"), ["auto", *OPTIMIZERS])
    problems += combination_problems(search, evaluation)
    parts = evaluation.get("objective") if isinstance(evaluation.get("objective"), list) else []
    metrics = [("evaluation.metric", evaluation.get("metric"))]
    metrics += [(f"evaluation.objective.{i}.metric", part.get("metric"))
                for i, part in enumerate(parts) if isinstance(part, dict)]
    return problems + [p for key, metric in metrics for p in unknown(key, "metric", metric, sorted(METRICS))]


def combination_problems(search: dict, evaluation: dict) -> list[str]:
    """The optimiser with the merge method, metric and objective the config names, as the optimiser declares what
    it needs (optimizers.optimizer_problems; defaults as the schema's)."""
    from .config import EvaluationConfig, SearchConfig
    default = lambda model, key: model.model_fields[key].default
    optimizer = search.get("optimizer", default(SearchConfig, "optimizer"))
    merge = search.get("merge", default(SearchConfig, "merge"))
    metric = evaluation.get("metric", default(EvaluationConfig, "metric"))
    if not all(isinstance(x, str) for x in (optimizer, merge, metric)):
        return []  # the schema reports the type
    return [f"search.optimizer: {p}" for p in
            optimizer_problems(optimizer, merge, metric, objective=bool(evaluation.get("objective")))]


def template_problems(cfg: RunConfig) -> list[str]:
    """The LLaMA-Factory config templates the methods render, the judge's and generate's prompt templates."""
    problems = [f"train.templates.{m}: {problem}" for m in METHODS
                if (problem := template_problem(method_template(cfg, m), m)) is not None]
    prompts = [("evaluation.judge.prompt_template", cfg.evaluation.judge.prompt_template)] if cfg.evaluation.judge \
        else []
    for split in ("sources", "validation", "test"):
        listed = cfg.data.sources if split == "sources" else getattr(cfg.evaluation, split)
        where = "data.sources" if split == "sources" else f"evaluation.{split}"
        prompts += [(f"{where}.{i}.prompt_template", src.prompt_template)
                    for i, src in enumerate(listed) if isinstance(src, GenerateSource)]
    return problems + [f"{key}: no template {name!r} in autollm_lf/templates/; name a file there or give a path"
                       for key, name in prompts if find_template(name) is None]


def evaluation_problems(cfg: RunConfig) -> list[str]:
    """What each metric in use needs of the evaluation section and cannot use (lm-eval's tasks, a Python
    function that does not load: the metric's config_problems)."""
    evaluation = cfg.evaluation
    used = dict.fromkeys([evaluation.metric] + [p.metric for p in evaluation.objective if p.metric])
    return [problem for metric in used for problem in METRICS[metric].config_problems(evaluation)]
