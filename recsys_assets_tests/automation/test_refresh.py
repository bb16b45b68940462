"""Which partitions need recomputing: expiry leads and subjects active since generation."""

from __future__ import annotations

from datetime import timedelta

from recsys_assets.automation.refresh import (
    ACTIVE_SUBJECTS,
    EXPIRING,
    UNPUBLISHED,
    expiring_lists,
    incremental_refresh_plan,
    refresh_lead,
)
from recsys_assets.config import load_settings
from recsys_assets.pipeline.partitions import SurfaceRegion
from recsys_assets.warehouse import Warehouse
from recsys_assets_tests.automation.helpers import NOW, write_manifest, write_users

SETTINGS = load_settings()


def publish_everything(warehouse: Warehouse, *, generated_hours_ago: float = 1) -> None:
    """Every partition published `generated_hours_ago`, with its surface's ttl."""
    generated = NOW - timedelta(hours=generated_hours_ago)
    for region in SETTINGS.regions:
        for name, surface in SETTINGS.surfaces.items():
            write_manifest(
                warehouse, name, region, generated_at=generated, expires_at=generated + surface.ttl
            )
            write_manifest(
                warehouse,
                name,
                region,
                generated_at=NOW,
                expires_at=NOW + SETTINGS.fallback.ttl,
                fallback=True,
            )


def test_refresh_lead_is_a_quarter_of_the_ttl_at_most_an_hour() -> None:
    assert refresh_lead(timedelta(hours=1)) == timedelta(minutes=15)
    assert refresh_lead(timedelta(days=7)) == timedelta(hours=1)


def test_lists_in_their_last_quarter_are_due(local_warehouse: Warehouse) -> None:
    publish_everything(local_warehouse, generated_hours_ago=1.75)
    due = expiring_lists(local_warehouse, SETTINGS, now=NOW)
    # push (ttl 2h) has 15 min left of a 30 min lead; enterprise (ttl 1h) has expired.
    assert {(entry.partition.surface, entry.scope) for entry in due} == {
        ("push", "lists"),
        ("enterprise_action_queue", "lists"),
    }
    # The enterprise queue only where it is enabled (surfaces.enterprise_action_queue.regions).
    assert len(due) == len(SETTINGS.regions) + len(
        SETTINGS.surface_regions("enterprise_action_queue")
    )


def test_fallback_lists_are_due_on_their_own_ttl(local_warehouse: Warehouse) -> None:
    publish_everything(local_warehouse, generated_hours_ago=0)
    write_manifest(
        local_warehouse,
        "home_feed",
        "na",
        generated_at=NOW - timedelta(minutes=25),
        expires_at=NOW + timedelta(minutes=5),
        version="v20261120T113500000000",
        fallback=True,
    )
    due = expiring_lists(local_warehouse, SETTINGS, now=NOW)
    assert [(e.partition, e.scope, e.version) for e in due] == [
        (SurfaceRegion("home_feed", "na"), "fallback", "v20261120T113500000000")
    ]


def test_incremental_plan_picks_unpublished_expiring_and_active(local_warehouse: Warehouse) -> None:
    publish_everything(local_warehouse, generated_hours_ago=2)
    # enterprise (1h) has expired, push (2h) expires now; na home_feed was never published.
    local_warehouse.delete("published/surface=home_feed/region=na/manifest.json")
    write_users(
        local_warehouse,
        {
            1: ("eu", NOW - timedelta(minutes=30)),  # active since the eu lists were generated
            2: ("apac", NOW - timedelta(days=3)),  # not active since
        },
    )
    plan = {
        entry.partition: entry
        for entry in incremental_refresh_plan(local_warehouse, SETTINGS, now=NOW)
    }

    assert plan[SurfaceRegion("home_feed", "na")].reasons == (UNPUBLISHED,)
    assert plan[SurfaceRegion("push", "apac")].reasons == (EXPIRING,)
    eu_home = plan[SurfaceRegion("home_feed", "eu")]
    assert eu_home.reasons == (ACTIVE_SUBJECTS,) and eu_home.active_subjects == 1
    assert eu_home.active_since == NOW - timedelta(hours=2)
    # The enterprise queue needs tenant actors: the active consumer is no subject of it.
    assert plan[SurfaceRegion("enterprise_action_queue", "eu")].reasons == (EXPIRING,)
    assert SurfaceRegion("home_feed", "apac") not in plan
    assert SurfaceRegion("digest_weekly", "latam") not in plan


def test_incremental_plan_without_raw_data_still_refreshes_expiring(
    local_warehouse: Warehouse,
) -> None:
    publish_everything(local_warehouse, generated_hours_ago=0)
    plan = incremental_refresh_plan(local_warehouse, SETTINGS, now=NOW)
    # Only the enterprise queue (ttl 1h) expires within the hour; no users table, no activity.
    assert {(entry.partition.surface, entry.reasons) for entry in plan} == {
        ("enterprise_action_queue", (EXPIRING,))
    }
    assert len(plan) == len(SETTINGS.surface_regions("enterprise_action_queue"))
