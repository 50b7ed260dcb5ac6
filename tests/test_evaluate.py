"""exact_match by teacher forcing must equal what greedy generation actually produces."""
import random

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from autollm_lf.evaluate import ExactMatch, encode_prompt_response


def half_trained(tiny_model, rows, tok):
    """A few optimiser steps on the rows, so greedy decoding gets some right (with EOS) and some wrong."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    pairs = [encode_prompt_response(tok, "default", r["prompt"], r["response"]) for r in rows]
    for step in range(120):
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
    flags = ExactMatch(model, tok, "default", rows, batch_size=7).correct()
    for row, flag in zip(rows, flags):
        ids, target = encode_prompt_response(tok, "default", row["prompt"], row["response"])
        gen = model.generate(torch.tensor([ids]), max_new_tokens=len(target) + 2, do_sample=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()
        assert flag == (gen[: len(target)] == target), row
    assert 0 < sum(flags) < len(flags), flags
