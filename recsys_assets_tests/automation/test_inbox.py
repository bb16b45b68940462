"""The inbox: apply each file once, quarantine bad lines, survive restarts and crashes."""

from __future__ import annotations

import json
from datetime import timedelta

from recsys_assets.automation.inbox import (
    ERROR_REPORT_SUFFIX,
    INCOMING,
    PROCESSED,
    QUARANTINE,
    PolicyChangeCursor,
    scan_inbox,
)
from recsys_assets.config import load_settings
from recsys_assets.pipeline.partitions import SurfaceRegion
from recsys_assets.rules.tombstones import load_tombstones
from recsys_assets.warehouse import Warehouse
from recsys_assets_tests.automation.helpers import NOW, change, drop_file, write_users

SETTINGS = load_settings()
EU = {SurfaceRegion(surface, "eu") for surface in SETTINGS.surfaces}


def roundtrip(cursor: PolicyChangeCursor) -> PolicyChangeCursor:
    """As Dagster stores it: JSON text between ticks."""
    return PolicyChangeCursor.from_json(cursor.to_json())


def test_file_is_applied_once_and_moved_after_its_runs_are_committed(warehouse: Warehouse) -> None:
    path = drop_file(warehouse, "2026-11-20T1100.jsonl", change("ban-7", region="eu"))
    first = scan_inbox(warehouse, SETTINGS, PolicyChangeCursor(), now=NOW)

    assert list(load_tombstones(warehouse)["item_id"]) == [7]
    assert {refresh.partition for refresh in first.refreshes} == EU
    identity = first.outcomes[0].file.identity
    assert all(identity in refresh.run_key for refresh in first.refreshes)
    assert warehouse.exists(path), "stays in incoming/ until the cursor is committed"
    assert warehouse.exists(f"{PROCESSED}/2026-11-20T1100.jsonl")

    second = scan_inbox(warehouse, SETTINGS, roundtrip(first.cursor), now=NOW)
    assert second.outcomes == [] and second.refreshes == []
    assert second.archived == [path]
    assert warehouse.list(INCOMING) == []


def test_bad_lines_are_quarantined_while_good_lines_take_effect(warehouse: Warehouse) -> None:
    drop_file(
        warehouse,
        "mixed.jsonl",
        change("ban-1", region="na"),
        "{broken",
        change("ban-2", region="mars"),
        change("ban-3", item_ids=[9], region="na"),
    )
    drop_file(warehouse, "garbage.jsonl", "not json at all")
    tick = scan_inbox(warehouse, SETTINGS, PolicyChangeCursor(), now=NOW)

    assert sorted(load_tombstones(warehouse)["change_id"]) == ["ban-1", "ban-3"]
    assert {refresh.partition.region for refresh in tick.refreshes} == {"na"}
    report = warehouse.read_json(f"{QUARANTINE}/mixed.jsonl.errors.json")
    assert report["file"] == f"{INCOMING}/mixed.jsonl"
    assert report["changes_applied"] == 2
    assert [(error["line"], error["error"][:14]) for error in report["errors"]] == [
        (2, "not valid JSON"),
        (3, "region 'mars' "),
    ]
    quarantined = warehouse.read_bytes(f"{QUARANTINE}/mixed.jsonl").decode().splitlines()
    assert len(quarantined) == 2 and quarantined[0] == "{broken"
    assert warehouse.exists(f"{PROCESSED}/mixed.jsonl")

    garbage = warehouse.read_json(f"{QUARANTINE}/garbage.jsonl.errors.json")
    assert garbage["changes_applied"] == 0 and garbage["errors"][0]["line"] == 1
    assert not warehouse.exists(f"{PROCESSED}/garbage.jsonl")

    after = scan_inbox(warehouse, SETTINGS, roundtrip(tick.cursor), now=NOW)
    assert sorted(after.archived) == [f"{INCOMING}/garbage.jsonl", f"{INCOMING}/mixed.jsonl"]
    assert warehouse.list(INCOMING) == []


def test_restart_resumes_from_the_cursor_with_names_in_any_order(warehouse: Warehouse) -> None:
    drop_file(warehouse, "z-late-name.jsonl", change("ban-z", region="na"))
    first = scan_inbox(warehouse, SETTINGS, PolicyChangeCursor(), now=NOW)
    stored = first.cursor.to_json()

    # A restarted sensor with the stored cursor: nothing is applied or requested again.
    again = scan_inbox(warehouse, SETTINGS, PolicyChangeCursor.from_json(stored), now=NOW)
    assert again.outcomes == [] and again.refreshes == []

    # A file whose name sorts *before* the one already seen is still found, and only it.
    drop_file(warehouse, "a-early-name.jsonl", change("ban-a", region="eu"))
    later = scan_inbox(warehouse, SETTINGS, roundtrip(again.cursor), now=NOW + timedelta(1))
    assert [outcome.file.name for outcome in later.outcomes] == ["a-early-name.jsonl"]
    assert {refresh.partition for refresh in later.refreshes} == EU


