"""exact_match by teacher forcing must equal what greedy generation actually produces."""
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from autollm_lf.config import EvaluationConfig
from autollm_lf.evaluate import ExactMatch, NegativeLoss, encode_prompt_response, plan_batches
from autollm_lf.evaluate.metrics import METRICS


def half_trained(tiny_model, rows, tok, steps: int = 120):
    """A few optimiser steps on the rows, so greedy decoding gets some right (with EOS) and some wrong."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    pairs = [encode_prompt_response(tok, "default", r["prompt"], r["response"], system=r.get("system")) for r in rows]
    for step in range(steps):
        p, a = pairs[step % len(pairs)]
        ids = torch.tensor([p + a])
        labels = torch.tensor([[-100] * len(p) + a])
        model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def test_teacher_forced_exact_match_equals_greedy_generation(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    rng = random.Random(0)
    words = ["".join(rng.choice("abcd") for _ in range(rng.randint(2, 5))) for _ in range(40)]
    rows = [{"prompt": w, "response": w[:2]} for w in words]
    model = half_trained(tiny_model, rows[:30], tok)
    flags = ExactMatch(model, tok, "default", rows, EvaluationConfig(batch_size=7)).correct()
    for row, flag in zip(rows, flags):
        ids, target = encode_prompt_response(tok, "default", row["prompt"], row["response"])
        gen = model.generate(torch.tensor([ids]), max_new_tokens=len(target) + 2, do_sample=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()
        assert flag == (gen[: len(target)] == target), row
    assert 0 < sum(flags) < len(flags), flags


def greedy_answers(model, tok, rows):
    out = []
    for r in rows:
        ids, _ = encode_prompt_response(tok, "default", r["prompt"], "")
        gen = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)[0, len(ids):]
        out.append(tok.decode(gen, skip_special_tokens=True).strip())
    return out


GENERATED = [  # metric, its evaluation keys, the verdict on (answer, reference): one row per generated metric
    ("contains", {}, lambda answer, reference: reference in answer),
    ("regex", {"pattern": r"^(\w{2})"},
     lambda answer, reference: answer[:2] == reference and len(answer) >= 2 and answer[:2].isalnum()),
]


@pytest.mark.parametrize("metric,keys,verdict", GENERATED, ids=[g[0] for g in GENERATED])
def test_generated_metrics_agree_with_one_by_one_generation(tiny_model, metric, keys, verdict):
    """Batched, left-padded generate gives the same answers as generating row by row, and each metric's score of a
    row is its verdict on that answer."""
    tok = AutoTokenizer.from_pretrained(tiny_model)
    rows = [{"prompt": p, "response": p[:2]} for p in ["ab", "abcd", "bca", "dddd", "cab", "a"]]
    model = half_trained(tiny_model, rows, tok)
    cfg = EvaluationConfig(metric=metric, batch_size=4, max_new_tokens=8, **keys)
    evaluator = METRICS[metric](model, tok, "default", rows, cfg)
    single = greedy_answers(model, tok, rows)
    assert evaluator.predictions() == single
    scores = evaluator.row_scores()
    assert scores == [float(verdict(s, r["response"])) for r, s in zip(rows, single)]
    assert 0 < sum(scores) < len(rows) or metric != "contains"  # the half-trained model gets some right


def test_numeric_and_python_and_loss(tiny_model, tmp_path, monkeypatch):
    from autollm_lf.evaluate import Numeric

    cfg = EvaluationConfig(metric="numeric", tolerance=0.01)
    assert Numeric.compare(type("N", (), {"cfg": cfg})(), "the answer is 1,234.005", "1234", {})
    assert not Numeric.compare(type("N", (), {"cfg": cfg})(), "about 12", "13", {})
    tok = AutoTokenizer.from_pretrained(tiny_model)
    rows = [{"prompt": "ab", "response": "a"}, {"prompt": "cd", "response": "cdcd"}]
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    (tmp_path / "my_metric.py").write_text("def score(preds, refs, rows):\n"
                                           "    return [len(p) + len(r) for p, r in zip(preds, refs)]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    py = METRICS["python"](model, tok, "default", rows,
                           EvaluationConfig(metric="python", function="my_metric:score", max_new_tokens=3))
    preds = py.predictions()
    assert py.row_scores() == [float(len(p) + len(r["response"])) for p, r in zip(preds, rows)]
    loss = METRICS["loss"](model, tok, "default", rows, EvaluationConfig(metric="loss"))
    ids, target = encode_prompt_response(tok, "default", "cd", "cdcd")
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([ids + target]), labels=torch.tensor([[-100] * len(ids) + target])).loss
    assert abs(loss.row_scores()[1] + ref.item()) < 1e-5


SYSTEM = "You answer with the first two letters of the word, nothing else. " * 4  # ~270 shared tokens


def test_shared_prefix_cache_gives_the_same_scores(tiny_model):
    """Rows sharing a long system prompt: its key/value cache is computed once per pass and reused; per-row
    exact match is identical and the loss equal to 1e-5, compared with a full pass per row."""
    tok = AutoTokenizer.from_pretrained(tiny_model)
    rng = random.Random(1)
    words = ["".join(rng.choice("abcd") for _ in range(rng.randint(2, 6))) for _ in range(30)]
    rows = [{"prompt": w, "response": w[:2], "system": SYSTEM if i % 3 else None} for i, w in enumerate(words)]
    model = half_trained(tiny_model, rows[:20], tok, steps=400)
    cfg = EvaluationConfig(batch_size=8)
    shared, plain = (ExactMatch(model, tok, "default", rows, cfg),
                     ExactMatch(model, tok, "default", rows, cfg, share_prefix=False))
    assert any(len(b.prefix) > 250 for b in shared.batches)
    assert len(shared.prefixes) < sum(bool(b.prefix) for b in shared.batches)  # batches share one copy of it
    assert not any(b.prefix for b in plain.batches)
    assert shared.row_scores() == plain.row_scores()
    assert 0 < sum(shared.row_scores()) < len(rows)
    loss_shared = NegativeLoss(model, tok, "default", rows, cfg).row_scores()
    loss_plain = NegativeLoss(model, tok, "default", rows, cfg, share_prefix=False).row_scores()
    assert torch.allclose(torch.tensor(loss_shared), torch.tensor(loss_plain), atol=1e-5)


def test_sliding_window_model_scores_as_a_plain_pass(tiny_model):
    """A sliding-window cache (Mistral, Gemma 2) keeps only the window: its prefix cannot be shared as a view.
    The loss with the default settings equals the plain pass on a model whose window is shorter than the
    shared system prompt."""
    from transformers import MistralConfig, MistralForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_model)
    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, sliding_window=32, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)).eval()
    systems = [SYSTEM, "Be brief. " + SYSTEM]  # two shared prefixes of different lengths, both past the window
    rows = [{"prompt": w, "response": w[::-1], "system": systems[i % 2]}
            for i, w in enumerate(("abc", "bcd", "cab", "dcba", "ab", "ba", "cc", "dab"))]
    cfg = EvaluationConfig(metric="loss", batch_size=4)
    default, plain = (NegativeLoss(model, tok, "default", rows, cfg),
                      NegativeLoss(model, tok, "default", rows, cfg, share_prefix=False))
    assert torch.allclose(torch.tensor(default.row_scores()), torch.tensor(plain.row_scores()), atol=1e-5)


def test_plan_batches_covers_every_row_once_and_prefers_shared_prefixes():
    rng = random.Random(0)
    system = list(range(50, 90))
    encoded = [((system if i % 2 else []) + [rng.randint(1, 9) for _ in range(rng.randint(2, 9))], [1, 2])
               for i in range(60)]
    by_prompt = sorted(range(60), key=lambda i: encoded[i][0])
    cost, batches = plan_batches(encoded, by_prompt, 16)
    assert sorted(i for b in batches for i in b) == list(range(60))
    assert all(0 < len(b) <= 16 for b in batches)
    assert not any(encoded[b[0]][0][:40] == system and encoded[b[-1]][0][:40] != system for b in batches)
    padded = sum(len(b) * max(len(encoded[i][0]) + 1 for i in b)
                 for b in (by_prompt[s:s + 16] for s in range(0, 60, 16)))
    assert cost < padded


def _tiny(kind: str, tok):
    """A 2-layer model of the given family, random weights, sized for the char tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    families = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
                "qwen3": (Qwen3Config, Qwen3ForCausalLM)}  # qwen3: a norm on the keys before RoPE
    config_cls, model_cls = families[kind]
    torch.manual_seed(0)
    return model_cls(config_cls(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)).eval()


