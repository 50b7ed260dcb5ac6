"""Rendering LLaMA-Factory configs, keeping hand edits, and failure reporting (subprocess faked here;
tests/test_e2e.py runs the real llamafactory-cli)."""
import stat
from types import SimpleNamespace

import pytest
import yaml

from autollm_lf.errors import UserError
from autollm_lf.paths import RunDir
from autollm_lf.train import lfcli
from autollm_lf.train.deltas import DeltaSpec, config_for_delta
from autollm_lf.train.lfcli import apply_overrides
from autollm_lf.train.render import render_template


def test_overrides_replace_in_place_and_append_new_keys():
    text = "# comment\nlearning_rate: 1.0e-4\nsave_strategy: \"no\"\n"
    out = apply_overrides(text, {"learning_rate": 0.003, "lora_rank": 16, "save_strategy": "no"})
    assert out.startswith("# comment\nlearning_rate: 0.003\n")
    parsed = yaml.safe_load(out)
    assert parsed == {"learning_rate": 0.003, "save_strategy": "no", "lora_rank": 16}


def test_rendered_template_is_valid_llamafactory_yaml(tmp_path):
    text = render_template("sft_lora.yaml.j2", {"num_train_epochs": 2.0}, delta="d", model_name_or_path="/m",
                           template="default", dataset_dir="/data", dataset="a,b", output_dir="/out/d", seed=3,
                           bf16=False, cpu=True)
    cfg = yaml.safe_load(text)
    assert cfg["stage"] == "sft" and cfg["finetuning_type"] == "lora" and cfg["dataset"] == "a,b"
    assert cfg["save_strategy"] == "no" and cfg["num_train_epochs"] == 2.0 and cfg["seed"] == 3
    assert cfg["disable_gradient_checkpointing"] is True and cfg["bf16"] is False


def fake_cfg(tmp_path, **args):
    return SimpleNamespace(out=tmp_path / "run", run=RunDir(tmp_path / "run"), seed=0,
                           base_model=SimpleNamespace(path=tmp_path / "m", template="default"),
                           train=SimpleNamespace(templates={}, args=args,
                                                 chunk_args={}))


def test_hand_edited_config_is_kept_and_untouched_one_rerendered(tmp_path, capsys):
    spec = DeltaSpec("math", ["math"])
    path, first = config_for_delta(fake_cfg(tmp_path, learning_rate=0.001), spec)
    # not edited: a config change re-renders
    path, second = config_for_delta(fake_cfg(tmp_path, learning_rate=0.002), spec)
    assert "learning_rate: 0.002" in second and path.read_text() == second
    edited = second.replace("lora_rank: 8", "lora_rank: 32")
    path.write_text(edited)
    path, used = config_for_delta(fake_cfg(tmp_path, learning_rate=0.005), spec)
    assert used == edited and path.read_text() == edited
    assert "keeping hand-edited" in capsys.readouterr().out
    path.unlink()  # back to the template
    path, used = config_for_delta(fake_cfg(tmp_path, learning_rate=0.005), spec)
    assert "learning_rate: 0.005" in used and "lora_rank: 8" in used


def test_hand_edit_moving_output_dir_is_refused(tmp_path):
    spec = DeltaSpec("math", ["math"])
    path, text = config_for_delta(fake_cfg(tmp_path), spec)
    path.write_text(text.replace(f"output_dir: {tmp_path / 'run' / 'deltas' / 'math'}", "output_dir: /elsewhere"))
    with pytest.raises(UserError, match="output_dir must stay"):
        config_for_delta(fake_cfg(tmp_path), spec)


