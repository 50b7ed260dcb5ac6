"""torch's no_grad / inference_mode as decorators that import torch only when the function runs, so a module
can use them without importing torch when it is itself imported (`autollm validate` never loads torch)."""
from __future__ import annotations

import functools


def _lazy(context: str):
    def decorate(fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            import torch

            with getattr(torch, context)():
                return fn(*args, **kwargs)
        return run
    return decorate


no_grad = _lazy("no_grad")
inference_mode = _lazy("inference_mode")
