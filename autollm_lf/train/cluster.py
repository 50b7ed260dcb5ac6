"""`cluster:`: the run on a Ray cluster. Every delta a Ray task; the search's trials on K Ray actors.

No shared filesystem is assumed. A training task gets its rendered config, its datasets and the base model
through Ray's object store (the base put once per stage), runs the real `llamafactory-cli train` in a temporary
folder on its node and returns the adapter and logs, which the driver writes into runs/<name>/deltas/. A task
lost with its node or worker is run again (`cluster.max_retries`, Ray's own retries). The driver's run dir
stays the one record: a delta is done when its marker is written there, so a killed driver resumes as ever.
Where `cluster.storage` is a folder every node mounts at the same path and it holds the base model and the
run dir, nothing is shipped: the task reads and writes in place.

Search actors read the base model and deltas in place: on the driver's node, or on any node when both are
under `cluster.storage`.
"""
from __future__ import annotations

import json
import logging
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Protocol

import yaml

from ..errors import UserError
from ..log import get_logger
from .lfcli import apply_overrides, run_llamafactory

logger = get_logger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
SKIP_BACK = ("checkpoint-",)  # LLaMA-Factory's intermediate checkpoints stay on the node


class Job(Protocol):  # deltas.TrainingJob, as far as this module reads it
    spec: Any
    config: Path
    text: str
    out: Path
    model: Path
    data: list[Path]


def connect(address: str) -> None:
    """ray.init once per process: `local` starts Ray here, anything else joins that cluster."""
    try:
        import ray
    except ImportError:
        raise UserError("cluster: Ray is not installed; pip install 'autollm-lf[cluster]' (or remove cluster:)") \
            from None

    if ray.is_initialized():
        return
    try:
        ray.init(address=None if address == "local" else address, logging_level=logging.ERROR,
                 include_dashboard=False if address == "local" else None, log_to_driver=True)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise UserError(f"cluster.address: no Ray cluster at {address!r} ({str(e).splitlines()[0]}); start one "
                        f"with `ray start --head` or write `address: local`") from None


def under(path: Path, storage: Path | None) -> bool:
    return storage is not None and Path(path).resolve().is_relative_to(storage)


# ---- files through the object store ------------------------------------------------------------------------

def pack(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, bytes]:
    """Every file below `folder` by relative path (those under a top-level folder starting with `skip` left out)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*"))
            if p.is_file() and not p.relative_to(folder).parts[0].startswith(skip or ("\0",))}


def unpack(files: dict[str, bytes], folder: Path) -> None:
    for rel, data in files.items():
        target = folder / rel
        if not target.resolve().is_relative_to(folder.resolve()):  # a name with .. never leaves the folder
            raise UserError(f"refusing to write {rel!r} outside {folder}")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)


def train_task(name: str, config_text: str, model: dict[str, bytes] | None, data: dict[str, bytes],
               devices: dict[str, str], in_place: Path | None) -> dict[str, Any]:
    """Runs on a cluster node: one `llamafactory-cli train`. In place (shared storage) it runs the config as it is;
    otherwise in a temporary folder with the shipped model and data, returning the output's files. A failed
    training returns its error and logs instead of raising, so the driver keeps the log."""
    import ray

    node = {"node": socket.gethostname(), "node_id": ray.get_runtime_context().get_node_id()}
    if in_place is not None:
        try:
            seconds = run_llamafactory(in_place, _output_dir(config_text), desc=f"training delta {name}",
                                       devices=devices)
        except UserError as e:
            return {**node, "error": str(e)}
        return {**node, "seconds": seconds}
    work = Path(tempfile.mkdtemp(prefix=f"autollm-{name}-"))
    try:
        overrides = {"dataset_dir": str(work / "data"), "output_dir": str(work / "out")}
        if model is not None:
            unpack(model, work / "model")
            overrides["model_name_or_path"] = str(work / "model")
        unpack(data, work / "data")
        config = work / "train.yaml"
        config.write_text(apply_overrides(config_text, overrides), encoding="utf-8")
        try:
            seconds = run_llamafactory(config, work / "out", desc=f"training delta {name}", devices=devices)
        except UserError as e:
            return {**node, "error": str(e).replace(str(work / "out"), "{out}"),
                    "files": pack(work / "out", SKIP_BACK)}
        return {**node, "seconds": seconds, "files": pack(work / "out", SKIP_BACK)}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _output_dir(config_text: str) -> Path:
    return Path(yaml.safe_load(config_text)["output_dir"])


def bring_back(job: Job, files: dict[str, bytes]) -> None:
    """The task's output into the job's delta folder, whole or not at all. The adapter names the base model as
    the driver's config does (it was trained on a shipped copy of it)."""
    incoming = job.out.with_name(job.out.name + ".incoming")
    shutil.rmtree(incoming, ignore_errors=True)
    unpack(files, incoming)
    adapter_config = incoming / ADAPTER_CONFIG
    if adapter_config.is_file():
        settings = json.loads(adapter_config.read_text(encoding="utf-8"))
        settings["base_model_name_or_path"] = str(yaml.safe_load(job.text)["model_name_or_path"])
        adapter_config.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    shutil.rmtree(job.out, ignore_errors=True)
    incoming.rename(job.out)


