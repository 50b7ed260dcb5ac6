"""Evaluation within the model's limits: held-out rows truncated exactly as LLaMA-Factory truncates training rows
(cutoff_len, its supervised processor's rule), truncated rows counted, rows that cannot fit refused by name."""
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from autollm_lf.config import EvaluationConfig
from autollm_lf.errors import UserError
from autollm_lf.evaluate import ExactMatch, NegativeLoss, chat_template, encode_turns

ROWS = [
    {"prompt": "ab", "response": "cd"},                                   # fits
    {"prompt": "x" * 60, "response": "yz"},                               # long prompt: its end is cut
    {"prompt": "q", "response": "r" * 50},                                # long answer: the answer is cut
    {"prompt": "p" * 30, "response": "s" * 30},                           # both cut, in proportion
    {"prompt": "now", "response": "ok", "history": [{"role": "user", "content": "h" * 8},
                                                     {"role": "assistant", "content": "i" * 8}]},
]


def lf_training_ids(tok, row, cutoff_len):
    """What LLaMA-Factory's supervised processor trains on for this row: (input ids, labels)."""
    from llamafactory.data.processor.supervised import SupervisedDatasetProcessor
    from llamafactory.hparams import DataArguments

    template = chat_template(tok, "default")
    processor = SupervisedDatasetProcessor(template, tok, None,
                                           DataArguments(template="default", cutoff_len=cutoff_len))
    messages = list(row.get("history", [])) + [{"role": "user", "content": row["prompt"]}]
    return processor._encode_data_example(messages, [{"role": "assistant", "content": row["response"]}], None, None,
                                          [], [], [])


@pytest.mark.parametrize("cutoff_len", [16, 40, 1000])
def test_truncation_is_llamafactorys(tiny_model, cutoff_len):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    for row in ROWS:
        prompt, target, truncated = encode_turns(tok, "default", row["prompt"], row["response"], row.get("history"),
                                                 None, cutoff_len)
        input_ids, labels = lf_training_ids(tok, row, cutoff_len)
        assert prompt + target == input_ids[:len(prompt) + len(target)], row  # the same tokens, the same cut
        last_target = [t for t, label in zip(input_ids[len(prompt):], labels[len(prompt):]) if label != -100]
        assert target == last_target[:len(target)] and (not target or len(input_ids) <= cutoff_len), row
        assert truncated == (len(input_ids) < len(lf_training_ids(tok, row, 10 ** 6)[0])), row


def test_truncated_rows_counted_and_scored(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    ev = ExactMatch(model, tok, "default", ROWS[:4], EvaluationConfig(batch_size=2, cutoff_len=40))
    assert ev.stats == {"truncated": 3} and len(ev.row_scores()) == 4  # all but the first
    assert len(ev.encoded[0][0]) + len(ev.encoded[0][1]) < 40 and all(len(p) + len(t) <= 40 for p, t in ev.encoded)
    # the loss over the kept answer tokens equals a plain forward on the truncated row
    nll = NegativeLoss(model, tok, "default", ROWS[:4], EvaluationConfig(batch_size=4, cutoff_len=40)).row_scores()
    p, t = ev.encoded[2]
    with torch.no_grad():
        logits = model(torch.tensor([p + t])).logits[0, len(p) - 1:-1]
    assert nll[2] == pytest.approx(-torch.nn.functional.cross_entropy(logits, torch.tensor(t)).item(), abs=1e-5)


def test_never_past_the_models_positions(tiny_model):
    """A prompt longer than the model's 512 positions is cut there even under a larger cutoff_len."""
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    rows = [{"prompt": "a" * 2000, "response": "b"}, {"prompt": "c", "response": "d"}]
    ev = ExactMatch(model, tok, "default", rows, EvaluationConfig(cutoff_len=4096))
    assert ev.cutoff_len == model.config.max_position_embeddings == 512
    assert ev.stats == {"truncated": 1} and max(len(p) + len(t) for p, t in ev.encoded) <= 512
    assert len(ev.row_scores()) == 2


def test_rows_that_cannot_fit_are_refused_by_name(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    long_history = [{"role": "user", "content": "h" * 40}, {"role": "assistant", "content": "i" * 40}]
    rows = [{"prompt": "a", "response": "b", "chunk": "math", "source": "file:0", "row_id": 7},
            {"prompt": "a", "response": "b", "chunk": "math", "source": "file:0", "row_id": 8, "history": long_history}]
    with pytest.raises(UserError) as err:
        ExactMatch(model, tok, "default", rows, EvaluationConfig(cutoff_len=30))
    msg = str(err.value)
    assert "1 held-out row(s) cannot fit in cutoff_len 30" in msg and "file:0 row 8" in msg and "row 7" not in msg
    assert "\n" not in msg
