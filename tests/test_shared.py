"""train.shared: a shared adapter trained on a few rows of every chunk, merged into the base with the real
`llamafactory-cli export`; the deltas, train@all and the search start from that base."""
import json

import pytest
import yaml
from conftest import autollm, write_config

from autollm_lf.checks import load_config
from autollm_lf.data.prepare import prepare
from autollm_lf.session import adapter_score


def test_prepare_writes_a_seeded_sample_of_every_chunk(tiny_model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write_config(tmp_path, tiny_model, name="sh")
    raw = yaml.safe_load(path.read_text())
    raw["train"]["shared"] = {"rows_per_chunk": 3}
    path.write_text(yaml.safe_dump(raw))
    cfg = load_config(path)
    prepare(cfg)
    data = cfg.run.data
    shared = json.loads((data / "_shared.json").read_text())
    assert sorted(r["chunk"] for r in shared) == ["code"] * 3 + ["math"] * 3
    train = {c: {r["instruction"] for r in json.loads((data / f"{c}.json").read_text())} for c in ("code", "math")}
    assert all(r["instruction"] in train[r["chunk"]] and r["output"] for r in shared)  # training rows only
    info = json.loads((data / "dataset_info.json").read_text())
    assert info["_shared"]["file_name"] == "_shared.json"
    first = (data / "_shared.json").read_text()
    prepare(cfg)
    assert (data / "_shared.json").read_text() == first  # seeded: the same sample again


@pytest.mark.slow
def test_shared_base_is_trained_merged_and_every_delta_starts_from_it(tiny_model, tmp_path, monkeypatch):
    path = write_config(tmp_path, tiny_model, name="sh")
    raw = yaml.safe_load(path.read_text())
    raw["train"]["shared"] = {"rows_per_chunk": 4, "args": {"num_train_epochs": 2.0}}
    raw["train"]["auto_mix"] = False
    path.write_text(yaml.safe_dump(raw))
    res = autollm("run", str(path), cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    run = tmp_path / "runs" / "sh"
    base = run / "shared_base"
    assert (base / "config.json").is_file() and (run / "deltas" / "_shared" / "adapter_model.safetensors").is_file()
    assert json.loads((run / "deltas" / "_shared" / "adapter_config.json").read_text())[
        "base_model_name_or_path"] == str(tiny_model)
    rendered = yaml.safe_load((run / "configs" / "_shared.yaml").read_text())
    assert rendered["dataset"] == "_shared" and rendered["num_train_epochs"] == 2.0
    for delta in ("math-sft", "code-sft"):
        adapter_cfg = json.loads((run / "deltas" / delta / "adapter_config.json").read_text())
        assert adapter_cfg["base_model_name_or_path"] == str(base), delta
    # the yardstick a user would train: train@all from the configured model, not from the shared base
    assert json.loads((run / "deltas" / "all" / "adapter_config.json").read_text())[
        "base_model_name_or_path"] == str(tiny_model)
    assert yaml.safe_load((run / "export.yaml").read_text())["model_name_or_path"] == str(base)
    assert "shared adapter (4 training rows of every chunk)" in (run / "report" / "report.md").read_text()
    report = json.loads((run / "report" / "report.json").read_text())
    rows = {r["model"]: r for r in report["rows"]}
    assert list(rows)[:3] == ["raw", "train@all", "shared_base"]
    shared_seconds = json.loads((run / "deltas" / "_shared" / "autollm_delta.json").read_text())["seconds"]
    assert rows["shared_base"]["seconds"] == shared_seconds > 0 and rows["raw"]["seconds"] == 0
    # raw is the configured model: scored as a user loads it, it is what the plain model scores
    monkeypatch.chdir(tmp_path)  # the config's run_dir is relative, as a user writes it
    cfg = load_config(path)
    assert rows["raw"]["test"] == pytest.approx(adapter_score(cfg, None, "test").score())
    assert rows["train@all"]["test"] == pytest.approx(adapter_score(cfg, run / "deltas" / "all", "test").score())

    again = autollm("run", str(path), cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"shared base: {base} up to date" in again.stdout
    assert again.stdout.count("up to date, not retrained") == 4  # _shared, two deltas, train@all
