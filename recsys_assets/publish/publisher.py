"""Publish one version: write it whole, validate it, and only then flip the manifest.

The order is the safety argument. A reader follows the manifest, and the manifest only
ever names a folder whose validation.json (written last) says it passed. A publisher
killed at any point leaves either the old manifest or the new one, each naming a complete
version; its half-written folder is collected later as an orphan.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import pandas as pd
import pyarrow.dataset as ds

from recsys_assets.config import Settings
from recsys_assets.data import read_raw, read_snapshot
from recsys_assets.data.snapshot import raw_table_path
from recsys_assets.publish.diagnosis import explain_short_lists
from recsys_assets.publish.fallback import compute_fallback_lists
from recsys_assets.publish.lists import (
    LINEAGE_COLUMNS,
    candidate_counts,
    decision_log,
    finalize_lists,
    lists_from_slates,
)
from recsys_assets.publish.manifest import (
    DEFAULT_ORPHAN_GRACE,
    Manifest,
    VersionRecord,
    apply_publish,
    collect_garbage,
    iso,
    read_manifest,
    update_manifest,
)
from recsys_assets.publish.validation import GateLimits, ValidationReport, validate_lists
from recsys_assets.publish.versions import (
    naive_utc,
    new_version_id,
    read_version_lists,
    utc_now,
    version_path,
    write_version_data,
    write_version_report,
)
from recsys_assets.rules.person import read_person_facts
from recsys_assets.rules.tombstones import load_tombstones, tombstoned_items
from recsys_assets.warehouse import Warehouse, partition_path


@dataclass
class PublishOutcome:
    """What a publish did: the version it wrote, whether it went live, and why not."""

    surface: str
    region: str
    version: str
    path: str
    published: bool
    report: ValidationReport
    manifest: Manifest | None
    fallback: bool = False
    collected: list[str] = field(default_factory=list)

    @property
    def failures(self) -> list[str]:
        return self.report.failures

    def summary(self) -> str:
        kind = "fallback lists" if self.fallback else "lists"
        where = f"{kind} for surface={self.surface} region={self.region}"
        if self.published:
            active = self.manifest.active_version if self.manifest else self.version
            return f"published {self.version} of {where}; active version is {active}"
        serving = self.manifest.active_version if self.manifest else "nothing (no manifest yet)"
        return (
            f"refused {self.version} of {where}; still serving {serving}. Failed checks: "
            + "; ".join(self.report.failures)
        )


def publish_version(
    warehouse: Warehouse,
    settings: Settings,
    surface: str,
    region: str,
    lists: pd.DataFrame,
    *,
    items: pd.DataFrame,
    now: datetime | None = None,
    subjects: pd.DataFrame | None = None,
    candidates: pd.Series | None = None,
    interactions: ds.Dataset | None = None,
    fallback: bool = False,
    tracking_secret: str | None = None,
    orphan_grace: timedelta = DEFAULT_ORPHAN_GRACE,
) -> PublishOutcome:
    """Write `lists` as a new version, validate it, and flip the manifest if it passes.

    `lists` are list records (`lists_from_slates` or `compute_fallback_lists`); the version
    and list ids are stamped here. `items` is the current raw items table, `subjects` the
    partition's eligible subjects (coverage, tenants, timezones), `candidates` the candidate
    count per subject for the decision log, `interactions` the raw interactions (a lazy
    dataset): given, a refusal for short or empty lists says which history segments are
    short and why. A refused version keeps its folder (with validation.json saying why) for
    inspection until garbage collection's grace period.
    """
    surface_config = settings.surface(surface)
    settings.check_region(region)
    at = naive_utc(now) if now is not None else utc_now()
    version = new_version_id(warehouse, surface, region, fallback=fallback)
    folder = version_path(surface, region, version, fallback=fallback)
    records = finalize_lists(
        lists, surface=surface, region=region, version=version, fallback=fallback
    )
    log = decision_log(
        records,
        surface=surface_config,
        subjects=subjects,
        candidates=candidates,
        secret=tracking_secret,
    )
    write_version_data(warehouse, folder, lists=records, decision_log=log)
    thresholds = settings.publish.thresholds
    limits = GateLimits.for_fallback(thresholds) if fallback else GateLimits.for_lists(thresholds)
    judged = read_version_lists(warehouse, folder)  # judge the bytes serving will read
    tombstones = load_tombstones(warehouse)
    report = validate_lists(
        judged,
        surface=surface_config,
        region=region,
        items=items,
        limits=limits,
        now=at,
        subjects=subjects,
        kind="fallback" if fallback else "personalized",
        tombstones=tombstones,
        person=None if fallback else read_person_facts(warehouse),
    )
    if interactions is not None and not fallback:
        report = explain_short_lists(
            report,
            warehouse,
            judged,
            surface=surface_config,
            region=region,
            items=items,
            subjects=subjects,
            tombstones=tombstones,
            now=at,
            interactions=interactions,
            short_below=limits.min_mean_list_length_ratio * surface_config.store_depth,
        )
    record = VersionRecord(
        version=version,
        path=folder,
        generated_at=iso(records["generated_at"].min()) if len(records) else None,
        expires_at=iso(records["expires_at"].min()) if len(records) else None,
        lineage=lineage_of(records),
        validation=report.summary(),
    )
    write_version_report(
        warehouse,
        folder,
        {
            "version": version,
            "surface": surface,
            "region": region,
            "fallback": fallback,
            "generated_at": record.generated_at,
            "expires_at": record.expires_at,
            "validated_at": iso(at),
            "lineage": record.lineage,
            "validation": report.to_dict(),
        },
    )
    if not report.passed:
        return PublishOutcome(
            surface, region, version, folder, False, report,
            read_manifest(warehouse, surface, region, fallback=fallback), fallback,
        )  # fmt: skip
    retired: list[str] = []

    def flip(current: Manifest | None) -> Manifest:
        manifest, dropped = apply_publish(
            current,
            record,
            surface=surface,
            region=region,
            retain_versions=settings.publish.retain_versions,
            published_at=utc_now(),
        )
        retired[:] = dropped
        return manifest

    manifest = update_manifest(warehouse, surface, region, flip, fallback=fallback)
    collected = collect_garbage(
        warehouse, surface, region, retired=retired, orphan_grace=orphan_grace, fallback=fallback
    )
    return PublishOutcome(
        surface, region, version, folder, True, report, manifest, fallback, collected
    )


def lineage_of(records: pd.DataFrame) -> dict[str, Any]:
    """The version's lineage: each column's value, `|`-joined if lists disagree."""
    lineage: dict[str, Any] = {}
    for column in LINEAGE_COLUMNS:
        values = sorted({str(value) for value in records[column].dropna().unique()})
        lineage[column] = "|".join(values) if values else None
    lineage["score_time"] = iso(records["generated_at"].min()) if len(records) else None
    return lineage


def publish_partition(
    warehouse: Warehouse,
    settings: Settings,
    surface: str,
    region: str,
    *,
    now: datetime | None = None,
    pipeline_run_id: str | None = None,
    tracking_secret: str | None = None,
) -> PublishOutcome:
    """Publish a partition's slates (what the `published_lists` asset runs)."""
    surface_config = settings.surface(surface)
    where = partition_path(surface=surface, region=region)
    slates = _pipeline_table(warehouse, "slates", where)
    subjects = _pipeline_table(warehouse, "subjects", where)
    lists = lists_from_slates(
        slates,
        surface=surface_config,
        region=region,
        ttl=surface_config.ttl,
        source_data_snapshot=_snapshot_id(warehouse),
        candidate_policy_version=_candidate_policy_version(warehouse, where),
        pipeline_run_id=pipeline_run_id,
    )
    return publish_version(
        warehouse,
        settings,
        surface,
        region,
        lists,
        items=read_raw(warehouse, "items"),
        now=now,
        subjects=subjects,
        candidates=candidate_counts(warehouse, surface, region),
        interactions=warehouse.dataset(raw_table_path("interactions")),
        tracking_secret=tracking_secret,
    )


