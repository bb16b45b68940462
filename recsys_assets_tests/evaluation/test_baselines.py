"""Baselines: same item rules as the pipeline, seen items filtered, deterministic, and useful."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from recsys_assets.data.holdout import temporal_holdout
from recsys_assets.evaluation.baselines import (
    baseline_lists,
    build_catalog,
    popularity_scorer,
    top_k_lists,
    training_matrices,
)
from recsys_assets.evaluation.metrics import evaluate_lists

NOW = pd.Timestamp("2026-11-01")
N_ITEMS = 120
N_GROUPS = 6


def catalog_items(n_items: int = N_ITEMS) -> pd.DataFrame:
    ids = np.arange(1, n_items + 1)
    frame = pd.DataFrame(
        {
            "item_id": ids,
            "item_type": "product",
            "title": None,
            "category": [f"c{(i - 1) % N_GROUPS}" for i in ids],
            "creator_id": "maker",
            "regions": "*",
            "status": "active",
            "policy_state": "approved",
            "stock": -1,
            "is_sponsored": False,
            "campaign_id": None,
            "campaign_end": pd.NaT,
            "risk_level": "low",
            "tenant_id": None,
            "required_role": None,
            "case_state": None,
            "created_at": NOW - pd.Timedelta(days=100),
        }
    )
    frame.loc[frame["item_id"] == 1, "policy_state"] = "banned"
    frame.loc[frame["item_id"] == 2, "regions"] = "eu"
    frame.loc[frame["item_id"] == 3, "tenant_id"] = "tenant_acme"
    return frame


def catalog_users(n_users: int) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "user_id": np.arange(1, n_users + 1),
            "region": "na",
            "tenant_id": None,
            "actor_role": None,
        }
    )


def clustered_interactions(n_users: int = 150, seed: int = 0) -> pd.DataFrame:
    """Each user clicks items of one taste group (item_id % 6), popularity skewed, over time."""
    rng = np.random.default_rng(seed)
    rows = []
    for user in range(1, n_users + 1):
        group = user % N_GROUPS
        members = np.arange(group + 1, N_ITEMS + 1, N_GROUPS)
        weights = 1.0 / np.arange(1, len(members) + 1)
        picks = rng.choice(members, size=12, replace=False, p=weights / weights.sum())
        for order, item in enumerate(picks):
            rows.append((user, int(item), "click", 1.0, NOW - pd.Timedelta(hours=200 - order)))
    return pd.DataFrame(rows, columns=["user_id", "item_id", "event_type", "value", "ts"])


def test_lists_obey_item_rules_and_skip_seen_items() -> None:
    data = clustered_interactions()
    catalog = build_catalog(catalog_items(), catalog_users(150), now=NOW, tenant_items=False)
    users = np.arange(1, 151)
    lists = baseline_lists(data, catalog, users, k=10, seed=0)
    seen = set(map(tuple, data[["user_id", "item_id"]].to_numpy()))
    for name, frame in lists.items():
        assert not frame["item_id"].isin([1, 2, 3]).any(), name  # banned, eu-only, tenant item
        assert not any(tuple(pair) in seen for pair in frame[["user_id", "item_id"]].to_numpy())
        assert frame.groupby("user_id").size().eq(10).all(), name
        assert (frame.groupby("user_id")["rank"].apply(list) == [list(range(1, 11))] * 150).all()


def test_popularity_orders_by_count_then_item_id() -> None:
    data = pd.DataFrame(
        {
            "user_id": [1, 2, 3, 1, 2, 4],
            "item_id": [20, 20, 20, 10, 30, 30],
            "event_type": "click",
            "value": 1.0,
            "ts": NOW - pd.Timedelta(days=1),
        }
    )
    catalog = build_catalog(catalog_items(40), catalog_users(5), now=NOW, tenant_items=False)
    matrices = training_matrices(data, catalog)
    lists = top_k_lists(popularity_scorer(matrices), matrices, catalog, np.array([4]), 4)
    # 20 (3 users) > 30 (2) > 10 (1) > the rest by item id, skipping 1-3 (rules) and 30 (seen).
    assert lists["item_id"].tolist() == [20, 10, 4, 5]


def test_baselines_are_deterministic() -> None:
    data = clustered_interactions(seed=4)
    catalog = build_catalog(catalog_items(), catalog_users(150), now=NOW, tenant_items=False)
    users = np.arange(1, 151)
    first = baseline_lists(data, catalog, users, k=10, seed=7)
    second = baseline_lists(data.copy(), catalog, users, k=10, seed=7)
    for name in first:
        pd.testing.assert_frame_equal(first[name], second[name])


def test_personalized_baselines_beat_popularity_on_clustered_tastes() -> None:
    data = clustered_interactions(seed=1)
    split = temporal_holdout(data, holdout=0.25, seed=0)
    catalog = build_catalog(catalog_items(), catalog_users(150), now=NOW, tenant_items=False)
    users = split.evaluated_users
    lists = baseline_lists(split.train, catalog, users, k=10, seed=0)
    recall = {
        name: evaluate_lists(
            frame,
            split.relevant,
            k=10,
            catalog_size=catalog.size,
            item_categories=catalog.categories,
            users=users,
        ).recall
        for name, frame in lists.items()
    }
    # Tastes are pure: neighbours and factors find the user's group, popularity cannot.
    assert recall["item_knn"] > recall["popularity"] + 0.1
    assert recall["als"] > recall["popularity"] + 0.1


def test_users_without_training_data_are_refused() -> None:
    data = clustered_interactions(n_users=10)
    catalog = build_catalog(catalog_items(), catalog_users(20), now=NOW, tenant_items=False)
    with pytest.raises(ValueError, match="no training interactions"):
        baseline_lists(data, catalog, np.array([15]), k=5, seed=0)
