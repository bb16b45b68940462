"""Unsubscribes after send: a send followed by its subject's opt-out of its medium within the
window counts once, by surface, region, model version and opt-out, in /metrics and in the
plan metadata; email unsubscribes and push opt-outs arrive through `POST /v1/events`."""

from __future__ import annotations

from datetime import timedelta

import pandas as pd
import pytest
from fastapi.testclient import TestClient

from recsys_assets.channels.plans import plan_sends
from recsys_assets.channels.unsubscribes import unsubscribes_after_send
from recsys_assets.serving.api import create_app
from recsys_assets.serving.state import OnlineState
from recsys_assets_tests.channels.conftest import (
    CAPPED,
    REGION,
    ChannelWorld,
    at_hours,
    record_event,
)
from recsys_assets_tests.channels.test_send import (
    EMAIL,
    materialize_plan,
    plan_metadata,
    publish_email,
    send,
)
from recsys_assets_tests.serving.conftest import ADMIN_TOKEN, CONSUMER, READER, TOKENS, WRITER


def test_opt_outs_of_the_sends_medium_after_it_and_within_the_window_count_once() -> None:
    sent = pd.Timestamp("2026-11-20 09:00")
    hour = timedelta(hours=1)
    sends = pd.DataFrame(
        {
            "send_key": [f"s{subject}" for subject in range(1, 7)],
            "subject_id": [1, 2, 3, 4, 5, 6],
            "surface": ["email_daily", "email_daily", "email_daily", "push", "push", "push"],
            "medium": ["email", "email", "email", "push", "push", "push"],
            "region": ["na"] * 6,
            "model_version": ["m1", "m1", "m2", "m1", "m1", "m1"],
            "send_at": [sent] * 6,
        }
    )
    opt_outs = pd.DataFrame(
        [
            (1, "consent_revoked", sent + hour),  # 1: counts under its first opt-out ...
            (1, "email_unsubscribed", sent + 2 * hour),  # ... and this one adds nothing
            (2, "email_unsubscribed", sent - timedelta(minutes=1)),  # before the send
            (3, "email_unsubscribed", sent + 48 * hour),  # the window's last instant
            (4, "push_disabled", sent + 48 * hour + timedelta(seconds=1)),  # past the window
            (5, "email_unsubscribed", sent + hour),  # leaves email, not the push it got
            (6, "push_disabled", sent + hour),
        ],
        columns=["user_id", "type", "ts"],
    )
    assert unsubscribes_after_send(sends, opt_outs, window=timedelta(hours=48)) == {
        ("email_daily", "na", "m1", "consent_revoked"): 1,
        ("email_daily", "na", "m2", "email_unsubscribed"): 1,
        ("push", "na", "m1", "push_disabled"): 1,
    }
    assert unsubscribes_after_send(sends, opt_outs, window=timedelta(hours=24)) == {
        ("email_daily", "na", "m1", "consent_revoked"): 1,
        ("push", "na", "m1", "push_disabled"): 1,
    }


def test_unsubscribes_after_send_reach_metrics_and_plan_metadata(
    channel: ChannelWorld, capsys: pytest.CaptureFixture[str]
) -> None:
    warehouse = channel.warehouse
    publish_email(channel)
    materialize_plan(warehouse, EMAIL)
    send(capsys)  # CONSUMER and CAPPED get the 09:00 email
    record_event(warehouse, "consent_revoked", CONSUMER, at_hours(9 + 3))

    with TestClient(create_app(channel.base.service(), tokens=TOKENS)) as client:
        metrics = client.get("/metrics", headers={"Authorization": f"Bearer {READER}"}).text
    labels = (
        f'model_version="model_a",opt_out="consent_revoked",region="{REGION}",surface="email_daily"'
    )
    assert f"recsys_channel_unsubscribes_after_send_total{{{labels}}} 1.0" in metrics

    metadata = plan_metadata(materialize_plan(warehouse, EMAIL))
    assert metadata["unsubscribes_after_send"] == 1
    assert "| model_a | consent_revoked | 1 |" in str(metadata["unsubscribes_by_opt_out"])
    assert metadata["unsubscribe_window_hours"] == 48.0


def test_an_email_unsubscribe_through_the_events_api_counts_and_stops_the_next_email(
    channel: ChannelWorld, capsys: pytest.CaptureFixture[str]
) -> None:
    warehouse = channel.warehouse
    publish_email(channel)
    materialize_plan(warehouse, EMAIL)
    send(capsys)  # CONSUMER and CAPPED get the 09:00 email
    channel.base.clock.now = at_hours(12).to_pydatetime()
    service = channel.base.service()
    with TestClient(create_app(service, tokens=TOKENS)) as client:
        writer = {"Authorization": f"Bearer {WRITER}"}
        unsubscribe = {"type": "email_unsubscribed", "user_id": CONSUMER}
        assert client.post("/v1/events", json=unsubscribe, headers=writer).status_code == 202
        assert not service.state.subject(CONSUMER).email_subscribed  # serving honours it now

        # Opting back in is an admin action, as granting consent is.
        resubscribe = {"type": "email_subscribed", "user_id": CAPPED}
        refused = client.post("/v1/events", json=resubscribe, headers=writer)
        assert refused.status_code == 403 and "'admin' scope" in refused.json()["error"]
        malformed = client.post(
            "/v1/events", json={"type": "push_disabled", "user_id": "x"}, headers=writer
        )
        assert malformed.status_code == 422 and "user_id" in malformed.json()["error"]
        admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        assert client.post("/v1/events", json=resubscribe, headers=admin).status_code == 202

        service.attribution.refresh()  # what the poller does every poll_interval_s
        metrics = client.get("/metrics", headers={"Authorization": f"Bearer {READER}"}).text
    labels = (
        f'model_version="model_a",opt_out="email_unsubscribed",region="{REGION}",'
        'surface="email_daily"'
    )
    samples = [
        line
        for line in metrics.splitlines()
        if line.startswith("recsys_channel_unsubscribes_after_send_total{")
    ]
    assert samples == [f"recsys_channel_unsubscribes_after_send_total{{{labels}}} 1.0"]

    # Another replica loading the events from the warehouse agrees; the opt-in came later.
    replica = OnlineState(warehouse, channel.base.settings, clock=channel.base.clock)
    replica.load()
    assert not replica.subject(CONSUMER).email_subscribed
    assert replica.subject(CAPPED).email_subscribed

    # The next plan (the batch side reads the same events) skips the unsubscribed subject.
    plan = plan_sends(warehouse, channel.base.settings, "email_daily", REGION, now=at_hours(13))
    reasons = plan.decisions.set_index("subject_id")["reason"]
    assert reasons[CONSUMER] == "email_unsubscribed"
