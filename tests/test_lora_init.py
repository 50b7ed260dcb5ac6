"""train.lora_init with the real `llamafactory-cli train`: per_delta gives each delta its own A, frozen_a one A that
training leaves where it started (LoRA+'s B/A ratio), while B learns."""
import pytest
import torch
import yaml
from conftest import autollm, write_config
from safetensors.torch import load_file

pytestmark = pytest.mark.slow


def a_and_b(delta_dir):
    tensors = load_file(str(delta_dir / "adapter_model.safetensors"))
    A = torch.cat([t.flatten() for k, t in sorted(tensors.items()) if "lora_A" in k])
    B = torch.cat([t.flatten() for k, t in sorted(tensors.items()) if "lora_B" in k])
    return A, B


def cosine(x, y):
    return float(torch.nn.functional.cosine_similarity(x, y, dim=0))


@pytest.mark.parametrize("init", ["per_delta", "frozen_a"])
def test_lora_init_on_real_trainings(tiny_model, tmp_path, init):
    cfg = write_config(tmp_path, tiny_model, name=init, baselines=False)
    config = yaml.safe_load(cfg.read_text())
    config["train"]["lora_init"] = init
    cfg.write_text(yaml.safe_dump(config))
    for stage in ("prepare", "train"):
        res = autollm(stage, str(cfg), cwd=tmp_path)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    (A1, B1), (A2, B2) = (a_and_b(tmp_path / "runs" / init / "deltas" / d) for d in ("math-sft", "code-sft"))
    assert B1.abs().max() > 0 and B2.abs().max() > 0 and cosine(B1, B2) < 0.99  # B learned, each its own
    if init == "per_delta":
        assert abs(cosine(A1, A2)) < 0.2  # independent draws
    else:
        assert cosine(A1, A2) > 0.9999  # the same A, barely moved by training
