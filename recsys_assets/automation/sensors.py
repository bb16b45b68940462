"""Sensors: policy-change files → tombstones + targeted recomputes; lists nearing expiry.

Thin shells over `inbox.scan_inbox` and `refresh.expiring_lists`; the warehouse, settings
and clock come from the `recsys` resource, so tests point them at any warehouse.
"""

from __future__ import annotations

import dagster as dg

from recsys_assets.automation.inbox import PolicyChangeCursor, scan_inbox
from recsys_assets.automation.refresh import expiring_lists
from recsys_assets.automation.runs import (
    CHANGE_TYPES_TAG,
    POLICY_FILES_TAG,
    refresh_request,
    refreshes_in_flight,
)
from recsys_assets.pipeline.jobs import REFRESH_JOB
from recsys_assets.pipeline.resources import RecsysResource

POLICY_CHANGE_INTERVAL_S = 30
LIST_EXPIRY_INTERVAL_S = 300


@dg.sensor(
    job_name=REFRESH_JOB,
    minimum_interval_seconds=POLICY_CHANGE_INTERVAL_S,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Applies policy-change files from policy_changes/incoming/: writes their "
    "tombstones at once (serving honours them on its next reload) and requests refresh_lists "
    "runs for exactly the partitions they affect. Bad lines are quarantined with a report.",
)
def policy_change_sensor(
    context: dg.SensorEvaluationContext, recsys: RecsysResource
) -> dg.SensorResult:
    """Apply new policy-change files, one run per affected partition (run_key: file identity)."""
    settings = recsys.settings()
    tick = scan_inbox(
        recsys.warehouse(),
        settings,
        PolicyChangeCursor.from_json(context.cursor),
        now=recsys.now().to_pydatetime(),
    )
    for outcome in tick.outcomes:
        context.log.info(
            "%s: %d change(s) applied, %d tombstone file(s), %d line(s) quarantined%s",
            outcome.file.path,
            len(outcome.changes),
            len(outcome.tombstone_paths),
            len(outcome.errors),
            f" → {outcome.quarantined_as}" if outcome.quarantined_as else "",
        )
    for path, error in tick.failures.items():
        context.log.warning("%s could not be applied (retried next tick): %s", path, error)
    requests = [
        refresh_request(
            refresh.partition,
            run_key=refresh.run_key,
            trigger="policy_change",
            tags={
                POLICY_FILES_TAG: ",".join(refresh.files),
                CHANGE_TYPES_TAG: ",".join(refresh.change_types),
            },
        )
        for refresh in tick.refreshes
    ]
    skip = None
    if not requests:
        skip = (
            f"{len(tick.outcomes)} file(s) applied; no partition to recompute"
            if tick.outcomes
            else "no new policy-change files"
        )
    return dg.SensorResult(run_requests=requests, cursor=tick.cursor.to_json(), skip_reason=skip)


@dg.sensor(
    job_name=REFRESH_JOB,
    minimum_interval_seconds=LIST_EXPIRY_INTERVAL_S,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Refreshes partitions whose published lists (or fallback lists) enter the "
    "last quarter of their ttl (at most the last hour), once per published version.",
)
def list_expiry_sensor(
    context: dg.SensorEvaluationContext, recsys: RecsysResource
) -> dg.SensorResult:
    """Lists nearing expiry get refreshed; run_key = partition + the expiring version."""
    due = expiring_lists(recsys.warehouse(), recsys.settings(), now=recsys.now().to_pydatetime())
    in_flight = refreshes_in_flight(context.instance, REFRESH_JOB)
    requests = []
    for entry in due:
        running = in_flight.get(str(entry.partition.to_key()), set())
        if "lists" in running or entry.scope in running:
            continue
        requests.append(
            refresh_request(
                entry.partition,
                run_key=f"list_expiry:{entry.scope}:{entry.partition.region}:"
                f"{entry.partition.surface}:{entry.version}",
                trigger="list_expiry",
                fallback_only=entry.scope == "fallback",
            )
        )
    skip = None if requests else f"{len(due)} partition(s) near expiry, none needing a new run"
    return dg.SensorResult(run_requests=requests, skip_reason=skip)


SENSORS = [policy_change_sensor, list_expiry_sensor]
