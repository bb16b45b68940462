"""Fill, top-up, fallback, stale policies, a missing store, the decision log and metrics."""

from __future__ import annotations

from datetime import timedelta

import pytest

from recsys_assets.data.snapshot import read_raw
from recsys_assets.rules.tombstones import write_tombstones
from recsys_assets.serving.decision_log import DECISION_LOG_PREFIX
from recsys_assets.serving.service import InvalidLimit, UnknownRegion, UnknownSurface
from recsys_assets_tests.serving.conftest import AGENT, CONSUMER, TENANT, World
from recsys_assets_tests.serving.published import write_version

FRESH = timedelta(hours=1)


def _home(
    world: World, lists: dict, *, age: timedelta = FRESH, ttl: timedelta = timedelta(hours=6)
):
    return write_version(
        world.warehouse,
        "home_feed",
        "na",
        lists,
        generated_at=world.clock.now - age,
        ttl=ttl,
    )


def _home_fallback(world: World, lists: dict, *, age: timedelta = timedelta(minutes=5)) -> str:
    return write_version(
        world.warehouse,
        "home_feed",
        "na",
        lists,
        generated_at=world.clock.now - age,
        ttl=timedelta(minutes=30),
        fallback=True,
        model_version="",
    )


def test_fill_stops_at_display_count_and_tops_up_without_duplicates(world: World) -> None:
    good, failing = world.good, world.failing
    _home(world, {CONSUMER: [failing["out_of_stock"], *good[:5]]})
    _home_fallback(world, {"popular_by_region": [good[3], failing["not_approved"], *good[5:40]]})
    service = world.service()

    full = service.recommend(CONSUMER, "home_feed", "na")
    ids = [item["item_id"] for item in full.items]
    assert ids == good[:5] + good[5:20]
    assert len(set(ids)) == len(ids) == 20
    assert full.served_from == "precomputed"
    assert full.items[5]["source_provenance"] == ("popular_by_region",)
    assert full.rejections == {"out_of_stock": 1, "not_approved": 1}

    limited = service.recommend(CONSUMER, "home_feed", "na", limit=3)
    assert [item["item_id"] for item in limited.items] == good[:3]


def test_subject_without_a_list_gets_the_new_user_default(world: World) -> None:
    _home(world, {CONSUMER: world.good[:30]})
    _home_fallback(
        world, {"new_user_default": world.good[30:45], "popular_by_region": world.good[:30]}
    )
    service = world.service()
    other_user = int(read_raw(world.warehouse, "users")["user_id"].iloc[3])
    response = service.recommend(other_user, "home_feed", "na")
    assert response.served_from == "fallback"
    assert response.list_id and "new_user_default" in response.list_id
    assert [item["item_id"] for item in response.items][:15] == world.good[30:45]


def test_nothing_qualifies_gives_an_empty_safe_response(world: World) -> None:
    failing = world.failing
    _home(world, {CONSUMER: [failing["inactive_or_deleted"], failing["not_in_region"]]})
    service = world.service()
    response = service.recommend(CONSUMER, "home_feed", "na")
    assert response.served_from == "empty"
    assert response.items == [] and response.list_id is None and response.version is None
    assert response.rejections == {"inactive_or_deleted": 1, "not_in_region": 1}


