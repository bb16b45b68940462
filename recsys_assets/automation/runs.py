"""Run requests for the `refresh_lists` job: tags that say why a run exists, and which
partitions already have a refresh on the way."""

from __future__ import annotations

from collections.abc import Mapping

import dagster as dg

from recsys_assets.pipeline.partitions import SurfaceRegion

TRIGGER_TAG = "recsys/trigger"
"""policy_change | list_expiry | daily_full_refresh | hourly_incremental_refresh"""
SCOPE_TAG = "recsys/refresh_scope"
"""lists (the whole partition) | fallback (only the fallback_lists asset)"""
REASONS_TAG = "recsys/refresh_reasons"
ACTIVE_SINCE_TAG = "recsys/active_since"
"""ISO-8601: subjects active after this are why the run exists; a subject-filtered
`subjects` asset may read it from `context.run.tags`."""
ACTIVE_SUBJECTS_TAG = "recsys/active_subjects"
POLICY_FILES_TAG = "recsys/policy_change_files"
CHANGE_TYPES_TAG = "recsys/policy_change_types"
FALLBACK_ASSET = dg.AssetKey("fallback_lists")
_TAG_VALUE_LIMIT = 1000
_IN_FLIGHT = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
]


def refresh_request(
    partition: SurfaceRegion,
    *,
    run_key: str,
    trigger: str,
    tags: Mapping[str, str] | None = None,
    fallback_only: bool = False,
) -> dg.RunRequest:
    """A run of `refresh_lists` for one partition (or only its fallback lists)."""
    all_tags = {
        TRIGGER_TAG: trigger,
        SCOPE_TAG: "fallback" if fallback_only else "lists",
        **{key: value[:_TAG_VALUE_LIMIT] for key, value in (tags or {}).items()},
    }
    return dg.RunRequest(
        run_key=run_key,
        partition_key=partition.to_key(),
        tags=all_tags,
        asset_selection=[FALLBACK_ASSET] if fallback_only else None,
    )


def refreshes_in_flight(instance: dg.DagsterInstance, job_name: str) -> dict[str, set[str]]:
    """Partition key → refresh scopes of runs of `job_name` queued or running now.

    A run that has not finished yet reads the warehouse when its steps start, so a second
    request for the same partition for the same reason (expiry, activity) adds nothing.
    """
    runs = instance.get_runs(filters=dg.RunsFilter(job_name=job_name, statuses=_IN_FLIGHT))
    found: dict[str, set[str]] = {}
    for run in runs:
        key = run.tags.get("dagster/partition")
        if key:
            found.setdefault(key, set()).add(run.tags.get(SCOPE_TAG, "lists"))
    return found
