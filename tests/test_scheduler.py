"""Trainings across device groups: one delta per free GPU group, one at a time on a CPU, failures kept apart."""
import threading
import time

import pytest

from autollm_lf.errors import UserError
from autollm_lf.train.scheduler import device_groups, run_on_devices


def test_device_groups():
    assert device_groups([], 1) == [{}]  # CPU: one training at a time
    assert device_groups(["0", "1", "2"], 1) == [{"CUDA_VISIBLE_DEVICES": d} for d in "012"]
    assert device_groups(["0", "1", "2", "3", "4"], 2) == [
        {"CUDA_VISIBLE_DEVICES": "0,1", "FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "2"},
        {"CUDA_VISIBLE_DEVICES": "2,3", "FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "2"}]
    with pytest.raises(UserError, match="train.gpus_per_delta: 4 GPUs per delta, but 2 are visible"):
        device_groups(["0", "1"], 4)


def recording_jobs(names, fail=(), seconds=0.05):
    running, peak, seen, lock = set(), [0], {}, threading.Lock()

    def job(name):
        def run(env):
            with lock:
                running.add(name)
                peak[0] = max(peak[0], len(running))
                seen[name] = env.get("CUDA_VISIBLE_DEVICES")
            time.sleep(seconds)
            with lock:
                running.discard(name)
            if name in fail:
                raise UserError(f"training delta {name} failed")
            return f"deltas/{name}"
        return run
    return {n: job(n) for n in names}, peak, seen


def test_one_delta_per_free_gpu_and_never_two_on_one():
    jobs, peak, seen = recording_jobs([f"d{i}" for i in range(6)])
    results, failed = run_on_devices(jobs, device_groups(["0", "1"], 1), keep_going=False)
    assert results == {n: f"deltas/{n}" for n in jobs} and failed == []
    assert peak[0] == 2 and set(seen.values()) == {"0", "1"}


def test_cpu_runs_one_at_a_time():
    jobs, peak, _ = recording_jobs(["a", "b", "c"])
    run_on_devices(jobs, device_groups([], 1), keep_going=False)
    assert peak[0] == 1


def test_keep_going_trains_the_others_and_a_failure_otherwise_stops_new_ones():
    jobs, _, seen = recording_jobs(["a", "b", "c", "d"], fail={"b"})
    results, failed = run_on_devices(jobs, device_groups(["0", "1"], 1), keep_going=True)
    assert failed == ["b"] and set(results) == {"a", "c", "d"}
    jobs, _, seen = recording_jobs(["a", "b", "c", "d"], fail={"b"})
    with pytest.raises(UserError, match="training delta b failed"):
        run_on_devices(jobs, device_groups([], 1), keep_going=False)
    assert set(seen) == {"a", "b"}  # on one device nothing starts after the failure
