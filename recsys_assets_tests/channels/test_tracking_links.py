"""The links in a sent message work: rendered under RECSYS_TRACKING_BASE_URL, followed
through the app's GET routes over real HTTP, attributed once; forged tokens are answered
alike and never recorded; nothing is sent without the URL."""

from __future__ import annotations

import re
from email import message_from_bytes, policy
from urllib.parse import urlsplit

import dagster as dg
import pytest
from fastapi.testclient import TestClient

from recsys_assets.channels.attribution import (
    CLICK_LANDING_URL_ENV,
    TRACKING_BASE_URL_ENV,
    attribution_summary,
    read_engagement,
)
from recsys_assets.channels.delivery import DeliveryConfig, deliver_sends
from recsys_assets.channels.ledger import ledger_files, read_sends
from recsys_assets.cli import main
from recsys_assets.pipeline.resources import RecsysResource
from recsys_assets.serving.api import TRANSPARENT_GIF, create_app
from recsys_assets_tests.channels.conftest import REGION, TRACKING_BASE_URL, ChannelWorld
from recsys_assets_tests.channels.test_send import (
    EMAIL,
    OUTBOX,
    materialize_plan,
    publish_email,
    send,
)
from recsys_assets_tests.conftest import TINY_AS_OF
from recsys_assets_tests.serving.conftest import CONSUMER, TOKENS

LANDING = "https://shop.example.com/items"
FORGED = "ab" * 32


def _links(body: str) -> tuple[list[str], str]:
    """(click links in order, the open pixel) of a rendered email's text."""
    urls = re.findall(r"https?://\S+?(?=[\s)]|$)", body)
    clicks = [url for url in urls if "/v1/t/click/" in url]
    (pixel,) = [url for url in urls if "/v1/t/open/" in url]
    return clicks, pixel


def _path(url: str) -> str:
    """The part of a message link the app routes: path and query under the base URL."""
    assert url.startswith(f"{TRACKING_BASE_URL}/v1/t/"), url
    parts = urlsplit(url)
    return f"{parts.path}?{parts.query}" if parts.query else parts.path


