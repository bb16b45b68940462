"""Collaborative filtering with EASE (Steck, 2019): one closed-form item × item model.

EASE learns item-to-item weights B (zero diagonal) that reconstruct each user's engagement
row from the rest of it: B = I - P / diag(P) with P = (XᵀX + λI)⁻¹. It is a strong, cheap
model on implicit data, and it serves three roles here, all from this one module:

- a candidate source (`collaborative` in the candidate pools): a subject's scores are the
  sum of B's rows over the items in their history;
- ranker inputs: the same sum over the full history and over the most recent items only
  (the latter carries what the user is into *now*, which full-history models blur);
- the EASE baseline of `recsys evaluate`.

λ is not a constant tuned to one data set: `tune_collaborative` tries multiples of the mean item
degree (the scale of XᵀX's diagonal, so the grid follows the data's density) on a
per-user holdout and keeps the best by Recall@K. The matrix is dense (items²), so the
model covers at most `max_items` items, the most engaged ones; other items get no
collaborative score (0) and are covered by the other sources.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp

from recsys_assets.rules.engagement import engagement_events

L2_DEGREE_MULTIPLES = (1.0, 4.0, 16.0)
"""λ candidates as multiples of the mean item degree (mean diagonal of XᵀX)."""
DEFAULT_MAX_ITEMS = 6000
"""Items covered by the dense B (6,000² float32 = 144 MB): the most engaged ones."""
TUNING_K = 20
_USER_BATCH = 1024
SCORE_BLOCK_VALUES = 4_000_000
"""Dense scores held at once by `pair_scores` (16 MB of float32)."""


@dataclass(frozen=True)
class CollaborativeModel:
    """EASE weights over `item_ids` (sorted), and the λ they were fitted with."""

    item_ids: np.ndarray
    weights: np.ndarray
    """float32 (len(item_ids) × len(item_ids)), zero diagonal: row = history item."""
    l2: float

    @property
    def size(self) -> int:
        return len(self.item_ids)

    def columns(self, item_ids: np.ndarray) -> np.ndarray:
        """Column of each item id in `weights`; -1 for items the model does not cover."""
        return _columns(self.item_ids, item_ids)

    def history_matrix(self, subject_ids: np.ndarray, history: pd.DataFrame) -> sp.csr_matrix:
        """Binary subjects × model-items matrix of `history` (subject_id, item_id rows)."""
        return history_matrix(self.item_ids, subject_ids, history)

    def scores(self, matrix: sp.csr_matrix) -> np.ndarray:
        """Dense scores (rows of `matrix` × model items)."""
        return np.asarray(matrix @ self.weights, dtype=np.float32)

    def pair_scores(
        self, matrix: sp.csr_matrix, rows: np.ndarray, item_ids: np.ndarray
    ) -> np.ndarray:
        """Score of each (matrix row, item id) pair; 0 for items the model does not cover.

        The rows' dense scores (`scores`) are computed a block of rows at a time and read at
        the pairs (`read_dense_blocks`): one sparse × dense product per block instead of
        gathering Σ weights[h, item] history item by history item (2.5× faster on a
        1.5M-pair shard).
        """
        return read_dense_blocks(
            rows,
            self.columns(item_ids),
            matrix.shape[0],
            self.size,
            lambda start, stop: self.scores(matrix[start:stop]),
        ).astype(np.float32)

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        np.savez(buffer, item_ids=self.item_ids, weights=self.weights, l2=np.float64(self.l2))
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> CollaborativeModel:
        with np.load(io.BytesIO(data), allow_pickle=False) as saved:
            return cls(
                item_ids=saved["item_ids"].astype(np.int64),
                weights=np.ascontiguousarray(saved["weights"], dtype=np.float32),
                l2=float(saved["l2"]),
            )


def read_dense_blocks(
    rows: np.ndarray,
    columns: np.ndarray,
    row_count: int,
    width: int,
    dense: Callable[[int, int], np.ndarray],
) -> np.ndarray:
    """The value at each (rows[i], columns[i]) of a row_count × width matrix that
    `dense(start, stop)` computes a block of rows at a time; 0 where columns[i] is -1.

    Blocks hold about SCORE_BLOCK_VALUES values, so memory stays bounded, and each block is
    computed once for all the pairs in it, whatever order the pairs come in.
    """
    out = np.zeros(len(rows), dtype=np.float64)
    wanted = np.flatnonzero(columns >= 0)
    if wanted.size == 0 or width == 0:
        return out
    rows = np.asarray(rows, dtype=np.int64)[wanted]
    columns = np.asarray(columns, dtype=np.int64)[wanted]
    if np.any(rows[1:] < rows[:-1]):
        by_row = np.argsort(rows, kind="stable")
        wanted, rows, columns = wanted[by_row], rows[by_row], columns[by_row]
    block = max(1, SCORE_BLOCK_VALUES // width)
    starts = np.arange(0, row_count + block, block)
    bounds = np.searchsorted(rows, starts)
    for index, start in enumerate(starts[:-1]):
        first, last = bounds[index], bounds[index + 1]
        if first < last:
            values = dense(int(start), int(min(start + block, row_count)))
            out[wanted[first:last]] = values[rows[first:last] - start, columns[first:last]]
    return out


def engaged_pairs(interactions: pd.DataFrame) -> pd.DataFrame:
    """Distinct (subject_id, item_id) pairs with any engagement (rules.engagement)."""
    engaged = interactions.loc[
        engagement_events(interactions), ["user_id", "item_id"]
    ].drop_duplicates()
    return engaged.rename(columns={"user_id": "subject_id"}).astype("int64")


def covered_items(pairs: pd.DataFrame, max_items: int) -> np.ndarray:
    """The `max_items` most engaged items (ties: lower id), sorted by id."""
    counts = pairs["item_id"].value_counts()
    ranked = counts.reset_index().sort_values(["count", "item_id"], ascending=[False, True])
    return np.sort(ranked["item_id"].to_numpy(dtype=np.int64)[:max_items])


def _columns(covered: np.ndarray, item_ids: np.ndarray) -> np.ndarray:
    item_ids = np.asarray(item_ids, dtype=np.int64)
    if len(covered) == 0:
        return np.full(len(item_ids), -1, dtype=np.int64)
    found = np.minimum(np.searchsorted(covered, item_ids), len(covered) - 1)
    return np.where(covered[found] == item_ids, found, -1)


def history_matrix(
    item_ids: np.ndarray, subject_ids: np.ndarray, history: pd.DataFrame
) -> sp.csr_matrix:
    """Binary `subject_ids` (sorted) × `item_ids` (sorted) matrix of `history` rows."""
    subject_ids = np.asarray(subject_ids, dtype=np.int64)
    subjects_of_rows = history["subject_id"].to_numpy(dtype=np.int64)
    rows = np.minimum(np.searchsorted(subject_ids, subjects_of_rows), max(len(subject_ids) - 1, 0))
    columns = _columns(item_ids, history["item_id"].to_numpy(dtype=np.int64))
    # Rows of other subjects (every row when there are no subjects) are left out.
    keep = (columns >= 0) & (subject_ids[rows] == subjects_of_rows if len(subject_ids) else False)
    matrix = sp.csr_matrix(
        (np.ones(int(keep.sum()), dtype=np.float32), (rows[keep], columns[keep])),
        shape=(len(subject_ids), len(item_ids)),
    )
    matrix.data[:] = 1.0  # duplicates summed: back to binary
    return matrix


@dataclass(frozen=True)
class _Engagement:
    """The binary engagement matrix of a window over its covered items, and its Gram."""

    item_ids: np.ndarray
    subject_ids: np.ndarray
    history: sp.csr_matrix
    gram: np.ndarray

    @classmethod
    def of(cls, interactions: pd.DataFrame, max_items: int) -> _Engagement:
        pairs = engaged_pairs(interactions)
        item_ids = covered_items(pairs, max_items)
        subject_ids = np.unique(pairs["subject_id"].to_numpy(dtype=np.int64))
        history = history_matrix(item_ids, subject_ids, pairs)
        gram = np.asarray((history.T @ history).toarray(), dtype=np.float64)
        return cls(item_ids, subject_ids, history, gram)


def ease_weights(gram: np.ndarray, l2: float) -> np.ndarray:
    """B = I - P / diag(P), P = (G + λI)⁻¹, zero diagonal (float32)."""
    regularised = gram.copy()
    regularised[np.diag_indices_from(regularised)] += l2
    inverse = np.linalg.inv(regularised)
    weights = inverse / -np.diag(inverse)
    weights[np.diag_indices_from(weights)] = 0.0
    return weights.astype(np.float32)


def l2_grid(gram: np.ndarray, multiples: Sequence[float] = L2_DEGREE_MULTIPLES) -> list[float]:
    """λ candidates scaled by the mean item degree (at least 1)."""
    degree = float(np.mean(np.diag(gram))) if len(gram) else 1.0
    return [max(degree, 1.0) * multiple for multiple in multiples]


def fit_collaborative(
    interactions: pd.DataFrame, *, l2: float | None = None, max_items: int = DEFAULT_MAX_ITEMS
) -> CollaborativeModel:
    """EASE on `interactions`' engagement with λ = `l2`, else 4 × the mean item degree."""
    engagement = _Engagement.of(interactions, max_items)
    chosen = float(l2) if l2 is not None else l2_grid(engagement.gram, (4.0,))[0]
    return CollaborativeModel(engagement.item_ids, ease_weights(engagement.gram, chosen), chosen)


