"""Runs of equal keys in a grouped (sorted) array: the vectorised groupby helpers that
candidate merging and slate building share."""

from __future__ import annotations

import numpy as np


def run_starts(sorted_keys: np.ndarray) -> np.ndarray:
    """Indices where a run of equal values begins in a grouped array."""
    if sorted_keys.size == 0:
        return np.zeros(0, dtype=np.int64)
    return np.flatnonzero(np.concatenate(([True], sorted_keys[1:] != sorted_keys[:-1])))


def run_lengths(starts: np.ndarray, size: int) -> np.ndarray:
    return np.diff(np.append(starts, size))


def rank_within_runs(sorted_keys: np.ndarray) -> np.ndarray:
    """0-based position of each element within its run of equal keys (a cumcount)."""
    starts = run_starts(sorted_keys)
    return np.arange(sorted_keys.size) - np.repeat(starts, run_lengths(starts, sorted_keys.size))
