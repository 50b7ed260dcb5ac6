"""A real run killed with SIGKILL during training and again during search loses nothing: finished deltas
are not retrained, no trial is lost, and the final best weights equal an uninterrupted run's."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import write_config

pytestmark = pytest.mark.slow  # real llamafactory-cli runs


def start(cfg, cwd):
    return subprocess.Popen([sys.executable, "-m", "autollm_lf", "run", str(cfg)], cwd=cwd, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def kill_when(proc, condition, timeout=600):
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, f"run ended before it could be killed:\n{proc.stdout.read()[-3000:]}"
        assert time.time() < deadline, "condition never met"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole group: autollm and its llamafactory-cli child
    proc.wait()


def lines(path):
    return path.read_text().splitlines() if path.exists() else []


def test_sigkill_during_training_and_search(tiny_model, tmp_path):
    search = {"init_points": 3, "n_iter": 12}
    ref_dir, kill_dir = tmp_path / "ref", tmp_path / "kill"
    ref_dir.mkdir(), kill_dir.mkdir()
    ref_cfg = write_config(ref_dir, tiny_model, name="r", search=search, baselines=False)
    res = subprocess.run([sys.executable, "-m", "autollm_lf", "run", str(ref_cfg)], cwd=ref_dir, capture_output=True,
                         text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]

    cfg = write_config(kill_dir, tiny_model, name="r", search=search, baselines=False)
    run = kill_dir / "runs" / "r"
    # 1. killed while the second delta trains (the first one, code, has finished)
    kill_when(start(cfg, kill_dir), lambda: (run / "deltas" / "math-sft" / "train.log").exists())
    assert (run / "deltas" / "code-sft" / "autollm_delta.json").exists()
    assert not (run / "deltas" / "math-sft" / "autollm_delta.json").exists()
    code_mtime = (run / "deltas" / "code-sft" / "adapter_model.safetensors").stat().st_mtime_ns
    # 2. killed in the middle of the search
    kill_when(start(cfg, kill_dir), lambda: len(lines(run / "search" / "trials.jsonl")) >= 8)
    logged = [l for l in lines(run / "search" / "trials.jsonl") if l.endswith("}")]
    assert 8 <= len(logged) < 2 + 2 + 1 + 3 + 12
    # 3. finish
    res = subprocess.run([sys.executable, "-m", "autollm_lf", "run", str(cfg)], cwd=kill_dir, capture_output=True,
                         text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "delta code-sft: up to date, not retrained" in res.stdout and "delta math-sft: up to date" in res.stdout
    assert (run / "deltas" / "code-sft" / "adapter_model.safetensors").stat().st_mtime_ns == code_mtime
    final = lines(run / "search" / "trials.jsonl")
    # timings differ, and so do fingerprints (they hash absolute paths): compare everything else
    strip = lambda ls: [{k: v for k, v in json.loads(l).items() if k not in ("eval_seconds", "seconds", "fingerprint")}
                        for l in ls]
    assert strip(final[: len(logged)]) == strip(logged)  # no trial lost or redone
    ref_run = ref_dir / "runs" / "r"
    assert strip(final) == strip(lines(ref_run / "search" / "trials.jsonl"))
    best = json.loads((run / "search" / "best.json").read_text())
    assert best == json.loads((ref_run / "search" / "best.json").read_text())
