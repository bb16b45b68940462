"""The sensors on a real Dagster instance, against a local folder and against S3."""

from __future__ import annotations

from datetime import timedelta

import dagster as dg

from recsys_assets.automation.inbox import INCOMING, QUARANTINE
from recsys_assets.automation.runs import (
    CHANGE_TYPES_TAG,
    FALLBACK_ASSET,
    POLICY_FILES_TAG,
    SCOPE_TAG,
    TRIGGER_TAG,
)
from recsys_assets.automation.sensors import list_expiry_sensor, policy_change_sensor
from recsys_assets.config import load_settings
from recsys_assets.pipeline.jobs import REFRESH_JOB
from recsys_assets.rules.tombstones import load_tombstones
from recsys_assets.warehouse import Warehouse
from recsys_assets_tests.automation.conftest import automation_definitions, sensor_tick
from recsys_assets_tests.automation.helpers import NOW, change, drop_file, write_manifest

SETTINGS = load_settings()


def test_the_code_location_loads(local_warehouse: Warehouse) -> None:
    dg.Definitions.validate_loadable(automation_definitions(local_warehouse))


def test_policy_change_sensor_requests_exactly_the_affected_partitions(
    warehouse: Warehouse, instance: dg.DagsterInstance
) -> None:
    drop_file(warehouse, "bans.jsonl", change("ban-7", region="eu"))
    drop_file(warehouse, "broken.jsonl", '{"change_id": "x", "type": "item_banned"')
    result = sensor_tick(policy_change_sensor, instance, warehouse)

    requests = result.run_requests or []
    partitions = load_settings().surfaces
    assert sorted(request.partition_key for request in requests) == sorted(
        f"eu|{surface}" for surface in partitions
    )
    assert len({request.run_key for request in requests}) == len(requests)
    assert all("bans.jsonl" in str(request.run_key) for request in requests)
    assert requests[0].tags[TRIGGER_TAG] == "policy_change"
    assert requests[0].tags[POLICY_FILES_TAG] == "bans.jsonl"
    assert requests[0].tags[CHANGE_TYPES_TAG] == "item_banned"
    job = automation_definitions(warehouse).resolve_job_def(REFRESH_JOB)
    assert all(job.partitions_def.has_partition_key(r.partition_key) for r in requests)

    assert list(load_tombstones(warehouse)["item_id"]) == [7]
    report = warehouse.read_json(f"{QUARANTINE}/broken.jsonl.errors.json")
    assert report["errors"][0]["line"] == 1 and "not valid JSON" in report["errors"][0]["error"]

    # Restart with the stored cursor: no new request; the files leave incoming/.
    restarted = sensor_tick(policy_change_sensor, instance, warehouse, cursor=result.cursor)
    assert not restarted.run_requests
    assert warehouse.list(INCOMING) == []

    # A new file: only its partitions, under its own run keys.
    drop_file(
        warehouse, "na.jsonl", change("oos-3", "item_out_of_stock", item_ids=[3], region="na")
    )
    later = sensor_tick(policy_change_sensor, instance, warehouse, cursor=restarted.cursor)
    assert {r.partition_key.split("|")[0] for r in later.run_requests or []} == {"na"}
    assert all("na.jsonl" in str(r.run_key) for r in later.run_requests or [])


def test_consent_revocation_suppresses_at_once_without_runs(
    local_warehouse: Warehouse, instance: dg.DagsterInstance
) -> None:
    drop_file(local_warehouse, "consent.jsonl", change("c-1", "consent_revoked", user_ids=[42]))
    result = sensor_tick(policy_change_sensor, instance, local_warehouse)
    assert not result.run_requests
    assert list(load_tombstones(local_warehouse)["user_id"]) == [42]


def test_list_expiry_sensor_refreshes_once_per_expiring_version(
    local_warehouse: Warehouse, instance: dg.DagsterInstance
) -> None:
    fresh = {"generated_at": NOW, "expires_at": NOW + timedelta(hours=5)}
    write_manifest(local_warehouse, "home_feed", "na", **fresh)
    write_manifest(
        local_warehouse, "push", "na", generated_at=NOW, expires_at=NOW + timedelta(minutes=20)
    )
    write_manifest(
        local_warehouse,
        "home_feed",
        "na",
        generated_at=NOW,
        expires_at=NOW + timedelta(minutes=3),
        version="v20261120T114000000000",
        fallback=True,
    )
    requests = sensor_tick(list_expiry_sensor, instance, local_warehouse).run_requests or []
    by_partition = {request.partition_key: request for request in requests}

    assert set(by_partition) == {"na|push", "na|home_feed"}
    assert by_partition["na|push"].asset_selection is None
    assert by_partition["na|push"].tags[SCOPE_TAG] == "lists"
    assert by_partition["na|home_feed"].asset_selection == [FALLBACK_ASSET]
    assert "v20261120T114000000000" in str(by_partition["na|home_feed"].run_key)


def test_list_expiry_sensor_leaves_partitions_with_a_refresh_in_flight(
    local_warehouse: Warehouse, instance: dg.DagsterInstance
) -> None:
    write_manifest(
        local_warehouse, "push", "eu", generated_at=NOW, expires_at=NOW + timedelta(minutes=5)
    )
    before = sensor_tick(list_expiry_sensor, instance, local_warehouse)
    assert [request.partition_key for request in before.run_requests or []] == ["eu|push"]

    job = automation_definitions(local_warehouse).resolve_job_def(REFRESH_JOB)
    running = instance.create_run_for_job(
        job,
        status=dg.DagsterRunStatus.STARTED,
        tags={"dagster/partition": "eu|push", SCOPE_TAG: "lists"},
    )
    try:
        assert not sensor_tick(list_expiry_sensor, instance, local_warehouse).run_requests
    finally:
        instance.delete_run(running.run_id)