@pytest.mark.parametrize(
    ("surface", "ttl", "expired_for", "served_from"),
    [
        ("home_feed", timedelta(hours=6), timedelta(hours=1), "precomputed_stale"),
        ("home_feed", timedelta(hours=6), timedelta(hours=7), "fallback"),
        ("email_daily", timedelta(hours=24), timedelta(minutes=1), "empty"),
        ("enterprise_action_queue", timedelta(hours=1), timedelta(minutes=30), "precomputed_stale"),
        ("enterprise_action_queue", timedelta(hours=1), timedelta(hours=2), "fallback"),
    ],
)
def test_expired_list_follows_the_stale_policy(
    world: World, surface: str, ttl: timedelta, expired_for: timedelta, served_from: str
) -> None:
    subject = AGENT if surface == "enterprise_action_queue" else CONSUMER
    fallback_key = (
        f"tenant_default_actions:{TENANT}"
        if surface == "enterprise_action_queue"
        else "popular_by_region"
    )
    write_version(
        world.warehouse,
        surface,
        "na",
        {subject: world.good[:30]},
        generated_at=world.clock.now - ttl - expired_for,
        ttl=ttl,
    )
    write_version(
        world.warehouse,
        surface,
        "na",
        {fallback_key: world.good[30:45]},
        generated_at=world.clock.now - timedelta(minutes=5),
        ttl=timedelta(minutes=30),
        fallback=True,
    )
    service = world.service()
    response = service.recommend(subject, surface, "na")
    assert response.served_from == served_from
    if served_from == "precomputed_stale":
        assert response.items[0]["item_id"] == world.good[0]
    elif served_from == "fallback":
        assert response.items[0]["item_id"] == world.good[30]
    else:
        assert response.items == []
    outcome = {"precomputed_stale": "served_with_check", "fallback": "fallback"}
    text = service.metrics.exposition().decode()
    assert f'outcome="{outcome.get(served_from, "empty")}"' in text


def test_missing_store_falls_back_and_is_counted(world: World) -> None:
    _home_fallback(world, {"popular_by_region": world.good[:25]})
    service = world.service()
    missing = service.recommend(CONSUMER, "home_feed", "na")
    assert missing.served_from == "fallback"
    assert [item["item_id"] for item in missing.items] == world.good[:20]

    version = _home(world, {CONSUMER: world.good[25:50]})
    world.warehouse.delete(
        f"published/surface=home_feed/region=na/versions/{version}", recursive=True
    )
    service.refresh()  # the manifest names a version that cannot be read
    unavailable = service.recommend(CONSUMER, "home_feed", "na")
    assert unavailable.served_from == "fallback"
    text = service.metrics.exposition().decode()
    assert 'cause="manifest_missing"' in text
    assert 'cause="store_unavailable"' in text
    assert 'result="miss"' in text
    assert "recsys_serving_store_refresh_errors_total 1.0" in text


def test_tombstone_written_while_serving_applies_after_refresh(world: World) -> None:
    _home(world, {CONSUMER: world.good[:30]})
    service = world.service()
    assert service.recommend(CONSUMER, "home_feed", "na").items[0]["item_id"] == world.good[0]
    write_tombstones(
        world.warehouse,
        "creator-ban-1",
        [{"type": "creator_banned", "creator_id": read_creator(world, world.good[0])}],
        created_at=world.clock.now,
    )
    service.refresh()
    response = service.recommend(CONSUMER, "home_feed", "na")
    assert world.good[0] not in [item["item_id"] for item in response.items]
    assert response.rejections.get("tombstoned", 0) >= 1


def read_creator(world: World, item_id: int) -> str:
    items = read_raw(world.warehouse, "items")
    return str(items.loc[items["item_id"] == item_id, "creator_id"].iloc[0])


def test_bad_requests_raise_clear_errors(world: World) -> None:
    service = world.service()
    with pytest.raises(UnknownSurface, match="configured surfaces"):
        service.recommend(CONSUMER, "homefeed", "na")
    with pytest.raises(UnknownRegion, match="configured regions"):
        service.recommend(CONSUMER, "home_feed", "mars")
    with pytest.raises(InvalidLimit, match="display_count"):
        service.recommend(CONSUMER, "home_feed", "na", limit=21)


def test_every_response_is_in_the_decision_log(world: World) -> None:
    _home(world, {CONSUMER: world.good[:30]})
    service = world.service(start=True)
    first = service.recommend(CONSUMER, "home_feed", "na", context={"page": "home"})
    service.recommend(CONSUMER, "home_feed", "na", limit=5)
    service.close()
    folders = world.warehouse.list_dirs(DECISION_LOG_PREFIX)
    assert folders == [f"date={world.clock.now.date().isoformat()}"]
    log = world.warehouse.read_parquet(f"{DECISION_LOG_PREFIX}/{folders[0]}")
    assert len(log) == 2
    row = log.set_index("request_id").loc[first.request_id]
    assert list(row["item_ids"]) == world.good[:20]
    assert row["served_from"] == "precomputed" and row["version"] == first.version
    assert row["context"] == '{"page": "home"}'
