"""Send-plan rules at their edges (issue 15): quiet hours across DST changes, the send cap
exactly at its window, a list expiring a minute either side of its send time, consent
revoked and a campaign ending between publish and send."""

from __future__ import annotations

import json
from datetime import timedelta

import pandas as pd

from recsys_assets.channels.ledger import SEND_SCHEMA, append_sends, send_key
from recsys_assets.channels.plans import SEND, SEND_CAP, STALE_LIST, plan_sends
from recsys_assets.data.snapshot import read_raw
from recsys_assets_tests.channels.conftest import (
    REGION,
    ChannelWorld,
    at_hours,
    publish_channel_version,
    record_event,
)
from recsys_assets_tests.conftest import TINY_AS_OF
from recsys_assets_tests.serving.conftest import CONSUMER

# Subjects added by these tests (ids clear of conftest's 910_xxx / 920_xxx).
NY_SPRING = 930_001  # America/New_York, quiet 22-07, night of 2027-03-14 (02:00 -> 03:00)
NY_SPRING_GAP = 930_002  # quiet 22-03: quiet hours end inside the skipped hour
NY_FALL = 930_003  # quiet 22-07, night of 2027-11-07 (02:00 -> 01:00)
NY_FALL_REPEAT = 930_004  # quiet 22-02: 01:00 local happens twice, both quiet
BERLIN_SPRING = 930_005  # Europe/Berlin, quiet 22-07, night of 2027-03-28
BERLIN_FALL = 930_006  # quiet 22-07, night of 2027-10-31
AT_WINDOW = 930_011  # previous send exactly send_cap_window before
INSIDE_WINDOW = 930_012  # previous send one second inside the window
EXPIRES_BEFORE = 930_021  # list expires one minute before the send
EXPIRES_AFTER = 930_022  # list expires one minute after the send
EXPIRES_AT = 930_023  # list expires at the send instant
LATE_REVOKER = 930_031  # revokes consent after publish, before the plan


def _add_subscribers(channel: ChannelWorld, people: dict[int, tuple[str, int, int]]) -> None:
    """Subscribed users (email and push) cloned from CONSUMER: id -> (tz, quiet start, end)."""
    warehouse = channel.warehouse
    users = read_raw(warehouse, "users")
    template = users[users["user_id"] == CONSUMER]
    rows = []
    for user_id, (zone, start, end) in people.items():
        row = template.copy()
        row["user_id"] = user_id
        row["email_subscribed"], row["push_enabled"], row["timezone"] = True, True, zone
        row["quiet_hours_start"], row["quiet_hours_end"] = start, end
        rows.append(row)
    warehouse.write_parquet(
        "raw/users/part-00000.parquet", pd.concat([users, *rows], ignore_index=True)
    )


def _decisions(plan) -> dict[int, tuple[str, str | None]]:
    return {
        int(row.subject_id): (row.decision, None if pd.isna(row.reason) else row.reason)
        for row in plan.decisions.itertuples(index=False)
    }


def _utc(text: str) -> pd.Timestamp:
    return pd.Timestamp(text)