def test_a_crashed_tick_is_repeated_without_double_effects(local_warehouse: Warehouse) -> None:
    drop_file(local_warehouse, "one.jsonl", change("ban-1", region="eu"))
    crashed = scan_inbox(local_warehouse, SETTINGS, PolicyChangeCursor(), now=NOW)
    retried = scan_inbox(local_warehouse, SETTINGS, PolicyChangeCursor(), now=NOW)

    assert [r.run_key for r in retried.refreshes] == [r.run_key for r in crashed.refreshes]
    assert local_warehouse.list("tombstones") == ["tombstones/ban-1.parquet"]
    assert local_warehouse.list(PROCESSED) == [f"{PROCESSED}/one.jsonl"]


def test_several_files_for_one_partition_need_one_run(local_warehouse: Warehouse) -> None:
    drop_file(local_warehouse, "a.jsonl", change("ban-1", region="eu"))
    drop_file(local_warehouse, "b.jsonl", change("oos-1", "item_out_of_stock", item_ids=[3]))
    tick = scan_inbox(local_warehouse, SETTINGS, PolicyChangeCursor(), now=NOW)

    assert len(tick.refreshes) == len(SETTINGS.enabled_partitions())
    home_eu = next(r for r in tick.refreshes if r.partition == SurfaceRegion("home_feed", "eu"))
    assert home_eu.files == ("a.jsonl", "b.jsonl")
    assert home_eu.change_types == ("item_banned", "item_out_of_stock")


def test_a_reused_name_with_new_content_is_a_new_file(local_warehouse: Warehouse) -> None:
    drop_file(local_warehouse, "daily.jsonl", change("ban-1", region="eu"))
    first = scan_inbox(local_warehouse, SETTINGS, PolicyChangeCursor(), now=NOW)
    second = scan_inbox(local_warehouse, SETTINGS, roundtrip(first.cursor), now=NOW)
    assert second.archived == [f"{INCOMING}/daily.jsonl"]

    drop_file(local_warehouse, "daily.jsonl", change("ban-2", item_ids=[8, 9], region="na"))
    third = scan_inbox(local_warehouse, SETTINGS, roundtrip(second.cursor), now=NOW)
    assert [outcome.changes[0].change_id for outcome in third.outcomes] == ["ban-2"]
    archived = local_warehouse.list(PROCESSED)
    assert len(archived) == 2 and f"{PROCESSED}/daily.jsonl" in archived


def test_future_changes_refresh_when_they_take_effect(local_warehouse: Warehouse) -> None:
    effective = NOW + timedelta(hours=2)
    drop_file(
        local_warehouse,
        "later.jsonl",
        change("ban-later", region="eu", effective_at=effective.isoformat()),
    )
    tick = scan_inbox(local_warehouse, SETTINGS, PolicyChangeCursor(), now=NOW)
    assert tick.refreshes == []
    assert {entry.partition for entry in tick.cursor.deferred} == EU
    assert load_tombstones(local_warehouse)["effective_at"].iloc[0] == effective

    early = scan_inbox(
        local_warehouse, SETTINGS, roundtrip(tick.cursor), now=NOW + timedelta(hours=1)
    )
    assert early.refreshes == [] and len(early.cursor.deferred) == len(EU)
    due = scan_inbox(local_warehouse, SETTINGS, roundtrip(early.cursor), now=effective)
    assert {refresh.partition for refresh in due.refreshes} == EU
    assert due.cursor.deferred == []


def test_work_is_bounded_per_tick(local_warehouse: Warehouse) -> None:
    for index in range(3):
        drop_file(local_warehouse, f"f{index}.jsonl", change(f"ban-{index}", region="eu"))
    tick = scan_inbox(local_warehouse, SETTINGS, PolicyChangeCursor(), now=NOW, max_files=2)
    assert [o.file.name for o in tick.outcomes] == ["f0.jsonl", "f1.jsonl"] and tick.waiting == 1
    rest = scan_inbox(local_warehouse, SETTINGS, roundtrip(tick.cursor), now=NOW, max_files=2)
    assert [o.file.name for o in rest.outcomes] == ["f2.jsonl"] and rest.waiting == 0


def quarantine_errors(warehouse: Warehouse, name: str) -> list[tuple[int, str]]:
    report = warehouse.read_json(f"{QUARANTINE}/{name}{ERROR_REPORT_SUFFIX}")
    return [(error["line"], error["error"]) for error in report["errors"]]


