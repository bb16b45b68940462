"""The schedules' run requests, evaluated with build_schedule_context on a real instance."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import dagster as dg

from recsys_assets.automation.runs import ACTIVE_SINCE_TAG, REASONS_TAG, TRIGGER_TAG
from recsys_assets.automation.schedules import daily_full_refresh, hourly_incremental_refresh
from recsys_assets.config import load_settings
from recsys_assets.warehouse import Warehouse
from recsys_assets_tests.automation.conftest import recsys_for
from recsys_assets_tests.automation.helpers import NOW, write_manifest, write_users

SETTINGS = load_settings()


def evaluate(
    schedule: dg.ScheduleDefinition,
    when: datetime,
    warehouse: Warehouse,
    instance: dg.DagsterInstance,
) -> list[dg.RunRequest] | dg.SkipReason:
    """One tick at `when` (UTC); the context is closed again, with what it opened."""
    with dg.build_schedule_context(
        instance=instance,
        scheduled_execution_time=when.replace(tzinfo=UTC),
        resources={"recsys": recsys_for(warehouse)},
    ) as context:
        return schedule(context)


def test_daily_full_refresh_requests_every_partition_once_a_day(
    local_warehouse: Warehouse, instance: dg.DagsterInstance
) -> None:
    requests = evaluate(daily_full_refresh, datetime(2026, 11, 20, 2), local_warehouse, instance)
    assert len(requests) == len(SETTINGS.enabled_partitions())
    assert len({r.partition_key for r in requests}) == len(requests)
    assert {r.tags[TRIGGER_TAG] for r in requests} == {"daily_full_refresh"}
    assert requests[0].run_key == "daily:2026-11-20:na:home_feed"


def test_hourly_refresh_picks_active_and_expiring_partitions(
    local_warehouse: Warehouse, instance: dg.DagsterInstance
) -> None:
    generated = NOW - timedelta(hours=3)
    for region in SETTINGS.regions:
        for name in SETTINGS.surfaces:
            write_manifest(
                local_warehouse,
                name,
                region,
                generated_at=generated,
                expires_at=NOW + timedelta(days=1),
            )
    write_manifest(
        local_warehouse,
        "push",
        "apac",
        generated_at=generated,
        expires_at=NOW + timedelta(minutes=40),
    )
    write_users(local_warehouse, {5: ("latam", NOW - timedelta(hours=1))})
    requests = evaluate(hourly_incremental_refresh, NOW, local_warehouse, instance)

    by_key = {request.partition_key: request for request in requests}
    consumer_surfaces = [s for s in SETTINGS.surfaces if s != "enterprise_action_queue"]
    assert set(by_key) == {"apac|push"} | {f"latam|{surface}" for surface in consumer_surfaces}
    assert by_key["apac|push"].tags[REASONS_TAG] == "expiring"
    assert by_key["latam|home_feed"].tags[REASONS_TAG] == "active_subjects"
    assert by_key["latam|home_feed"].tags[ACTIVE_SINCE_TAG] == generated.isoformat()
    assert by_key["latam|home_feed"].run_key == f"hourly:{NOW.isoformat()}:latam:home_feed"


def test_hourly_refresh_skips_when_everything_is_fresh(
    local_warehouse: Warehouse, instance: dg.DagsterInstance
) -> None:
    for region in SETTINGS.regions:
        for name in SETTINGS.surfaces:
            write_manifest(
                local_warehouse, name, region, generated_at=NOW, expires_at=NOW + timedelta(days=1)
            )
    result = evaluate(hourly_incremental_refresh, NOW, local_warehouse, instance)
    assert isinstance(result, dg.SkipReason)
