"""Every file a run writes, named in one place: `RunDir(root)` (root = runs/<name>/, or round-K/ below it).

Stages read and write through it, never through hand-built `out / "..."` paths, so the layout the design
promises (data/ configs/ deltas/ search/ report/ merged/) is this file and nothing else.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UserError
from .fileio import read_json

# Bookkeeping files in data/ start with "_": records.chunk_name() never makes a name that does, so no chunk
# can overwrite them (validation/test/dataset_info are reserved chunk names instead).
MANIFEST, SUMMARY = "_manifest.json", "_summary.json"
ADAPTER_FILE = "adapter_model.safetensors"
TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"  # package data: in every install, not only a checkout
SFT_VIEW = "_sft_"  # a preference chunk read as SFT on its chosen answers (train@all's), in dataset_info only


def sft_view(chunk: str) -> str:
    return SFT_VIEW + chunk


def dataset_file_stem(dataset: str) -> str:
    """The data/ file a dataset_info entry reads: a chunk's own, also for its SFT view."""
    return dataset[len(SFT_VIEW):] if dataset.startswith(SFT_VIEW) else dataset


SHARED = "_shared"  # train.shared: its dataset (data/_shared.json), config and delta; no chunk name starts with _
ALL_DELTA = "all"  # train@all: one adapter on every chunk it can read
MIX_DELTA = "auto_mix"  # train@auto_mix: one adapter on the SFT chunks mixed by the best weights


def find_template(name: str) -> Path | None:
    """A template file: the path as given, else the package's templates/ (None if neither is a file)."""
    for candidate in (Path(name), TEMPLATES_DIR / name):
        if candidate.is_file():
            return candidate
    return None


@dataclass(frozen=True)
class RunDir:
    root: Path

    # ---- names: where a run and its adapters are named ----
    @classmethod
    def of(cls, run_dir: Path, name: str, round: int = 1) -> RunDir:
        """runs/<name>/ for round 1 (as ever), runs/<name>/round-<K>/ for round K >= 2."""
        return cls(run_dir / name if round == 1 else run_dir / name / f"round-{round}")

    @staticmethod
    def label(name: str, round: int = 1) -> str:
        """The run's label in reports and the WebUI: <name>, or <name>-round<K> for round K >= 2."""
        return name if round == 1 else f"{name}-round{round}"

    # ---- prepare: LLaMA-Factory's dataset_dir ----
    @property
    def data(self) -> Path:
        return self.root / "data"

    def split(self, name: str) -> Path:
        """data/<name>.json: a chunk's training rows, or validation / test."""
        return self.data / f"{name}.json"

    @property
    def dataset_info(self) -> Path:
        return self.data / "dataset_info.json"

    @property
    def manifest(self) -> Path:
        return self.data / MANIFEST

    @property
    def summary(self) -> Path:
        return self.data / SUMMARY

    # ---- train ----
    @property
    def configs(self) -> Path:
        return self.root / "configs"

    def config(self, delta: str) -> Path:
        return self.configs / f"{delta}.yaml"

    @property
    def rendered(self) -> Path:
        """The hash of each config as we rendered it: a differing file was edited by hand (and is kept)."""
        return self.configs / ".rendered.json"

    def delta(self, name: str) -> Path:
        return self.root / "deltas" / name

    @property
    def shared_base(self) -> Path:
        """train.shared: the base with the shared adapter merged in (full weights); every delta trains on it."""
        return self.root / "shared_base"

    # ---- search ----
    @property
    def search(self) -> Path:
        return self.root / "search"

    @property
    def trials(self) -> Path:
        return self.search / "trials.jsonl"

    @property
    def best(self) -> Path:
        return self.search / "best.json"

    @property
    def merge_choice(self) -> Path:
        """search.merge: auto: each candidate method's best baseline point and the one chosen (search.merge_choice)."""
        return self.search / "merge_auto.json"

    def candidate_search(self, method: str) -> Path:
        """search.merge: auto: the folder of one raced candidate's search (its trials.jsonl and best.json)."""
        return self.search / "merge_auto" / method

    def raw_constraints(self, split: str) -> Path:
        """The raw model's score on each constraint of evaluation.objective, on one split."""
        return self.search / f"raw_constraints.{split}.json"

    @property
    def search_cost(self) -> Path:
        """The shared set-up's wall seconds (base model and every delta loaded once); trials log their own."""
        return self.search / "cost.json"

    # ---- report ----
    @property
    def report(self) -> Path:
        return self.root / "report"

    @property
    def report_md(self) -> Path:
        return self.report / "report.md"

    @property
    def report_json(self) -> Path:
        return self.report / "report.json"

    @property
    def report_html(self) -> Path:
        return self.report / "report.html"

    @property
    def row_scores(self) -> Path:  # every report row's score on every held-out row, with the rows' chunks
        return self.report / "row_scores.json"

    @property
    def bad_cases(self) -> Path:
        return self.report / "bad_cases.jsonl"

    # ---- export ----
    @property
    def merged(self) -> Path:
        return self.root / "merged"

    @property
    def merged_full(self) -> Path:
        return self.root / "merged_full"

    @property
    def export_yaml(self) -> Path:
        return self.root / "export.yaml"

    @property
    def chat_yaml(self) -> Path:
        return self.root / "chat.yaml"

    # ---- the run itself ----
    @property
    def log(self) -> Path:
        """Everything the run printed (debug lines too), with times: appended by each command on this run."""
        return self.root / "autollm.log"

    @property
    def resolved_config(self) -> Path:
        return self.root / "config.resolved.yaml"

    @property
    def generate_cache(self) -> Path:
        return self.root / "cache" / "generate"

    def read_best(self) -> dict[str, Any]:
        """search/best.json, or the one-line error every later stage gives when the search has not run."""
        best = read_json(self.best)
        if best is None:
            raise UserError(f"{self.best} missing; run `autollm search` first")
        return best


def delta_name(chunk: str, method: str) -> str:
    """A chunk's delta trained with one method: <chunk>-<method> (its deltas/ folder and configs/ file)."""
    return f"{chunk}-{method}"


def webui_name(label: str, adapter: str) -> str:
    """An adapter's folder under the WebUI's saves/<model>/lora/: <label>-<adapter> (e.g. toy-best)."""
    return f"{label}-{adapter}"


def is_fresh(marker: dict, fingerprint: str, *outputs: Path) -> bool:
    """A stage's outputs are up to date: its marker holds this fingerprint and every output exists."""
    return marker.get("fingerprint") == fingerprint and all(Path(p).exists() for p in outputs)