def publish_fallback_partition(
    warehouse: Warehouse,
    settings: Settings,
    surface: str,
    region: str,
    *,
    now: datetime | None = None,
    pipeline_run_id: str | None = None,
) -> PublishOutcome:
    """Compute and publish a partition's fallback lists (what `fallback_lists` runs)."""
    at = naive_utc(now) if now is not None else utc_now()
    items = read_raw(warehouse, "items")
    surface_config = settings.surface(surface)
    users = read_raw(warehouse, "users", columns=["user_id", "region", "tenant_id"])
    audience = users[users["region"] == settings.check_region(region)]
    if "tenant_actor" in surface_config.eligibility.requires:
        audience = audience[audience["tenant_id"].notna()]
    withdrawn = tombstoned_items(load_tombstones(warehouse), items, region=region, now=at)
    lists = compute_fallback_lists(
        surface=surface_config,
        region=region,
        items=items[~withdrawn],
        interactions=read_raw(
            warehouse, "interactions", columns=["user_id", "item_id", "event_type", "ts"]
        ),
        users=users,
        editorial=read_raw(warehouse, "editorial"),
        now=at,
        # A fallback list never holds more than the surface stores per list.
        list_length=min(settings.fallback.list_length, surface_config.store_depth),
        ttl=settings.fallback.ttl,
        trending_window=timedelta(days=settings.pipeline.trending_window_days),
        source_data_snapshot=_snapshot_id(warehouse),
        pipeline_run_id=pipeline_run_id,
    )
    return publish_version(
        warehouse,
        settings,
        surface,
        region,
        lists,
        items=items,
        now=at,
        fallback=True,
        subjects=audience.rename(columns={"user_id": "subject_id"}),
    )


def _pipeline_table(warehouse: Warehouse, asset: str, where: str) -> pd.DataFrame:
    path = f"pipeline/{asset}/{where}"
    if not warehouse.parquet_parts(path):
        raise FileNotFoundError(
            f"no {asset} for {where} at {warehouse.uri(path)}: materialize {asset} for this "
            "partition before publishing it"
        )
    return warehouse.read_parquet(path)


def _snapshot_id(warehouse: Warehouse) -> str | None:
    try:
        return str(read_snapshot(warehouse).get("snapshot_id"))
    except FileNotFoundError:
        return None


def _candidate_policy_version(warehouse: Warehouse, where: str) -> str | None:
    parts = warehouse.parquet_parts(f"pipeline/candidate_pools/{where}")
    if not parts:
        return None
    column = warehouse.read_parquet(parts[0], columns=["candidate_policy_version"])
    return str(column.iloc[0, 0]) if len(column) else None
