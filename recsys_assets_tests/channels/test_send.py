"""The send_plans asset on a real Dagster instance and `recsys send`: once per (channel,
subject, send date), whatever re-runs or crashes, and never to someone who unsubscribed."""

from __future__ import annotations

import json
from datetime import timedelta
from email import message_from_bytes, policy

import dagster as dg
import pytest

from recsys_assets.channels.assets import send_plans
from recsys_assets.channels.ledger import ledger_files, read_sends
from recsys_assets.channels.plans import ALREADY_SENT
from recsys_assets.cli import main
from recsys_assets.pipeline.partitions import SurfaceRegion
from recsys_assets.pipeline.resources import RecsysResource
from recsys_assets.warehouse import Warehouse
from recsys_assets_tests.channels.conftest import (
    CAPPED,
    REGION,
    REVOKED,
    ChannelWorld,
    publish_channel_version,
    record_event,
)
from recsys_assets_tests.conftest import TINY_AS_OF
from recsys_assets_tests.serving.conftest import CONSUMER

EMAIL = SurfaceRegion(surface="email_daily", region=REGION)
OUTBOX = f"channels/outbox/surface=email_daily/region={REGION}/date=2026-11-20"


def materialize_plan(warehouse: Warehouse, partition: SurfaceRegion) -> dg.ExecuteInProcessResult:
    """send_plans for one partition, on a temporary instance, at the tiny data's clock."""
    with dg.instance_for_test() as instance:
        return dg.materialize(
            [send_plans],
            partition_key=partition.to_key(),
            resources={
                "recsys": RecsysResource(
                    warehouse_url=warehouse.url, score_time=TINY_AS_OF.isoformat()
                )
            },
            instance=instance,
        )


def plan_metadata(result: dg.ExecuteInProcessResult) -> dict[str, object]:
    (event,) = result.get_asset_materialization_events()
    return {key: value.value for key, value in event.materialization.metadata.items()}


def publish_email(channel: ChannelWorld) -> None:
    good = channel.base.good
    publish_channel_version(
        channel,
        "email_daily",
        {CONSUMER: good[:6], CAPPED: good[6:12], REVOKED: good[12:18]},
        ttl=timedelta(hours=24),
        calibrated={CONSUMER: [0.9] * 6, CAPPED: [0.9] * 6, REVOKED: [0.9] * 6},
    )


def send(capsys: pytest.CaptureFixture[str], *extra: str) -> str:
    assert main(["send", "--surface", "email_daily", "--region", REGION, *extra]) == 0
    return capsys.readouterr().out


def test_plan_then_send_once_per_subject_and_day(
    channel: ChannelWorld, capsys: pytest.CaptureFixture[str]
) -> None:
    warehouse = channel.warehouse
    publish_email(channel)

    result = materialize_plan(warehouse, EMAIL)
    metadata = plan_metadata(result)
    assert (metadata["status"], metadata["sends"], metadata["skips"]) == ("planned", 2, 1)
    assert "| consent_revoked | 1 |" in str(metadata["skips_by_reason"])

    assert "dry run: would send 2" in send(capsys, "--dry-run")
    assert (
        warehouse.list(OUTBOX) == []
        and read_sends(warehouse, surface="email_daily", region=REGION).empty
    )

    record_event(warehouse, "consent_revoked", CAPPED)  # unsubscribes after the plan was made
    assert "sent 1, withdrawn_consent 1" in send(capsys)
    (path,) = warehouse.list(OUTBOX)
    assert path.endswith(f"/{CONSUMER}.eml")
    message = message_from_bytes(warehouse.read_bytes(path), policy=policy.default)
    assert message["X-Recsys-Send-Key"] == f"email_daily/{CONSUMER}/2026-11-20"
    assert message["X-Recsys-Send-At-Local"] == "2026-11-20T09:00:00+00:00"
    sends = read_sends(warehouse, surface="email_daily", region=REGION)
    body = message.get_content()
    assert all(f"/click/{token}" in body for token in sends["tracking_token"])
    assert sends["item_id"].tolist() == channel.base.good[:6]
    written = warehouse.read_bytes(path)

    assert "already_sent 1, withdrawn_consent 1" in send(capsys)  # a re-run sends nothing
    assert warehouse.list(OUTBOX) == [path]
    assert len(ledger_files(warehouse, surface="email_daily", region=REGION)) == 1

    # A run that died after handing the message over but before its ledger write:
    for name in ledger_files(warehouse, surface="email_daily", region=REGION):
        warehouse.delete(name)
    assert "recovered 1" in send(capsys)
    assert warehouse.read_bytes(path) == written  # found in the outbox, not sent again
    assert read_sends(warehouse, surface="email_daily", region=REGION)["send_key"].nunique() == 1

    # The next plan knows the list went out.
    again = materialize_plan(warehouse, EMAIL)
    assert plan_metadata(again)["sends"] == 0
    decisions = warehouse.read_parquet(
        f"channels/send_plans/{EMAIL.path}/decision_log.parquet"
    ).set_index("subject_id")
    assert decisions.loc[CONSUMER, "reason"] == ALREADY_SENT


def test_a_surface_that_is_not_a_channel_materializes_an_empty_plan(
    channel: ChannelWorld,
) -> None:
    home = SurfaceRegion(surface="home_feed", region=REGION)
    metadata = plan_metadata(materialize_plan(channel.warehouse, home))
    assert (metadata["status"], metadata["sends"]) == ("not_a_channel", 0)
    summary = json.loads(
        channel.warehouse.read_bytes(f"channels/send_plans/{home.path}/summary.json")
    )
    assert summary["status"] == "not_a_channel"
