"""Send plans: each rule sends or skips with its own reason, judged at the send time."""

from __future__ import annotations

import json
from datetime import timedelta

import numpy as np
import pandas as pd

from recsys_assets.channels.ledger import SEND_SCHEMA, append_sends, send_key
from recsys_assets.channels.plans import (
    BELOW_RELEVANCE,
    NO_ELIGIBLE_ITEM,
    NO_HIGH_CONFIDENCE_ITEM,
    NOT_A_CHANNEL,
    PLANNED,
    QUIET_HOURS,
    RISK_LEVEL_BLOCKED,
    SEND,
    SEND_CAP,
    STALE_LIST,
    UNKNOWN_SUBJECT,
    first_slot_order,
    plan_sends,
)
from recsys_assets_tests.channels.conftest import (
    ALL_REJECTED,
    CAPPED,
    LOW_CONFIDENCE,
    NIGHT_OWL,
    REGION,
    REVOKED,
    RISKY,
    STALE,
    UNKNOWN,
    UNSUBSCRIBED,
    WEAK,
    ChannelWorld,
    at_hours,
    publish_channel_version,
)
from recsys_assets_tests.conftest import TINY_AS_OF
from recsys_assets_tests.serving.conftest import CONSUMER


def _decisions(plan) -> dict[int, tuple[str, str | None]]:
    return {
        int(row.subject_id): (row.decision, None if pd.isna(row.reason) else row.reason)
        for row in plan.decisions.itertuples(index=False)
    }


def test_email_plan_sends_or_skips_each_subject_for_its_own_reason(
    channel: ChannelWorld,
) -> None:
    good, failing = channel.base.good, channel.base.failing
    prior_send = pd.DataFrame(
        [
            {
                "send_key": send_key("email_daily", CAPPED, "2026-11-19"),
                "subject_id": CAPPED,
                "surface": "email_daily",
                "medium": "email",
                "region": REGION,
                "send_date": "2026-11-19",
                "send_at": at_hours(-5),
                "handed_over_at": at_hours(-6),
                "list_id": "precomp_email_daily_earlier",
                "version": "v_earlier",
                "model_version": "model_a",
                "item_id": good[40],
                "position": 1,
                "tracking_token": "0" * 64,
                "message_path": "channels/outbox/earlier.eml",
            }
        ],
        columns=list(SEND_SCHEMA),
    )
    append_sends(channel.warehouse, prior_send, handed_over_at=at_hours(-6))
    publish_channel_version(
        channel,
        "email_daily",
        {
            CONSUMER: [channel.campaign_item, *good[:9]],
            UNSUBSCRIBED: good[10:16],
            REVOKED: good[16:22],
            ALL_REJECTED: [failing["out_of_stock"], failing["not_approved"]],
            LOW_CONFIDENCE: good[22:28],
            STALE: good[28:30],
            CAPPED: good[32:38],
            UNKNOWN: good[38:40],
        },
        ttl=timedelta(hours=24),
        calibrated={
            CONSUMER: [0.95, 0.7, 0.6, 0.5, 0.4, 0.3, 0.3, 0.2, 0.2, 0.1],
            LOW_CONFIDENCE: [0.3, 0.2, 0.2, 0.1, 0.1, 0.1],
        },
        send_at={STALE: at_hours(24)},  # after the list's expiry (+23 h)
    )

    plan = plan_sends(
        channel.warehouse, channel.base.settings, "email_daily", REGION, now=TINY_AS_OF
    )

    assert plan.status == PLANNED
    assert _decisions(plan) == {
        CONSUMER: (SEND, None),
        UNSUBSCRIBED: ("skip", "email_unsubscribed"),
        REVOKED: ("skip", "consent_revoked"),  # raw flag on, serving's consent event wins
        ALL_REJECTED: ("skip", NO_ELIGIBLE_ITEM),
        LOW_CONFIDENCE: ("skip", NO_HIGH_CONFIDENCE_ITEM),
        STALE: ("skip", STALE_LIST),
        CAPPED: ("skip", SEND_CAP),
        UNKNOWN: ("skip", UNKNOWN_SUBJECT),
    }
    (sent,) = plan.plan.itertuples(index=False)
    # 09:00 local (UTC) send; the campaign item ended at 02:00, between planning and sending.
    assert sent.send_at == at_hours(9)
    assert sent.send_at_local == "2026-11-20T09:00:00+00:00"
    assert sent.item_ids.split("|") == [str(i) for i in good[:6]]  # display_count 6
    assert sent.positions.split("|") == ["2", "3", "4", "5", "6", "7"]
    log = channel.warehouse.read_parquet(
        f"published/surface=email_daily/region={REGION}/versions/{sent.version}/decision_log.parquet"
    )
    published = log.loc[log["subject_id"] == CONSUMER].iloc[0]
    tokens = dict(
        zip(
            published["selected_item_ids"].split("|"),
            published["tracking_tokens"].split("|"),
            strict=True,
        )
    )
    assert sent.tracking_tokens.split("|") == [tokens[str(i)] for i in good[:6]]
    rejections = plan.decisions.set_index("subject_id")["item_rejections"].map(json.loads)
    assert rejections[CONSUMER] == {"campaign_ended": 1}
    assert rejections[ALL_REJECTED] == {"not_approved": 1, "out_of_stock": 1}
    assert plan.skips_by_reason()[SEND_CAP] == 1 and plan.sends == 1


