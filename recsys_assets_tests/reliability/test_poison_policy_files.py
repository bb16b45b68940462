"""Poison policy-change files, through the real `policy_change_sensor` on a real Dagster
instance: every bad line or file is quarantined with its reason, every valid line and file
beside them is applied, no tick fails, and `incoming/` empties (nothing is lost).

Counts are reported in docs/AUTOMATION.md ("Poison files").
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import dagster as dg
import pytest

from recsys_assets.automation.inbox import (
    ERROR_REPORT_SUFFIX,
    INCOMING,
    PROCESSED,
    QUARANTINE,
    change_record_path,
)
from recsys_assets.automation.sensors import policy_change_sensor
from recsys_assets.rules.tombstones import load_tombstones
from recsys_assets.warehouse import Warehouse
from recsys_assets_tests.automation.conftest import sensor_tick
from recsys_assets_tests.automation.helpers import NOW, change, write_users

TENANT = "tenant_acme"


@dataclass(frozen=True)
class Poison:
    """One file: its bytes, the (line, reason fragment) it must be quarantined with, and
    the change_ids that must take effect anyway."""

    name: str
    data: bytes
    rejected: tuple[tuple[int, str], ...]
    applied: tuple[str, ...] = ()


def lines(*records: dict[str, Any] | str, end: str = "\n") -> bytes:
    text = end.join(record if isinstance(record, str) else json.dumps(record) for record in records)
    return (text + end).encode()


def ok(change_id: str, **fields: Any) -> dict[str, Any]:
    return change(change_id, item_ids=[5], **fields)


REVOKE = {"type": "tenant_permission_revoked", "region": "na"}
POISONS = [
    Poison("a01-huge-id.jsonl", lines(change("huge", item_ids=[99999999999999999999999]), ok("huge-ok")), ((1, "int64"),), ("huge-ok",)),
    Poison("a02-original.jsonl", lines(change("reused", item_ids=[7])), (), ("reused",)),
    Poison("a03-reused-id.jsonl", lines(change("reused", item_ids=[8]), ok("reused-ok")), ((1, "already applied with other content"),), ("reused-ok",)),
    Poison("a04-redelivered.jsonl", lines(change("reused", item_ids=[7])), (), ("reused",)),
    Poison("a05-bom.jsonl", b"\xef\xbb\xbf" + lines(ok("bom-ok")), (), ("bom-ok",)),
    Poison("a06-unknown-tenant.jsonl", lines(change("t-typo", **REVOKE, tenant_id="tenant_acme_"), change("t-ok", **REVOKE, tenant_id=TENANT)), ((1, "is not a tenant"),), ("t-ok",)),
    Poison("a07-latin1.jsonl", '{"reason": "caf\xe9"}\n'.encode("latin-1"), ((0, "not UTF-8"),)),
    Poison("a08-empty.jsonl", b"", ((0, "no changes"),)),
    Poison("a09-blank-lines.jsonl", b"\n \n\t\n", ((0, "no changes"),)),
    Poison("a10-nested.jsonl", lines("[" * 100_000 + "]" * 100_000, ok("nested-ok")), ((1, "nested too deeply"),), ("nested-ok",)),
    Poison("a11-array.jsonl", lines("[1, 2]", ok("array-ok")), ((1, "expected a JSON object"),), ("array-ok",)),
    Poison("a12-type-list.jsonl", lines(ok("tl", type=["item_banned"])), ((1, "is not one of"),)),
    Poison("a13-now.jsonl", lines(ok("now", effective_at="now")), ((1, "not an ISO-8601"),)),
    Poison("a14-year-9999.jsonl", lines(ok("far", effective_at="9999-01-01T00:00:00Z")), ((1, "between years"),)),
    Poison("a15-negative-id.jsonl", lines(change("neg", item_ids=[-1])), ((1, "non-negative integer"),)),
    Poison("a16-float-id.jsonl", lines(change("flt", item_ids=[1.5])), ((1, "non-negative integer"),)),
    Poison("a17-bool-id.jsonl", lines(change("bool", item_ids=[True])), ((1, "non-negative integer"),)),
    Poison("a18-nan-id.jsonl", lines('{"change_id": "nan", "type": "item_banned", "item_ids": [NaN], "effective_at": "2026-11-20T11:00:00Z"}'), ((1, "non-negative integer"),)),
    Poison("a19-empty-ids.jsonl", lines(change("none", item_ids=[])), ((1, "non-empty list"),)),
    Poison("a20-region.jsonl", lines(ok("mars", region="mars"), ok("eu-ok", region="eu")), ((1, "region 'mars'"),), ("eu-ok",)),
    Poison("a21-path-id.jsonl", lines(ok("../../etc/passwd")), ((1, "change_id"),)),
    Poison("a22-no-id.jsonl", lines({"type": "item_banned", "item_ids": [1], "effective_at": "2026-11-20"}), ((1, "needs ['change_id']"),)),
    Poison("a23-singular.jsonl", lines(change("sing", item_id=3)), ((1, "use item_ids"),)),
    Poison("a24-dup-in-file.jsonl", lines(ok("twice"), ok("twice")), ((2, "duplicate change_id"),), ("twice",)),
    Poison("a25-case-state.jsonl", lines(change("case", "case_state_changed", item_ids=[1], case_state="solved")), ((1, "case_state 'solved'"),)),
    Poison("a26-null-byte.jsonl", b'{"change_id": "z"\x00}\n' + lines(ok("null-ok")), ((1, "not valid JSON"),), ("null-ok",)),
    Poison("a27-long-line.jsonl", lines(ok("long", reason="x" * 1_000_000, region="moon")), ((1, "region 'moon'"),)),
    Poison("a28-crlf.jsonl", lines(ok("crlf-1"), ok("crlf-2"), end="\r\n"), (), ("crlf-1", "crlf-2")),
    Poison("a29-surrogate.jsonl", lines('{"change_id": "sur", "type": "item_banned", "item_ids": [2], "effective_at": "2026-11-20T11:00:00Z", "reason": "\\ud800"}'), (), ("sur",)),
    Poison("a30-truncated.jsonl", lines(ok("cut-ok")) + b'{"change_id": "cut", "type": "item_ba', ((2, "not valid JSON"),), ("cut-ok",)),
    Poison("a31-binary.jsonl", b"\x89PNG\r\n\x1a\n", ((0, "not UTF-8"),)),
]  # fmt: skip


@pytest.fixture(scope="module")
def instance() -> Iterator[dg.DagsterInstance]:
    with dg.instance_for_test() as test_instance:
        yield test_instance


def tick(instance: dg.DagsterInstance, warehouse: Warehouse, cursor: str | None) -> str | None:
    return sensor_tick(policy_change_sensor, instance, warehouse, cursor).cursor


def test_the_poison_set_is_large_enough() -> None:
    assert len(POISONS) >= 30 and len({poison.name for poison in POISONS}) == len(POISONS)


def test_poison_files_are_quarantined_and_nothing_else_is_held_up(
    warehouse: Warehouse, instance: dg.DagsterInstance
) -> None:
    write_users(warehouse, {1: ("na", NOW)})
    users = warehouse.read_parquet("raw/users/part-00000.parquet").assign(tenant_id=TENANT)
    warehouse.write_parquet("raw/users/part-00000.parquet", users)
    for poison in POISONS:
        warehouse.write_bytes(f"{INCOMING}/{poison.name}", poison.data)

    cursor = tick(instance, warehouse, None)  # applies every file; none may fail the tick
    tick(instance, warehouse, cursor)  # the files leave incoming/

    assert warehouse.list(INCOMING) == []
    tombstoned = set(load_tombstones(warehouse)["change_id"])
    for poison in POISONS:
        report_path = f"{QUARANTINE}/{poison.name}{ERROR_REPORT_SUFFIX}"
        if poison.rejected:
            report = warehouse.read_json(report_path)
            errors = [(error["line"], error["error"]) for error in report["errors"]]
            assert [line for line, _ in errors] == [line for line, _ in poison.rejected], errors
            for (_, error), (_, fragment) in zip(errors, poison.rejected, strict=True):
                assert fragment in error, (poison.name, error)
            assert report["changes_applied"] == len(set(poison.applied)), poison.name
        else:
            assert not warehouse.exists(report_path), poison.name
        if poison.applied:  # lost = 0: the file is archived and every valid change took effect
            assert warehouse.exists(f"{PROCESSED}/{poison.name}"), poison.name
        for change_id in poison.applied:
            assert warehouse.exists(change_record_path(change_id)), (poison.name, change_id)
            assert change_id in tombstoned, (poison.name, change_id)
    assert load_tombstones(warehouse).query("change_id == 'reused'")["item_id"].tolist() == [7]
