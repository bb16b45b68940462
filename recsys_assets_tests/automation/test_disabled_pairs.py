"""Schedules, sensors, the refresh planner and backfills never ask for a pair a surface's
`regions` leaves out (the packaged enterprise_action_queue has no tenant in latam)."""

from __future__ import annotations

from datetime import UTC, timedelta

import dagster as dg
import pytest

from recsys_assets.automation.backfills import backfill_partitions
from recsys_assets.automation.inbox import DeferredRefresh, PolicyChangeCursor, scan_inbox
from recsys_assets.automation.refresh import expiring_lists, incremental_refresh_plan
from recsys_assets.automation.schedules import daily_full_refresh
from recsys_assets.automation.sensors import list_expiry_sensor
from recsys_assets.config import ConfigError, load_settings
from recsys_assets.pipeline.partitions import SurfaceRegion
from recsys_assets.warehouse import Warehouse
from recsys_assets_tests.automation.conftest import recsys_for, sensor_tick
from recsys_assets_tests.automation.helpers import NOW, change, drop_file, write_manifest

SETTINGS = load_settings()
DISABLED = SurfaceRegion("enterprise_action_queue", "latam")
ENABLED_KEYS = {str(SurfaceRegion(s, r).to_key()) for s, r in SETTINGS.enabled_partitions()}


def expire_everywhere(warehouse: Warehouse) -> None:
    """A lapsed manifest for every pair of the grid, the disabled one included (as a
    configuration change would leave behind)."""
    for region in SETTINGS.regions:
        for surface in SETTINGS.surfaces:
            write_manifest(
                warehouse,
                surface,
                region,
                generated_at=NOW - timedelta(days=8),
                expires_at=NOW - timedelta(minutes=1),
            )


def test_daily_full_refresh_requests_only_enabled_pairs(
    local_warehouse: Warehouse, instance: dg.DagsterInstance
) -> None:
    with dg.build_schedule_context(
        instance=instance,
        scheduled_execution_time=NOW.replace(hour=2, tzinfo=UTC),
        resources={"recsys": recsys_for(local_warehouse)},
    ) as context:
        requests = daily_full_refresh(context)
    assert {request.partition_key for request in requests} == ENABLED_KEYS
    assert str(DISABLED.to_key()) not in ENABLED_KEYS


def test_refresh_planner_leaves_the_disabled_pair_alone(local_warehouse: Warehouse) -> None:
    unpublished = incremental_refresh_plan(local_warehouse, SETTINGS, now=NOW)
    assert {str(entry.partition.to_key()) for entry in unpublished} == ENABLED_KEYS
    expire_everywhere(local_warehouse)
    due = expiring_lists(local_warehouse, SETTINGS, now=NOW)
    assert {str(entry.partition.to_key()) for entry in due} == ENABLED_KEYS


def test_list_expiry_sensor_requests_no_run_for_the_disabled_pair(
    local_warehouse: Warehouse, instance: dg.DagsterInstance
) -> None:
    expire_everywhere(local_warehouse)
    result = sensor_tick(list_expiry_sensor, instance, local_warehouse)
    assert {request.partition_key for request in result.run_requests or []} == ENABLED_KEYS


def test_policy_changes_recompute_only_enabled_pairs(local_warehouse: Warehouse) -> None:
    drop_file(local_warehouse, "latam-ban.jsonl", change("ban-latam", region="latam"))
    owed = DeferredRefresh(DISABLED, NOW - timedelta(minutes=5), "policy_change:owed")
    tick = scan_inbox(local_warehouse, SETTINGS, PolicyChangeCursor(deferred=[owed]), now=NOW)
    requested = {refresh.partition for refresh in tick.refreshes}
    assert requested == {
        SurfaceRegion(surface, "latam")
        for surface in SETTINGS.surfaces
        if surface != DISABLED.surface
    }
    assert tick.cursor.deferred == [], "a refresh owed to a pair switched off since is dropped"


def test_backfills_skip_the_disabled_pair_and_refuse_it_alone() -> None:
    latam = backfill_partitions(SETTINGS, regions=["latam"])
    assert DISABLED not in latam and len(latam) == len(SETTINGS.surfaces) - 1
    with pytest.raises(ConfigError, match=r"surfaces\.enterprise_action_queue\.regions"):
        backfill_partitions(SETTINGS, regions=["latam"], surfaces=[DISABLED.surface])
