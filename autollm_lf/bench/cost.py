"""What a search trial costs: setting weights in place vs the AutoLLM-style reload, every apply mode and merge
method against a plain pass, and a search process's peak memory (probe.py, run in a process of its own)."""
from __future__ import annotations

import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..merge import WeightedDeltas, delta_weight
from ..models.tiny import build_char_tokenizer

SHAPES = {  # Qwen2-0.5B's dimensions; `quick` is for the test of this command
    "0.5B": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "quick": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=256, tie_word_embeddings=True),
}


TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def timed(fn, repeats: int = 3) -> float:
    """Median wall time of fn()."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def build_model(root: Path, shape: dict) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM


    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(max_position_embeddings=512, **shape))
    model.save_pretrained(root / "base")
    build_char_tokenizer().save_pretrained(root / "base")
    return root / "base"


def build_adapters(base: Path, root: Path, n: int, rank: int = 16) -> dict[str, Path]:
    """n random rank-`rank` LoRA deltas on every linear module (non-zero B)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, init_lora_weights=False))
    out = {}
    for i in range(n):
        torch.manual_seed(100 + i)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.normal_(0, 0.02)
        model.save_pretrained(root / f"d{i}")
        out[f"d{i}"] = root / f"d{i}"
    return out


def reload_trial(weighted, weights: dict, base: Path, tmp: Path):
    """The AutoLLM-style trial: W0 + sum w_i dW_i into a state dict, save_pretrained, reload."""
    from transformers import AutoModelForCausalLM


    plain = AutoModelForCausalLM.from_pretrained(base)
    state = plain.state_dict()
    for name, module in weighted.model.named_modules():
        if hasattr(module, "lora_A") and weighted.names[0] in module.lora_A:
            key = name.removeprefix("base_model.model.") + ".weight"
            for d in weighted.names:
                state[key] += weights[d] * delta_weight(module.lora_A[d].weight, module.lora_B[d].weight,
                                                        weighted.bank.unit_scaling[0][d])
    plain.load_state_dict(state)
    plain.save_pretrained(tmp / "merged")
    return AutoModelForCausalLM.from_pretrained(tmp / "merged").eval()


def forward_pass(model, ids):
    import torch
    with torch.no_grad():
        model(input_ids=ids)


MERGE_BENCH = ("ties", "dare_ties", "dare_linear")  # linear is measured as `cat` and `fold`


