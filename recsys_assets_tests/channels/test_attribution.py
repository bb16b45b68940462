"""Opens and clicks over the real HTTP API: the tracking token is the credential, verified
against its send; unknown or forged tokens are refused; metrics and asset metadata count."""

from __future__ import annotations

import pandas as pd
import pytest
from fastapi.testclient import TestClient

from recsys_assets.channels.attribution import read_engagement
from recsys_assets.channels.ledger import SEND_SCHEMA, append_sends, read_sends, send_key
from recsys_assets.publish.lists import tracking_token
from recsys_assets.serving.api import create_app
from recsys_assets_tests.channels.conftest import REGION, ChannelWorld, at_hours
from recsys_assets_tests.channels.test_send import (
    EMAIL,
    materialize_plan,
    plan_metadata,
    publish_email,
    send,
)
from recsys_assets_tests.serving.conftest import CONSUMER, READER, TOKENS, WRITER


def test_opens_and_clicks_are_attributed_to_their_send(
    channel: ChannelWorld, capsys: pytest.CaptureFixture[str]
) -> None:
    warehouse = channel.warehouse
    publish_email(channel)
    materialize_plan(warehouse, EMAIL)
    send(capsys)
    sends = read_sends(warehouse, surface="email_daily", region=REGION)
    mine = sends[sends["subject_id"] == CONSUMER].sort_values("position")
    first, second = mine.iloc[0], mine.iloc[1]
    # A ledger row whose token was not signed with this server's secret.
    foreign = sends.iloc[[0]].copy()
    foreign["send_key"] = send_key("email_daily", 1, "2026-11-20")
    foreign["tracking_token"] = tracking_token(
        str(foreign["list_id"].iloc[0]), int(foreign["item_id"].iloc[0]), 1, "another-secret"
    )
    append_sends(warehouse, foreign[list(SEND_SCHEMA)], handed_over_at=at_hours(1))

    service = channel.base.service()
    app = create_app(service, tokens=TOKENS)
    with TestClient(app) as client:  # no Authorization header: mail clients have none
        opened = client.post(
            "/v1/events", json={"type": "open", "tracking_token": first["tracking_token"]}
        )
        clicked = client.post(
            "/v1/events",
            json={
                "type": "click",
                "tracking_token": second["tracking_token"],
                "item_id": int(second["item_id"]),
            },
        )
        assert (opened.status_code, clicked.status_code) == (202, 202)
        assert opened.json()["path"].startswith("channels/engagement/date=")
        # Replays (a re-fetched pixel, a repeated request) are answered, not counted again.
        for _ in range(3):
            replay = client.post(
                "/v1/events", json={"type": "open", "tracking_token": first["tracking_token"]}
            )
            assert replay.status_code == 202
            assert replay.json() == {"accepted": 0, "path": None}

        forged = client.post("/v1/events", json={"type": "click", "tracking_token": "ab" * 32})
        assert forged.status_code == 404 and "unknown tracking token" in forged.json()["error"]
        unsigned = client.post(
            "/v1/events",
            json={"type": "open", "tracking_token": foreign["tracking_token"].iloc[0]},
        )
        assert unsigned.status_code == 403 and "does not verify" in unsigned.json()["error"]
        wrong_item = client.post(
            "/v1/events",
            json={
                "type": "click",
                "tracking_token": first["tracking_token"],
                "item_id": int(second["item_id"]),
            },
        )
        assert wrong_item.status_code == 422
        malformed = client.post("/v1/events", json={"type": "open", "tracking_token": "nope"})
        assert malformed.status_code == 422
        # Every other event type still needs events:write.
        hide = {"type": "hide_item", "user_id": CONSUMER, "item_id": int(first["item_id"])}
        assert client.post("/v1/events", json=hide).status_code == 401
        assert (
            client.post(
                "/v1/events", json=hide, headers={"Authorization": f"Bearer {READER}"}
            ).status_code
            == 403
        )
        assert (
            client.post(
                "/v1/events", json=hide, headers={"Authorization": f"Bearer {WRITER}"}
            ).status_code
            == 202
        )

        metrics = client.get("/metrics", headers={"Authorization": f"Bearer {READER}"}).text
    labels = 'model_version="model_a",region="na",surface="email_daily"'
    assert f"recsys_channel_opens_total{{{labels}}} 1.0" in metrics
    assert f"recsys_channel_clicks_total{{{labels}}} 1.0" in metrics
    # CONSUMER's send clicked, CAPPED's not (the foreign row is a third send): 1 of 3.
    assert f"recsys_channel_sends_total{{{labels}}} 3.0" in metrics
    assert f"recsys_channel_attributed_ctr{{{labels}}} 0.3333333333333333" in metrics
    assert (
        'recsys_channel_plan_skips{reason="consent_revoked",region="na",surface="email_daily"} 1.0'
        in metrics
    )

    metadata = plan_metadata(materialize_plan(warehouse, EMAIL))
    assert (metadata["sent_messages"], metadata["opens"], metadata["clicks"]) == (3, 1, 1)
    assert metadata["attributed_ctr"] == pytest.approx(1 / 3)
    events = read_engagement(warehouse)
    assert set(events["send_key"]) == {f"email_daily/{CONSUMER}/2026-11-20"}
    assert pd.Series(events["type"]).value_counts().to_dict() == {"open": 1, "click": 1}
