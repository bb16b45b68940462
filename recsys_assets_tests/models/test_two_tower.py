"""The two-tower model learns planted structure, is deterministic, round-trips, and has
usable vectors for users and items it never saw."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from recsys_assets.data import read_raw
from recsys_assets.data.holdout import temporal_holdout
from recsys_assets.models.two_tower import (
    TwoTowerConfig,
    TwoTowerModel,
    TwoTowerResult,
    TwoTowerTrainingError,
    retrieval_recall,
    train_two_tower,
)
from recsys_assets.warehouse import Warehouse

CUTOFF = pd.Timestamp("2026-11-01")
CATEGORIES = 10
ITEMS_PER_CATEGORY = 30
USERS = 200
CONFIG = TwoTowerConfig(embedding_dim=16, epochs=4, seed=3)
CPU = torch.device("cpu")


def planted(seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Each user clicks only items of one category, spread over the 30 days before CUTOFF.

    Items are equally popular, so a model that beats random here learned the categories.
    """
    rng = np.random.default_rng(seed)
    item_ids = np.arange(CATEGORIES * ITEMS_PER_CATEGORY, dtype=np.int64) + 1000
    items = pd.DataFrame(
        {"item_id": item_ids, "category": [f"c{i // ITEMS_PER_CATEGORY}" for i in range(300)]}
    )
    events_per_user = 16
    users = np.repeat(np.arange(USERS, dtype=np.int64), events_per_user)
    favourite = users % CATEGORIES
    item = item_ids[
        favourite * ITEMS_PER_CATEGORY + rng.integers(0, ITEMS_PER_CATEGORY, len(users))
    ]
    seconds = rng.integers(0, 30 * 86_400, len(users))
    interactions = pd.DataFrame(
        {
            "user_id": users,
            "item_id": item,
            "event_type": np.where(rng.random(len(users)) < 0.8, "click", "purchase"),
            "value": 1.0,
            "ts": CUTOFF - pd.to_timedelta(seconds + 1, unit="s"),
        }
    )
    # Events at or after the cutoff (and hides) must not be learned from: make them loud.
    future = interactions.head(500).assign(item_id=item_ids[0], ts=CUTOFF + pd.Timedelta(hours=1))
    hides = interactions.head(500).assign(item_id=item_ids[1], event_type="hide")
    return pd.concat([interactions, future, hides], ignore_index=True), items


def train(
    interactions: pd.DataFrame, items: pd.DataFrame, config: TwoTowerConfig = CONFIG
) -> TwoTowerResult:
    return train_two_tower(
        interactions,
        items,
        cutoff=CUTOFF,
        config=config,
        device=CPU,
    )


def held_out_recall(
    interactions: pd.DataFrame, items: pd.DataFrame, config: TwoTowerConfig = CONFIG
) -> dict[str, float]:
    """Train on a per-user holdout's training part; recall of its held-out positives."""
    split = temporal_holdout(interactions[interactions["ts"] < CUTOFF], holdout=0.25, seed=0)
    model = train(split.train, items, config).model
    return retrieval_recall(
        model,
        split.train,
        split.relevant,
        items["item_id"].to_numpy(),
        max_users=config.max_validation_users,
        seed=config.seed,
    )


@pytest.fixture(scope="module")
def planted_result() -> TwoTowerResult:
    return train(*planted())


def test_planted_categories_are_learned_far_above_random(planted_result: TwoTowerResult) -> None:
    metrics = {**planted_result.metrics, **held_out_recall(*planted())}
    random_recall_50 = 50 / (CATEGORIES * ITEMS_PER_CATEGORY)
    assert metrics["validation_users"] > 100
    assert metrics["recall@50"] > 3 * random_recall_50
    assert metrics["recall@100"] >= metrics["recall@50"]
    assert metrics["recall@50"] > metrics["popularity_recall@50"] + 0.2
    assert metrics["train_positives"] > 0 and np.isfinite(metrics["final_loss"])
    assert metrics["train_seconds"] > 0


