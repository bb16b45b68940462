"""Schedules: a daily full refresh of every partition, an hourly incremental refresh."""

from __future__ import annotations

from datetime import UTC, datetime

import dagster as dg

from recsys_assets.automation.refresh import every_partition, incremental_refresh_plan
from recsys_assets.automation.runs import (
    ACTIVE_SINCE_TAG,
    ACTIVE_SUBJECTS_TAG,
    REASONS_TAG,
    refresh_request,
    refreshes_in_flight,
)
from recsys_assets.pipeline.jobs import REFRESH_JOB
from recsys_assets.pipeline.resources import RecsysResource

DAILY_CRON = "0 2 * * *"
HOURLY_CRON = "30 * * * *"
SCHEDULE_TIMEZONE = "UTC"


def _tick_time(context: dg.ScheduleEvaluationContext) -> datetime:
    """The tick's scheduled time as naive UTC: run keys and plans depend on it, not on
    when the daemon got round to evaluating it."""
    scheduled = context.scheduled_execution_time
    if scheduled.tzinfo is not None:
        scheduled = scheduled.astimezone(UTC).replace(tzinfo=None)
    return scheduled


@dg.schedule(
    cron_schedule=DAILY_CRON,
    execution_timezone=SCHEDULE_TIMEZONE,
    job_name=REFRESH_JOB,
    description="Recompute every surface × region partition once a day (02:00 UTC).",
)
def daily_full_refresh(
    context: dg.ScheduleEvaluationContext, recsys: RecsysResource
) -> list[dg.RunRequest]:
    """One run per partition; run_key = day + partition, so a retried tick adds nothing."""
    day = _tick_time(context).date().isoformat()
    return [
        refresh_request(
            partition,
            run_key=f"daily:{day}:{partition.region}:{partition.surface}",
            trigger="daily_full_refresh",
        )
        for partition in every_partition(recsys.settings())
    ]


@dg.schedule(
    cron_schedule=HOURLY_CRON,
    execution_timezone=SCHEDULE_TIMEZONE,
    job_name=REFRESH_JOB,
    description="Every hour: recompute partitions never published, whose lists expire within "
    "the hour, or with subjects active since their lists were generated; partitions with a "
    "refresh already queued or running are left to it.",
)
def hourly_incremental_refresh(
    context: dg.ScheduleEvaluationContext, recsys: RecsysResource
) -> dg.RunRequest | list[dg.RunRequest] | dg.SkipReason:
    """Runs for the partitions `refresh.incremental_refresh_plan` picks (reasons in tags)."""
    now = _tick_time(context)
    plan = incremental_refresh_plan(recsys.warehouse(), recsys.settings(), now=now)
    in_flight = refreshes_in_flight(context.instance, REFRESH_JOB)
    requests = []
    for entry in plan:
        if "lists" in in_flight.get(str(entry.partition.to_key()), set()):
            continue
        tags = {
            REASONS_TAG: ",".join(entry.reasons),
            ACTIVE_SUBJECTS_TAG: str(entry.active_subjects),
        }
        if entry.active_since is not None:
            tags[ACTIVE_SINCE_TAG] = entry.active_since.isoformat()
        requests.append(
            refresh_request(
                entry.partition,
                run_key=f"hourly:{now.isoformat()}:{entry.partition.region}:"
                f"{entry.partition.surface}",
                trigger="hourly_incremental_refresh",
                tags=tags,
            )
        )
    if not requests:
        if plan:
            return dg.SkipReason(
                f"{len(plan)} partition(s) due at {now.isoformat()} already have a refresh "
                "queued or running"
            )
        return dg.SkipReason(
            f"nothing to refresh at {now.isoformat()}: every partition is published, fresh for "
            "the next hour and without subjects active since its lists were generated"
        )
    return requests


SCHEDULES = [daily_full_refresh, hourly_incremental_refresh]
