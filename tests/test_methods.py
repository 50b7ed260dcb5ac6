"""Training methods chosen from the data: shapes detected and checked per chunk, one delta per
(chunk, method), and a real `llamafactory-cli train` run per method (sft, dpo, orpo, simpo, kto, pt)."""
import json
import random

import pytest
import yaml

from autollm_lf.config import RunConfig, TrainConfig
from autollm_lf.data.prepare import prepare
from autollm_lf.errors import UserError
from autollm_lf.train.deltas import delta_specs
from autollm_lf.train.render import render_template


def mixed_rows(n=24, seed=0):
    """Four chunks, one per data shape."""
    rng = random.Random(seed)
    word = lambda: "".join(rng.choice("abcd") for _ in range(rng.randint(2, 4)))
    rows = []
    for i in range(n):
        w = word() + str(i)
        rows.append({"id": i, "task": "qa", "prompt": f"rev {w}", "response": w[::-1]})
        rows.append({"id": 100 + i, "task": "pref", "prompt": f"up {w}", "chosen": w.upper(), "rejected": w})
        rows.append({"id": 200 + i, "task": "judged", "prompt": f"dup {w}", "response": w * 2 if i % 2 else w,
                     "label": bool(i % 2)})
        rows.append({"id": 300 + i, "task": "corpus", "text": f"the word {w} reversed is {w[::-1]}"})
    return rows


def write_source(tmp_path, rows):
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_cfg(tmp_path, path, **train):
    return RunConfig.model_validate({
        "name": "m", "run_dir": str(tmp_path / "runs"), "base_model": {"path": str(tmp_path)},
        "data": {"sources": [{"type": "file", "path": str(path)}], "validation_per_chunk": 3, "test_per_chunk": 3},
        "train": train})


def test_shapes_detected_and_written_for_llamafactory(tmp_path):
    cfg = make_cfg(tmp_path, write_source(tmp_path, mixed_rows()))
    shapes = prepare(cfg)
    assert shapes == {"corpus": "pt", "judged": "kto", "pref": "preference", "qa": "sft"}
    data = cfg.out / "data"
    info = json.loads((data / "dataset_info.json").read_text())
    assert info["pref"]["ranking"] is True
    assert info["pref"]["columns"] == {"prompt": "instruction", "chosen": "chosen", "rejected": "rejected",
                                       "history": "history", "system": "system"}
    assert info["judged"]["columns"]["kto_tag"] == "kto_tag" and "ranking" not in info["judged"]
    assert info["corpus"]["columns"] == {"prompt": "text"}
    kto = json.loads((data / "judged.json").read_text())
    assert {type(r["kto_tag"]) for r in kto} == {bool} and {r["kto_tag"] for r in kto} == {True, False}
    val = json.loads((data / "validation.json").read_text())
    pref_val = [r for r in val if r["chunk"] == "pref"]
    assert all(r["output"] == r["instruction"].split()[1].upper() for r in pref_val)  # chosen is the reference
    judged_val = [r for r in val if r["chunk"] == "judged"]
    assert len(judged_val) == 3 and all(r["output"] == r["instruction"].split()[1] * 2 for r in judged_val)  # desirable
    assert all(r["instruction"] == "" for r in val if r["chunk"] == "corpus")


def test_rows_that_do_not_fit_the_shape_are_named(tmp_path):
    rows = mixed_rows()
    del rows[5]["rejected"]  # a pref row
    with pytest.raises(UserError,
                       match=r"row 5 of file:0 has no rejected \(chunk 'pref' holds prompt with chosen/rejected"):
        prepare(make_cfg(tmp_path, write_source(tmp_path, rows)))
    rows = mixed_rows()
    for r in rows:  # labels as strings are fine ("true"/"false"), anything else is named
        if "label" in r:
            r["label"] = str(r["label"]).lower()
    rows[6]["label"] = "maybe"
    with pytest.raises(UserError, match="row 6 of file:0 has label 'maybe'; use true/false"):
        prepare(make_cfg(tmp_path, write_source(tmp_path, rows)))


def test_delta_per_chunk_and_method_and_misfit_error(tmp_path):
    shapes = {"qa": "sft", "pref": "preference", "judged": "kto", "corpus": "pt"}
    cfg = make_cfg(tmp_path, tmp_path / "x.jsonl", chunk_methods={"pref": ["dpo", "orpo", "simpo"]},
                   method_args={"dpo": {"pref_beta": 0.3}}, chunk_args={"pref-orpo": {"learning_rate": 0.5}})
    specs = {s.name: s for s in delta_specs(cfg, shapes)}
    assert list(specs) == ["qa-sft", "pref-dpo", "pref-orpo", "pref-simpo", "judged-kto", "corpus-pt", "all"]
    assert specs["all"].datasets == ["qa"] and specs["pref-dpo"].args == {"pref_beta": 0.3}
    assert specs["pref-orpo"].args == {"learning_rate": 0.5}
    bad = make_cfg(tmp_path, tmp_path / "x.jsonl", chunk_methods={"qa": ["sft", "kto"]})
    with pytest.raises(UserError, match="method 'kto' does not fit chunk 'qa': its data is prompt/response, kto needs"):
        delta_specs(bad, shapes)


