"""Every rejection reason, against a real published list read back through the store."""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import pandas as pd
from hypothesis import given, settings
from hypothesis import strategies as st

from recsys_assets.rules.eligibility import (
    CODE_BY_REASON,
    REASON_BY_CODE,
    ItemStateArrays,
    item_rejection_reasons,
)
from recsys_assets.rules.tombstones import write_tombstones
from recsys_assets.serving.state import ServingEvent
from recsys_assets_tests.serving.conftest import (
    AGENT,
    CONSUMER,
    HIDDEN_CATEGORY,
    HIDDEN_CREATOR,
    NO_CONSENT,
    World,
)
from recsys_assets_tests.serving.published import write_version

UNKNOWN_ITEM_ID = 987_654_321


def _personal_events(world: World) -> list[ServingEvent]:
    failing = world.failing
    return [
        ServingEvent("hide_item", CONSUMER, item_id=failing["hidden_item"]),
        ServingEvent("hide_creator", CONSUMER, creator_id=HIDDEN_CREATOR),
        ServingEvent("hide_category", CONSUMER, category=HIDDEN_CATEGORY),
        ServingEvent("purchase", CONSUMER, item_id=failing["already_consumed"]),
        ServingEvent("exposure", CONSUMER, item_id=failing["frequency_cap"], surface="home_feed"),
        ServingEvent("exposure", CONSUMER, item_id=failing["frequency_cap"], surface="home_feed"),
        # one exposure on home_feed is under the cap of 2: that item stays
        ServingEvent("exposure", CONSUMER, item_id=world.good[0], surface="home_feed"),
    ]


def test_every_rejection_reason_on_a_published_list(world: World) -> None:
    failing = world.failing
    rejected_first = [UNKNOWN_ITEM_ID, *(failing[name] for name in list(failing)[:12])]
    listed = rejected_first + world.good[:40]
    write_version(
        world.warehouse,
        "home_feed",
        "na",
        {CONSUMER: listed, NO_CONSENT: listed},
        generated_at=world.clock.now - timedelta(hours=1),
        ttl=timedelta(hours=6),
    )
    write_tombstones(
        world.warehouse,
        "ban-test-1",
        [{"type": "item_banned", "item_id": failing["tombstoned"]}],
        created_at=world.clock.now - timedelta(minutes=5),
    )
    service = world.service()
    service.record_events(_personal_events(world))

    response = service.recommend(CONSUMER, "home_feed", "na")

    assert response.served_from == "precomputed"
    assert [item["item_id"] for item in response.items] == world.good[:20]
    assert [item["position"] for item in response.items] == list(range(1, 21))
    assert response.rejections == {
        "unknown_item": 1,
        "inactive_or_deleted": 1,
        "not_approved": 1,
        "not_in_region": 1,
        "out_of_stock": 1,
        "campaign_ended": 1,
        "tenant_not_allowed": 1,
        "tombstoned": 1,
        "hidden_by_user": 3,
        "already_consumed": 1,
        "frequency_cap": 1,
    }
    assert response.list_id and response.list_id.startswith(f"precomp_home_feed_{CONSUMER}_")
    assert response.model_version == "model_a"
    assert response.items[0]["reason_codes"] == ("two_tower", "high_confidence")

    revoked = service.recommend(NO_CONSENT, "home_feed", "na")
    assert revoked.rejections == {"consent_revoked": len(listed)}
    assert revoked.served_from == "empty"  # no fallback list published yet


def test_enterprise_actor_tenant_role_and_case(world: World) -> None:
    failing = world.failing
    queue = [
        failing["tenant_not_allowed"],
        failing["role_not_allowed"],
        failing["case_closed"],
        failing["own_tenant"],
        *world.good[:12],
    ]
    write_version(
        world.warehouse,
        "enterprise_action_queue",
        "na",
        {AGENT: queue, CONSUMER: queue},
        generated_at=world.clock.now - timedelta(minutes=10),
        ttl=timedelta(hours=1),
    )
    service = world.service()

    display = world.settings.surface("enterprise_action_queue").display_count
    agent = service.recommend(AGENT, "enterprise_action_queue", "na")
    assert agent.rejections == {"tenant_not_allowed": 1, "role_not_allowed": 1, "case_closed": 1}
    assert [item["item_id"] for item in agent.items] == [
        failing["own_tenant"],
        *world.good[: display - 1],
    ]

    consumer = service.recommend(CONSUMER, "enterprise_action_queue", "na")
    assert consumer.rejections == {"tenant_not_allowed": 3, "case_closed": 1}
    assert [item["item_id"] for item in consumer.items] == world.good[:display]