class RayCluster:
    def __init__(self, settings, gpus_per_delta: int = 1):
        import ray

        self.settings, self.gpus_per_delta = settings, gpus_per_delta
        connect(settings.address)
        self.has_gpus = ray.cluster_resources().get("GPU", 0.0) > 0  # asked once per stage, not per task

    def hardware(self) -> dict[str, Any]:
        """What the rendered configs say about the hardware: the cluster's, not the driver's."""
        return {"bf16": self.has_gpus, "cpu": not self.has_gpus}

    def _in_place(self, job: Job) -> bool:
        storage = self.settings.storage
        return under(job.model, storage) and under(job.out, storage) and all(under(p, storage) for p in job.data)

    def _submit(self, job: Job, models: dict[Path, Any]):
        import ray

        s, gpus = self.settings, self.gpus_per_delta if self.has_gpus else 0
        task = ray.remote(train_task).options(num_cpus=s.cpus_per_delta, num_gpus=gpus, max_retries=s.max_retries,
                                              retry_exceptions=False, name=f"train {job.spec.name}")
        devices = {"FORCE_TORCHRUN": "1", "NPROC_PER_NODE": str(gpus)} if gpus > 1 else {}
        if self._in_place(job):  # a fresh folder, as run_here makes
            shutil.rmtree(job.out, ignore_errors=True)
            job.out.mkdir(parents=True)
            return task.remote(job.spec.name, job.text, None, {}, devices, Path(job.config).resolve())
        if job.model not in models:  # once per base model: every task of this stage reads the same object
            models[job.model] = None if under(job.model, s.storage) else ray.put(pack(job.model))
        data = {p.name: p.read_bytes() for p in job.data}
        return task.remote(job.spec.name, job.text, models[job.model], data, devices, None)

    def train(self, jobs: list[Job], keep_going: bool,
              record: Callable[[Job, float, dict], Path]) -> tuple[dict[str, Path], list[str]]:
        """Every job a Ray task at once, the largest (by data) first; Ray places them as CPUs and GPUs free up.
        Results are recorded as they come. A failed training stops the others unless keep_going (then it is
        reported and left out)."""
        import ray

        resources = ray.cluster_resources()
        nodes = sum(1 for n in ray.nodes() if n["Alive"])
        logger.info(f"train: {len(jobs)} deltas as Ray tasks on {nodes} node(s), "
                    f"{resources.get('CPU', 0):g} CPUs, {resources.get('GPU', 0):g} GPUs: "
                    + ", ".join(job.spec.name for job in jobs))
        models: dict[Path, Any] = {}
        # the largest trainings first (train@all), so no long one starts last while the other nodes sit idle
        by_size = sorted(jobs, key=lambda job: -sum(p.stat().st_size for p in job.data))
        running = {self._submit(job, models): job for job in by_size}
        done, failed = {}, []
        while running:
            [ref], _ = ray.wait(list(running), num_returns=1)
            job = running.pop(ref)
            try:
                result = self._outcome(job, ref)
            except UserError as e:
                if not keep_going:
                    for other in running:
                        ray.cancel(other, force=True)
                    raise
                logger.info(f"error: {e}")
                failed.append(job.spec.name)
                continue
            where = {"node": result["node"], "node_id": result["node_id"]}
            done[job.spec.name] = record(job, result["seconds"], where)
            logger.info(f"delta {job.spec.name}: trained on {result['node']} ({result['node_id'][:8]}) in "
                        f"{result['seconds']:.0f} s")
        return done, failed

    def _outcome(self, job: Job, ref) -> dict[str, Any]:
        """The task's result with its files written into the delta folder; a UserError for a failed or lost one."""
        import ray

        try:
            result = ray.get(ref)
        except ray.exceptions.RayTaskError as e:
            raise UserError(f"training delta {job.spec.name} failed on the cluster: {e.cause}") from None
        except ray.exceptions.RayError as e:
            raise UserError(f"training delta {job.spec.name} was lost on the cluster "
                            f"({type(e).__name__}, after {self.settings.max_retries} retries); "
                            f"run again to retrain it, or raise cluster.max_retries") from None
        if "files" in result:
            bring_back(job, result["files"])
        if "error" in result:
            raise UserError(result["error"].replace("{out}", str(job.out)))
        return result