def test_quiet_hours_defer_to_the_first_full_local_hour_across_dst_changes(
    channel: ChannelWorld,
) -> None:
    good = channel.base.good
    cases = {
        # subject: (tz, quiet, scheduled (UTC), deferred send_at (UTC), its local time)
        NY_SPRING: (
            "America/New_York", (22, 7),
            "2027-03-14 04:00",  # 23:00 EST on the 13th
            "2027-03-14 11:00",  # 07:00 EDT: 8 wall-clock hours, 7 real ones
            "2027-03-14T07:00:00-04:00",
        ),
        NY_SPRING_GAP: (
            "America/New_York", (22, 3),
            "2027-03-14 04:00",
            "2027-03-14 07:00",  # 02:00 never happens: 03:00 EDT is the first hour after
            "2027-03-14T03:00:00-04:00",
        ),
        NY_FALL: (
            "America/New_York", (22, 7),
            "2027-11-07 03:00",  # 23:00 EDT on the 6th
            "2027-11-07 12:00",  # 07:00 EST: 8 wall-clock hours, 9 real ones
            "2027-11-07T07:00:00-05:00",
        ),
        NY_FALL_REPEAT: (
            "America/New_York", (22, 2),
            "2027-11-07 03:00",
            "2027-11-07 07:00",  # 01:00 EDT and 01:00 EST are both quiet; 02:00 EST is not
            "2027-11-07T02:00:00-05:00",
        ),
        BERLIN_SPRING: (
            "Europe/Berlin", (22, 7),
            "2027-03-27 22:00",  # 23:00 CET
            "2027-03-28 05:00",  # 07:00 CEST
            "2027-03-28T07:00:00+02:00",
        ),
        BERLIN_FALL: (
            "Europe/Berlin", (22, 7),
            "2027-10-30 21:00",  # 23:00 CEST
            "2027-10-31 06:00",  # 07:00 CET
            "2027-10-31T07:00:00+01:00",
        ),
    }  # fmt: skip
    _add_subscribers(channel, {s: (zone, *quiet) for s, (zone, quiet, *_) in cases.items()})
    subjects = list(cases)
    publish_channel_version(
        channel,
        "push",
        {s: good[2 * i : 2 * i + 2] for i, s in enumerate(subjects)},
        ttl=timedelta(days=400),  # never stale: only quiet hours decide here
        send_at={s: _utc(case[2]) for s, case in cases.items()},
    )

    plan = plan_sends(channel.warehouse, channel.base.settings, "push", REGION, now=TINY_AS_OF)

    assert _decisions(plan) == {s: (SEND, None) for s in subjects}
    sends = plan.plan.set_index("subject_id")
    for subject, (zone, _, _, expected_utc, expected_local) in cases.items():
        row = sends.loc[subject]
        assert row["send_at"] == _utc(expected_utc), subject
        assert row["send_at_local"] == expected_local, subject
        assert row["timezone"] == zone
        # the local and UTC columns name the same instant
        local = pd.Timestamp(row["send_at_local"])
        assert local.tz_convert("UTC").tz_localize(None) == row["send_at"]
        assert local.minute == 0 and local.second == 0  # a full hour
    log = plan.decisions.set_index("subject_id")
    assert (log.loc[subjects, "send_at"] == sends.loc[subjects, "send_at"]).all()


def _prior_send(subject_id: int, send_at: pd.Timestamp, item_id: int) -> dict[str, object]:
    return {
        "send_key": send_key("email_daily", subject_id, send_at.date().isoformat()),
        "subject_id": subject_id,
        "surface": "email_daily",
        "medium": "email",
        "region": REGION,
        "send_date": send_at.date().isoformat(),
        "send_at": send_at,
        "handed_over_at": send_at - pd.Timedelta(hours=1),
        "list_id": f"precomp_email_daily_{subject_id}_earlier",
        "version": "v_earlier",
        "model_version": "model_a",
        "item_id": item_id,
        "position": 1,
        "tracking_token": "0" * 64,
        "message_path": f"channels/outbox/earlier-{subject_id}.eml",
    }


def test_send_cap_counts_a_send_one_second_inside_its_window_but_not_one_at_its_edge(
    channel: ChannelWorld,
) -> None:
    good = channel.base.good
    settings = channel.base.settings
    window = pd.Timedelta(settings.surface("email_daily").channel_rules.send_cap_window)
    assert window == pd.Timedelta(hours=20) and (
        settings.surface("email_daily").channel_rules.max_sends == 1
    )
    send_at = at_hours(9)  # publish's 09:00 local (UTC) send
    _add_subscribers(channel, {AT_WINDOW: ("UTC", 0, 0), INSIDE_WINDOW: ("UTC", 0, 0)})
    prior = pd.DataFrame(
        [
            _prior_send(AT_WINDOW, send_at - window, good[40]),
            _prior_send(INSIDE_WINDOW, send_at - window + pd.Timedelta(seconds=1), good[41]),
        ],
        columns=list(SEND_SCHEMA),
    )
    append_sends(channel.warehouse, prior, handed_over_at=send_at - window)
    publish_channel_version(
        channel,
        "email_daily",
        {AT_WINDOW: good[:6], INSIDE_WINDOW: good[6:12]},
        ttl=timedelta(hours=24),
    )

    plan = plan_sends(channel.warehouse, settings, "email_daily", REGION, now=TINY_AS_OF)

    assert _decisions(plan) == {AT_WINDOW: (SEND, None), INSIDE_WINDOW: ("skip", SEND_CAP)}
    (sent,) = plan.plan.itertuples(index=False)
    assert sent.subject_id == AT_WINDOW and sent.send_at == send_at