def tune_collaborative(
    train: pd.DataFrame,
    relevant: pd.DataFrame,
    *,
    max_items: int = DEFAULT_MAX_ITEMS,
    k: int = TUNING_K,
) -> CollaborativeModel:
    """EASE fitted on `train` with the λ of `l2_grid` whose Recall@k against `relevant`
    (user_id, item_id: a per-user holdout after `train`) is best."""
    engagement = _Engagement.of(train, max_items)
    grid = l2_grid(engagement.gram)
    targets = relevant.rename(columns={"user_id": "subject_id"})
    targets = targets[targets["subject_id"].isin(engagement.subject_ids)]
    if targets.empty or len(engagement.item_ids) == 0:
        l2 = grid[len(grid) // 2]
        return CollaborativeModel(engagement.item_ids, ease_weights(engagement.gram, l2), l2)
    evaluated = np.unique(targets["subject_id"].to_numpy(dtype=np.int64))
    rows = np.searchsorted(engagement.subject_ids, evaluated)
    truth = history_matrix(engagement.item_ids, evaluated, targets)
    wanted = np.asarray(
        targets.groupby("subject_id").size().reindex(evaluated).to_numpy(), dtype=np.float64
    )
    best: tuple[float, CollaborativeModel] | None = None
    for l2 in grid:
        weights = ease_weights(engagement.gram, l2)
        found = 0.0
        for start in range(0, len(rows), _USER_BATCH):
            chunk = slice(start, start + _USER_BATCH)
            seen = engagement.history[rows[chunk]]
            scores = np.asarray(seen @ weights)
            scores[seen.nonzero()] = -np.inf
            depth = min(k, scores.shape[1])
            top = np.argpartition(-scores, depth - 1, axis=1)[:, :depth]
            hits = np.take_along_axis(truth[chunk].toarray(), top, axis=1).sum(axis=1)
            found += float((hits / wanted[chunk]).sum())
        recall = found / len(rows)
        if best is None or recall > best[0]:
            best = (recall, CollaborativeModel(engagement.item_ids, weights, l2))
    return best[1]  # type: ignore[index]  # the grid is never empty


def choose_l2(
    train: pd.DataFrame,
    relevant: pd.DataFrame,
    *,
    max_items: int = DEFAULT_MAX_ITEMS,
    k: int = TUNING_K,
) -> float:
    """The λ `tune_collaborative` picks."""
    return tune_collaborative(train, relevant, max_items=max_items, k=k).l2
