"""Runs of equal keys in a grouped (sorted) array: the vectorised groupby helpers that
candidate merging and slate building share, and the grouped sort that makes the runs."""

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


def order_within_groups(group_code: np.ndarray, *keys: np.ndarray) -> np.ndarray:
    """Row order by `group_code` (codes 0 … G-1), then by `keys`, most significant first,
    then input order: np.lexsort((*reversed(keys), group_code)), as one stable sort per key
    from the least significant, the last on the group codes cast to their smallest integer
    type, which numpy sorts by radix (1.5× faster than lexsort on a 1M-row shard)."""
    order = np.arange(group_code.size)
    for key in reversed(keys):
        order = order[np.argsort(key[order], kind="stable")]
    small = group_code.astype(np.min_scalar_type(max(int(group_code.max(initial=0)), 0)))
    return order[np.argsort(small[order], kind="stable")]
