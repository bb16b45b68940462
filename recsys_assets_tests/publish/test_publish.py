"""Publish, refuse, roll back and collect garbage against a real warehouse (local and S3)."""

from __future__ import annotations

from datetime import timedelta

import pytest

from recsys_assets.config import Settings
from recsys_assets.publish import (
    ACTIVE,
    PREVIOUS,
    ROLLED_BACK,
    RollbackRefused,
    active_lists,
    collect_garbage,
    mark_invalid,
    publish_version,
    read_manifest,
    rollback,
)
from recsys_assets.publish.lists import TRACKING_SECRET_ENV_VAR, MissingTrackingSecret
from recsys_assets.publish.versions import (
    format_version,
    manifest_path,
    version_path,
    versions_root,
)
from recsys_assets.warehouse import Warehouse
from recsys_assets_tests.publish.builders import (
    NOW,
    REGION,
    SURFACE,
    later,
    make_lists,
    settings,
)


def _retaining(count: int) -> Settings:
    base = settings()
    return base.model_copy(
        update={"publish": base.publish.model_copy(update={"retain_versions": count})}
    )


def _publish(warehouse: Warehouse, config: Settings | None = None):
    lists, items, subjects = make_lists()
    return publish_version(
        warehouse, config or settings(), SURFACE, REGION, lists, items=items, subjects=subjects,
        now=later(1), tracking_secret="s",
    )  # fmt: skip


def test_a_good_version_goes_live_with_lineage_and_a_decision_log(warehouse: Warehouse) -> None:
    outcome = _publish(warehouse)

    assert outcome.published, outcome.failures
    manifest = read_manifest(warehouse, SURFACE, REGION)
    assert manifest is not None
    assert manifest.active_version == outcome.version
    assert manifest.active_path == version_path(SURFACE, REGION, outcome.version)
    assert manifest.lineage["model_version"] == "model_test"
    assert manifest.lineage["source_data_snapshot"] == "snap_test"
    assert manifest.validation["passed"] is True
    assert manifest.expires_at == "2026-11-20T14:00:00"  # generated_at + push ttl (2h)
    assert [(entry.version, entry.status) for entry in manifest.history] == [
        (outcome.version, ACTIVE)
    ]
    lists = active_lists(warehouse, SURFACE, REGION)
    assert len(lists) == 5 * 10
    assert set(lists["version"]) == {outcome.version}
    assert lists["list_id"].iloc[0] == f"precomp_push_100_{outcome.version}"
    log = warehouse.read_parquet(f"{outcome.path}/decision_log.parquet")
    assert len(log) == 5
    assert log["tracking_tokens"].str.split("|").map(len).tolist() == [10] * 5
    assert log["scheduled_send_at"].notna().all()


def test_failing_validation_keeps_the_previous_version_and_says_why(
    warehouse: Warehouse,
) -> None:
    good = _publish(warehouse)
    before = warehouse.read_bytes(manifest_path(SURFACE, REGION))
    lists, items, subjects = make_lists()
    banned = lists.loc[lists["position"] <= 2, "item_id"].unique()
    items.loc[items["item_id"].isin(banned), "policy_state"] = "banned"

    bad = publish_version(
        warehouse, settings(), SURFACE, REGION, lists, items=items, subjects=subjects, now=later(2)
    )

    assert not bad.published
    assert any("invalid-item rate" in failure for failure in bad.failures)
    assert "not_approved" in bad.report.invalid_by_reason
    assert f"still serving {good.version}" in bad.summary()
    assert warehouse.read_bytes(manifest_path(SURFACE, REGION)) == before
    assert read_manifest(warehouse, SURFACE, REGION).active_version == good.version
    kept = warehouse.read_json(f"{bad.path}/validation.json")  # kept for inspection
    assert kept["validation"]["passed"] is False
    with pytest.raises(RollbackRefused, match="failed validation"):
        rollback(warehouse, SURFACE, REGION, to_version=bad.version, now=later(3))


