"""autollm-lf: continual LLM improvement by searching the weights of LoRA deltas trained with LLaMA-Factory."""
__version__ = "0.1.0"
