"""The quick start's promises on any machine (claims.TOY_CLAIMS): the README states each, its own table keeps those
the table shows, and each claim fails on a report that breaks it (so the check at the end of a toy run can fail)."""
import copy
import re
from pathlib import Path

import pytest

from autollm_lf.report.claims import TOY_CLAIMS, check_claims, claims_lines

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")


def readme_report() -> dict:
    """The README's toy table as a report.json: test scores per row, the paired difference it states."""
    block = README.split("### What you should see", 1)[1].split("```")[1]
    rows = []
    for line in block.splitlines():
        cells = [c.strip() for c in line.split("|")]
        if len(cells) > 3 and re.match(r"\d", cells[2]):
            rows.append({"model": cells[0], "test": float(cells[2].split()[0])})
    paired = re.search(r"paired difference\s+on\s+test\s+([+-][\d.]+)\s+\[([+-][\d.]+),\s+([+-][\d.]+)\]", README)
    assert paired, "the README states the paired difference auto_merge - train@all on test"
    low, high = float(paired.group(2)), float(paired.group(3))
    weights = re.search(r"auto_merge's weights: ([^\n]+)", README)
    assert weights, "the README states auto_merge's weights"
    best = {name: float(w) for name, w in re.findall(r"`([\w@-]+)` ([\d.]+)", weights.group(1))}
    return {"rows": rows, "best": {"weights": best},
            "paired": {"b": "train@all", "test": {"overall": {"interval": [low, high]}}}}


def test_the_readme_states_every_claim_and_its_table_keeps_them():
    flat = " ".join(README.split())
    for text, _ in TOY_CLAIMS:
        assert text in flat, text
    checked = check_claims(readme_report())
    assert all(ok for _, ok in checked), checked


def broken(report: dict, claim: int) -> dict:
    r = copy.deepcopy(report)
    test = {row["model"]: row for row in r["rows"]}
    if claim == 0:
        test["train@all"]["test"] = test["raw"]["test"] + 0.01
    elif claim == 1:
        test["auto_merge"]["test"] = test["human_merge"]["test"] - 0.01
    elif claim == 2:
        r["paired"]["test"]["overall"]["interval"] = [-0.01, 0.2]
    else:
        scraped = next(d for d in r["best"]["weights"] if d.startswith("scraped"))
        r["best"]["weights"][scraped] = max(r["best"]["weights"].values()) + 0.1
    return r


@pytest.mark.parametrize("claim", range(len(TOY_CLAIMS)))
def test_each_claim_fails_on_a_report_that_breaks_it(claim):
    checked = check_claims(broken(readme_report(), claim))
    assert [ok for _, ok in checked] == [i != claim for i in range(len(TOY_CLAIMS))]
    assert "DOES NOT HOLD" in "\n".join(claims_lines(broken(readme_report(), claim)))
