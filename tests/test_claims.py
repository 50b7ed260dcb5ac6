"""The quick start's promises on any machine (claims.TOY_CLAIMS) and what only some CPUs showed (TOY_SOMETIMES): the
README states each, its own table keeps the promised ones and says truly whether it shows the others, and each claim
fails on a report that breaks it (so the check at the end of a toy run can fail)."""
import copy
import re
from pathlib import Path

import pytest

from autollm_lf.report.claims import TOY_CLAIMS, TOY_SOMETIMES, check_claims, claims_lines

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
    weights = re.search(r"auto_merge's weights:([^)]+)", README)
    assert weights, "the README states auto_merge's weights"
    best = {name: float(w) for name, w in re.findall(r"`([\w@-]+)` ([\d.]+)", weights.group(1))}
    return {"rows": rows, "best": {"weights": best},
            "paired": {"b": "train@all", "test": {"overall": {"interval": [low, high]}}}}


def test_the_readme_states_every_claim_and_its_table_keeps_them():
    flat = " ".join(README.split())
    for text, _ in TOY_CLAIMS + TOY_SOMETIMES:
        assert text in flat, text
    report = readme_report()
    assert all(ok for _, ok in check_claims(report)), check_claims(report)
    assert len(report["best"]["weights"]) == 7  # every delta's weight is read
    # the README says its table's machine shows neither of the others; the table agrees
    assert "This Xeon shows neither" in flat
    assert not any(ok for _, ok in check_claims(report, TOY_SOMETIMES)), check_claims(report, TOY_SOMETIMES)


BREAK = {
    "auto_merge scores above raw": lambda test, r: test["auto_merge"].update(test=test["human_merge"]["test"] - 0.01),
    "the scraped delta": lambda test, r: r["best"]["weights"].update(
        {next(d for d in r["best"]["weights"] if d.startswith("scraped")): max(r["best"]["weights"].values()) + 0.1}),
    "train@all scores below raw": lambda test, r: test["train@all"].update(test=test["raw"]["test"] + 0.01),
    "auto_merge is ahead of train@all": lambda test, r: r["paired"]["test"]["overall"].update(interval=[-0.01, 0.2]),
}
MAKE = {
    "train@all scores below raw": lambda test, r: test["train@all"].update(test=test["raw"]["test"] - 0.01),
    "auto_merge is ahead of train@all": lambda test, r: r["paired"]["test"]["overall"].update(interval=[0.01, 0.2]),
}


def edited(report: dict, claim: str, how: dict) -> dict:
    r = copy.deepcopy(report)
    next(fn for start, fn in how.items() if claim.startswith(start))({row["model"]: row for row in r["rows"]}, r)
    return r


@pytest.mark.parametrize("claim", [text for text, _ in TOY_CLAIMS])
def test_each_claim_fails_on_a_report_that_breaks_it(claim):
    checked = check_claims(edited(readme_report(), claim, BREAK))
    assert [ok for _, ok in checked] == [text != claim for text, _ in TOY_CLAIMS]
    assert "DOES NOT HOLD" in "\n".join(claims_lines(edited(readme_report(), claim, BREAK)))


@pytest.mark.parametrize("claim", [text for text, _ in TOY_SOMETIMES])
def test_each_sometimes_claim_is_logged_as_it_is(claim):
    made = edited(readme_report(), claim, MAKE)
    assert [ok for _, ok in check_claims(made, TOY_SOMETIMES)] == [text == claim for text, _ in TOY_SOMETIMES]
    assert f"[holds here] {claim}" in "\n".join(claims_lines(made))
    assert f"[not here] {claim}" in "\n".join(claims_lines(edited(made, claim, BREAK)))
