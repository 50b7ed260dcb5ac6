"""docs/extending.md shows real diffs: each still applies to this checkout (git apply --check)."""
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DIFFS = re.findall(r"```diff\n(.*?)```", (REPO / "docs" / "extending.md").read_text(), re.S)


def test_extending_shows_four_diffs():
    assert len(DIFFS) == 4


@pytest.mark.parametrize("diff", DIFFS, ids=["metric", "source", "merge method", "optimiser"])
def test_each_diff_applies(diff, tmp_path):
    patch = tmp_path / "change.diff"
    patch.write_text(diff)
    res = subprocess.run(["git", "apply", "--check", str(patch)], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