def test_push_defers_past_quiet_hours_and_sends_only_strong_low_risk_items(
    channel: ChannelWorld,
) -> None:
    good = channel.base.good
    publish_channel_version(
        channel,
        "push",
        {NIGHT_OWL: good[:3], WEAK: good[3:5], RISKY: [channel.risky_item, good[5]]},
        ttl=timedelta(hours=36),
        calibrated={NIGHT_OWL: [0.9, 0.5, 0.4], WEAK: [0.25, 0.2], RISKY: [0.9, 0.5]},
        send_at={NIGHT_OWL: at_hours(23)},  # 23:00 local: inside the 22-07 quiet hours
    )
    settings = channel.base.settings

    plan = plan_sends(channel.warehouse, settings, "push", REGION, now=TINY_AS_OF)

    assert _decisions(plan) == {
        NIGHT_OWL: (SEND, None),
        WEAK: ("skip", BELOW_RELEVANCE),
        RISKY: (SEND, None),
    }
    sends = plan.plan.set_index("subject_id")
    assert sends.loc[NIGHT_OWL, "send_at"] == at_hours(31)  # 07:00 the next morning
    assert sends.loc[NIGHT_OWL, "item_ids"] == str(good[0])  # display_count 1
    assert sends.loc[RISKY, "item_ids"] == str(good[5])  # never the high-risk item
    risky = plan.decisions.set_index("subject_id").loc[RISKY, "item_rejections"]
    assert json.loads(risky) == {RISK_LEVEL_BLOCKED: 1}

    push = settings.surfaces["push"]
    skipping = settings.model_copy(
        update={
            "surfaces": {
                **settings.surfaces,
                "push": push.model_copy(
                    update={
                        "channel_rules": push.channel_rules.model_copy(
                            update={"quiet_hours_mode": "skip"}
                        )
                    }
                ),
            }
        }
    )
    strict = plan_sends(channel.warehouse, skipping, "push", REGION, now=TINY_AS_OF)
    assert _decisions(strict)[NIGHT_OWL] == ("skip", QUIET_HOURS)


def test_a_surface_that_is_not_a_channel_gets_an_empty_plan_saying_so(
    channel: ChannelWorld,
) -> None:
    plan = plan_sends(channel.warehouse, channel.base.settings, "home_feed", REGION, now=TINY_AS_OF)
    assert plan.status == NOT_A_CHANNEL
    assert plan.plan.empty and plan.decisions.empty
    assert "home_feed is not a channel" in plan.detail


def test_first_slot_takes_the_first_most_confident_item_and_keeps_list_order_after_it() -> None:
    slots = np.array([0, 0, 0, 0, 1, 1, 3])
    confidence = np.array([0.4, 0.9, 0.2, 0.9, np.nan, 0.45, 0.5])

    order, missed = first_slot_order(slots, confidence, 0.5, subjects=4)

    # slot 0 opens with its first 0.9 (row 1), the rest in list order; slot 1's best (0.45,
    # an unknown probability counting as -1) misses the threshold; slot 3 reaches it
    assert order.tolist() == [1, 0, 2, 3, 5, 4, 6]
    assert missed.tolist() == [False, True, False, False]  # slot 2 has no rows: not judged
    unordered, none_missed = first_slot_order(slots, confidence, None, subjects=4)
    assert unordered.tolist() == list(range(7)) and not none_missed.any()
