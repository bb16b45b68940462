"""Dagster shell for channels: `send_plans`, downstream of `published_lists`.

One plain function decides (plans.py); the asset writes the plan and reports sends, skips
by reason and the attribution so far (opens, clicks, CTR of the partition's sends).
"""

import dagster as dg

from recsys_assets.channels.attribution import attribution_summary
from recsys_assets.channels.ledger import read_sends
from recsys_assets.channels.plans import SKIP_REASONS, SendPlan, plan_sends, write_send_plan
from recsys_assets.channels.unsubscribes import (
    UNSUBSCRIBE_WINDOW,
    Unsubscribes,
    opt_outs_of,
    sends_of,
    unsubscribes_after_send,
)
from recsys_assets.pipeline.partitions import (
    ONE_RUN_PER_PARTITION,
    SurfaceRegion,
    surface_region_partitions,
)
from recsys_assets.pipeline.resources import RecsysResource
from recsys_assets.rules.person import read_events

CHANNELS_GROUP = "channels"


def _markdown(plan: SendPlan) -> str:
    skips = plan.skips_by_reason()
    rows = [f"| {reason} | {skips[reason]} |" for reason in SKIP_REASONS if reason in skips]
    return "\n".join(["| skip reason | subjects |", "| --- | --- |", *rows])


def _unsubscribes_markdown(unsubscribes: dict[Unsubscribes, int]) -> str:
    rows = [
        f"| {model_version} | {opt_out} | {count} |"
        for (_, _, model_version, opt_out), count in sorted(unsubscribes.items())
    ]
    return "\n".join(["| model_version | opt-out | sends |", "| --- | --- | --- |", *rows])


@dg.asset(
    partitions_def=surface_region_partitions(),
    backfill_policy=ONE_RUN_PER_PARTITION,
    group_name=CHANNELS_GROUP,
    deps=[dg.AssetKey("published_lists")],
    kinds={"parquet"},
)
def send_plans(context: dg.AssetExecutionContext, recsys: RecsysResource) -> dg.MaterializeResult:
    """Email, push and digest: per subscriber, send or skip at the scheduled send time
    (subscription, quiet hours, staleness, send cap, final check, relevance), with tracking
    tokens and a decision-log row per subject. Other surfaces: an empty plan saying so."""
    partition = SurfaceRegion.from_context(context)
    warehouse = recsys.warehouse()
    plan = plan_sends(
        warehouse, recsys.settings(), partition.surface, partition.region, now=recsys.now()
    )
    root = write_send_plan(warehouse, plan)
    metadata: dict[str, dg.RawMetadataValue] = {
        "status": plan.status,
        "detail": plan.detail or "-",
        "plan_path": root,
        "version": plan.version or "none",
        "model_version": plan.model_version or "none",
        "sends": plan.sends,
        "skips": int(sum(plan.skips_by_reason().values())),
        "skips_by_reason": dg.MetadataValue.md(_markdown(plan)),
    }
    attribution = attribution_summary(warehouse, surface=partition.surface, region=partition.region)
    metadata.update(
        {
            "sent_messages": attribution.sends,
            "opens": attribution.opens,
            "clicks": attribution.clicks,
            "attributed_ctr": attribution.ctr,
        }
    )
    unsubscribes = unsubscribes_after_send(
        sends_of(read_sends(warehouse, surface=partition.surface, region=partition.region)),
        opt_outs_of(read_events(warehouse)),
    )
    metadata["unsubscribes_after_send"] = sum(unsubscribes.values())
    metadata["unsubscribes_by_opt_out"] = dg.MetadataValue.md(_unsubscribes_markdown(unsubscribes))
    metadata["unsubscribe_window_hours"] = UNSUBSCRIBE_WINDOW.total_seconds() / 3600
    context.log.info(f"{partition.surface}/{partition.region}: {plan.summary()}")
    return dg.MaterializeResult(metadata=metadata)


CHANNEL_ASSETS = [send_plans]

SEND_PLANS_JOB = "send_plans_job"
send_plans_job = dg.define_asset_job(
    SEND_PLANS_JOB,
    selection=dg.AssetSelection.assets(send_plans),
    description="Plan one channel partition's sends (the channel schedules request it).",
)
CHANNEL_JOBS = [send_plans_job]
