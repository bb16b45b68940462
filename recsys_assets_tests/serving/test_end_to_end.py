"""Serving what the real publisher wrote: fallback lists and a personalized version flip."""

from __future__ import annotations

from datetime import timedelta

import pandas as pd

from recsys_assets.data.snapshot import read_raw
from recsys_assets.publish import publish_version
from recsys_assets.publish.publisher import publish_fallback_partition
from recsys_assets_tests.serving.conftest import CONSUMER, World


def _records(world: World, items: list[int]) -> pd.DataFrame:
    now = pd.Timestamp(world.clock.now) - pd.Timedelta(minutes=10)
    return pd.DataFrame(
        {
            "subject_id": CONSUMER,
            "context_key": "default",
            "generated_at": now,
            "expires_at": now + pd.Timedelta(hours=6),
            "model_version": "model_e2e",
            "feature_set_version": "features_v1",
            "candidate_policy_version": "candidates_v1",
            "slate_policy_version": "slate_v1",
            "pipeline_run_id": "run-e2e",
            "source_data_snapshot": "snap",
            "position": range(1, len(items) + 1),
            "item_id": items,
            "item_type": "product",
            "score": [1.0 / rank for rank in range(1, len(items) + 1)],
            "calibrated": [0.5 / rank for rank in range(1, len(items) + 1)],
            "reason_codes": "two_tower",
            "source_provenance": "two_tower",
            "exploration": False,
            "propensity": 1.0,
        }
    )


def test_serves_what_publish_version_published(world: World) -> None:
    warehouse, settings = world.warehouse, world.settings
    fallback = publish_fallback_partition(
        warehouse, settings, "home_feed", "na", now=world.clock.now
    )
    assert fallback.published, fallback.summary()
    items = read_raw(warehouse, "items")
    first = publish_version(
        warehouse, settings, "home_feed", "na", _records(world, world.good[:60]),
        items=items, now=world.clock.now,
    )  # fmt: skip
    assert first.published, first.summary()
    service = world.service()

    response = service.recommend(CONSUMER, "home_feed", "na")
    assert response.served_from == "precomputed"
    assert response.version == first.version
    assert response.model_version == "model_e2e"
    assert [item["item_id"] for item in response.items] == world.good[:20]
    first = response.items[0]
    assert (first["score"], first["utility"], first["fallback_score"]) == (0.5, 1.0, None)

    other = int(read_raw(warehouse, "users")["user_id"].iloc[0])
    newcomer = service.recommend(other, "home_feed", "na")
    assert newcomer.served_from == "fallback"
    assert newcomer.version == fallback.version
    assert len(newcomer.items) == 20
    # Fallback items: no model probability; the list's popularity stands in its own field.
    assert {(item["score"], item["utility"]) for item in newcomer.items} == {(None, None)}
    popularity = [item["fallback_score"] for item in newcomer.items]
    assert all(value is not None and value >= 0 for value in popularity)

    second = publish_version(
        warehouse, settings, "home_feed", "na", _records(world, world.good[20:72]),
        items=items, now=world.clock.now + timedelta(seconds=1),
    )  # fmt: skip
    assert second.published, second.summary()
    service.refresh()
    flipped = service.recommend(CONSUMER, "home_feed", "na")
    assert flipped.version == second.version
    assert [item["item_id"] for item in flipped.items] == world.good[20:40]
