"""Fallback lists: aggregates only, eligible items only, published like personal lists."""

from __future__ import annotations

from datetime import timedelta

import pandas as pd

from recsys_assets.publish import active_lists, publish_version, read_manifest
from recsys_assets.publish.fallback import MIN_DISTINCT_USERS, compute_fallback_lists
from recsys_assets.publish.versions import manifest_path
from recsys_assets.warehouse import Warehouse
from recsys_assets_tests.publish.builders import NOW, REGION, make_items, settings


def _users() -> pd.DataFrame:
    ids = list(range(1, 21))
    return pd.DataFrame(
        {
            "user_id": ids,
            "region": ["na"] * 10 + ["eu"] * 10,
            "tenant_id": [None] * 8 + ["acme", "acme"] + [None] * 10,
        }
    )


def _events(item_id: int, users: list[int], days_ago: float, event_type: str = "click"):
    return [
        {"user_id": u, "item_id": item_id, "event_type": event_type, "value": 1.0,
         "ts": pd.Timestamp(NOW) - pd.Timedelta(days=days_ago)}
        for u in users
    ]  # fmt: skip


def _inputs() -> dict:
    items = make_items(60)
    items.loc[items["item_id"] == 8, "risk_level"] = "high"
    items.loc[items["item_id"] == 4, "status"] = "inactive"
    cases = items["item_id"].between(50, 54)
    items.loc[cases, ["tenant_id", "item_type"]] = ["acme", "case"]
    items.loc[cases, "case_state"] = ["open", "open", "closed", "open", "in_progress"]
    items.loc[items["item_id"] == 53, "risk_level"] = "high"
    interactions = pd.DataFrame(
        _events(1, [1, 2, 3, 4, 5], days_ago=8)  # popular, not trending
        + _events(2, [1, 2], days_ago=1)  # too few users to be shown
        + _events(3, [11, 12, 13, 14], days_ago=1)  # popular in eu, not na
        + _events(4, [1, 2, 3, 4], days_ago=1)  # popular but inactive now
        + _events(5, [1, 2, 3, 6], days_ago=1)  # trending in na
        + _events(5, [7], days_ago=5)
        + _events(6, [1, 2, 3], days_ago=1, event_type="hide")  # hides never count
    )
    editorial = pd.DataFrame(
        {
            "list_name": ["picks", "picks", "picks", "old"],
            "region": "na",
            "item_id": [7, 8, 9, 10],
            "position": [1, 2, 3, 1],
            "valid_from": pd.Timestamp(NOW) - pd.Timedelta(days=1),
            "valid_to": [pd.Timestamp(NOW) + pd.Timedelta(days=1)] * 3
            + [pd.Timestamp(NOW) - pd.Timedelta(hours=1)],
        }
    )
    return {"items": items, "interactions": interactions, "users": _users(), "editorial": editorial}


def _compute(surface: str, inputs: dict) -> pd.DataFrame:
    config = settings()
    return compute_fallback_lists(
        surface=config.surface(surface),
        region=REGION,
        now=NOW,
        list_length=10,
        ttl=config.fallback.ttl,
        trending_window=timedelta(days=3),
        source_data_snapshot="snap_test",
        **inputs,
    )


def _items_of(lists: pd.DataFrame, key: str) -> list[int]:
    return lists.loc[lists["context_key"] == key].sort_values("position")["item_id"].tolist()


def test_public_fallback_lists_use_aggregates_and_eligible_items_only() -> None:
    lists = _compute("home_feed", _inputs())

    assert MIN_DISTINCT_USERS == 3
    popular = _items_of(lists, "popular_by_region")
    assert popular[:2] == [1, 5]  # then topped up with the newest eligible items
    assert len(popular) == 10
    assert not {2, 3, 4, 6} & set(popular[:2])
    assert not set(popular) & {4, 50, 51, 52, 53, 54}  # inactive and tenant-owned items never
    assert _items_of(lists, "trending_by_category:cat5") == [5]
    assert set(lists["context_key"]) >= {"editorial_safe", "new_user_default"}
    assert _items_of(lists, "editorial_safe") == [7, 9]  # 8 is high risk, 10's window ended
    row = lists.iloc[0]
    assert row["subject_id"] == -1
    assert row["expires_at"] - row["generated_at"] == pd.Timedelta(minutes=30)
    assert row["policy_version"] == "fallback_v1"
    assert "region=na" in row["eligibility_scope"]
    assert row["reason"]


def test_the_enterprise_surface_gets_each_tenants_open_cases() -> None:
    lists = _compute("enterprise_action_queue", _inputs())
    assert set(lists["context_key"]) == {"tenant_default_actions:acme"}
    assert _items_of(lists, "tenant_default_actions:acme") == [53, 50, 51]  # high risk, then newest


def test_fallback_lists_publish_under_their_own_manifest(warehouse: Warehouse) -> None:
    inputs = _inputs()
    lists = _compute("home_feed", inputs)
    now = NOW + timedelta(minutes=1)

    outcome = publish_version(
        warehouse, settings(), "home_feed", REGION, lists, items=inputs["items"], now=now,
        fallback=True,
    )  # fmt: skip

    assert outcome.published, outcome.failures
    assert warehouse.exists(manifest_path("home_feed", REGION, fallback=True))
    assert read_manifest(warehouse, "home_feed", REGION) is None  # personal lists untouched
    served = active_lists(warehouse, "home_feed", REGION, fallback=True)
    assert served["list_id"].iloc[0].startswith("fallback_home_feed_")
    assert set(served["context_key"]) == set(lists["context_key"])

    inputs["items"].loc[inputs["items"]["item_id"] == 1, "policy_state"] = "banned"
    refused = publish_version(
        warehouse, settings(), "home_feed", REGION, lists, items=inputs["items"], now=now,
        fallback=True,
    )  # fmt: skip
    assert not refused.published
    assert any("max_invalid_item_rate 0.0" in failure for failure in refused.failures)
    assert read_manifest(warehouse, "home_feed", REGION, fallback=True).active_version == (
        outcome.version
    )
