"""Scoring: the ranker's calibrated prediction, turned into a utility with its components.

utility = relevance + novelty + sponsored + exploration, where

| component | value | why |
| --- | --- | --- |
| utility_relevance | calibrated P(engage) | the ranker's calibrated prediction |
| utility_novelty | 0.05 × (1 − popularity percentile) × relevance | lifts the long tail, never an irrelevant item |
| utility_sponsored | 0.02 for a sponsored item with a live campaign | a small paid boost, capped by the slate policy |
| utility_exploration | 0.03 × relevance for new-item / long-tail candidates | room for items without history |

The components are stored next to the total so a decision can be explained afterwards.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from recsys_assets.pipeline.feature_tables import take_or_fill
from recsys_assets.pipeline.text import coded, constant

UTILITY_POLICY_VERSION = "utility_v1"
NOVELTY_WEIGHT = 0.05
SPONSORED_BOOST = 0.02
EXPLORATION_WEIGHT = 0.03
ITEM_COLUMNS = ["item_type", "category", "creator_id", "is_sponsored"]


def score_candidates(
    pool: pd.DataFrame,
    prediction: np.ndarray,
    calibrated: np.ndarray,
    items: pd.DataFrame,
    *,
    score_time: pd.Timestamp,
    popularity_percentile: pd.Series,
    lineage: dict[str, object],
) -> pd.DataFrame:
    """Scored candidates: predictions, calibrated probabilities, utility and components.

    `pool` holds candidate rows (subject_id, item_id, rank_<source>, source_provenance);
    `prediction` and `calibrated` are the ranker's outputs for them, in row order (e.g.
    ModelBundle.score_matrix). `items` is indexed by item_id with ITEM_COLUMNS;
    `popularity_percentile` maps item_id to [0, 1] (1 = most popular); `lineage` adds
    constant columns (model_version, ...).
    """
    prediction = np.asarray(prediction, dtype=np.float32)
    calibrated = np.clip(np.asarray(calibrated, dtype=np.float32), 0.0, 1.0)
    item_ids = pool["item_id"].to_numpy(dtype=np.int64)
    at = items.index.get_indexer(item_ids)  # the catalog row of each candidate, -1 if none
    percentile = take_or_fill(
        popularity_percentile.reindex(items.index).fillna(0.0).to_numpy(dtype=np.float32), at
    )
    exploratory = (
        (pool["rank_new_item_exploration"] > 0) | (pool["rank_long_tail_quality"] > 0)
    ).to_numpy()
    sponsored = take_or_fill(items["is_sponsored"].to_numpy(dtype=bool), at, fill=False)

    relevance = calibrated
    novelty = (NOVELTY_WEIGHT * (1.0 - percentile) * relevance).astype(np.float32)
    sponsored_boost = np.where(sponsored, SPONSORED_BOOST, 0.0).astype(np.float32)
    exploration = np.where(exploratory, EXPLORATION_WEIGHT * relevance, 0.0).astype(np.float32)

    rows = len(pool)
    scored = pd.DataFrame(
        {
            "subject_id": pool["subject_id"].to_numpy(dtype=np.int64),
            "item_id": item_ids,
            "prediction": prediction,
            "calibrated": calibrated,
            "utility": relevance + novelty + sponsored_boost + exploration,
            "utility_relevance": relevance,
            "utility_novelty": novelty,
            "utility_sponsored": sponsored_boost,
            "utility_exploration": exploration,
            # Text columns are coded (pipeline/text.py): an integer per row, not a string.
            "item_type": coded(items["item_type"], at),
            "category": coded(items["category"], at),
            "creator_id": coded(items["creator_id"], at),
            "is_sponsored": sponsored,
            "is_exploration_candidate": exploratory,
            "source_provenance": pd.Categorical(pool["source_provenance"]),
            "score_time": np.full(rows, pd.Timestamp(score_time).to_datetime64()),
        }
    )
    for column, value in {**lineage, "utility_policy_version": UTILITY_POLICY_VERSION}.items():
        scored[column] = constant(str(value), rows)
    return scored
