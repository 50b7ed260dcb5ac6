"""What the pooled optimisers share: they propose several points at once and need nothing of the merge method, metric or
objective; bayes_opt and cma kept quiet."""
from __future__ import annotations

import contextlib
import io
import warnings


@contextlib.contextmanager
def quiet():
    """bayes_opt and cma print to the console; our log keeps one line per new best."""
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


class PooledOptimizer:
    """An optimiser that proposes several points at once (a pool scores them together); it needs nothing of the merge
    method, metric or objective."""
    parallel = True
    needs = ()