def test_rollback_round_trip_and_refusals(warehouse: Warehouse) -> None:
    first = _publish(warehouse).version
    second = _publish(warehouse).version

    manifest = rollback(warehouse, SURFACE, REGION, reason="bad model", now=later(5))

    assert manifest.active_version == first
    assert manifest.entry(second).status == ROLLED_BACK
    assert "bad model" in manifest.entry(second).reason
    assert manifest.lineage["model_version"] == "model_test"
    assert set(active_lists(warehouse, SURFACE, REGION)["version"]) == {first}
    with pytest.raises(RollbackRefused, match="no previous version"):
        rollback(warehouse, SURFACE, REGION, now=later(5))
    with pytest.raises(RollbackRefused, match="marked rolled_back"):
        rollback(warehouse, SURFACE, REGION, to_version=second, now=later(5))

    third = _publish(warehouse).version
    manifest = read_manifest(warehouse, SURFACE, REGION)
    assert {e.version: e.status for e in manifest.history} == {
        third: ACTIVE,
        first: PREVIOUS,
        second: ROLLED_BACK,
    }
    with pytest.raises(RollbackRefused, match="expired"):
        rollback(warehouse, SURFACE, REGION, now=NOW + timedelta(hours=3))
    with pytest.raises(RollbackRefused, match="not in the retained history"):
        rollback(warehouse, SURFACE, REGION, to_version="v20000101T000000000000", now=later(5))
    with pytest.raises(RollbackRefused, match="already active"):
        rollback(warehouse, SURFACE, REGION, to_version=third, now=later(5))
    mark_invalid(warehouse, SURFACE, REGION, first, reason="leaked test items")
    with pytest.raises(RollbackRefused, match="marked invalid"):
        rollback(warehouse, SURFACE, REGION, to_version=first, now=later(5))
    assert read_manifest(warehouse, SURFACE, REGION).active_version == third


def test_retention_and_gc_never_remove_the_active_version(warehouse: Warehouse) -> None:
    config = _retaining(1)
    versions = [_publish(warehouse, config).version for _ in range(3)]
    manifest = read_manifest(warehouse, SURFACE, REGION)
    assert [entry.version for entry in manifest.history] == versions[:0:-1]
    assert warehouse.list_dirs(versions_root(SURFACE, REGION)) == versions[1:]

    rollback(warehouse, SURFACE, REGION, now=later(5))  # versions[1] active again
    crashed = format_version(NOW - timedelta(days=30))  # a publish killed mid-write long ago
    warehouse.write_bytes(f"{version_path(SURFACE, REGION, crashed)}/lists.parquet", b"partial")
    in_flight = format_version(NOW + timedelta(days=3650))  # minted after "now": inside the grace
    warehouse.write_bytes(f"{version_path(SURFACE, REGION, in_flight)}/lists.parquet", b"x")

    deleted = collect_garbage(warehouse, SURFACE, REGION)
    assert deleted == [crashed]
    everything = collect_garbage(
        warehouse, SURFACE, REGION, now=NOW + timedelta(days=36500), orphan_grace=timedelta(0)
    )
    assert everything == [in_flight]
    assert warehouse.list_dirs(versions_root(SURFACE, REGION)) == versions[1:]
    assert set(active_lists(warehouse, SURFACE, REGION)["version"]) == {versions[1]}


def test_push_lists_are_not_published_without_a_tracking_secret(
    local_warehouse: Warehouse, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: an unset secret fell back to a key in the source code (a warning only)."""
    monkeypatch.delenv(TRACKING_SECRET_ENV_VAR)
    lists, items, subjects = make_lists()
    with pytest.raises(MissingTrackingSecret, match=f"{TRACKING_SECRET_ENV_VAR} is not set"):
        publish_version(
            local_warehouse, settings(), SURFACE, REGION, lists, items=items, subjects=subjects,
            now=later(1),
        )  # fmt: skip
    assert read_manifest(local_warehouse, SURFACE, REGION) is None
    assert local_warehouse.list_dirs(versions_root(SURFACE, REGION)) == []

    monkeypatch.setenv(TRACKING_SECRET_ENV_VAR, "configured")
    outcome = publish_version(
        local_warehouse, settings(), SURFACE, REGION, lists, items=items, subjects=subjects,
        now=later(1),
    )  # fmt: skip
    assert outcome.published, outcome.failures
