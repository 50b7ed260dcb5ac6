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


# Killed from inside at a fixed point of the Gram pass: on the tiny model a chunk's Grams take milliseconds, so a
# watcher polling for the first file would race the second. The second chunk's file is cut to half its bytes and
# the process SIGKILLed while it is in the writer's temporary folder, as a kill -9 mid-write leaves it.
KILL_IN_GRAM_PASS = '''
import os, signal, sys
import safetensors.torch
from autollm_lf.cli import main
real, written = safetensors.torch.save_file, []

def save_file(tensors, filename, metadata=None):
    real(tensors, filename, metadata=metadata)
    if "grams" in str(filename) and written:
        os.truncate(filename, os.path.getsize(filename) // 2)
        os.kill(os.getpid(), signal.SIGKILL)
    written.append(filename)

safetensors.torch.save_file = save_file
sys.exit(main(sys.argv[1:]))
'''


def autollm(*args, cwd, script=None):
    command = [sys.executable, str(script)] if script else [sys.executable, "-m", "autollm_lf"]
    return subprocess.run(command + list(args), cwd=cwd, capture_output=True, text=True, timeout=900)


def tensors(path):
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}


def test_sigkill_during_the_gram_pass_resumes_to_the_same_grams_and_best(tiny_model, tmp_path):
    import shutil

    import torch
    cfg = write_config(tmp_path, tiny_model, name="g", search={"merge": "regmean", "init_points": 2, "n_iter": 4},
                       baselines=False)
    for stage in ("prepare", "train", "search"):
        res = autollm(stage, str(cfg), cwd=tmp_path)
        assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "runs" / "g"
    ref = tmp_path / "uninterrupted"
    shutil.move(run / "search", ref)  # the uninterrupted search, put aside: the next one starts from nothing
    grams = sorted(p.name for p in (ref / "grams").glob("*.safetensors"))
    assert len(grams) == 2

    killer = tmp_path / "kill_in_gram_pass.py"
    killer.write_text(KILL_IN_GRAM_PASS)
    res = autollm("search", str(cfg), cwd=tmp_path, script=killer)
    assert res.returncode == -signal.SIGKILL, res.stdout[-2000:] + res.stderr[-2000:]
    folder = run / "search" / "grams"
    done = [p.name for p in folder.glob("*.safetensors")]
    assert len(done) == 1, done  # the first chunk's file is whole, the second's never reached its name
    torn = list(folder.glob(".tmp-*/*"))
    whole = ref / "grams" / torn[0].with_suffix(".safetensors").name
    assert len(torn) == 1 and torn[0].stat().st_size == whole.stat().st_size // 2
    assert not (run / "search" / "trials.jsonl").exists() or not lines(run / "search" / "trials.jsonl")
    first_mtime = (folder / done[0]).stat().st_mtime_ns

    res = autollm("search", str(cfg), cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    recomputed = [g for g in grams if f"Grams of {g.removesuffix('.safetensors')}:" in res.stdout + res.stderr]
    assert recomputed == [g for g in grams if g not in done]  # only the chunk the kill interrupted
    assert (folder / done[0]).stat().st_mtime_ns == first_mtime
    assert not list(folder.glob(".tmp-*"))  # the killed writer's folder is gone
    for name in grams:
        meta, got = tensors(folder / name)
        ref_meta, want = tensors(ref / "grams" / name)
        assert meta == ref_meta and got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want)
    strip = lambda ls: [{k: v for k, v in json.loads(l).items() if k not in ("eval_seconds", "seconds")} for l in ls]
    assert strip(lines(run / "search" / "trials.jsonl")) == strip(lines(ref / "trials.jsonl"))
    assert json.loads((run / "search" / "best.json").read_text()) == json.loads((ref / "best.json").read_text())
