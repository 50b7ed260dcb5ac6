"""Stage 2, train: one LoRA delta per (chunk, method) with LLaMA-Factory.

Parts: methods.py (the training methods' registry), render.py (LLaMA-Factory YAMLs from templates/), deltas.py (the
deltas: specs, configs, trainers), lfcli.py (running `llamafactory-cli`), scheduler.py (GPUs), cluster.py (Ray),
shared_base.py (train.shared: the shared base every delta starts from), auto_mix.py (train@auto_mix).
"""
from .deltas import DONE_MARKER, DeltaSpec, delta_specs, train_deltas

__all__ = ["DONE_MARKER", "DeltaSpec", "delta_specs", "train_deltas"]
