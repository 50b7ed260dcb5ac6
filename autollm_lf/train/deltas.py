"""Stage 2: render one LLaMA-Factory YAML per delta and run `llamafactory-cli train` on each: on this machine
(one per free device group, one at a time on a CPU) or as Ray tasks on a cluster (`cluster:`, cluster.py)."""
from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from ..config.owned import OWNED_TRAIN_KEYS
from ..errors import UserError
from ..fileio import atomic_write_text, file_digest, fingerprint, read_json, write_json
from ..log import get_logger
from ..paths import ADAPTER_FILE, ALL_DELTA, dataset_file_stem, delta_name, is_fresh, sft_view
from .cluster import RayCluster
from .lfcli import run_llamafactory
from .methods import AUTO_METHODS, METHODS, SHAPE_WORDS
from .render import check_template, hardware_defaults, method_template, render_template
from .scheduler import device_groups, run_on_devices, visible_gpus

logger = get_logger(__name__)

DONE_MARKER = "autollm_delta.json"


@dataclass
class DeltaSpec:
    """One training run: a LoRA delta trained with one method on some chunks' datasets."""
    name: str
    datasets: list[str]
    method: str = "sft"
    args: dict[str, Any] = field(default_factory=dict)
    merged: bool = False  # one of the deltas the search merges (train.lora_init applies to these only)

    @property
    def chunk(self) -> str | None:
        """The one chunk a per-chunk delta trains on (None for train@all and train@auto_mix)."""
        return self.datasets[0] if len(self.datasets) == 1 and self.name != ALL_DELTA else None


def model_fingerprint(model_dir: Path) -> str:
    """Config contents plus weight-file sizes and mtimes (hashing GBs of weights per run would be slow)."""
    model_dir = Path(model_dir)
    parts = []
    for p in sorted(model_dir.glob("*")):
        if p.is_file() and p.suffix in {".json", ".safetensors", ".bin", ".model"}:
            st = p.stat()
            parts.append([p.name, st.st_size, st.st_mtime_ns if st.st_size > 1 << 20 else p.read_text(errors="ignore")])
    return fingerprint(parts)


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# ---- train.lora_init: how each merged delta's LoRA starts (its keys over the rendered config) -------------------
# LLaMA-Factory draws a LoRA's A from the run's `seed`: with one seed every delta starts from the same A and, at
# these learning rates, barely moves it (cosine .985 across the Gemma example's deltas), so all deltas read the same
# input directions.

FROZEN_A_RATIO = 10_000.0  # frozen_a: B learns at learning_rate, A at learning_rate / this (LoRA+'s param groups)


def delta_seed(seed: int, name: str) -> int:
    """A seed of the delta's own, fixed by the run's seed and the delta's name."""
    return int(hashlib.sha256(f"{seed}:{name}".encode()).hexdigest()[:8], 16)


def _per_delta_init(seed: int, name: str, learning_rate: float) -> dict[str, Any]:
    return {"seed": delta_seed(seed, name)}


def _frozen_a_init(seed: int, name: str, learning_rate: float) -> dict[str, Any]:
    """One A for every delta (the run's seed), held still: LoRA+'s B/A learning-rate ratio at FROZEN_A_RATIO with
    the learning rate divided by it, so B trains as configured and A moves by ~1e-4 of itself (LoRA-FA / LoRI)."""
    return {"learning_rate": learning_rate / FROZEN_A_RATIO, "loraplus_lr_ratio": FROZEN_A_RATIO}


LORA_INITS: dict[str, Any] = {  # keyed by registry.LORA_INITS (tests/test_registry.py)
    "shared": lambda seed, name, learning_rate: {},  # LLaMA-Factory's default: the run's seed for every delta
    "per_delta": _per_delta_init,
    "frozen_a": _frozen_a_init,
}


def config_for_delta(cfg, spec: DeltaSpec,
                     hardware: dict[str, Any] | None = None) -> tuple[Path, str]:
    """Render configs/<delta>.yaml unless the user edited it since we last rendered it (then keep theirs)."""
    run = cfg.run
    path, state_path = run.config(spec.name), run.rendered
    state = read_json(state_path, {})
    render = lambda overrides: render_template(
        method_template(cfg, spec.method), overrides, **METHODS[spec.method].args,
        delta=spec.name, model_name_or_path=str(cfg.base_model.path), template=cfg.base_model.template,
        dataset_dir=str(run.data), dataset=",".join(spec.datasets), output_dir=str(run.delta(spec.name)),
        seed=cfg.seed, **(hardware or hardware_defaults()),
    )
    rendered = render({**cfg.train.args, **spec.args})
    if spec.merged and cfg.train.lora_init != "shared":
        learning_rate = float(yaml.safe_load(rendered).get("learning_rate", 5e-5))
        init = LORA_INITS[cfg.train.lora_init](cfg.seed, spec.name, learning_rate)
        rendered = render({**cfg.train.args, **spec.args, **init})
    if path.exists() and _sha(path.read_text(encoding="utf-8")) != state.get(spec.name):
        logger.info(f"keeping hand-edited {path} (delete it to go back to the template)")
        text = path.read_text(encoding="utf-8")
        _check_user_yaml(path, text, run.delta(spec.name), yaml.safe_load(rendered))
        return path, text
    atomic_write_text(path, rendered)
    state[spec.name] = _sha(rendered)
    write_json(state_path, state)
    return path, rendered


