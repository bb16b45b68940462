"""Unsubscribes after send: a send followed by its subject's opt-out within the window
counts once, by surface, region and model version, in /metrics and in the plan metadata."""

from __future__ import annotations

from datetime import timedelta

import pandas as pd
import pytest
from fastapi.testclient import TestClient

from recsys_assets.channels.unsubscribes import unsubscribes_after_send
from recsys_assets.serving.api import create_app
from recsys_assets_tests.channels.conftest import REGION, ChannelWorld, at_hours, record_event
from recsys_assets_tests.channels.test_send import (
    EMAIL,
    materialize_plan,
    plan_metadata,
    publish_email,
    send,
)
from recsys_assets_tests.serving.conftest import CONSUMER, READER, TOKENS


def test_only_opt_outs_after_a_send_and_within_the_window_count_once_per_send() -> None:
    sent = pd.Timestamp("2026-11-20 09:00")
    sends = pd.DataFrame(
        {
            "send_key": ["email_daily/1/d", "email_daily/2/d", "email_daily/3/d", "push/4/d"],
            "subject_id": [1, 2, 3, 4],
            "surface": ["email_daily", "email_daily", "email_daily", "push"],
            "region": ["na"] * 4,
            "model_version": ["m1", "m1", "m2", "m1"],
            "send_at": [sent] * 4,
        }
    )
    opt_outs = pd.DataFrame(
        {
            "user_id": [1, 1, 2, 3, 4],
            "ts": [
                sent + timedelta(hours=1),  # 1: counts, and its second opt-out adds nothing
                sent + timedelta(hours=2),
                sent - timedelta(minutes=1),  # 2: before the send, not caused by it
                sent + timedelta(hours=48),  # 3: the window's last instant counts
                sent + timedelta(hours=48, seconds=1),  # 4: just past the window
            ],
        }
    )
    assert unsubscribes_after_send(sends, opt_outs, window=timedelta(hours=48)) == {
        ("email_daily", "na", "m1"): 1,
        ("email_daily", "na", "m2"): 1,
    }
    assert unsubscribes_after_send(sends, opt_outs, window=timedelta(hours=24)) == {
        ("email_daily", "na", "m1"): 1
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
    labels = f'model_version="model_a",region="{REGION}",surface="email_daily"'
    assert f"recsys_channel_unsubscribes_after_send_total{{{labels}}} 1.0" in metrics

    metadata = plan_metadata(materialize_plan(warehouse, EMAIL))
    assert metadata["unsubscribes_after_send"] == 1
    assert metadata["unsubscribe_window_hours"] == 48.0