def test_last_layer_runs_only_the_answer_positions(tiny_model):
    """The last layer's MLP sees only the scored (answer) positions, and the scores equal a plain pass (no
    prefix cache, whole last layer, transformers' own masks): exact match row for row, loss to 1e-5, for Llama,
    Qwen2 and Qwen3 (key norm), with sdpa and eager attention, with a shared-prefix cache and without one
    (where the cut layer builds its own causal mask)."""
    tok = AutoTokenizer.from_pretrained(tiny_model)
    rng = random.Random(2)
    rows = [{"prompt": "".join(rng.choice("abcd") for _ in range(rng.randint(2, 9))),
             "response": "ab" * rng.randint(1, 3),
             "system": SYSTEM[: 40 + 10 * (i % 2)]} for i in range(24)]
    for kind, implementation, share in [("llama", "sdpa", True), ("llama", "sdpa", False), ("llama", "eager", True),
                                         ("llama", "eager", False), ("qwen2", "sdpa", True), ("qwen3", "sdpa", False)]:
        model = _tiny(kind, tok)
        model.set_attn_implementation(implementation)
        cfg = EvaluationConfig(metric="loss", batch_size=5)
        cut = NegativeLoss(model, tok, "default", rows, cfg, share_prefix=share)
        whole = NegativeLoss(model, tok, "default", rows, cfg, share_prefix=False, keys_only_prompts=False)
        seen = []
        hook = model.model.layers[-1].mlp.register_forward_hook(
            lambda m, args, out: seen.append(args[0].shape[:2].numel()))
        cut_scores = cut.row_scores()
        hook.remove()
        assert any(b.prefix for b in cut.batches) == share
        scored = sum(b.input_ids.shape[0] * b.scored for b in cut.batches)
        assert sum(seen) == cut.prefixes.numel() + scored, (kind, implementation, share)  # prefix call: whole layer
        assert scored < sum(b.input_ids.numel() for b in cut.batches)
        assert torch.allclose(torch.tensor(cut_scores), torch.tensor(whole.row_scores()),
                              atol=1e-5), (kind, implementation)
        em_cut = ExactMatch(model, tok, "default", rows, cfg, share_prefix=share)
        em_whole = ExactMatch(model, tok, "default", rows, cfg, share_prefix=False, keys_only_prompts=False)
        assert em_cut.row_scores() == em_whole.row_scores()


