"""Delivery: hand each new send plan to the sender without an operator in the loop.

`recsys send` delivers a partition's plan by hand. The `deliver_send_plans` sensor does the
same after every `send_plans` materialization (the channel schedules make one per region at
its send hour): one `deliver_sends` run per new materialization, in the order they landed,
none missed when several regions plan between two ticks (a cursor over the event log, not
the latest event only). The sensor starts stopped: turning it on (UI, or `dagster sensor
start deliver_send_plans`) is the decision to send for real. Delivery is idempotent per
(channel, subject, send date), so a repeated request hands nothing over twice. Links point
at `RECSYS_TRACKING_BASE_URL` (read from the environment of the process that delivers);
without it a delivery that is not a dry run fails, naming the variable.
"""

import dagster as dg
import pandas as pd

from recsys_assets.automation.runs import TRIGGER_TAG
from recsys_assets.channels.attribution import tracking_base_url_from_env
from recsys_assets.channels.plans import channel_medium, read_send_plan
from recsys_assets.channels.sender import MessageSender, OutboxSender, SendReport, dispatch_plan
from recsys_assets.config import Settings
from recsys_assets.pipeline.partitions import SurfaceRegion
from recsys_assets.pipeline.resources import RecsysResource
from recsys_assets.warehouse import Warehouse

DELIVER_SENDS_JOB = "deliver_sends"
DELIVERY_SENSOR = "deliver_send_plans"
SEND_PLANS_KEY = dg.AssetKey("send_plans")
_EVENTS_PER_TICK = 100


def deliver_partition(
    warehouse: Warehouse,
    settings: Settings,
    surface: str,
    region: str,
    *,
    now: pd.Timestamp,
    dry_run: bool = False,
    sender: MessageSender | None = None,
) -> SendReport:
    """Send the partition's current plan (messages not sent yet) through `sender` (default:
    the warehouse outbox), its links under `RECSYS_TRACKING_BASE_URL`; FileNotFoundError
    before its first send_plans, TrackingLinksNotConfigured without the URL (unless
    `dry_run`)."""
    if channel_medium(settings.surface(surface)) is None:
        raise ValueError(
            f"{surface} is not a channel surface: only email, push and digest surfaces "
            "(a send hour or quiet hours, and a subscription flag) have send plans"
        )
    settings.check_enabled(surface, region)
    plan = read_send_plan(warehouse, surface, region)
    return dispatch_plan(
        warehouse,
        settings,
        plan,
        sender or OutboxSender(warehouse),
        now=now,
        tracking_base_url=tracking_base_url_from_env(),
        dry_run=dry_run,
    )


class DeliveryConfig(dg.Config):
    """Which partition's plan to deliver."""

    surface: str
    region: str
    dry_run: bool = False


@dg.op(description="Hand the partition's send plan to the sender (messages not sent yet).")
def deliver_send_plan(
    context: dg.OpExecutionContext, config: DeliveryConfig, recsys: RecsysResource
) -> dg.Output[str]:
    report = deliver_partition(
        recsys.warehouse(),
        recsys.settings(),
        config.surface,
        config.region,
        now=recsys.now(),
        dry_run=config.dry_run,
    )
    summary = f"{config.surface}/{config.region}: {report.summary()}"
    context.log.info(summary)
    return dg.Output(
        summary,
        metadata={
            "surface": config.surface,
            "region": config.region,
            **{f"messages_{outcome}": count for outcome, count in report.outcomes.items()},
            "ledger": report.ledger_path or "none",
        },
    )


@dg.job(
    name=DELIVER_SENDS_JOB,
    description="Deliver one partition's send plan (email/push/digest) to the sender; "
    "run by the deliver_send_plans sensor, or by hand with run config.",
)
def deliver_sends() -> None:
    deliver_send_plan()


@dg.sensor(
    name=DELIVERY_SENSOR,
    job_name=DELIVER_SENDS_JOB,
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.STOPPED,
    description="After each send_plans materialization, deliver that partition's plan "
    "(deliver_sends). Stopped by default: starting it is the decision to send for real.",
)
def deliver_send_plans(
    context: dg.SensorEvaluationContext, recsys: RecsysResource
) -> dg.SensorResult:
    """One run per channel send_plans materialization since the cursor (a storage id),
    oldest first; the empty plans of other surfaces are passed over."""
    settings = recsys.settings()
    after = int(context.cursor) if context.cursor else None
    records = context.instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=SEND_PLANS_KEY, after_storage_id=after),
        limit=_EVENTS_PER_TICK,
        ascending=True,
    ).records
    requests = []
    for record in records:
        if record.partition_key is None:
            continue
        partition = SurfaceRegion.from_key(record.partition_key)
        surface = settings.surfaces.get(partition.surface)
        if surface is None or channel_medium(surface) is None:
            continue
        requests.append(
            dg.RunRequest(
                run_key=f"deliver:{record.storage_id}",
                run_config=dg.RunConfig(
                    ops={
                        "deliver_send_plan": DeliveryConfig(
                            surface=partition.surface, region=partition.region
                        )
                    }
                ),
                tags={TRIGGER_TAG: DELIVERY_SENSOR},
            )
        )
    cursor = str(records[-1].storage_id) if records else context.cursor
    return dg.SensorResult(run_requests=requests, cursor=cursor)
