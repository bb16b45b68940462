"""Baselines: same item rules as the pipeline, seen items filtered, deterministic, and useful."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from recsys_assets.data.holdout import temporal_holdout
from recsys_assets.evaluation.baselines import (
    baseline_lists,
    build_catalog,
    ease_scorer,
    fit_ease,
    popularity_scorer,
    top_k_lists,
    training_matrices,
)
from recsys_assets.evaluation.metrics import evaluate_lists
from recsys_assets.models.collaborative import choose_l2, fit_collaborative

NOW = pd.Timestamp("2026-11-01")
HOLDOUT = 0.25
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
    lists = baseline_lists(data, catalog, users, k=10, seed=0, holdout=HOLDOUT)
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
    first = baseline_lists(data, catalog, users, k=10, seed=7, holdout=HOLDOUT)
    second = baseline_lists(data.copy(), catalog, users, k=10, seed=7, holdout=HOLDOUT)
    for name in first:
        pd.testing.assert_frame_equal(first[name], second[name])


def test_personalized_baselines_beat_popularity_on_clustered_tastes() -> None:
    data = clustered_interactions(seed=1)
    split = temporal_holdout(data, holdout=HOLDOUT, seed=0)
    catalog = build_catalog(catalog_items(), catalog_users(150), now=NOW, tenant_items=False)
    users = split.evaluated_users
    lists = baseline_lists(split.train, catalog, users, k=10, seed=0, holdout=HOLDOUT)
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
    assert recall["ease"] > recall["popularity"] + 0.1


def test_ease_tunes_lambda_inside_the_training_part_then_fits_all_of_it() -> None:
    split = temporal_holdout(clustered_interactions(seed=2), holdout=HOLDOUT, seed=0)
    model = fit_ease(split.train, holdout=HOLDOUT, seed=0)
    inner = temporal_holdout(split.train, holdout=HOLDOUT, seed=0)
    assert model.l2 == choose_l2(inner.train, inner.relevant)
    whole = fit_collaborative(split.train, l2=model.l2)
    np.testing.assert_array_equal(model.item_ids, whole.item_ids)
    np.testing.assert_array_equal(model.weights, whole.weights)


def test_ease_ranks_items_it_does_not_cover_last_but_keeps_them() -> None:
    # Items 4..9 are engaged with (covered); 10..20 never are. Items 1-3 fail the rules.
    pairs = [(1, 4), (1, 5), (2, 4), (2, 6), (2, 7), (3, 5), (3, 8), (3, 9), (4, 6), (4, 9)]
    data = pd.DataFrame(
        {
            "user_id": [user for user, _ in pairs],
            "item_id": [item for _, item in pairs],
            "event_type": "click",
            "value": 1.0,
            "ts": NOW - pd.Timedelta(days=1),
        }
    )
    catalog = build_catalog(catalog_items(20), catalog_users(4), now=NOW, tenant_items=False)
    matrices = training_matrices(data, catalog)
    model = fit_collaborative(data, l2=1.0)
    scorer = ease_scorer(model, data, matrices, catalog)
    lists = top_k_lists(scorer, matrices, catalog, np.array([1]), 20)
    items = lists["item_id"].tolist()
    assert sorted(items[:4]) == [6, 7, 8, 9]  # every covered, unseen item first
    assert sorted(items[4:]) == list(range(10, 21))  # then the rest, still allowed


def test_users_without_training_data_are_refused() -> None:
    data = clustered_interactions(n_users=10)
    catalog = build_catalog(catalog_items(), catalog_users(20), now=NOW, tenant_items=False)
    with pytest.raises(ValueError, match="no training interactions"):
        baseline_lists(data, catalog, np.array([15]), k=5, seed=0, holdout=HOLDOUT)