def test_future_events_and_hides_are_not_trained_on(planted_result: TwoTowerResult) -> None:
    model = planted_result.model
    # Item 1000 (category c0) only got 'future' clicks from users of every category; item
    # 1001 only hides. Neither can be closer to an off-category user than their own items.
    users = np.arange(1, USERS, CATEGORIES, dtype=np.int64)  # favourite category c1
    user_vectors = model.user_embeddings(users)
    own = model.item_embeddings(np.arange(1030, 1060, dtype=np.int64))
    leaked = model.item_embeddings(np.array([1000, 1001], dtype=np.int64))
    assert (user_vectors @ leaked.T).max() < (user_vectors @ own.T).mean()


def test_same_seed_same_model_and_metrics() -> None:
    interactions, items = planted(seed=1)
    first, second = train(interactions, items), train(interactions, items)
    ids = np.arange(USERS, dtype=np.int64)
    np.testing.assert_array_equal(
        first.model.user_embeddings(ids), second.model.user_embeddings(ids)
    )
    np.testing.assert_array_equal(
        first.model.item_embeddings(items["item_id"].to_numpy()),
        second.model.item_embeddings(items["item_id"].to_numpy()),
    )
    timing_free = {key: value for key, value in first.metrics.items() if key != "train_seconds"}
    assert timing_free == {k: v for k, v in second.metrics.items() if k != "train_seconds"}


def test_bytes_round_trip_gives_identical_vectors(planted_result: TwoTowerResult) -> None:
    model = planted_result.model
    loaded = TwoTowerModel.from_bytes(model.to_bytes(), device=CPU)
    users = np.array([0, 5, 199, 10_000], dtype=np.int64)  # the last one is unknown
    items = np.array([1000, 1299, 99_999], dtype=np.int64)
    np.testing.assert_array_equal(loaded.user_embeddings(users), model.user_embeddings(users))
    np.testing.assert_array_equal(loaded.item_embeddings(items), model.item_embeddings(items))
    assert loaded.categories == model.categories


def test_cold_users_and_new_items_get_unit_vectors(planted_result: TwoTowerResult) -> None:
    model = planted_result.model
    cold_users = model.user_embeddings(np.array([-5, 10_000], dtype=np.int64))
    np.testing.assert_allclose(np.linalg.norm(cold_users, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(cold_users[0], model.popularity_direction())

    # 5000 and 5001 are unknown to the model; 5000 comes with a category the model knows.
    vectors = model.item_embeddings(
        np.array([1031, 5000, 5001], dtype=np.int64), categories=np.array(["c1", "c1", "zz"])
    )
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    category_c1 = model.towers.category.weight[model.categories.index("c1") + 1].detach()
    np.testing.assert_allclose(
        vectors[1], (category_c1 / category_c1.norm()).numpy(), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_array_equal(vectors[2], model.popularity_direction())
    # The new c1 item is retrieved for c1 lovers ahead of items of other categories.
    lovers = model.user_embeddings(np.arange(1, USERS, CATEGORIES, dtype=np.int64))
    others = model.item_embeddings(np.arange(1100, 1130, dtype=np.int64))
    assert (lovers @ vectors[1]).mean() > (lovers @ others.T).mean()


def test_realistic_tiny_data_trains_and_reports_metrics(tiny_warehouse: Warehouse) -> None:
    interactions = read_raw(tiny_warehouse, "interactions")
    items = read_raw(tiny_warehouse, "items")
    cutoff = interactions["ts"].max() - pd.Timedelta(days=7)
    split = temporal_holdout(interactions[interactions["ts"] < cutoff], holdout=0.2, seed=0)
    result = train_two_tower(split.train, items, cutoff=cutoff, config=TwoTowerConfig(), device=CPU)
    metrics = retrieval_recall(
        result.model,
        split.train,
        split.relevant,
        items["item_id"].to_numpy(),
        max_users=5_000,
        seed=0,
    )
    assert metrics["validation_users"] > 20
    assert 50 / len(items) < metrics["recall@50"] <= metrics["recall@100"] <= 1.0
    vectors = result.model.item_embeddings(items["item_id"].to_numpy())
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)


def test_no_positives_before_cutoff_is_a_clear_error() -> None:
    interactions, items = planted()
    late = interactions.assign(ts=CUTOFF + pd.Timedelta(days=1))
    with pytest.raises(TwoTowerTrainingError, match="before the training cutoff"):
        train(late, items)
    views_only = interactions.assign(event_type="view")
    with pytest.raises(TwoTowerTrainingError, match="no positive interactions"):
        train(views_only, items)
