"""The ranker's training rows: real pools, real features, labels from after the pools.

The leak test is a property of the construction, not of a model: when what users do next
is drawn independently of their past, no feature may tell the engaged rows from the
others. A feature that did would be computed from the label itself (an age of 0 at the
label's time, a stock drawn down by it, a count that includes it).
"""

from __future__ import annotations

import duckdb
import numpy as np
import pandas as pd
import pytest

from recsys_assets.config import load_settings
from recsys_assets.data import read_raw
from recsys_assets.data.holdout import HoldoutSplit, temporal_holdout
from recsys_assets.models.calibration import roc_auc
from recsys_assets.models.collaborative import fit_collaborative
from recsys_assets.pipeline.features import FEATURE_COLUMNS
from recsys_assets.pipeline.training_rows import RetrievalModels, pool_training_rows
from recsys_assets.warehouse import Warehouse

TABLES = ("users", "items", "interactions", "exposures", "user_controls", "editorial")


def _tables(warehouse: Warehouse) -> dict[str, pd.DataFrame]:
    tables = {table: read_raw(warehouse, table) for table in TABLES}
    interactions = tables["interactions"]
    # Clicks and purchases only: every engaged item is consumed, so pools hold only items
    # the subject never touched, exactly the items random labels are drawn from.
    tables["interactions"] = interactions[interactions["event_type"].isin(["click", "purchase"])]
    return tables


def _random_future(split: HoldoutSplit, items: np.ndarray, seed: int) -> HoldoutSplit:
    """The same training part, with held-out positives drawn uniformly at random."""
    rng = np.random.default_rng(seed)
    users = np.unique(split.train["user_id"].to_numpy(dtype=np.int64))
    drawn = pd.DataFrame(
        {"user_id": np.repeat(users, 6), "item_id": rng.choice(items, size=len(users) * 6)}
    )
    seen = split.train[["user_id", "item_id"]].drop_duplicates().assign(_seen=True)
    drawn = drawn.merge(seen, on=["user_id", "item_id"], how="left")
    relevant = drawn[drawn["_seen"].isna()][["user_id", "item_id"]].drop_duplicates()
    return HoldoutSplit(
        train=split.train,
        held_out=relevant.assign(event_type="click", value=1.0, ts=split.split_time),
        relevant=relevant.astype("int64").reset_index(drop=True),
        split_time=split.split_time,
        holdout=split.holdout,
        seed=seed,
        users_with_interactions=len(users),
        users_excluded=0,
    )


def _rows(warehouse: Warehouse, split: HoldoutSplit, tables: dict[str, pd.DataFrame]):
    return pool_training_rows(
        duckdb.connect(),
        split,
        tables=tables,
        models=RetrievalModels(two_tower=None, collaborative=fit_collaborative(split.train)),
        settings=load_settings(),
    )


def test_no_feature_separates_random_labels(tiny_warehouse: Warehouse) -> None:
    tables = _tables(tiny_warehouse)
    split = temporal_holdout(tables["interactions"], holdout=0.2, seed=0)
    random_split = _random_future(split, tables["items"]["item_id"].to_numpy(), seed=1)
    rows = _rows(tiny_warehouse, random_split, tables)
    labels = rows["label"].to_numpy()
    assert labels.sum() > 300, "too few labelled rows for the property to mean anything"
    assert (pd.to_datetime(rows["feature_timestamp"]) < split.split_time).all()
    separating = {}
    for feature in FEATURE_COLUMNS:
        values = rows[feature].to_numpy(dtype=np.float64)
        if np.ptp(values) == 0:
            continue
        auc = roc_auc(labels, values)
        if abs(auc - 0.5) > 0.08:
            separating[feature] = round(auc, 3)
    assert not separating, f"features separate labels drawn at random: {separating}"


def test_real_labels_are_learnable_and_come_from_the_future(tiny_warehouse: Warehouse) -> None:
    tables = _tables(tiny_warehouse)
    split = temporal_holdout(tables["interactions"], holdout=0.2, seed=0)
    rows = _rows(tiny_warehouse, split, tables)
    positives = rows[rows["label"] == 1][["subject_id", "item_id"]]
    held = split.relevant.rename(columns={"user_id": "subject_id"})
    assert len(positives) > 0
    assert len(positives.merge(held)) == len(positives)  # every positive is a held-out one
    train_pairs = split.train.rename(columns={"user_id": "subject_id"})[["subject_id", "item_id"]]
    assert positives.merge(train_pairs).empty  # never an item already engaged with
    # The seeded users have real preferences: the history scores find them.
    assert roc_auc(rows["label"].to_numpy(), rows["collaborative_score"].to_numpy()) > 0.6


@pytest.mark.parametrize("limit", [5])
def test_training_subjects_are_capped_by_configuration(
    tiny_warehouse: Warehouse, limit: int
) -> None:
    tables = _tables(tiny_warehouse)
    split = temporal_holdout(tables["interactions"], holdout=0.2, seed=0)
    settings = load_settings()
    capped = settings.model_copy(
        update={"training": settings.training.model_copy(update={"max_training_subjects": limit})}
    )
    rows = pool_training_rows(
        duckdb.connect(),
        split,
        tables=tables,
        models=RetrievalModels(two_tower=None, collaborative=None),
        settings=capped,
    )
    assert 0 < rows["subject_id"].nunique() <= limit
