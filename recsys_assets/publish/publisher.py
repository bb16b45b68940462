"""Publish one version: write it whole, validate it, and only then flip the manifest.

The order is the safety argument. A reader follows the manifest, and the manifest only
ever names a folder whose validation.json (written last) says it passed. A publisher
killed at any point leaves either the old manifest or the new one, each naming a complete
version; its half-written folder is collected later as an orphan.

Memory is bounded by a part, not by the partition: a partition's slates are read part by
part (one per subject shard), each part's lists and decision-log rows are appended to the
version's lists.parquet and decision_log.parquet as row groups, and the gate reads
lists.parquet back in parts of whole lists, merging their measures (`validate_parts`).
Only a refusal for short or empty lists reads the version whole, for its diagnosis.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from recsys_assets.config import Settings, SurfaceConfig
from recsys_assets.data import read_raw, read_snapshot
from recsys_assets.data.snapshot import raw_table_path
from recsys_assets.publish.diagnosis import DIAGNOSED_CHECKS, explain_short_lists
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
from recsys_assets.publish.shortlists import shortlist_parts
from recsys_assets.publish.validation import (
    VALIDATED_COLUMNS,
    GateLimits,
    ValidationReport,
    validate_parts,
    validated_columns,
    whole_lists,
)
from recsys_assets.publish.versions import (
    DECISION_LOG_FILE,
    LISTS_FILE,
    naive_utc,
    new_version_id,
    utc_now,
    version_path,
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
            empty = " (empty: no eligible subject; serving uses the fallback lists)"
            return (
                f"published {self.version} of {where}"
                f"{empty if self.report.empty else ''}; active version is {active}"
            )
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
    return publish_parts(
        warehouse,
        settings,
        surface,
        region,
        [lists],
        items=items,
        now=now,
        subjects=subjects,
        candidates=candidates,
        interactions=interactions,
        fallback=fallback,
        tracking_secret=tracking_secret,
        orphan_grace=orphan_grace,
    )


def publish_parts(
    warehouse: Warehouse,
    settings: Settings,
    surface: str,
    region: str,
    parts: Iterable[pd.DataFrame],
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
    """`publish_version` of list records that come in parts (a partition's subject shards,
    in subject order, each holding its subjects' whole lists): one part in memory at a time."""
    surface_config = settings.surface(surface)
    settings.check_region(region)
    at = naive_utc(now) if now is not None else utc_now()
    version = new_version_id(warehouse, surface, region, fallback=fallback)
    folder = version_path(surface, region, version, fallback=fallback)
    written = _write_version_parts(
        warehouse,
        folder,
        parts,
        surface=surface_config,
        region=region,
        version=version,
        fallback=fallback,
        subjects=subjects,
        candidates=candidates,
        secret=tracking_secret,
    )
    thresholds = settings.publish.thresholds
    limits = GateLimits.for_fallback(thresholds) if fallback else GateLimits.for_lists(thresholds)
    tombstones = load_tombstones(warehouse)
    report = validate_parts(
        # Judge the bytes serving will read.
        whole_lists(_judged_parts(warehouse, folder, validated_columns(surface_config))),
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
    if interactions is not None and not fallback and report.failed_checks() & DIAGNOSED_CHECKS:
        report = explain_short_lists(
            report,
            warehouse,
            warehouse.read_parquet(f"{folder}/{LISTS_FILE}", columns=VALIDATED_COLUMNS),
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
        generated_at=written.first("generated_at"),
        expires_at=written.first("expires_at"),
        lineage=written.lineage(),
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


@dataclass
class _WrittenVersion:
    """What the version's parts held, gathered while writing them: its lineage and times."""

    rows: int = 0
    lineage_values: dict[str, set[str]] = field(
        default_factory=lambda: {column: set() for column in LINEAGE_COLUMNS}
    )
    earliest: dict[str, pd.Timestamp] = field(default_factory=dict)
    """The first generated_at and expires_at of every list."""
    last_subject: int | None = None

    def add(self, records: pd.DataFrame) -> None:
        if records.empty:
            return
        self.rows += len(records)
        for column, values in self.lineage_values.items():
            values.update(str(value) for value in records[column].dropna().unique())
        for column in ("generated_at", "expires_at"):
            first = records[column].min()
            self.earliest[column] = min(self.earliest.get(column, first), first)

    def first(self, column: str) -> str | None:
        return iso(self.earliest[column]) if self.rows else None

    def lineage(self) -> dict[str, Any]:
        """Each lineage column's value, `|`-joined if lists disagree."""
        lineage: dict[str, Any] = {
            column: "|".join(sorted(values)) if values else None
            for column, values in self.lineage_values.items()
        }
        lineage["score_time"] = self.first("generated_at")
        return lineage


class _ParquetParts:
    """One Parquet object written a part (a row group) at a time, schema set by the first
    non-empty part. A half-written object only ever sits in a version folder nobody reads
    until its validation.json exists (on S3 it appears only when the upload completes)."""

    def __init__(self, warehouse: Warehouse, relative: str) -> None:
        self.warehouse = warehouse
        self.relative = relative
        self._handle: Any = None
        self._writer: pq.ParquetWriter | None = None
        self._empty: pd.DataFrame | None = None

    def write(self, frame: pd.DataFrame) -> None:
        if frame.empty:  # its columns may lack types: it sets the schema only if all are empty
            self._empty = frame
            return
        table = pa.Table.from_pandas(frame, preserve_index=False)
        if self._writer is None:
            target = self.warehouse.path(self.relative)
            if self.warehouse.is_local:
                self.warehouse.fs.makedirs(posixpath.dirname(target), exist_ok=True)
            self._handle = self.warehouse.fs.open(target, "wb")
            self._writer = pq.ParquetWriter(self._handle, table.schema, compression="lz4")
        elif not table.schema.equals(self._writer.schema, check_metadata=False):
            table = table.cast(self._writer.schema)
        self._writer.write_table(table)

    def close(self) -> None:
        if self._writer is None:
            self.warehouse.write_parquet(self.relative, self._empty)
            return
        self.abandon()

    def abandon(self) -> None:
        """Close what was opened; an unfinished object stays in the unvalidated folder."""
        if self._writer is not None:
            try:
                self._writer.close()
            finally:
                self._handle.close()


def _write_version_parts(
    warehouse: Warehouse,
    folder: str,
    parts: Iterable[pd.DataFrame],
    *,
    surface: SurfaceConfig,
    region: str,
    version: str,
    fallback: bool,
    subjects: pd.DataFrame | None,
    candidates: pd.Series | None,
    secret: str | None,
) -> _WrittenVersion:
    """Stamp, write and log each part of list records: lists.parquet and
    decision_log.parquet, one row group per part, in order (the file stays sorted by
    subject, each list's rows together, as long as the parts come in subject order)."""
    written = _WrittenVersion()
    lists_file = _ParquetParts(warehouse, f"{folder}/{LISTS_FILE}")
    log_file = _ParquetParts(warehouse, f"{folder}/{DECISION_LOG_FILE}")
    try:
        for part in parts:
            records = finalize_lists(
                part, surface=surface.name, region=region, version=version, fallback=fallback
            )
            log = decision_log(
                records, surface=surface, subjects=subjects, candidates=candidates, secret=secret
            )
            if len(records) and not fallback:
                first = int(records["subject_id"].iat[0])
                if written.last_subject is not None and first <= written.last_subject:
                    raise ValueError(
                        f"list records of subject {first} come after those of subject "
                        f"{written.last_subject}: publish parts must be subject shards in "
                        "subject order (as the pipeline writes slates); re-materialize the slates"
                    )
                written.last_subject = int(records["subject_id"].iat[-1])
            lists_file.write(records)
            log_file.write(log)
            written.add(records)
    except BaseException:
        lists_file.abandon()
        log_file.abandon()
        raise
    lists_file.close()
    log_file.close()
    return written


_JUDGED_BATCH_ROWS = 262_144


def _judged_parts(warehouse: Warehouse, folder: str, columns: list[str]) -> Iterator[pd.DataFrame]:
    """The version's lists.parquet as written, the columns the gate reads, a batch at a time."""
    with warehouse.fs.open(warehouse.path(f"{folder}/{LISTS_FILE}"), "rb") as handle:
        reader = pq.ParquetFile(handle)
        # One pass per row group: a single pass over a whole file grows the allocator's
        # footprint with the file's length, one per row group stays flat.
        for row_group in range(reader.num_row_groups):
            for batch in reader.iter_batches(
                batch_size=_JUDGED_BATCH_ROWS, columns=columns, row_groups=[row_group]
            ):
                yield batch.to_pandas()


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
    """Publish a partition's slates (what the `published_lists` asset runs), part by part;
    for a `storage_mode: candidate_pool` surface, its shortlists (publish/shortlists.py)."""
    surface_config = settings.surface(surface)
    where = partition_path(surface=surface, region=region)
    slates = _pipeline_parts(warehouse, "slates", where)
    subjects = _pipeline_table(warehouse, "subjects", where)
    snapshot = _snapshot_id(warehouse)
    candidate_policy_version = _candidate_policy_version(warehouse, where)
    lists: Iterable[pd.DataFrame]
    if surface_config.storage_mode == "candidate_pool":
        lists = shortlist_parts(
            warehouse,
            surface_config,
            region,
            source_data_snapshot=snapshot,
            candidate_policy_version=candidate_policy_version,
            pipeline_run_id=pipeline_run_id,
        )
    else:
        lists = (
            lists_from_slates(
                warehouse.read_parquet(part),
                surface=surface_config,
                region=region,
                ttl=surface_config.ttl,
                source_data_snapshot=snapshot,
                candidate_policy_version=candidate_policy_version,
                pipeline_run_id=pipeline_run_id,
            )
            for part in slates
        )
    return publish_parts(
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
    _pipeline_parts(warehouse, asset, where)
    return warehouse.read_parquet(f"pipeline/{asset}/{where}")


def _pipeline_parts(warehouse: Warehouse, asset: str, where: str) -> list[str]:
    path = f"pipeline/{asset}/{where}"
    parts = warehouse.parquet_parts(path)
    if not parts:
        raise FileNotFoundError(
            f"no {asset} for {where} at {warehouse.uri(path)}: materialize {asset} for this "
            "partition before publishing it"
        )
    return parts


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
