"""Config validation: every error at once, with key paths; the CLI prints them and exits 2 without a traceback."""
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from autollm_lf.checks import load_config
from autollm_lf.errors import UserError

REPO = Path(__file__).resolve().parent.parent

GOOD = {
    "name": "t",
    "base_model": {"path": "m"},
    "data": {"sources": [{"type": "sql", "url": "sqlite:///x.sqlite", "query": "SELECT 1"}]},
}


def write(tmp_path, cfg):
    (tmp_path / "m").mkdir(exist_ok=True)
    (tmp_path / "m" / "config.json").write_text("{}")
    (tmp_path / "x.sqlite").touch()
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def test_missing_model_and_database_reported_together(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = {**GOOD, "base_model": {"path": "no-model"},
           "data": {"sources": [{"type": "sql", "url": "sqlite:///gone.sqlite", "query": "SELECT 1"}]}}
    with pytest.raises(UserError) as e:
        load_config(write(tmp_path, cfg))
    assert "base_model.path:" in str(e.value) and "no config.json" in str(e.value)
    assert "data.sources.0.url: SQLite file" in str(e.value) and "gone.sqlite not found" in str(e.value)


def test_good_config_resolves_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(write(tmp_path, GOOD))
    assert cfg.base_model.path == tmp_path / "m"
    assert cfg.out == tmp_path / "runs" / "t"
    assert cfg.search.bounds == (0.0, 1.0)


def test_all_errors_reported_at_once(tmp_path):
    bad = {**GOOD, "nmae": "typo", "seed": "zero",
           "search": {"bounds": [1.0, 0.0], "n_iter": -1},
           "data": {"sources": [{"type": "sql", "url": "sqlite:///x"}], "chunkby": "task"},
           "evaluation": {"metric": "bleu"}}
    with pytest.raises(UserError) as e:
        load_config(write(tmp_path, bad))
    msg = str(e.value)
    for expected in ["nmae: unknown key", "seed:", "search.bounds: lower bound 1.0 must be below",
                     "search.n_iter:", "data.sources.0.sql.query: required key is missing",
                     "data.chunkby: unknown key"]:
        assert expected in msg, (expected, msg)
    assert len(msg.splitlines()) >= 6


def test_unknown_template_and_metric(tmp_path):
    bad = {**GOOD, "train": {"templates": {"dpo": "nope.yaml.j2"}}}
    with pytest.raises(UserError, match="train.templates.dpo: no template 'nope.yaml.j2'"):
        load_config(write(tmp_path, bad))
    with pytest.raises(UserError, match="unknown metric 'bleu'"):
        load_config(write(tmp_path, {**GOOD, "evaluation": {"metric": "bleu"}}))


@pytest.mark.parametrize("name", ["../escape", "a/b", "", ".hidden"])
def test_run_names_cannot_escape_run_dir(tmp_path, name):
    with pytest.raises(UserError, match="name:"):
        load_config(write(tmp_path, {**GOOD, "name": name}))


def test_cli_validate_exit_codes(tmp_path):
    ok = subprocess.run([sys.executable, "-m", "autollm_lf", "validate", str(write(tmp_path, GOOD))],
                        capture_output=True, text=True, cwd=tmp_path)
    assert ok.returncode == 0 and "ok" in ok.stdout
    bad = write(tmp_path, {**GOOD, "serch": {}})
    res = subprocess.run([sys.executable, "-m", "autollm_lf", "validate", str(bad)], capture_output=True, text=True,
                         cwd=tmp_path)
    assert res.returncode == 2
    assert "serch: unknown key" in res.stderr and "Traceback" not in res.stderr
    missing = subprocess.run([sys.executable, "-m", "autollm_lf", "run", str(tmp_path / "none.yaml")],
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "config file not found" in missing.stderr


def test_unknown_merge_method_and_bad_density(tmp_path):
    with pytest.raises(UserError) as e:
        load_config(write(tmp_path, {**GOOD, "search": {"merge": "tie", "density": 0}}))
    msg = str(e.value)
    assert "search.merge: unknown merge method 'tie'; choose one of auto, linear, ties" in msg
    assert "search.density:" in msg


@pytest.mark.parametrize("example", sorted((REPO / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_example_validates(example, tiny_model, tmp_path, monkeypatch):
    """Every examples/*.yaml loads as written, from a copy of the repository root as the README runs them.

    A clean clone has no data/toy/ yet (the toy run builds it): the copy puts a tiny model there, so the
    examples that serve the toy's base model are checked on a clean clone too."""
    for entry in REPO.iterdir():
        if entry.name != "data":
            (tmp_path / entry.name).symlink_to(entry)
    (tmp_path / "data" / "toy").mkdir(parents=True)
    (tmp_path / "data" / "toy" / "base_model").symlink_to(tiny_model)
    monkeypatch.chdir(tmp_path)
    cfg = load_config(Path("examples") / example.name)
    assert cfg.name and cfg.data.sources


def test_key_value_overrides_as_llamafactory_cli_takes_them(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path, GOOD)
    cfg = load_config(path, overrides=["name=t2", "search.n_iter=7", "search.bounds=[0, 2]",
                                       "cluster.address=auto", "cluster.search_actors=2"])
    assert (cfg.name, cfg.search.n_iter, cfg.search.bounds) == ("t2", 7, (0.0, 2.0))
    assert (cfg.cluster.address, cfg.cluster.search_actors) == ("auto", 2)
    assert yaml.safe_load(path.read_text()) == GOOD  # the file itself is never written
    for bad, message in [("search", "not an override; write KEY=VALUE"), ("name.x=1", "name is not a mapping"),
                         ("search.n_iter=[", "not valid YAML")]:
        with pytest.raises(UserError, match=message):
            load_config(path, overrides=[bad])
    res = subprocess.run([sys.executable, "-m", "autollm_lf", "validate", str(path), "search.n_iter=-1",
                          "cluster.max_retries=x"], capture_output=True, text=True)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "search.n_iter: Input should be greater than or equal to 0" in res.stderr
    assert "cluster.max_retries: Input should be a valid integer" in res.stderr
