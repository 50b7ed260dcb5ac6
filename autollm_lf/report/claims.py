"""What the quick start promises on any machine: the README's claims about the toy's table, checked on the report a
run wrote. The digits depend on the CPU (float kernels differ, and LLaMA-Factory's training amplifies it: the same
commit gave raw .380 on a 2-core Xeon and .465 on a 2-core AMD EPYC); the ordering of the rows and the paired
difference with its interval held on both. `autollm run` on a config with a `toy:` section logs each claim with
whether it holds; tests/test_claims.py checks the README states these same claims and that its own table keeps them.
"""
from __future__ import annotations

from typing import Callable

from ..granularity import per_delta

Report = dict  # report.json


def _test(report: Report, model: str) -> float:
    return next(r["test"] for r in report["rows"] if r["model"] == model)


def _auto_ahead_of_train_all(report: Report) -> bool:
    paired = report.get("paired") or {}
    return bool(paired) and paired["b"] == "train@all" and paired["test"]["overall"]["interval"][0] > 0


def _scraped_smallest(report: Report) -> bool:
    weights = per_delta(report["best"]["weights"])
    scraped = [d for d in weights if d.startswith("scraped")]
    return bool(scraped) and all(weights[s] < w for s in scraped for d, w in weights.items() if d not in scraped)


TOY_CLAIMS: list[tuple[str, Callable[[Report], bool]]] = [
    ("train@all scores below raw on test (it takes the scraped chunk in)",
     lambda r: _test(r, "train@all") < _test(r, "raw")),
    ("auto_merge scores above raw, average_merge and human_merge on test",
     lambda r: all(_test(r, "auto_merge") > _test(r, m) for m in ("raw", "average_merge", "human_merge"))),
    ("auto_merge is ahead of train@all on test: the paired interval lies above 0", _auto_ahead_of_train_all),
    ("the scraped delta gets a smaller auto_merge weight than every other delta", _scraped_smallest),
]


def check_claims(report: Report, claims=TOY_CLAIMS) -> list[tuple[str, bool]]:
    return [(text, bool(holds(report))) for text, holds in claims]


def claims_lines(report: Report) -> list[str]:
    """One line per claim, for the log at the end of a toy run."""
    checked = check_claims(report)
    held = sum(ok for _, ok in checked)
    return ([f"toy: {held} of {len(checked)} claims the README makes on any machine hold "
             f"(the digits depend on the CPU):"]
            + [f"  [{'holds' if ok else 'DOES NOT HOLD'}] {text}" for text, ok in checked])
