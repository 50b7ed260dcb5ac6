"""Stage 1, data: rows read from the configured sources, cut into chunks and held-out splits, written as
LLaMA-Factory datasets.

Parts: sources/ (one file per source type, their registry in sources/__init__.py), prepare.py (the stage), toy.py
(the toy example's source database and base).
"""
from .prepare import load_split, prepare

__all__ = ["load_split", "prepare"]
