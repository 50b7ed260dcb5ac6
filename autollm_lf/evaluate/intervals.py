"""Every score with its uncertainty: a percentile bootstrap over the held-out rows, resampled within each chunk (the
held-out sets are drawn per chunk, so a resample keeps each chunk's row count), and paired differences of two models
scored on the same rows (one resample drives both, so what the rows have in common cancels)."""
from __future__ import annotations

from typing import Sequence

import numpy as np


def resample_index(strata: Sequence[str], n_boot: int, seed: int) -> np.ndarray:
    """[n_boot, rows] row indices: each resample draws every chunk's rows with replacement from that chunk."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(list(strata), dtype=object)
    index = np.empty((n_boot, len(labels)), dtype=np.int64)
    for label in dict.fromkeys(labels):
        members = np.flatnonzero(labels == label)
        index[:, members] = rng.choice(members, size=(n_boot, len(members)), replace=True)
    return index


def percentile_interval(samples: np.ndarray, level: float) -> list[float]:
    tail = (1.0 - level) / 2.0
    return [float(np.quantile(samples, tail)), float(np.quantile(samples, 1.0 - tail))]


def mean_interval(scores: Sequence[float], index: np.ndarray, level: float) -> list[float]:
    """The interval of the mean score over the resamples (`index` from resample_index on these rows)."""
    return percentile_interval(np.asarray(scores, dtype=float)[index].mean(axis=1), level)


def paired_difference(a: Sequence[float], b: Sequence[float], index: np.ndarray, level: float) -> dict:
    """mean(a) - mean(b) on the same rows, with its interval; `excludes_zero` says whether it is told apart."""
    diff = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    low, high = mean_interval(diff, index, level)
    return {"difference": float(diff.mean()), "interval": [low, high], "excludes_zero": bool(low > 0 or high < 0),
            "rows": int(len(diff))}


def chunk_columns(chunks: Sequence[str]) -> dict[str, np.ndarray]:
    labels = np.asarray(list(chunks), dtype=object)
    return {c: np.flatnonzero(labels == c) for c in dict.fromkeys(labels)}


def by_chunk_intervals(scores: Sequence[float], chunks: Sequence[str], n_boot: int, seed: int,
                       level: float) -> dict[str, list[float]]:
    """Each chunk's mean score with its interval (resampled within that chunk)."""
    values = np.asarray(scores, dtype=float)
    out = {}
    for chunk, cols in chunk_columns(chunks).items():
        index = resample_index([chunk] * len(cols), n_boot, seed)
        out[chunk] = mean_interval(values[cols], index, level)
    return out


def paired_by_chunk(a: Sequence[float], b: Sequence[float], chunks: Sequence[str], n_boot: int, seed: int,
                    level: float) -> dict[str, dict]:
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return {chunk: paired_difference(a[cols], b[cols], resample_index([chunk] * len(cols), n_boot, seed), level)
            for chunk, cols in chunk_columns(chunks).items()}


def fmt(value: float, interval: Sequence[float] | None) -> str:
    """`.450 [.41, .49]`: a score and its interval as the report prints them."""
    return f"{value:.3f}" if not interval else f"{value:.3f} [{interval[0]:.3f}, {interval[1]:.3f}]"


def split_by_chunk(scores: list[float], chunks: list[str]) -> tuple[float, dict[str, float]]:
    """Mean score overall and on each chunk's rows."""
    by_chunk = {c: sum(f for f, k in zip(scores, chunks) if k == c) / chunks.count(c) for c in dict.fromkeys(chunks)}
    return sum(scores) / max(len(scores), 1), by_chunk
