"""Schedules: one per channel surface, materializing `send_plans` at each region's send hour.

Regions carry no timezone in configuration, so a region's clock is the dominant timezone
of its users (raw `users.timezone`, the most common one; UTC for a region without users).
Every channel schedule ticks at the top of each UTC hour and requests the partitions whose
region is at the surface's `send_hour_local` in that timezone. A channel without a send hour
(push: quiet hours only) plans every enabled region every hour, since publish schedules each
push list for the first hour after it outside the subject's quiet hours.

The plan itself still judges every subject at their own `scheduled_send_at` (their own
timezone); the schedule only decides when the plan is made. digest_weekly is planned at its
send hour every day: its send cap (one per 6 days) keeps it weekly, and a subject whose last
digest failed a rule gets the next day's chance instead of waiting a week.
"""

from __future__ import annotations

from datetime import UTC, datetime

import dagster as dg
import pandas as pd

from recsys_assets.automation.runs import TRIGGER_TAG
from recsys_assets.channels.assets import SEND_PLANS_JOB
from recsys_assets.channels.plans import channel_medium
from recsys_assets.config import Settings
from recsys_assets.data.snapshot import read_raw
from recsys_assets.pipeline.partitions import SurfaceRegion
from recsys_assets.pipeline.resources import RecsysResource
from recsys_assets.rules.person import known_timezone
from recsys_assets.warehouse import Warehouse

SEND_PLANS_CRON = "0 * * * *"
SCHEDULE_TIMEZONE = "UTC"


def region_timezones(warehouse: Warehouse) -> dict[str, str]:
    """Region → its users' most common IANA timezone (ties: alphabetical first)."""
    users = read_raw(warehouse, "users", columns=["region", "timezone"])
    counts = users.groupby(["region", "timezone"]).size().reset_index(name="users")
    counts = counts.sort_values(["region", "users", "timezone"], ascending=[True, False, True])
    dominant = counts.drop_duplicates("region")
    return {
        str(region): known_timezone(str(zone))
        for region, zone in zip(dominant["region"], dominant["timezone"], strict=True)
    }


def regions_at_send_hour(
    settings: Settings, surface: str, now: datetime, timezones: dict[str, str]
) -> list[str]:
    """The enabled regions of `surface` whose local hour at `now` (naive UTC) is its send
    hour; every enabled region for a channel without a send hour."""
    send_hour = settings.surface(surface).channel_rules.send_hour_local
    regions = settings.surface_regions(surface)
    if send_hour is None:
        return list(regions)
    utc = pd.Timestamp(now).tz_localize("UTC")
    return [
        region
        for region in regions
        if utc.tz_convert(timezones.get(region, "UTC")).hour == send_hour
    ]


def _channel_schedule(settings: Settings, surface: str) -> dg.ScheduleDefinition:
    send_hour = settings.surface(surface).channel_rules.send_hour_local
    when = (
        f"at {send_hour:02d}:00 in each region's dominant user timezone"
        if send_hour is not None
        else "every hour in every region (no send hour: quiet hours only)"
    )

    @dg.schedule(
        name=f"{surface}_send_plans",
        cron_schedule=SEND_PLANS_CRON,
        execution_timezone=SCHEDULE_TIMEZONE,
        job_name=SEND_PLANS_JOB,
        description=f"{surface}: plan sends (send_plans) {when}; `recsys send` hands the "
        "plan to the sender (docs/CHANNELS.md).",
    )
    def schedule(
        context: dg.ScheduleEvaluationContext, recsys: RecsysResource
    ) -> list[dg.RunRequest] | dg.SkipReason:
        """One send_plans run per region at its send hour; run_key = surface, region and
        tick, so a retried tick adds nothing."""
        now = context.scheduled_execution_time.astimezone(UTC).replace(tzinfo=None)
        timezones = region_timezones(recsys.warehouse()) if send_hour is not None else {}
        regions = regions_at_send_hour(recsys.settings(), surface, now, timezones)
        if not regions:
            return dg.SkipReason(f"no region of {surface} is at its send hour at {now} UTC")
        return [
            dg.RunRequest(
                run_key=f"send_plans:{surface}:{region}:{now.isoformat()}",
                partition_key=SurfaceRegion(surface, region).to_key(),
                tags={TRIGGER_TAG: f"{surface}_send_plans"},
            )
            for region in regions
        ]

    return schedule


def channel_schedules(settings: Settings) -> list[dg.ScheduleDefinition]:
    """One schedule per channel surface of `settings` (email, push, digest)."""
    return [
        _channel_schedule(settings, name)
        for name, surface in settings.surfaces.items()
        if channel_medium(surface) is not None
    ]