def test_fast_path_switch_gives_a_plain_pass_with_the_same_scores(tiny_model):
    """evaluation.fast_path: false turns off the prefix cache and the last-layer cut (no hook, no shared prefix,
    no cache); the scores are the fast path's."""
    tok = AutoTokenizer.from_pretrained(tiny_model)
    rows = [{"prompt": f"{c * (i % 5 + 1)}", "response": "ab" * (i % 3 + 1), "system": SYSTEM[:48]}
            for i, c in enumerate("abcdabcdabcd")]
    model = _tiny("llama", tok)
    fast = NegativeLoss(model, tok, "default", rows, EvaluationConfig(metric="loss", batch_size=4))
    plain = NegativeLoss(model, tok, "default", rows, EvaluationConfig(metric="loss", batch_size=4, fast_path=False))
    assert fast.last_layer is not None and any(b.prefix for b in fast.batches)
    assert plain.last_layer is None and not plain.share_prefix and not any(b.prefix for b in plain.batches)
    assert torch.allclose(torch.tensor(fast.row_scores()), torch.tensor(plain.row_scores()), atol=1e-5)


def test_a_logits_budget_gives_the_same_scores_over_vocabulary_slices_or_row_slices(tiny_model, monkeypatch):
    """evaluation.logits_budget: a batch whose logits would exceed it is reduced over vocabulary slices (ChunkedHead:
    the model's own head, column by column) or, where that is not the model's head exactly, in calls of fewer rows;
    exact match is the unsliced one bit for bit, the loss to float rounding."""
    tok = AutoTokenizer.from_pretrained(tiny_model)
    rows = [{"prompt": f"{c * (i % 5 + 1)}", "response": "ab" * (i % 3 + 1), "system": SYSTEM[:48]}
            for i, c in enumerate("abcdabcdabcd")]
    model = _tiny("llama", tok)
    monkeypatch.setattr("autollm_lf.evaluate.logits.MIN_LOGITS_BYTES", 0)  # a tiny model's logits: cut them anyway
    for metric, kind in (("loss", NegativeLoss), ("exact_match", ExactMatch)):
        whole = kind(model, tok, "default", rows, EvaluationConfig(metric=metric, batch_size=6, logits_budget=1.0))
        expected = torch.tensor(whole.row_scores())
        assert max(len(b.index) for b in whole.batches) > 1 and any(b.prefix for b in whole.batches)
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        largest = max(len(b.index) * b.scored for b in whole.batches)  # its logits: a third of the vocabulary
        budget = largest * (model.config.vocab_size // 3) * 4 / weights
        # as checked (here narrow slices differ from the whole matmul by an ulp: row slices), the vocabulary
        # slices taken anyway, and row slices (a head the slices cannot reproduce: a LoRA on lm_head)
        for way in ("checked", "vocabulary", "rows"):
            sliced = kind(model, tok, "default", rows, EvaluationConfig(metric=metric, batch_size=6,
                                                                        logits_budget=budget))
            assert 0 < sliced.columns < model.config.vocab_size // 2  # several vocabulary slices per batch
            if way == "vocabulary":
                sliced.head_checked = sliced.head_ok = True
            if way == "rows":
                sliced.head = None
            scores = torch.tensor(sliced.row_scores())
            if metric == "exact_match" and way != "vocabulary":
                assert torch.equal(scores, expected)
            else:
                torch.testing.assert_close(scores, expected, rtol=0, atol=1e-5)


def test_greedy_tokens_and_label_logprobs_over_slices_equal_the_whole_vocabulary():
    from autollm_lf.evaluate import greedy_tokens, label_logprobs
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 50, generator=g)
    logits[0, 0, 7] = logits[0, 0, 31] = 9.0  # a tie across slices: the lower id, as argmax
    labels = torch.randint(0, 50, (3, 5), generator=g)
    slices = lambda: [(lo, logits[..., lo:lo + 16]) for lo in range(0, 50, 16)]  # noqa: E731
    assert torch.equal(greedy_tokens(slices()), logits.argmax(-1)) and greedy_tokens(slices())[0, 0] == 7
    expected = torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(label_logprobs(slices(), labels), expected)


