"""Stage 3, search: the merge weights, by an optimiser over validation rows.

Parts: loop.py (the loop: trials, resume, the best point), optimizers/ (one file per optimiser, their registry and the
Protocols in optimizers/protocol.py), holdout.py (fit and holdout rows), merge_choice.py (search.merge: auto),
scored.py (a session with no run behind it, for the bench).
"""
from .loop import run_search
from .optimizers import OPTIMIZERS, optimizer_problems

__all__ = ["OPTIMIZERS", "optimizer_problems", "run_search"]