def trial_costs(base: Path, adapters: dict[str, Path], ids, plain, repeats: int, density: float = 0.5) -> dict:
    """One loaded model per delta count; each way of applying weights is timed on it in turn. The evaluation
    pass is timed in quarters, each followed by the same quarter on the plain model, and the ratio is the sum
    over the quarters: pass times on a shared 2-core machine drift by 15-30% over minutes, and a quarter and
    its plain twin, a second or two apart, drift together."""

    w = WeightedDeltas(base, adapters, mode="cat")
    rng = random.Random(0)
    weights = lambda: {n: rng.uniform(0, 1) for n in w.names}
    # linear: the goals are on these two
    ways = [("cat", lambda: w.use_mode("cat"), 5, repeats), ("fold", lambda: w.use_mode("fold"), 3, repeats)]
    ways += [(m, lambda m=m: w.use_method(m, density), 1, 1) for m in MERGE_BENCH]
    quarters = ids.split(max(1, ids.shape[0] // 4))
    result = {}
    for name, use, apply_repeats, rounds in ways:
        use()
        first = timed(lambda: w.set_weights(weights()), repeats=1)  # ties: includes trimming each delta once
        apply = timed(lambda: w.set_weights(weights()), repeats=apply_repeats)
        forward_pass(w.model, quarters[0])  # warm-up: a search runs many trials in one mode
        trial_pass = plain_pass = 0.0
        for _ in range(rounds):
            for part in quarters:
                trial_pass += timed(lambda: forward_pass(w.model, part), 1) / rounds
                plain_pass += timed(lambda: forward_pass(plain, part), 1) / rounds
        result[name] = {"apply_seconds": apply, "first_apply_seconds": first, "pass_seconds": trial_pass,
                        "plain_pass_seconds": plain_pass, "trial_vs_plain": (apply + trial_pass) / plain_pass,
                        "merge_fraction": apply / trial_pass}
    best = min(("cat", "fold"), key=lambda m: result[m]["trial_vs_plain"])  # what search.apply: auto keeps
    result["linear"] = {**result[best], "picked": best}
    return result


def bench_merge(shape_name: str, repeats: int) -> dict:
    import torch

    shape = SHAPES[shape_name]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = build_model(tmp, shape)
        adapters16 = build_adapters(base, tmp / "adapters", 16)
        adapters4 = {k: adapters16[k] for k in list(adapters16)[:4]}
        ids = torch.randint(0, shape["vocab_size"], (16, 64), generator=torch.Generator().manual_seed(0))

        weighted = WeightedDeltas(base, adapters4, mode="cat")
        weights = {n: 0.3 + 0.1 * i for i, n in enumerate(weighted.names)}
        ours = timed(lambda: weighted.set_weights(weights), repeats=5)
        reloaded = {}
        reload = timed(lambda: reloaded.setdefault("m", reload_trial(weighted, weights, base, tmp)), repeats=1)
        plain = reloaded["m"]
        plain_pass = timed(lambda: forward_pass(plain, ids), repeats)
        weighted.set_weights(weights)
        with torch.no_grad():  # the in-place model and the reloaded merged model agree
            max_diff = (weighted.model(input_ids=ids[:2]).logits - plain(input_ids=ids[:2]).logits).abs().max().item()
        weighted = reloaded = None  # free the in-place model before the next part; the plain one stays, for the ratios
        costs = {n: trial_costs(base, a, ids, plain, repeats) for n, a in (("4", adapters4), ("16", adapters16))}
        plain = None
        size = sum(p.stat().st_size for p in tmp.rglob("*.safetensors") if "d" not in p.parent.name or
                   p.parent.name in adapters4)
        memory = {mode: search_process_rss(base, adapters4, mode) for mode in ("auto", "fold")}
    return {
        "shape": shape_name, "eval_batch": "16x64 tokens",
        "overhead_seconds_ours": ours, "overhead_seconds_reload": reload,
        "overhead_ratio": reload / max(ours, 1e-9),
        "trial_seconds_ours": ours + costs["4"]["cat"]["pass_seconds"], "trial_seconds_reload": reload + plain_pass,
        "plain_pass_seconds": plain_pass, "max_logit_diff_in_place_vs_reload": max_diff,
        "plain_pass_seconds_range": [min(c["plain_pass_seconds"] for m in costs.values() for c in m.values()),
                                     max(c["plain_pass_seconds"] for m in costs.values() for c in m.values())],
        "trial_vs_plain": {f"{n}_deltas": {mode: round(c["trial_vs_plain"], 3) for mode, c in modes.items()}
                           for n, modes in costs.items()},
        "merge_fraction": {f"{n}_deltas": {mode: round(c["merge_fraction"], 3) for mode, c in modes.items()}
                           for n, modes in costs.items()},
        "linear_picked": {f"{n}_deltas": modes["linear"]["picked"] for n, modes in costs.items()},
        "density": 0.5,
        "detail": costs,
        "search_memory": memory, "base_plus_4_adapters_mb": size / 2**20,
        "search_memory_ratio": {mode: m["model_mb"] / (size / 2**20) for mode, m in memory.items()},
    }


def search_process_rss(base: Path, adapters: dict[str, Path], mode: str, *overrides: str) -> dict:
    """Peak RSS (MB) of a process that does what a search does (load once, pick the apply mode, trials with a
    teacher-forced evaluation), and the RSS of its runtime before any model was loaded."""
    out = subprocess.run([sys.executable, "-m", "autollm_lf.bench.probe", str(base),
                          json.dumps({k: str(v) for k, v in adapters.items()}), mode, *overrides],
                         capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return {**result, "model_mb": result["peak_mb"] - result["runtime_mb"]}


def merge_lines(m: dict) -> list[str]:
    lines = [f"trial overhead: in place {m['overhead_seconds_ours']:.4f}s "
             f"vs reload {m['overhead_seconds_reload']:.2f}s = {m['overhead_ratio']:.0f}x",
             f"whole trial:    in place {m['trial_seconds_ours']:.2f}s vs reload {m['trial_seconds_reload']:.2f}s "
             f"(plain pass {m['plain_pass_seconds']:.2f}s; the same plain pass took "
             f"{m['plain_pass_seconds_range'][0]:.2f}-{m['plain_pass_seconds_range'][1]:.2f}s over this run)",
             f"trial / plain pass (merge fraction = apply / pass), ties and dare at density {m['density']}:"]
    for n, modes in m["trial_vs_plain"].items():
        lines.append(f"  {n:<10} " + ", ".join(f"{k} {v:.3f}x ({m['merge_fraction'][n][k]:.2f})"
                                               for k, v in modes.items() if k != "linear")
                     + f"; linear = {m['linear_picked'][n]}")
    for mode, mem in m["search_memory"].items():
        lines.append(f"search memory (apply {mode}, picked {mem['mode']}): peak RSS {mem['peak_mb']:.0f} MB - runtime "
                     f"{mem['runtime_mb']:.0f} MB = {mem['model_mb']:.0f} MB = "
                     f"{m['search_memory_ratio'][mode]:.2f}x base + 4 adapters ({m['base_plus_4_adapters_mb']:.0f} MB "
                     f"on disk)")
    return lines
