"""The deliver_send_plans sensor on a real instance: every channel send_plans
materialization since its cursor becomes one deliver_sends run, none missed when several
land between ticks, other surfaces' empty plans passed over, and a repeated delivery hands
nothing over twice; `recsys send` refuses a surface that is not a channel."""

from __future__ import annotations

import dagster as dg
import pytest

from recsys_assets.channels.assets import send_plans
from recsys_assets.channels.delivery import (
    DELIVERY_SENSOR,
    deliver_send_plans,
    deliver_sends,
)
from recsys_assets.channels.ledger import read_sends
from recsys_assets.cli import main
from recsys_assets.definitions import build_definitions
from recsys_assets.pipeline.partitions import SurfaceRegion
from recsys_assets.pipeline.resources import RecsysResource
from recsys_assets_tests.channels.conftest import REGION, ChannelWorld
from recsys_assets_tests.channels.test_send import EMAIL, OUTBOX, publish_email
from recsys_assets_tests.conftest import TINY_AS_OF

HOME = SurfaceRegion(surface="home_feed", region=REGION)


def test_each_plan_is_delivered_once(channel: ChannelWorld) -> None:
    warehouse = channel.warehouse
    publish_email(channel)
    recsys = RecsysResource(warehouse_url=warehouse.url, score_time=TINY_AS_OF.isoformat())
    with dg.instance_for_test() as instance:
        for partition in (EMAIL, HOME):  # two plans land before the sensor's next tick
            dg.materialize(
                [send_plans],
                partition_key=partition.to_key(),
                resources={"recsys": recsys},
                instance=instance,
            )
        tick = deliver_send_plans(
            dg.build_sensor_context(instance=instance, resources={"recsys": recsys})
        )
        configs = [r.run_config["ops"]["deliver_send_plan"]["config"] for r in tick.run_requests]
        # home_feed's plan is empty (not a channel): nothing to deliver, but the cursor passes it.
        assert [(c["surface"], c["region"]) for c in configs] == [("email_daily", REGION)]

        for request in tick.run_requests:
            run = deliver_sends.execute_in_process(
                run_config=request.run_config, resources={"recsys": recsys}, instance=instance
            )
            assert run.success
        paths = warehouse.list(OUTBOX)  # the email plan's two sends
        assert len(paths) == 2
        sends = read_sends(warehouse, surface="email_daily", region=REGION)
        assert sends["send_key"].nunique() == 2

        # Nothing new since the cursor: no runs. A repeated delivery sends nothing again.
        later = deliver_send_plans(
            dg.build_sensor_context(
                instance=instance, cursor=tick.cursor, resources={"recsys": recsys}
            )
        )
        assert later.run_requests == [] and later.cursor == tick.cursor
        again = deliver_sends.execute_in_process(
            run_config=tick.run_requests[0].run_config,
            resources={"recsys": recsys},
            instance=instance,
        )
        summary = again.output_for_node("deliver_send_plan")
        assert "already_sent 2" in summary and "sent" not in summary.replace("already_sent", "")
        assert warehouse.list(OUTBOX) == paths


def test_the_sensor_is_in_the_code_location_and_starts_stopped() -> None:
    sensor = build_definitions().resolve_sensor_def(DELIVERY_SENSOR)
    assert sensor.default_status == dg.DefaultSensorStatus.STOPPED
    assert sensor.job_name == "deliver_sends" and sensor.description


def test_send_refuses_a_surface_that_is_not_a_channel(
    channel: ChannelWorld, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["send", "--surface", "home_feed", "--region", REGION]) == 2
    assert "home_feed is not a channel surface" in capsys.readouterr().err