def test_a_list_expiring_a_minute_before_its_send_is_stale_a_minute_after_is_sent(
    channel: ChannelWorld,
) -> None:
    good = channel.base.good
    _add_subscribers(
        channel,
        {s: ("UTC", 0, 0) for s in (EXPIRES_BEFORE, EXPIRES_AFTER, EXPIRES_AT)},
    )
    ttl = timedelta(hours=24)
    expires_at = pd.Timestamp(TINY_AS_OF - timedelta(hours=1) + ttl)  # publish's generated_at + ttl
    minute = pd.Timedelta(minutes=1)
    version = publish_channel_version(
        channel,
        "email_daily",
        {EXPIRES_BEFORE: good[:6], EXPIRES_AFTER: good[6:12], EXPIRES_AT: good[12:18]},
        ttl=ttl,
        send_at={
            EXPIRES_BEFORE: expires_at + minute,
            EXPIRES_AFTER: expires_at - minute,
            EXPIRES_AT: expires_at,  # "not before the send time": still sent
        },
    )
    lists = channel.warehouse.read_parquet(
        f"published/surface=email_daily/region={REGION}/versions/{version}/lists.parquet"
    )
    assert (pd.to_datetime(lists["expires_at"]) == expires_at).all()

    plan = plan_sends(
        channel.warehouse, channel.base.settings, "email_daily", REGION, now=TINY_AS_OF
    )

    assert _decisions(plan) == {
        EXPIRES_BEFORE: ("skip", STALE_LIST),
        EXPIRES_AFTER: (SEND, None),
        EXPIRES_AT: (SEND, None),
    }
    sends = plan.plan.set_index("subject_id")["send_at"]
    assert sends[EXPIRES_AFTER] == expires_at - minute and sends[EXPIRES_AT] == expires_at


def test_consent_revoked_between_publish_and_send_skips_with_the_consent_reason(
    channel: ChannelWorld,
) -> None:
    good = channel.base.good
    _add_subscribers(channel, {LATE_REVOKER: ("UTC", 0, 0)})
    publish_channel_version(
        channel,
        "email_daily",
        {LATE_REVOKER: good[:6], CONSUMER: good[6:12]},
        ttl=timedelta(hours=24),
    )
    settings = channel.base.settings
    before = plan_sends(channel.warehouse, settings, "email_daily", REGION, now=TINY_AS_OF)
    assert _decisions(before) == {LATE_REVOKER: (SEND, None), CONSUMER: (SEND, None)}

    # serving receives the revocation 30 minutes after publish (generated_at - 1 h), while
    # the raw users row still says subscribed
    record_event(channel.warehouse, "consent_revoked", LATE_REVOKER)
    users = read_raw(channel.warehouse, "users").set_index("user_id")
    assert bool(users.loc[LATE_REVOKER, "email_subscribed"])

    after = plan_sends(channel.warehouse, settings, "email_daily", REGION, now=TINY_AS_OF)
    assert _decisions(after) == {LATE_REVOKER: ("skip", "consent_revoked"), CONSUMER: (SEND, None)}
    assert after.plan["subject_id"].tolist() == [CONSUMER]
    assert after.skips_by_reason() == {"consent_revoked": 1}


def test_a_campaign_ending_between_publish_and_send_drops_only_its_item(
    channel: ChannelWorld,
) -> None:
    good, campaign = channel.base.good, channel.campaign_item  # the campaign ends at +2 h
    rest = list(good[:5])
    settings = channel.base.settings

    def plan_for(send_at: pd.Timestamp):
        publish_channel_version(
            channel,
            "email_daily",
            {CONSUMER: [campaign, *rest]},
            ttl=timedelta(hours=24),
            calibrated={CONSUMER: [0.95, 0.9, 0.8, 0.7, 0.6, 0.5]},  # all above the first slot
            send_at={CONSUMER: send_at},
        )
        return plan_sends(channel.warehouse, settings, "email_daily", REGION, now=TINY_AS_OF)

    # sent before the campaign ends: the campaign item opens the message (most confident)
    early = plan_for(at_hours(1))
    (row,) = early.plan.itertuples(index=False)
    assert row.item_ids.split("|") == [str(i) for i in [campaign, *rest]]
    assert json.loads(early.decisions["item_rejections"].iloc[0]) == {}

    # publish's 09:00 send, after the campaign ended: only that item goes
    late = plan_for(at_hours(9))
    assert _decisions(late) == {CONSUMER: (SEND, None)}
    (row,) = late.plan.itertuples(index=False)
    assert row.send_at == at_hours(9)
    assert row.item_ids.split("|") == [str(i) for i in rest]
    assert row.positions.split("|") == ["2", "3", "4", "5", "6"]
    assert json.loads(late.decisions["item_rejections"].iloc[0]) == {"campaign_ended": 1}
