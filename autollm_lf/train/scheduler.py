"""Where trainings run: one delta per free device group on a GPU machine, one at a time on a CPU.

A device group is the environment one training sees (CUDA_VISIBLE_DEVICES, and LLaMA-Factory's torchrun
when a delta gets more than one GPU). On a CPU there is one group with no devices: two torch processes on
two cores run many times slower than one after the other.
"""
from __future__ import annotations

import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from ..errors import UserError
from ..log import get_logger, progress

logger = get_logger(__name__)

SKIPPED = object()  # a job not started because an earlier one failed


def visible_gpus() -> list[str]:
    import torch

    count = torch.cuda.device_count()
    listed = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return listed[:count] if listed else [str(i) for i in range(count)]


def device_groups(gpus: list[str], per_delta: int) -> list[dict[str, str]]:
    """The environments trainings run in at once: GPUs cut into groups of per_delta (a leftover smaller group
    stays idle), or one CPU group."""
    if not gpus:
        return [{}]
    if per_delta > len(gpus):
        raise UserError(f"train.gpus_per_delta: {per_delta} GPUs per delta, but {len(gpus)} are visible; lower it")
    groups = [gpus[i:i + per_delta] for i in range(0, len(gpus) - per_delta + 1, per_delta)]
    torchrun = {"FORCE_TORCHRUN": "1", "NPROC_PER_NODE": str(per_delta)} if per_delta > 1 else {}
    return [{"CUDA_VISIBLE_DEVICES": ",".join(g), **torchrun} for g in groups]


def run_on_devices(jobs: dict[str, Callable[[dict[str, str]], object]], groups: list[dict[str, str]],
                   keep_going: bool) -> tuple[dict[str, object], list[str]]:
    """Run every job (name -> fn(env)) with a free device group; returns (results, failed names). A job that
    fails with a UserError stops the rest unless keep_going (then it is reported and left out)."""
    free: queue.Queue = queue.Queue()
    for group in groups:
        free.put(group)
    stop = threading.Event()  # set by the first failure without keep_going: no training starts after it

    def run(name):
        env = free.get()
        try:
            if stop.is_set():
                return SKIPPED
            return jobs[name](env)
        except UserError:
            if not keep_going:
                stop.set()
            raise
        finally:
            free.put(env)

    results, failed, first_error = {}, [], None
    with ThreadPoolExecutor(max_workers=len(groups)) as pool, \
            progress(total=len(jobs), desc="train", unit="delta", disable=len(jobs) < 2 or None) as bar:
        futures = {name: pool.submit(run, name) for name in jobs}
        for name, future in futures.items():
            try:
                result, error = future.result(), None
            except UserError as e:
                result, error = None, e
            bar.update()
            if error is None and result is not SKIPPED:
                results[name] = result
            elif error is not None and not keep_going:
                first_error = first_error or error
            elif error is not None:
                logger.warning(f"error: {error}")
                failed.append(name)
    if first_error is not None:
        raise first_error
    return results, failed
