"""EASE pair scores: the block-wise dense read equals the definition Σ weights[h, item]."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from recsys_assets.models import collaborative
from recsys_assets.models.collaborative import CollaborativeModel


def _model(rng: np.random.Generator, items: int) -> CollaborativeModel:
    weights = rng.normal(size=(items, items)).astype(np.float32)
    np.fill_diagonal(weights, 0.0)
    return CollaborativeModel(np.arange(100, 100 + 3 * items, 3, dtype=np.int64), weights, 1.0)


@pytest.mark.parametrize("block_values", [7, 1_000_000])
def test_pair_scores_are_the_sum_of_history_rows(
    monkeypatch: pytest.MonkeyPatch, block_values: int
) -> None:
    rng = np.random.default_rng(3)
    model = _model(rng, items=40)
    subjects = np.arange(25, dtype=np.int64)
    history = pd.DataFrame(
        {
            "subject_id": rng.integers(0, 25, 300),
            # Some history items are outside the model: they contribute nothing.
            "item_id": rng.choice(np.concatenate((model.item_ids, [1, 2, 5])), 300),
        }
    )
    matrix = model.history_matrix(subjects, history)
    # Unsorted rows, repeated pairs, items the model does not cover (score 0).
    rows = rng.integers(0, 25, 500)
    item_ids = rng.choice(np.concatenate((model.item_ids, [7, 11])), 500)
    monkeypatch.setattr(collaborative, "SCORE_BLOCK_VALUES", block_values)

    found = model.pair_scores(matrix, rows, item_ids)

    dense = matrix.toarray()
    columns = model.columns(item_ids)
    expected = np.array(
        [
            0.0 if column < 0 else float(dense[row] @ model.weights[:, column])
            for row, column in zip(rows, columns, strict=True)
        ]
    )
    assert found.dtype == np.float32
    np.testing.assert_allclose(found, expected, rtol=1e-5, atol=1e-5)
    assert (found[columns < 0] == 0).all()


def test_pair_scores_without_covered_items_are_zero() -> None:
    model = _model(np.random.default_rng(0), items=5)
    matrix = model.history_matrix(np.arange(3), pd.DataFrame({"subject_id": [0], "item_id": [100]}))
    found = model.pair_scores(matrix, np.array([0, 2]), np.array([1, 2]))
    assert found.tolist() == [0.0, 0.0]
