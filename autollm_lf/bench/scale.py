"""The toy's deltas trained as Ray tasks on a local Ray cluster: one node vs two, vs the ideal."""
from __future__ import annotations

import contextlib
import io
import tempfile
import time
from pathlib import Path

from ..checks import load_config
from ..config import ClusterConfig
from ..fileio import read_json
from ..train.deltas import DONE_MARKER, delta_specs, train_specs


def bench_scale(toy_cfg: Path | None, nodes: int = 2, max_deltas: int | None = None) -> dict:
    """The toy's deltas trained as Ray tasks on a local Ray cluster of 1-CPU nodes: first on one node (one after
    the other: each delta's time, and the serial wall time), then on `nodes` nodes at once; the scheduler's wall
    time vs the ideal serial / nodes. Every training gets one thread, as one CPU slot of a node."""
    import shutil

    import ray
    from ray.cluster_utils import Cluster

    cfg = load_config(toy_cfg) if toy_cfg and toy_cfg.exists() else None
    if cfg is None or not cfg.run.manifest.exists():
        return {"skipped": "run `sh autollm.sh` first (needs the toy's prepared data)"}
    specs = delta_specs(cfg, read_json(cfg.run.manifest)["shapes"])[:max_deltas]
    walls, per_delta = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
        try:
            ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
            for n in (1, nodes):
                while len(ray.nodes()) < n:
                    cluster.add_node(num_cpus=1)
                cluster.wait_for_nodes()
                run_cfg = cfg.model_copy(update={"run_dir": Path(tmp) / f"nodes{n}",
                                                 "cluster": ClusterConfig(address=cluster.address)})
                shutil.copytree(cfg.run.data, run_cfg.run.data)
                with contextlib.redirect_stdout(io.StringIO()):
                    started = time.perf_counter()
                    train_specs(run_cfg, specs, force=True)
                    walls[n] = time.perf_counter() - started
                per_delta[n] = {s.name: read_json(run_cfg.run.delta(s.name) / DONE_MARKER)["seconds"]
                                for s in specs}
        finally:
            ray.shutdown()
            cluster.shutdown()
    ideal = walls[1] / nodes
    return {"deltas": len(specs), "nodes": nodes, "one_delta_seconds": per_delta[1],
            "one_delta_seconds_parallel": per_delta[nodes], "serial_wall_seconds": walls[1],
            "parallel_wall_seconds": walls[nodes], "ideal_seconds": ideal, "efficiency": ideal / walls[nodes]}


def scale_lines(r: dict) -> list[str]:
    if "skipped" in r:
        return ["scale: " + r["skipped"]]
    one = r["one_delta_seconds"]
    return [f"scale: {r['deltas']} deltas as Ray tasks, 1-CPU nodes of a local Ray cluster: one delta "
            f"{min(one.values()):.0f}-{max(one.values()):.0f} s; one node {r['serial_wall_seconds']:.0f} s, "
            f"{r['nodes']} nodes {r['parallel_wall_seconds']:.0f} s vs ideal {r['ideal_seconds']:.0f} s "
            f"(efficiency {r['efficiency']:.0%})"]