# ---- the search: K actors, each holding the base model and every delta once ------------------------------

class TrialActor:
    """One search worker: `make_scorer(*args)` builds the validation scorer once (the model loaded once)."""

    def __init__(self, make_scorer: Callable[..., Callable[[dict], dict]], *args):
        self.scorer = make_scorer(*args)

    def node(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def score(self, weights: dict[str, float]) -> tuple[dict, float]:
        started = time.perf_counter()
        return self.scorer(weights), time.perf_counter() - started


class TrialPool:
    """K Ray actors scoring trials side by side: `map(points)` scores up to K points at once, in order."""

    def __init__(self, settings, make_scorer: Callable, args: tuple, reads: list[Path]):
        import ray

        connect(settings.address)
        self.size = settings.search_actors
        gpus = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
        actor = ray.remote(TrialActor).options(num_cpus=settings.cpus_per_actor, num_gpus=gpus,
                                               **self._placement(settings, reads, gpus))
        self.actors = [actor.remote(make_scorer, *args) for _ in range(self.size)]
        nodes = set(self._get([a.node.remote() for a in self.actors]))  # every actor has loaded the model
        logger.info(f"search: {self.size} trials at once on Ray actors ({len(nodes)} node{'s' * (len(nodes) > 1)})")

    def _placement(self, settings, reads: list[Path], gpus: int) -> dict[str, Any]:
        """Anywhere when every file the actors read is on cluster.storage; else on the driver's node, which must
        hold all K of them (or they would wait for resources for ever)."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        if all(under(p, settings.storage) for p in reads):
            return {}
        here = ray.get_runtime_context().get_node_id()
        have = next(n["Resources"] for n in ray.nodes() if n["NodeID"] == here and n["Alive"])
        need = {"CPU": settings.cpus_per_actor * self.size, "GPU": gpus * self.size}
        short = [f"{need[k]:g} {k}s (it has {have.get(k, 0):g})" for k in need if need[k] > have.get(k, 0)]
        if short:
            raise UserError(f"cluster.search_actors: {self.size} actors on this node need {' and '.join(short)}; "
                            f"the actors read {', '.join(map(str, reads))} in place, so they run here unless "
                            f"cluster.storage (mounted on every node) holds them; lower search_actors or set storage")
        return {"scheduling_strategy": NodeAffinitySchedulingStrategy(here, soft=False)}

    def map(self, points: list[dict]) -> list[tuple[dict, float]]:
        return self._get([self.actors[i % self.size].score.remote(w) for i, w in enumerate(points)])

    @staticmethod
    def _get(refs: list) -> list:
        import ray

        try:
            return ray.get(refs)
        except ray.exceptions.RayTaskError as e:
            raise (e.cause if isinstance(e.cause, UserError) else UserError(f"search trial failed: {e.cause}")) \
                from None
        except ray.exceptions.RayError as e:
            raise UserError(f"search: a Ray actor was lost ({type(e).__name__}); run again to continue the "
                            f"search from its log") from None

    def close(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