def test_failed_training_shows_log_tail(tmp_path, monkeypatch):
    script = tmp_path / "fake-llamafactory-cli"
    script.write_text("#!/bin/sh\necho starting\necho 'ValueError: lora_rank must be positive'\nexit 3\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setattr(lfcli, "llamafactory_cli", lambda: str(script))
    with pytest.raises(UserError) as e:
        lfcli.run_llamafactory(tmp_path / "x.yaml", tmp_path / "out", desc="training delta math")
    assert "training delta math failed (exit 3)" in str(e.value)
    assert "lora_rank must be positive" in str(e.value)
    assert (tmp_path / "out" / "train.log").read_text().startswith("starting")


@pytest.mark.parametrize("init", ["shared", "per_delta", "frozen_a"])
def test_lora_init_sets_its_keys_on_merged_deltas_only(tmp_path, init):
    from autollm_lf.train.deltas import FROZEN_A_RATIO, delta_seed
    cfg = fake_cfg(tmp_path, learning_rate=0.002)
    cfg.train.lora_init = init
    math, code = (yaml.safe_load(config_for_delta(cfg, DeltaSpec(n, [c], merged=True))[1])
                  for n, c in (("math-sft", "math"), ("code-sft", "code")))
    baseline = yaml.safe_load(config_for_delta(cfg, DeltaSpec("all", ["math", "code"]))[1])
    assert baseline["seed"] == 0 and baseline["learning_rate"] == 0.002 and "loraplus_lr_ratio" not in baseline
    if init == "shared":
        assert math["seed"] == code["seed"] == 0 and math["learning_rate"] == 0.002
    elif init == "per_delta":
        assert math["seed"] == delta_seed(0, "math-sft") != code["seed"] == delta_seed(0, "code-sft")
        assert math["learning_rate"] == 0.002
    else:  # one A for all, held still: B's learning rate (lr x ratio) is the configured one
        assert math["seed"] == code["seed"] == 0 and math["loraplus_lr_ratio"] == FROZEN_A_RATIO
        assert math["learning_rate"] * math["loraplus_lr_ratio"] == pytest.approx(0.002)


@pytest.mark.parametrize("value", [1e-07, 2.5e-07, 1e20, 0.003, 3.0, 1.0e-4])
def test_float_overrides_stay_floats_for_pyyaml(value):
    out = apply_overrides("learning_rate: 1.0e-4\n", {"learning_rate": value, "extra": value})
    parsed = yaml.safe_load(out)
    assert parsed == {"learning_rate": value, "extra": value} and isinstance(parsed["extra"], float)


def test_a_run_folder_copied_elsewhere_retrains_nothing(tmp_path):
    """The rendered config names the run folder's absolute paths; a delta's fingerprint reads them as <run folder>,
    so a copied or moved run finds its deltas up to date. A delta whose marker holds the fingerprint of before (the
    paths in it) is up to date too."""
    import shutil

    from autollm_lf.fileio import file_digest, fingerprint, write_json
    from autollm_lf.train.deltas import ADAPTER_FILE, DONE_MARKER, TrainingJob, record_trained, training_job

    def job(root):
        cfg = fake_cfg(root, learning_rate=0.001)
        cfg.base_model.path = tmp_path / "m"  # one base model for both folders
        if not cfg.run.split("math").exists():
            cfg.run.split("math").parent.mkdir(parents=True, exist_ok=True)
            cfg.run.split("math").write_text('[{"instruction": "1+1", "output": "2"}]')
            write_json(cfg.run.dataset_info, {"math": {"file_name": "math.json"}})
        return training_job(cfg, DeltaSpec("math", ["math"]), "base", force=False,
                            hardware={"bf16": False, "cpu": True})

    first = job(tmp_path / "a")
    assert isinstance(first, TrainingJob) and str(tmp_path / "a") in first.text
    first.out.mkdir(parents=True)
    (first.out / ADAPTER_FILE).write_bytes(b"lora")
    record_trained(first, 1.0)
    assert job(tmp_path / "a") is None
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    assert job(tmp_path / "b") is None  # copied: up to date
    (tmp_path / "b" / "run" / "data" / "math.json").write_text('[{"instruction": "1+1", "output": "3"}]')
    assert isinstance(job(tmp_path / "b"), TrainingJob)  # its data changed: trained again
    legacy = fingerprint(first.text, file_digest([first.data[0]]), {"math": {"file_name": "math.json"}}, "base")
    write_json(first.out / DONE_MARKER, {"fingerprint": legacy})  # as fingerprinted before: its own paths in it
    assert job(tmp_path / "a") is None
    write_json(first.out / DONE_MARKER, {"fingerprint": "something else"})
    assert isinstance(job(tmp_path / "a"), TrainingJob)