def test_consent_revoked_on_a_send_gives_an_empty_response(world: World) -> None:
    write_version(
        world.warehouse,
        "email_daily",
        "na",
        {NO_CONSENT: world.good[:10]},
        generated_at=world.clock.now - timedelta(hours=1),
        ttl=timedelta(hours=24),
    )
    write_version(
        world.warehouse,
        "email_daily",
        "na",
        {"popular_by_region": world.good[10:20], "new_user_default": world.good[20:30]},
        generated_at=world.clock.now - timedelta(minutes=5),
        ttl=timedelta(minutes=30),
        fallback=True,
    )
    service = world.service()
    response = service.recommend(NO_CONSENT, "email_daily", "na")
    assert response.served_from == "empty"
    assert response.items == []
    assert response.rejections == {"consent_revoked": 10}


def _random_items(draw: st.DrawFn) -> pd.DataFrame:
    size = draw(st.integers(1, 25))
    stamps = st.one_of(
        st.none(),
        st.datetimes(min_value=pd.Timestamp("2026-01-01"), max_value=pd.Timestamp("2027-01-01")),
    )
    rows = [
        {
            "item_id": item_id,
            "status": draw(st.sampled_from(["active", "inactive", "deleted"])),
            "policy_state": draw(st.sampled_from(["approved", "pending", "banned"])),
            "regions": draw(st.sampled_from(["*", "na", "eu", "na|eu", "apac"])),
            "stock": draw(st.sampled_from([-1, 0, 5])),
            "is_sponsored": draw(st.booleans()),
            "campaign_end": draw(stamps),
            "tenant_id": draw(st.sampled_from([None, "t1", "t2"])),
            "required_role": draw(st.sampled_from([None, "agent", "supervisor"])),
            "case_state": draw(st.sampled_from([None, "open", "closed"])),
        }
        for item_id in range(size)
    ]
    frame = pd.DataFrame(rows)
    frame["campaign_end"] = pd.to_datetime(frame["campaign_end"]).astype("datetime64[ns]")
    return frame


@settings(max_examples=60, deadline=None)
@given(
    data=st.data(),
    now=st.datetimes(min_value=pd.Timestamp("2026-01-01"), max_value=pd.Timestamp("2027-01-01")),
    tenant=st.sampled_from([None, "t1", "t2", "t3"]),
    role=st.sampled_from([None, "agent", "admin"]),
)
def test_array_rules_agree_with_item_rejection_reasons(
    data: st.DataObject, now: pd.Timestamp, tenant: str | None, role: str | None
) -> None:
    """Serving's arrays must give the first reason publish validation gives, item by item."""
    items = data.draw(st.composite(_random_items)())
    arrays = ItemStateArrays.from_items(items, ("na", "eu", "apac"))
    positions = arrays.positions(items["item_id"].to_numpy())
    now_ns = int(pd.Timestamp(now).value)
    for region in ("na", "eu"):
        codes = arrays.reason_codes(
            positions, region=region, now_ns=now_ns, actor_tenant=tenant, actor_role=role
        )
        expected = item_rejection_reasons(
            items,
            region=region,
            now=now,
            subject_tenant=pd.Series([tenant] * len(items), dtype=object),
            subject_role=pd.Series([role] * len(items), dtype=object),
        )
        assert [REASON_BY_CODE[c] for c in codes] == [
            None if pd.isna(reason) else reason for reason in expected
        ]
    unknown = arrays.positions(np.array([10_000], dtype=np.int64))
    assert arrays.reason_codes(unknown, region="na", now_ns=now_ns).tolist() == [
        CODE_BY_REASON["unknown_item"]
    ]