def _check_user_yaml(path: Path, text: str, output_dir: Path, rendered: dict) -> None:
    try:
        parsed = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({e}); fix it or delete it to re-render from the template") from None
    if not isinstance(parsed, dict) or Path(str(parsed.get("output_dir", ""))) != output_dir:
        raise UserError(f"{path}: output_dir must stay {output_dir} (autollm reads the delta from there)")
    changed = [k for k in OWNED_TRAIN_KEYS if parsed.get(k) != rendered.get(k)]  # data, model, outputs: autollm's
    if changed:
        raise UserError(f"{path}: {changed[0]} must stay {rendered.get(changed[0])!r} (autollm sets it; "
                        f"{OWNED_TRAIN_KEYS[changed[0]]}); undo the edit or delete the file to re-render it")


def chunk_methods(cfg, chunk: str, shape: str) -> list[str]:
    chosen = cfg.train.chunk_methods.get(chunk, cfg.train.methods)
    return AUTO_METHODS[shape] if chosen == "auto" else list(chosen)


def train_all_datasets(cfg, shapes: dict[str, str]) -> list[str]:
    """What train@all trains on: every SFT chunk and every preference chunk prepare gave an SFT view (its chosen
    answers); KTO and pretraining chunks have no SFT form and stay out."""
    info = read_json(cfg.run.dataset_info, {})
    return ([c for c, shape in shapes.items() if shape == "sft"]
            + [sft_view(c) for c, shape in shapes.items() if shape == "preference" and sft_view(c) in info])


def delta_specs(cfg, shapes: dict[str, str]) -> list[DeltaSpec]:
    """One delta per (chunk, method), named <chunk>-<method>, plus train@all (SFT on every chunk it can read).

    A method that does not fit a chunk's data is an error here, before anything trains."""
    specs = []
    for chunk, shape in shapes.items():
        for m in chunk_methods(cfg, chunk, shape):
            if METHODS[m].shape != shape:
                raise UserError(f"train: method {m!r} does not fit chunk {chunk!r}: its data is {SHAPE_WORDS[shape]}, "
                                f"{m} needs {SHAPE_WORDS[METHODS[m].shape]}; set train.chunk_methods.{chunk} "
                                f"(e.g. {AUTO_METHODS[shape]}) or give the chunk such data")
            name = delta_name(chunk, m)
            args = {**cfg.train.method_args.get(m, {}), **cfg.train.chunk_args.get(chunk, {}),
                    **cfg.train.chunk_args.get(name, {})}
            specs.append(DeltaSpec(name, [chunk], m, args, merged=True))
    if cfg.train.train_all and (everything := train_all_datasets(cfg, shapes)):
        specs.append(DeltaSpec(ALL_DELTA, everything, "sft", cfg.train.method_args.get("sft", {})))
    return specs


@dataclass
class TrainingJob:
    """One delta that has to (re)train: its rendered LLaMA-Factory config, what it reads, where it writes."""
    spec: DeltaSpec
    config: Path
    text: str
    fingerprint: str
    out: Path
    model: Path  # base_model.path (the config's model_name_or_path)
    data: list[Path]  # dataset_info.json and the datasets' files (the config's dataset_dir)


RUN_FOLDER = "<run folder>"  # what a delta's fingerprint reads in place of its run folder's path


def config_fingerprints(cfg, text: str, of: Callable[[str], str]) -> list[str]:
    """`of(config text)` twice, the one to record first: with the run folder's own path left out (a run folder copied
    or moved is up to date), then as fingerprinted before that (its path in it: not redone after an upgrade)."""
    return [of(t) for t in (text.replace(str(cfg.run.root), RUN_FOLDER), text)]