def test_rendered_links_are_followed_and_attributed_once(
    channel: ChannelWorld, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    warehouse = channel.warehouse
    publish_email(channel)
    materialize_plan(warehouse, EMAIL)
    send(capsys)
    message = message_from_bytes(
        warehouse.read_bytes(f"{OUTBOX}/{CONSUMER}.eml"), policy=policy.default
    )
    clicks, pixel = _links(message.get_body().get_content())
    sends = read_sends(warehouse, surface="email_daily", region=REGION)
    mine = sends[sends["subject_id"] == CONSUMER].sort_values("position")
    assert clicks == [
        f"{TRACKING_BASE_URL}/v1/t/click/{row.tracking_token}?item_id={row.item_id}"
        for row in mine.itertuples()
    ]
    assert pixel == f"{TRACKING_BASE_URL}/v1/t/open/{mine.iloc[0]['tracking_token']}"
    first_item = int(mine.iloc[0]["item_id"])

    monkeypatch.setenv(CLICK_LANDING_URL_ENV, f"{LANDING}/")
    app = create_app(channel.base.service(), tokens=TOKENS)
    with TestClient(app, follow_redirects=False) as client:  # no Authorization header
        for _ in range(3):  # the pixel re-fetched, the link clicked again: counted once
            opened = client.get(_path(pixel))
            assert opened.status_code == 200
            assert opened.content == TRANSPARENT_GIF
            assert opened.headers["content-type"] == "image/gif"
            assert opened.headers["cache-control"] == "no-store"
            clicked = client.get(_path(clicks[0]))
            assert clicked.status_code == 302
            assert clicked.headers["location"] == f"{LANDING}/{first_item}"
            assert clicked.headers["cache-control"] == "no-store"

        # Forged, malformed or mismatched: answered like a real link, never recorded.
        forged_open = client.get(f"/v1/t/open/{FORGED}")
        assert (forged_open.status_code, forged_open.content) == (200, TRANSPARENT_GIF)
        assert client.get("/v1/t/open/not-a-token").content == TRANSPARENT_GIF
        forged_click = client.get(f"/v1/t/click/{FORGED}?item_id=7")
        assert (forged_click.status_code, forged_click.headers["location"]) == (
            302,
            f"{LANDING}/7",
        )
        other_item = int(mine.iloc[1]["item_id"])
        token = mine.iloc[0]["tracking_token"]
        assert client.get(f"/v1/t/click/{token}?item_id={other_item}").status_code == 302
        bare = client.get(f"/v1/t/click/{mine.iloc[1]['tracking_token']}")
        assert (bare.status_code, bare.headers["location"]) == (302, LANDING)

    events = read_engagement(warehouse)
    assert events[["type", "item_id"]].values.tolist() == [
        ["open", first_item],
        ["click", first_item],
        ["click", other_item],
    ]
    assert FORGED not in set(events["tracking_token"])
    summary = attribution_summary(warehouse, surface="email_daily", region=REGION)
    assert (summary.opens, summary.clicks) == (1, 2)


def test_a_click_without_landing_url_answers_204(
    channel: ChannelWorld, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    publish_email(channel)
    materialize_plan(channel.warehouse, EMAIL)
    send(capsys)
    sends = read_sends(channel.warehouse, surface="email_daily", region=REGION)
    token = sends[sends["subject_id"] == CONSUMER].iloc[0]["tracking_token"]
    monkeypatch.delenv(CLICK_LANDING_URL_ENV, raising=False)
    with TestClient(create_app(channel.base.service(), tokens=TOKENS)) as client:
        clicked = client.get(f"/v1/t/click/{token}")
    assert (clicked.status_code, clicked.content) == (204, b"")
    assert read_engagement(channel.warehouse)["type"].tolist() == ["click"]


@pytest.mark.parametrize(
    ("value", "problem"), [(None, "is not set"), ("t.example.com", "is not an http(s) URL")]
)
def test_sending_without_a_tracking_base_url_is_refused(
    channel: ChannelWorld,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    value: str | None,
    problem: str,
) -> None:
    warehouse = channel.warehouse
    publish_email(channel)
    materialize_plan(warehouse, EMAIL)
    if value is None:
        monkeypatch.delenv(TRACKING_BASE_URL_ENV)
    else:
        monkeypatch.setenv(TRACKING_BASE_URL_ENV, value)
    assert main(["send", "--surface", "email_daily", "--region", REGION]) == 2
    error = capsys.readouterr().err
    assert f"{TRACKING_BASE_URL_ENV}" in error and problem in error
    assert not warehouse.list(OUTBOX, suffix=".eml")
    assert ledger_files(warehouse, surface="email_daily", region=REGION) == []

    if value is None:  # a dry run renders and counts without it, and writes nothing
        assert "dry run: would send 2" in send(capsys, "--dry-run")
        assert not warehouse.list(OUTBOX, suffix=".eml")


def test_the_deliver_sends_job_refuses_without_a_tracking_base_url(
    channel: ChannelWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    warehouse = channel.warehouse
    publish_email(channel)
    materialize_plan(warehouse, EMAIL)
    monkeypatch.delenv(TRACKING_BASE_URL_ENV)
    recsys = RecsysResource(warehouse_url=warehouse.url, score_time=TINY_AS_OF.isoformat())
    config = DeliveryConfig(surface="email_daily", region=REGION)
    with dg.instance_for_test() as instance:
        run = deliver_sends.execute_in_process(
            run_config=dg.RunConfig(ops={"deliver_send_plan": config}),
            resources={"recsys": recsys},
            instance=instance,
            raise_on_error=False,
        )
        assert not run.success
        (failure,) = [event for event in run.all_events if event.is_step_failure]
        error = failure.step_failure_data.error
        assert error.cause is not None and error.cause.cls_name == "TrackingLinksNotConfigured"
        assert f"{TRACKING_BASE_URL_ENV} is not set" in error.cause.message
        dry = deliver_sends.execute_in_process(
            run_config=dg.RunConfig(
                ops={
                    "deliver_send_plan": DeliveryConfig(
                        surface="email_daily", region=REGION, dry_run=True
                    )
                }
            ),
            resources={"recsys": recsys},
            instance=instance,
        )
        assert "dry run: would send 2" in dry.output_for_node("deliver_send_plan")
    assert not warehouse.list(OUTBOX)


def test_a_landing_url_that_is_not_http_stops_the_app(
    channel: ChannelWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(CLICK_LANDING_URL_ENV, "javascript:alert(1)")
    with pytest.raises(ValueError, match=f"{CLICK_LANDING_URL_ENV}=.* is not an http"):
        create_app(channel.base.service(), tokens=TOKENS)