def test_the_search_frees_the_tokenizer_only_when_its_scorers_need_none(tiny_model, tiny_adapters):
    """Session.release_tokenizer: teacher-forced scorers hold their rows as token ids, so the tokenizer (0.45 GB
    for a 262k vocabulary) is freed before the first trial; a generated metric decodes in every trial: kept."""
    import gc
    import weakref

    from autollm_lf.evaluate import Contains, encode
    from autollm_lf.merge import WeightedDeltas
    from autollm_lf.session import release_tokenizer

    w = WeightedDeltas(tiny_model, tiny_adapters)
    rows = [{"prompt": "ab" * (i % 4 + 1), "response": "ba"} for i in range(6)]
    em = ExactMatch(w.model, w.tokenizer, "default", rows, EvaluationConfig(batch_size=4))
    release_tokenizer(w, [em, Contains(w.model, w.tokenizer, "default", rows, EvaluationConfig(metric="contains"))])
    assert w.held.loaded and em.tokenizer is not None
    freed = weakref.ref(w.tokenizer)
    before = em.row_scores()
    release_tokenizer(w, [em])
    gc.collect()
    assert freed() is None and em.tokenizer is None and not encode._templates
    assert em.row_scores() == before  # trials run on token ids
    assert w.tokenizer.pad_token_id == w.pad_token_id  # loaded again when something needs it (the report)