def test_an_id_too_large_for_int64_quarantines_its_line_not_the_tick(
    local_warehouse: Warehouse,
) -> None:
    """Regression: `item_ids: [99999999999999999999999]` raised OverflowError on every tick."""
    drop_file(
        local_warehouse,
        "a-huge.jsonl",
        change("huge", item_ids=[99999999999999999999999]),
        change("ban-ok", item_ids=[3]),
    )
    drop_file(local_warehouse, "b-later.jsonl", change("ban-later", item_ids=[4]))
    tick = scan_inbox(local_warehouse, SETTINGS, PolicyChangeCursor(), now=NOW)

    assert sorted(load_tombstones(local_warehouse)["item_id"]) == [3, 4]
    [(line, error)] = quarantine_errors(local_warehouse, "a-huge.jsonl")
    assert line == 1 and "at most 9223372036854775807" in error
    scan_inbox(local_warehouse, SETTINGS, roundtrip(tick.cursor), now=NOW)
    assert local_warehouse.list(INCOMING) == []


def test_a_reused_change_id_with_other_content_is_quarantined(local_warehouse: Warehouse) -> None:
    """Regression: the second `ban-1` (other items) was dropped yet reported as applied."""
    drop_file(local_warehouse, "a.jsonl", change("ban-1", item_ids=[7]))
    drop_file(local_warehouse, "b.jsonl", change("ban-1", item_ids=[8]))
    drop_file(local_warehouse, "c.jsonl", change("ban-1", item_ids=[7]))  # identical re-send
    tick = scan_inbox(local_warehouse, SETTINGS, PolicyChangeCursor(), now=NOW)

    applied = {outcome.file.name: len(outcome.changes) for outcome in tick.outcomes}
    assert applied == {"a.jsonl": 1, "b.jsonl": 0, "c.jsonl": 1}
    [(line, error)] = quarantine_errors(local_warehouse, "b.jsonl")
    assert line == 1 and "already applied with other content" in error and "item_ids" in error
    assert list(load_tombstones(local_warehouse)["item_id"]) == [7]
    assert local_warehouse.list(QUARANTINE) == [
        f"{QUARANTINE}/b.jsonl",
        f"{QUARANTINE}/b.jsonl{ERROR_REPORT_SUFFIX}",
    ]


def test_a_reused_change_id_is_caught_for_changes_without_tombstones(
    local_warehouse: Warehouse,
) -> None:
    drop_file(local_warehouse, "a.jsonl", change("price-1", "price_changed", item_ids=[1]))
    drop_file(local_warehouse, "b.jsonl", change("price-1", "price_changed", item_ids=[2]))
    scan_inbox(local_warehouse, SETTINGS, PolicyChangeCursor(), now=NOW)
    [(_, error)] = quarantine_errors(local_warehouse, "b.jsonl")
    assert "already applied with other content" in error


def test_a_file_with_a_utf8_bom_is_applied(local_warehouse: Warehouse) -> None:
    """Regression: a BOM made line 1 invalid JSON, so the whole file was quarantined."""
    local_warehouse.write_bytes(
        f"{INCOMING}/bom.jsonl", b"\xef\xbb\xbf" + json.dumps(change("ban-bom")).encode() + b"\n"
    )
    tick = scan_inbox(local_warehouse, SETTINGS, PolicyChangeCursor(), now=NOW)
    assert [len(outcome.changes) for outcome in tick.outcomes] == [1]
    assert tick.outcomes[0].errors == []


def test_an_unknown_tenant_is_quarantined(local_warehouse: Warehouse) -> None:
    """Regression: a revocation naming no real tenant was accepted and revoked nothing."""
    write_users(local_warehouse, {1: ("na", NOW)})
    users = local_warehouse.read_parquet("raw/users/part-00000.parquet")
    local_warehouse.write_parquet(
        "raw/users/part-00000.parquet", users.assign(tenant_id="tenant_acme")
    )
    revoke = {"type": "tenant_permission_revoked", "region": "na"}
    drop_file(
        local_warehouse,
        "tenants.jsonl",
        change("revoke-typo", **revoke, tenant_id="tenant_acme_"),
        change("revoke-ok", **revoke, tenant_id="tenant_acme"),
    )
    tick = scan_inbox(local_warehouse, SETTINGS, PolicyChangeCursor(), now=NOW)

    assert [c.change_id for c in tick.outcomes[0].changes] == ["revoke-ok"]
    [(line, error)] = quarantine_errors(local_warehouse, "tenants.jsonl")
    assert line == 1 and "'tenant_acme_' is not a tenant" in error and "tenant_acme" in error
