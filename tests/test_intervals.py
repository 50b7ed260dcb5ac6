"""The report's intervals: a stratified bootstrap over held-out rows and paired differences."""
import numpy as np
import pytest

from autollm_lf.evaluate.intervals import (
    by_chunk_intervals,
    fmt,
    mean_interval,
    paired_by_chunk,
    paired_difference,
    resample_index,
)

CHUNKS = ["a"] * 30 + ["b"] * 10


def test_resamples_keep_each_chunks_rows_within_that_chunk():
    index = resample_index(CHUNKS, 200, seed=0)
    assert index.shape == (200, 40)
    assert (index[:, :30] < 30).all() and (index[:, 30:] >= 30).all()
    assert len(np.unique(index[:, :30])) == 30  # every row drawn somewhere: it is a resample, not a fixed subset


def test_interval_brackets_the_mean_and_has_the_binomial_width():
    rng = np.random.default_rng(1)
    scores = (rng.random(400) < 0.5).astype(float)
    low, high = mean_interval(scores, resample_index(["x"] * 400, 2000, seed=0), 0.95)
    assert low < scores.mean() < high
    assert high - low == pytest.approx(2 * 1.96 * np.sqrt(0.25 / 400), rel=0.15)  # ~.098 for 400 rows
    narrow = mean_interval(scores, resample_index(["x"] * 400, 2000, seed=0), 0.5)
    assert narrow[1] - narrow[0] < high - low


def test_paired_difference_cancels_what_the_rows_share():
    rng = np.random.default_rng(2)
    b = rng.random(40)
    index = resample_index(CHUNKS, 1000, seed=0)
    same = paired_difference(b, b, index, 0.95)
    assert same["difference"] == 0 and same["interval"] == [0.0, 0.0] and not same["excludes_zero"]
    ahead = paired_difference(b + 0.05, b, index, 0.95)
    assert ahead["difference"] == pytest.approx(0.05) and ahead["excludes_zero"] and ahead["interval"][0] > 0
    # unpaired, rows this varied would not tell a .05 gap apart: the pairing is what does
    low_a, high_a = mean_interval(b + 0.05, index, 0.95)
    low_b, high_b = mean_interval(b, index, 0.95)
    assert low_a < high_b


def test_per_chunk_intervals_and_paired_differences():
    scores = [1.0] * 30 + [0.0, 1.0] * 5
    by_chunk = by_chunk_intervals(scores, CHUNKS, 500, 0, 0.95)
    assert by_chunk["a"] == [1.0, 1.0] and by_chunk["b"][0] < 0.5 < by_chunk["b"][1]
    paired = paired_by_chunk(scores, [0.0] * 40, CHUNKS, 500, 0, 0.95)
    assert paired["a"]["difference"] == 1.0 and paired["a"]["rows"] == 30 and paired["b"]["rows"] == 10


def test_format():
    assert fmt(0.45, [0.41, 0.49]) == "0.450 [0.410, 0.490]" and fmt(0.45, None) == "0.450"
