"""Training methods: which LLaMA-Factory stage, which data shape, which template, which defaults.

A new method is one entry in METHODS. Data shapes are detected per chunk by data/records.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SHAPE_FIELDS = {  # the fields a row of each shape must have
    "sft": ("prompt", "response"),
    "preference": ("prompt", "chosen", "rejected"),
    "kto": ("prompt", "response", "label"),
    "pt": ("text",),
}
SHAPE_WORDS = {
    "sft": "prompt/response",
    "preference": "prompt with chosen/rejected",
    "kto": "prompt/response with a boolean label",
    "pt": "plain text",
}


@dataclass(frozen=True)
class Method:
    stage: str                    # LLaMA-Factory `stage`
    shape: str                    # the data shape it trains on
    template: str                 # default jinja2 template in autollm_lf/templates/
    args: dict[str, Any] = field(default_factory=dict)  # the method's own LLaMA-Factory keys


METHODS: dict[str, Method] = {
    "sft": Method("sft", "sft", "sft_lora.yaml.j2"),
    "dpo": Method("dpo", "preference", "dpo_lora.yaml.j2", {"pref_loss": "sigmoid", "pref_beta": 0.1, "pref_ftx": 0.0}),
    "orpo": Method("dpo", "preference", "dpo_lora.yaml.j2", {"pref_loss": "orpo", "pref_beta": 0.1, "pref_ftx": 0.0}),
    "simpo": Method("dpo", "preference", "dpo_lora.yaml.j2",
                    {"pref_loss": "simpo", "pref_beta": 2.0, "simpo_gamma": 0.5, "pref_ftx": 0.0}),
    "kto": Method("kto", "kto", "kto_lora.yaml.j2",
                  {"pref_beta": 0.1, "kto_chosen_weight": 1.0, "kto_rejected_weight": 1.0, "pref_ftx": 0.0}),
    "pt": Method("pt", "pt", "pt_lora.yaml.j2"),
}

AUTO_METHODS = {"sft": ["sft"], "preference": ["dpo"], "kto": ["kto"], "pt": ["pt"]}
