"""Which partitions need recomputing, and why: lists nearing expiry and subjects active since.

Plain functions over the warehouse (published manifests, the raw users table); the
schedules and the expiry sensor turn their answers into run requests.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds

from recsys_assets.config import Settings
from recsys_assets.data.snapshot import SNAPSHOT_PATH, raw_table_path
from recsys_assets.pipeline.partitions import SurfaceRegion
from recsys_assets.pipeline.subjects import select_subjects
from recsys_assets.publish.manifest import Manifest, parse_time, read_manifest
from recsys_assets.warehouse import Warehouse

RefreshScope = Literal["lists", "fallback"]
MAX_REFRESH_LEAD = timedelta(hours=1)
REFRESH_LEAD_SHARE = 0.25
"""A list is refreshed when a quarter of its ttl (at most an hour) is left: long enough for
a partition run to finish before it expires, short enough not to recompute fresh lists."""
INCREMENTAL_HORIZON = timedelta(hours=1)

UNPUBLISHED = "unpublished"
EXPIRING = "expiring"
ACTIVE_SUBJECTS = "active_subjects"


def every_partition(settings: Settings) -> list[SurfaceRegion]:
    """All enabled surface × region partitions, region by region: a pair a surface's
    `regions` leaves out is never refreshed (it would only publish an empty version)."""
    return [SurfaceRegion(surface, region) for surface, region in settings.enabled_partitions()]


def refresh_lead(ttl: timedelta) -> timedelta:
    """How long before expiry a list with this ttl is refreshed."""
    return min(ttl * REFRESH_LEAD_SHARE, MAX_REFRESH_LEAD)


@dataclass(frozen=True)
class ExpiringList:
    """A published partition whose active version expires soon (or has expired)."""

    partition: SurfaceRegion
    scope: RefreshScope
    """`lists`: the personalized lists (a full partition run, which also rebuilds the
    fallback lists); `fallback`: only the fallback lists are due."""
    version: str
    expires_at: datetime


def expiring_lists(
    warehouse: Warehouse, settings: Settings, *, now: datetime
) -> list[ExpiringList]:
    """Partitions whose published lists or fallback lists are within their refresh lead.

    Never-published partitions are not listed: the schedules build them.
    """
    due = []
    fallback_lead = refresh_lead(settings.fallback.ttl)
    for partition in every_partition(settings):
        lead = refresh_lead(settings.surface(partition.surface).ttl)
        lists = read_manifest(warehouse, partition.surface, partition.region)
        if (entry := _due(partition, "lists", lists, lead, now)) is None:
            fallback = read_manifest(warehouse, partition.surface, partition.region, fallback=True)
            entry = _due(partition, "fallback", fallback, fallback_lead, now)
        if entry is not None:
            due.append(entry)
    return due


@dataclass(frozen=True)
class PlannedRefresh:
    """One partition the incremental refresh recomputes, with its reasons."""

    partition: SurfaceRegion
    reasons: tuple[str, ...]
    active_since: datetime | None
    """When the active lists were generated: activity after this is not reflected in them."""
    active_subjects: int
    expires_at: datetime | None


def incremental_refresh_plan(
    warehouse: Warehouse,
    settings: Settings,
    *,
    now: datetime,
    horizon: timedelta = INCREMENTAL_HORIZON,
) -> list[PlannedRefresh]:
    """Partitions with no published lists, lists expiring within `horizon`, or subjects of
    the surface active since the active lists were generated.

    The partition assets recompute whole partitions (they take no subject filter), so a
    partition with any active subject is recomputed whole; `active_since` travels with
    the run (tags) for when they do.
    """
    published = {
        partition: read_manifest(warehouse, partition.surface, partition.region)
        for partition in every_partition(settings)
    }
    since_by_partition = {
        partition: parse_time(manifest.generated_at)
        for partition, manifest in published.items()
        if manifest is not None
    }
    active = _active_users(warehouse, [s for s in since_by_partition.values() if s is not None])
    plan = []
    for partition, manifest in published.items():
        reasons: list[str] = []
        expires = _expires_at(manifest)
        since = since_by_partition.get(partition)
        count = 0
        if manifest is None:
            reasons.append(UNPUBLISHED)
        elif expires is None or expires <= now + horizon:
            reasons.append(EXPIRING)
        if since is not None and active is not None:
            recent = active[active["last_active_at"] > pd.Timestamp(since)]
            surface = settings.surface(partition.surface)
            count = len(select_subjects(recent, surface, region=partition.region, now=now).subjects)
            if count:
                reasons.append(ACTIVE_SUBJECTS)
        if reasons:
            plan.append(PlannedRefresh(partition, tuple(reasons), since, count, expires))
    return plan


def _due(
    partition: SurfaceRegion,
    scope: RefreshScope,
    manifest: Manifest | None,
    lead: timedelta,
    now: datetime,
) -> ExpiringList | None:
    expires = _expires_at(manifest)
    if manifest is None or expires is None or expires - lead > now:
        return None
    return ExpiringList(partition, scope, manifest.active_version, expires)


def _expires_at(manifest: Manifest | None) -> datetime | None:
    return None if manifest is None else manifest.expires_at_time


def _active_users(warehouse: Warehouse, since: list[datetime]) -> pd.DataFrame | None:
    """Users active after the earliest `since` (pushed down to Parquet), or None without data."""
    if not since or not warehouse.exists(SNAPSHOT_PATH):
        return None
    path = raw_table_path("users")
    if not warehouse.parquet_parts(path):
        return None
    earliest = pa.scalar(pd.Timestamp(min(since)).as_unit("us").to_pydatetime(), pa.timestamp("us"))
    return warehouse.read_parquet(path, filter=ds.field("last_active_at") > earliest)
