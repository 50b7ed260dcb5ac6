"""RunConfig: the whole run config, and where its outputs go."""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Optional

from pydantic import Field, PrivateAttr, field_validator, model_validator

from ..paths import RunDir
from .data_section import SAFE_NAME, DataConfig, Strict
from .sections import (
    ClusterConfig,
    EvaluationConfig,
    ExportConfig,
    ModelConfig,
    ReportConfig,
    RoundsConfig,
    SearchConfig,
    ToyConfig,
    TrainConfig,
)


class RunConfig(Strict):
    name: str
    seed: int = 0
    run_dir: Path = Path("runs")
    round: int = Field(1, ge=1, description="continual round; `--round K` sets it; round K >= 2 lives in "
                                             "runs/<name>/round-K/")
    rounds: RoundsConfig = Field(default_factory=RoundsConfig)
    base_model: ModelConfig
    _first_base: Optional[Path] = PrivateAttr(None)  # round 1's base model (round K's is round K-1's merge)

    @property
    def first_base(self) -> Optional[Path]:
        """Round 1's base model, as rounds.apply_round recorded it (round K's base is round K-1's merge)."""
        return self._first_base

    def record_first_base(self) -> None:
        self._first_base = self.base_model.path
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
        return self.round_run(self.round).root

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
        return RunDir.label(self.name, self.round)

    def on_shared_base(self) -> RunConfig:
        """The config every stage after prepare uses with train.shared: its base is the shared base (where it is
        built); private state (round K's first base) comes along."""
        base = self.base_model.model_copy(update={"path": self.run.shared_base, "gguf": None})
        return self.model_copy(update={"base_model": base})

    def round_run(self, k: int) -> RunDir:
        """Round k's run folder (runs/<name>/ or runs/<name>/round-<k>/)."""
        return RunDir.of(self.run_dir, self.name, k)
