"""What the quick start promises on any machine: the README's claims about the toy's table, checked on the report a
run wrote. The digits depend on the CPU (float kernels differ, and LLaMA-Factory's training amplifies it: the same
commit gave raw .465 on a 2-core AMD EPYC, .380 on an older 2-core Xeon and .357 on a 2-core Xeon Sapphire Rapids).
TOY_CLAIMS held on all three; TOY_SOMETIMES held on the first two and not on the third, so the README states them as
what those machines showed, and a toy run logs whether they hold on its own. `autollm run` on a config with a `toy:`
section logs each; tests/test_claims.py checks the README states these claims and that its own table keeps them.
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


Claims = list[tuple[str, Callable[[Report], bool]]]

TOY_CLAIMS: Claims = [
    ("auto_merge scores above raw, average_merge and human_merge on test",
     lambda r: all(_test(r, "auto_merge") > _test(r, m) for m in ("raw", "average_merge", "human_merge"))),
    ("the scraped delta gets a smaller auto_merge weight than every other delta", _scraped_smallest),
]
TOY_SOMETIMES: Claims = [
    ("train@all scores below raw on test (it takes the scraped chunk in)",
     lambda r: _test(r, "train@all") < _test(r, "raw")),
    ("auto_merge is ahead of train@all on test: the paired interval lies above 0", _auto_ahead_of_train_all),
]


def check_claims(report: Report, claims=TOY_CLAIMS) -> list[tuple[str, bool]]:
    return [(text, bool(holds(report))) for text, holds in claims]


def claims_lines(report: Report) -> list[str]:
    """One line per claim, for the log at the end of a toy run: the promised ones, then those some CPUs showed."""
    checked = check_claims(report)
    held = sum(ok for _, ok in checked)
    sometimes = check_claims(report, TOY_SOMETIMES)
    return ([f"toy: {held} of {len(checked)} claims the README makes on any machine hold "
             f"(the digits depend on the CPU):"]
            + [f"  [{'holds' if ok else 'DOES NOT HOLD'}] {text}" for text, ok in checked]
            + ["toy: what some CPUs showed (README), on this one:"]
            + [f"  [{'holds here' if ok else 'not here'}] {text}" for text, ok in sometimes])
