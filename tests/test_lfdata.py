"""An existing LLaMA-Factory data directory used as chunks unchanged: alpaca and sharegpt/openai entries,
multi-turn conversations, ranking and kto entries; trained for real with the right method each."""
import json
import random

import pytest
import yaml
from transformers import AutoTokenizer

from autollm_lf.config import RunConfig
from autollm_lf.data.prepare import load_split, prepare
from autollm_lf.evaluate import encode_prompt_response


def make_dataset_dir(root, n=16):
    rng = random.Random(0)
    word = lambda i: "".join(rng.choice("abcd") for _ in range(3)) + str(i)
    root.mkdir()
    alpaca = [{"instruction": f"rev {word(i)}", "input": "", "output": "x" * (i % 3 + 1)} for i in range(n)]
    chat = [{"conversations": [{"from": "human", "value": f"hi {i}"}, {"from": "gpt", "value": "hello"},
                               {"from": "human", "value": f"echo {word(i)}"}, {"from": "gpt", "value": f"e{i}"}]}
            for i in range(n)]
    pref = [{"messages": [{"role": "user", "content": f"a {i}"}, {"role": "assistant", "content": "b"},
                          {"role": "user", "content": f"up {word(i)}"}],
             "chosen": {"role": "assistant", "content": f"UP{i}"}, "rejected": {"role": "assistant", "content": "up"}}
            for i in range(n)]
    alpaca_pref = [{"instruction": f"pick {word(i)}", "chosen": f"good{i}", "rejected": "bad"} for i in range(n)]
    kto = [{"messages": [{"role": "user", "content": f"say {word(i)}"}, {"role": "assistant", "content": f"s{i}"}],
            "label": bool(i % 2)} for i in range(n)]
    files = {"alpaca_sft.json": alpaca, "chat_sft.json": chat, "chat_pref.json": pref, "alpaca_pref.json": alpaca_pref,
             "chat_kto.json": kto}
    for name, rows in files.items():
        (root / name).write_text(json.dumps(rows))
    openai_tags = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}
    info = {
        "alpaca_sft": {"file_name": "alpaca_sft.json"},
        "chat_sft": {"file_name": "chat_sft.json", "formatting": "sharegpt", "columns": {"messages": "conversations"}},
        "chat_pref": {"file_name": "chat_pref.json", "formatting": "sharegpt", "ranking": True,
                      "columns": {"messages": "messages", "chosen": "chosen", "rejected": "rejected"},
                      "tags": openai_tags},
        "alpaca_pref": {"file_name": "alpaca_pref.json", "ranking": True,
                        "columns": {"prompt": "instruction", "chosen": "chosen", "rejected": "rejected"}},
        "chat_kto": {"file_name": "chat_kto.json", "formatting": "sharegpt",
                     "columns": {"messages": "messages", "kto_tag": "label"}, "tags": openai_tags},
        "unused": {"file_name": "nope.json"},
    }
    (root / "dataset_info.json").write_text(json.dumps(info))
    return root, files, info


DATASETS = ["alpaca_sft", "chat_sft", "chat_pref", "alpaca_pref", "chat_kto"]


def test_datasets_become_chunks_in_their_own_format(tmp_path):
    root, files, info = make_dataset_dir(tmp_path / "lf")
    cfg = RunConfig.model_validate({
        "name": "lf", "run_dir": str(tmp_path / "runs"), "base_model": {"path": str(tmp_path)},
        "data": {"sources": [{"type": "llamafactory", "dataset_dir": str(root), "datasets": DATASETS}],
                 "validation_per_chunk": 2, "test_per_chunk": 2}})
    shapes = prepare(cfg)
    assert shapes == {"alpaca_pref": "preference", "alpaca_sft": "sft", "chat_kto": "kto", "chat_pref": "preference",
                      "chat_sft": "sft"}
    data = cfg.out / "data"
    written = json.loads((data / "dataset_info.json").read_text())
    for name in DATASETS:  # the entry is theirs (formatting, columns, tags, ranking), only file_name is ours
        assert written[name] == {**info[name], "file_name": f"{name}.json"}
        records = json.loads((data / f"{name}.json").read_text())
        assert all(r in files[f"{name}.json"] for r in records)  # records unchanged
    assert len(json.loads((data / "chat_sft.json").read_text())) == 16 - 4
    val = {r["chunk"]: r for r in load_split(cfg, "validation")}
    assert val["chat_sft"]["history"] == [{"role": "user", "content": val["chat_sft"]["history"][0]["content"]},
                                          {"role": "assistant", "content": "hello"}]
    assert val["chat_sft"]["prompt"].startswith("echo ") and val["chat_sft"]["response"].startswith("e")
    assert val["chat_pref"]["response"].startswith("UP") and len(val["chat_pref"]["history"]) == 2
    assert val["chat_kto"]["response"].startswith("s")


def test_history_is_encoded_like_llamafactory(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    history = [{"role": "user", "content": "hi 1"}, {"role": "assistant", "content": "hello"}]
    prompt, target = encode_prompt_response(tok, "default", "echo x", "e1", history)
    text = tok.decode(prompt)
    assert "hi 1" in text and "hello" in text and text.rstrip().endswith("Assistant:")
    assert tok.decode(target, skip_special_tokens=True) == "e1"


@pytest.mark.slow
def test_llamafactory_directory_trains_for_real(tiny_model, tmp_path, run_autollm):
    root, _, _ = make_dataset_dir(tmp_path / "lf")
    cfg = {"name": "lfrun", "base_model": {"path": str(tiny_model)},
           "data": {"sources": [{"type": "llamafactory", "dataset_dir": str(root), "datasets": DATASETS}],
                    "validation_per_chunk": 2, "test_per_chunk": 2},
           "train": {"args": {"num_train_epochs": 1.0, "per_device_train_batch_size": 4}, "auto_mix": False},
           "search": {"init_points": 1, "n_iter": 1}}
    run = run_autollm(cfg, tmp_path)
    deltas = ["alpaca_pref-dpo", "alpaca_sft-sft", "chat_kto-kto", "chat_pref-dpo", "chat_sft-sft"]
    for d in deltas:
        assert (run / "deltas" / d / "adapter_model.safetensors").exists(), d
    assert yaml.safe_load((run / "configs" / "all.yaml").read_text())["dataset"] == "alpaca_sft,chat_sft"
    report = json.loads((run / "report" / "report.json").read_text())
    assert set(report["best"]["weights"]) == set(deltas)
