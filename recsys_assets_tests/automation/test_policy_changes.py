"""The policy-change schema: what each line must say, what it withdraws, what it recomputes."""

from __future__ import annotations

import json
from datetime import datetime

import pytest

from recsys_assets.automation.policy_changes import CHANGE_TYPES, InvalidChange, parse_change
from recsys_assets.config import load_settings
from recsys_assets.pipeline.partitions import SurfaceRegion
from recsys_assets_tests.automation.helpers import change

SETTINGS = load_settings()
SURFACES = list(SETTINGS.surfaces)


def parse(record: dict) -> object:
    return parse_change(json.dumps(record), SETTINGS)


def test_item_banned_in_one_region_refreshes_every_surface_of_that_region() -> None:
    banned = parse(change("ban-1", item_ids=[7, 8, 7], region="eu"))
    assert banned.item_ids == (7, 8)
    assert banned.effective_at == datetime(2026, 11, 20, 11, 0)  # "Z" → naive UTC
    assert [(row["item_id"], row["region"]) for row in banned.tombstone_rows()] == [
        (7, "eu"),
        (8, "eu"),
    ]
    assert banned.affected_partitions(SETTINGS) == {SurfaceRegion(s, "eu") for s in SURFACES}


def test_global_change_refreshes_every_partition() -> None:
    deleted = parse(change("del-1", "item_deleted"))
    assert deleted.tombstone_rows()[0]["region"] is None
    assert len(deleted.affected_partitions(SETTINGS)) == len(SETTINGS.enabled_partitions())


def test_consent_revoked_suppresses_the_person_without_recomputing_partitions() -> None:
    revoked = parse(change("consent-1", "consent_revoked", user_ids=[42]))
    assert revoked.tombstone_rows() == [
        {"type": "consent_revoked", "effective_at": revoked.effective_at, "user_id": 42}
    ]
    assert revoked.affected_partitions(SETTINGS) == frozenset()


def test_person_hides_name_the_person_and_the_target() -> None:
    hide = parse(change("hide-1", "user_hide_creator", user_ids=[1, 2], creator_ids=["c9"]))
    assert [(r["user_id"], r["creator_id"]) for r in hide.tombstone_rows()] == [
        (1, "c9"),
        (2, "c9"),
    ]
    item_hide = parse(change("hide-2", "user_hide_item", user_ids=[1], item_ids=[5, 6]))
    assert [(r["user_id"], r["item_id"]) for r in item_hide.tombstone_rows()] == [(1, 5), (1, 6)]


def test_price_change_withdraws_nothing_but_reranks() -> None:
    priced = parse(change("price-1", "price_changed", region="na"))
    assert priced.tombstone_rows() == []
    assert priced.affected_partitions(SETTINGS) == {SurfaceRegion(s, "na") for s in SURFACES}


def test_tenant_and_case_changes_refresh_only_tenant_surfaces() -> None:
    revoked = parse(change("tenant-1", "tenant_permission_revoked", tenant_id="t1", region="na"))
    assert revoked.tombstone_rows()[0]["tenant_id"] == "t1"
    assert revoked.affected_partitions(SETTINGS) == {SurfaceRegion("enterprise_action_queue", "na")}
    closed = parse(change("case-1", "case_state_changed", item_ids=[3], case_state="closed"))
    assert [row["item_id"] for row in closed.tombstone_rows()] == [3]
    reopened = parse(change("case-2", "case_state_changed", item_ids=[3], case_state="open"))
    assert reopened.tombstone_rows() == []
    assert reopened.affected_partitions(SETTINGS) == {
        SurfaceRegion("enterprise_action_queue", region)
        for region in SETTINGS.surface_regions("enterprise_action_queue")
    }


def test_every_documented_type_parses() -> None:
    examples = {
        "item_banned": {"item_ids": [1]},
        "item_deleted": {"item_ids": [1]},
        "item_out_of_stock": {"item_ids": [1], "region": "na"},
        "item_region_unavailable": {"item_ids": [1], "region": "na"},
        "price_changed": {"item_ids": [1]},
        "campaign_expired": {"item_ids": [1], "campaign_id": "camp-1"},
        "user_hide_item": {"user_ids": [1], "item_ids": [1]},
        "user_hide_creator": {"user_ids": [1], "creator_ids": ["c1"]},
        "consent_revoked": {"user_ids": [1]},
        "tenant_permission_revoked": {"tenant_id": "t1"},
        "case_state_changed": {"item_ids": [1], "case_state": "closed"},
    }
    assert set(examples) == set(CHANGE_TYPES)
    for change_type, fields in examples.items():
        assert parse(change(f"id-{change_type}", change_type, **fields)).type == change_type


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        (json.dumps(change("x", "item_nuked")), "type 'item_nuked' is not one of"),
        (json.dumps(change("x", item_ids=[])), "non-empty list"),
        (json.dumps(change("x", item_ids=["7"])), "non-negative integer ids"),
        (json.dumps(change("x", item_ids=[True])), "non-negative integer ids"),
        (json.dumps({**change("x"), "item_id": 7}), "use item_ids"),
        (json.dumps(change("x", region="mars")), "region 'mars' is not configured"),
        (json.dumps(change("x", "item_deleted", region="na")), "'region' is not allowed"),
        (json.dumps(change("x", "item_region_unavailable", item_ids=[1])), "needs ['region']"),
        (json.dumps(change("bad id/../x")), "change_id"),
        (json.dumps(change("x", effective_at="yesterday")), "not an ISO-8601"),
        (json.dumps({"change_id": "x", "type": "item_banned", "item_ids": [1]}), "effective_at"),
        (json.dumps(change("x", "case_state_changed", item_ids=[1], case_state="x")), "case_state"),
    ],
)
def test_invalid_lines_say_what_is_wrong(line: str, message: str) -> None:
    with pytest.raises(InvalidChange, match=None) as raised:
        parse_change(line, SETTINGS)
    assert message in str(raised.value)