@pytest.mark.parametrize("method,stage,extra", [("dpo", "dpo", {"pref_loss": "sigmoid"}),
                                                ("orpo", "dpo", {"pref_loss": "orpo"}),
                                                ("simpo", "dpo", {"pref_loss": "simpo", "simpo_gamma": 0.5}),
                                                ("kto", "kto", {"kto_chosen_weight": 1.0}),
                                                ("pt", "pt", {}), ("sft", "sft", {})])
def test_templates_per_stage(method, stage, extra):
    from autollm_lf.train.methods import METHODS

    train = TrainConfig()
    template = train.templates.get(method, METHODS[method].template)
    text = render_template(template, {"pref_beta": 0.25}, **METHODS[method].args, delta="d",
                           model_name_or_path="/m", template="default", dataset_dir="/d", dataset="c",
                           output_dir="/o", seed=0, bf16=False, cpu=True)
    cfg = yaml.safe_load(text)
    assert cfg["stage"] == stage and cfg["finetuning_type"] == "lora"
    for k, v in extra.items():
        assert cfg[k] == v
    if stage != "sft" and stage != "pt":
        assert cfg["pref_beta"] == 0.25  # overrides replace the method's default in place


@pytest.mark.slow
def test_every_method_trains_for_real_and_the_search_loads_it(tiny_model, tmp_path, run_autollm):
    path = write_source(tmp_path, mixed_rows())
    cfg = {"name": "methods", "base_model": {"path": str(tiny_model)},
           "data": {"sources": [{"type": "file", "path": str(path)}], "validation_per_chunk": 3, "test_per_chunk": 3},
           "train": {"chunk_methods": {"pref": ["dpo", "orpo", "simpo"]},
                     "method_args": {"pt": {"cutoff_len": 32}},  # PT packs texts into blocks of cutoff_len
                     "args": {"num_train_epochs": 1.0, "per_device_train_batch_size": 4, "logging_steps": 1},
                     "train_all": False, "auto_mix": False},
           "search": {"init_points": 1, "n_iter": 1}}
    run = run_autollm(cfg, tmp_path)
    deltas = ["corpus-pt", "judged-kto", "pref-dpo", "pref-orpo", "pref-simpo", "qa-sft"]
    for d in deltas:
        rendered = yaml.safe_load((run / "configs" / f"{d}.yaml").read_text())
        assert rendered["stage"] == {"pt": "pt", "kto": "kto", "sft": "sft"}.get(d.split("-")[1], "dpo")
        log = [json.loads(l) for l in (run / "deltas" / d / "trainer_log.jsonl").read_text().splitlines()]
        assert log and log[-1]["current_steps"] == log[-1]["total_steps"] > 0
        assert (run / "deltas" / d / "adapter_model.safetensors").exists()
    report = json.loads((run / "report" / "report.json").read_text())
    assert set(report["best"]["weights"]) == set(deltas)
    assert {f"train@{d}" for d in deltas} <= {r["model"] for r in report["rows"]}


def test_messages_column_gives_multi_turn_sft_and_preference(tmp_path):
    rows = []
    for i in range(12):
        convo = [{"role": "system", "content": "be brief"}, {"role": "user", "content": f"hi {i}"},
                 {"role": "assistant", "content": "hello"}, {"role": "user", "content": f"count {i}"}]
        rows.append({"task": "chat", "messages": convo + [{"role": "assistant", "content": str(i)}]})
        pref = [*convo[:-1], {"role": "user", "content": f"pick {i}"}]  # its own prompts: chat keeps training rows
        rows.append({"task": "chatpref", "messages": pref, "chosen": str(i), "rejected": "many"})
    cfg = make_cfg(tmp_path, write_source(tmp_path, rows))
    assert prepare(cfg) == {"chat": "sft", "chatpref": "preference"}
    chat = json.loads((cfg.out / "data" / "chat.json").read_text())
    assert len(chat) == 12 - 6  # (with the same prompts in both chunks, chatpref's held-out ones emptied it)
    assert all(r["history"] == [[r["history"][0][0], "hello"]] and r["system"] == "be brief" for r in chat)
    assert all(r["instruction"].startswith("count ") and r["output"] == r["instruction"].split()[1] for r in chat)
    pref = json.loads((cfg.out / "data" / "chatpref.json").read_text())
    assert all(r["rejected"] == "many" and r["history"][0][1] == "hello" for r in pref)
    bad = [{"task": "chat", "messages": [{"role": "assistant", "content": "x"}]}] * 12
    with pytest.raises(UserError, match="row 0 of file:0: messages must end with a user turn"):
        prepare(make_cfg(tmp_path, write_source(tmp_path, bad)))