def training_job(cfg, spec: DeltaSpec, base_fp: str, force: bool, hardware: dict[str, Any]) -> TrainingJob | None:
    """The job for one delta, or None when it is already trained with the same config text, data and base."""
    cfg_path, text = config_for_delta(cfg, spec, hardware)
    data_files = [cfg.run.split(dataset_file_stem(d)) for d in spec.datasets] + [cfg.run.dataset_info]
    info = read_json(cfg.run.dataset_info, {})
    # the delta's own dataset_info entries, not the whole file: an entry added for another delta retrains nothing
    inputs = (file_digest(data_files[:-1]), {d: info.get(d) for d in spec.datasets}, base_fp)
    fps = config_fingerprints(cfg, text, lambda t: fingerprint(t, *inputs))
    delta_dir = cfg.run.delta(spec.name)
    done = read_json(delta_dir / DONE_MARKER, {})
    if not force and any(is_fresh(done, f, delta_dir / ADAPTER_FILE) for f in fps):
        logger.info(f"delta {spec.name}: up to date, not retrained")
        return None
    return TrainingJob(spec, cfg_path, text, fps[0], delta_dir, Path(cfg.base_model.path), data_files)


def record_trained(job: TrainingJob, seconds: float, where: dict[str, Any] | None = None) -> Path:
    """The done marker, written last: a delta without it is trained again on the next run."""
    if not (job.out / ADAPTER_FILE).exists():
        raise UserError(f"training delta {job.spec.name} wrote no {ADAPTER_FILE} in {job.out}; "
                        f"is finetuning_type lora in {job.config}?")
    write_json(job.out / DONE_MARKER, {"fingerprint": job.fingerprint, "config": str(job.config),
                                       "seconds": round(seconds, 1), **(where or {})})
    return job.out


def run_here(job: TrainingJob, devices: dict[str, str] | None = None) -> Path:
    """`llamafactory-cli train` on this machine, into a fresh folder (LLaMA-Factory would silently resume from
    stale checkpoint-* folders)."""
    shutil.rmtree(job.out, ignore_errors=True)
    seconds = run_llamafactory(job.config, job.out, desc=f"training delta {job.spec.name}", devices=devices)
    return record_trained(job, seconds)


class LocalTrainer:
    """This machine: one training per free device group (one at a time on a CPU)."""

    def __init__(self, cfg):
        self.groups = device_groups(visible_gpus(), cfg.train.gpus_per_delta)

    def hardware(self) -> dict[str, Any]:
        return hardware_defaults()

    def run(self, jobs: list[TrainingJob], keep_going: bool) -> tuple[dict[str, Path], list[str]]:
        if len(self.groups) > 1 and len(jobs) > 1:
            logger.info(f"train: {len(jobs)} deltas on {len(self.groups)} device groups "
                        f"({', '.join(g['CUDA_VISIBLE_DEVICES'] for g in self.groups)})")
        work = {job.spec.name: (lambda devices, job=job: run_here(job, devices or None)) for job in jobs}
        return run_on_devices(work, self.groups, keep_going)


class RayTrainer:
    """A Ray cluster (`cluster:`): every delta a Ray task (cluster.py)."""

    def __init__(self, cfg):
        self.cluster = RayCluster(cfg.cluster, cfg.train.gpus_per_delta)

    def hardware(self) -> dict[str, Any]:
        return self.cluster.hardware()

    def run(self, jobs: list[TrainingJob], keep_going: bool) -> tuple[dict[str, Path], list[str]]:
        return self.cluster.train(jobs, keep_going, record_trained)


TRAINERS = {"local": LocalTrainer, "ray": RayTrainer}


def train_specs(cfg, specs: list[DeltaSpec], force: bool = False, keep_going: bool = False) -> dict[str, Path]:
    """Train every delta not already trained, where the config says (TRAINERS); returns the trained deltas' folders
    in the specs' order. With keep_going a failed delta is reported and left out; the others train."""
    trainer = TRAINERS["ray" if cfg.cluster else "local"](cfg)
    base_fp, hardware = model_fingerprint(cfg.base_model.path), trainer.hardware()
    done, jobs = {}, []
    for spec in specs:
        job = training_job(cfg, spec, base_fp, force, hardware)
        if job is None:
            done[spec.name] = cfg.run.delta(spec.name)
        else:
            jobs.append(job)
    trained, failed = trainer.run(jobs, keep_going) if jobs else ({}, [])
    if failed:
        logger.warning(f"left out (training failed): {', '.join(failed)}; the search uses the other deltas")
    found = {**done, **trained}
    return {s.name: found[s.name] for s in specs if s.name in found}


def train_one(cfg, spec: DeltaSpec, force: bool = False) -> Path:
    """One delta (the shared adapter, train@auto_mix), trained where the others are."""
    return train_specs(cfg, [spec], force)[spec.name]


def train_deltas(cfg, specs: list[DeltaSpec], force: bool = False, keep_going: bool = False) -> dict[str, Path]:
    """Train these deltas (delta_specs) on cfg's base."""
    if not specs:
        return {}
    check_template(cfg.base_model.template, cfg.base_model.path)
    return train_specs(cfg, specs, force, keep_going)
