"""What autollm decides itself: where a training reads its data and model from and writes its output to, and
which keys of a LLaMA-Factory dataset_info entry a run's own data/dataset_info.json may carry.

A LLaMA-Factory key in `train.args` (or method_args, chunk_args, shared.args, toy.base_args, a `KEY=VALUE`
override, a hand-edited configs/<delta>.yaml) that moves data or outputs would make a delta train on rows outside
its chunk (held-out rows included), on a hub's data, or write outside the run: refused with what to use instead.
"""
from __future__ import annotations

DATA = "autollm writes each delta's data into runs/<name>/data/ from data.sources; add data there"
MODEL = "set base_model.path (or base_model.gguf); every delta starts from it"
OUTPUT = "autollm writes each delta to runs/<name>/deltas/<delta>/; set run_dir or name to move the run"
HUB = "autollm uploads nothing; `autollm export` places the merge in export.saves_dir, upload it from there"
TOKEN = "keep tokens out of configs (LLaMA-Factory reads HF_TOKEN from the environment)"

# LLaMA-Factory 0.9.5 arguments (hparams/*_args.py, transformers' TrainingArguments) -> what to use instead
OWNED_TRAIN_KEYS: dict[str, str] = {
    "output_dir": OUTPUT, "logging_dir": OUTPUT, "resume_from_checkpoint": OUTPUT,
    "offload_folder": OUTPUT, "export_dir": "use `autollm export`",
    "dataset": DATA, "eval_dataset": DATA, "dataset_dir": DATA, "tokenized_path": DATA, "media_dir": DATA,
    "model_name_or_path": MODEL, "adapter_name_or_path": MODEL, "adapter_folder": MODEL,
    "ref_model": MODEL, "ref_model_adapters": MODEL, "reward_model": MODEL, "reward_model_adapters": MODEL,
    "push_to_hub": HUB, "hub_model_id": HUB, "hub_strategy": HUB, "export_hub_model_id": HUB,
    "hub_token": TOKEN, "hf_hub_token": TOKEN, "ms_hub_token": TOKEN, "om_hub_token": TOKEN,
}


def owned_key_problems(args: dict, where: str) -> list[str]:
    """One line per key of `args` that autollm sets itself."""
    return [f"{where}.{k}: autollm sets {k} itself; {OWNED_TRAIN_KEYS[k]}" for k in args if k in OWNED_TRAIN_KEYS]


# dataset_info entry keys: what the run's own entry keeps (how to read its file); every key that makes
# LLaMA-Factory read something other than `file_name` (parser.py: hf_hub_url, ms_hub_url, om_hub_url, script_url,
# cloud_file_name are preferred to file_name) is refused on import; the rest (sampling, subsets, checksums) dropped
ENTRY_KEPT = ("formatting", "ranking", "columns", "tags")
REMOTE_ENTRY_KEYS = ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name")


MEDIA_COLUMNS = ("images", "videos", "audios")  # paths LLaMA-Factory would open wherever they point


def run_entry(entry: dict) -> dict:
    """A LLaMA-Factory dataset_info entry as the run's own dataset_info.json carries it (without file_name):
    how to read the records, nothing that loads other data (hub, script, cloud, media files) or resamples them."""
    kept = {k: entry[k] for k in ENTRY_KEPT if k in entry}
    if isinstance(kept.get("columns"), dict):
        kept["columns"] = {k: v for k, v in kept["columns"].items() if k not in MEDIA_COLUMNS}
    return kept
