"""The manifest: the one object serving trusts. Flipped atomically, never lost to a race.

Every change is a read-modify-conditional-write loop (`update_manifest`): the write only
lands if nobody changed the manifest since it was read, otherwise it re-reads and re-applies
the change. Two publishers (or a publisher and a rollback) therefore never erase each
other's history entry. Version states follow Venice's store versions: a version becomes
`active`, steps down to `previous` (a rollback target), or is marked `rolled_back` /
`invalid` (never a default target). The active version's folder is never deleted.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

import pandas as pd
import pyarrow as pa

from recsys_assets.publish.lists import LIST_COLUMNS
from recsys_assets.publish.versions import (
    LISTS_FILE,
    VALIDATION_FILE,
    manifest_path,
    naive_utc,
    read_version_report,
    utc_now,
    version_created_at,
    version_path,
    versions_root,
)
from recsys_assets.warehouse import PreconditionFailed, Warehouse, WarehouseError

ACTIVE = "active"
PREVIOUS = "previous"
ROLLED_BACK = "rolled_back"
INVALID = "invalid"
STATUSES = (ACTIVE, PREVIOUS, ROLLED_BACK, INVALID)
DEFAULT_ORPHAN_GRACE = timedelta(hours=24)
"""Version folders not named by the manifest (a crashed or refused publish) are kept this
long for inspection, and so that a publish still in flight is never collected under it."""
_UPDATE_ATTEMPTS = 100
_VERIFIED_COLUMNS = ["list_id", "subject_id", "position", "item_id", "score"]
"""Read in full before a rollback: what serving needs from every row of a list."""


class RollbackRefused(ValueError):
    """A rollback (or mark) was refused; the message says why and what to do instead."""


class CorruptManifest(WarehouseError):
    """A manifest.json that is not a manifest (bad JSON, wrong shape); names the file."""


def iso(value: datetime | pd.Timestamp | None) -> str | None:
    """Naive-UTC ISO-8601 text, as every timestamp in a manifest is written."""
    return None if value is None or pd.isna(value) else naive_utc(value).isoformat()


def parse_time(value: str | None) -> datetime | None:
    return None if not value else naive_utc(pd.Timestamp(value))


@dataclass
class HistoryEntry:
    """One retained version and what happened to it."""

    version: str
    path: str
    status: str
    generated_at: str | None
    expires_at: str | None
    published_at: str | None
    reason: str = ""


@dataclass
class Manifest:
    """A partition's manifest (docs/DATA_MODEL.md "manifest.json")."""

    surface: str
    region: str
    active_version: str
    active_path: str
    generated_at: str | None
    expires_at: str | None
    lineage: dict[str, Any]
    validation: dict[str, Any]
    updated_at: str | None
    history: list[HistoryEntry] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json_bytes(self) -> bytes:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True).encode("utf-8")

    @classmethod
    def from_dict(cls, data: Any) -> Manifest:
        """Raises ValueError saying what is wrong when `data` is not a manifest."""
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object, got {type(data).__name__}")
        for key in ("active_version", "active_path"):
            if not isinstance(data.get(key), str) or not data[key]:
                raise ValueError(f"{key} must be non-empty text, got {data.get(key)!r}")
        fields = {key: data.get(key) for key in cls.__dataclass_fields__ if key != "history"}
        for key in ("lineage", "validation"):
            fields[key] = fields[key] or {}
            if not isinstance(fields[key], dict):
                raise ValueError(f"{key} must be an object, got {type(fields[key]).__name__}")
        entries = data.get("history") or []
        if not isinstance(entries, list) or not all(isinstance(entry, dict) for entry in entries):
            raise ValueError("history must be a list of objects")
        try:
            history = [HistoryEntry(**entry) for entry in entries]
        except TypeError as error:  # a missing or unknown field in an entry
            raise ValueError(f"history entry: {error}") from None
        return cls(**fields, history=history)

    def entry(self, version: str) -> HistoryEntry | None:
        return next((entry for entry in self.history if entry.version == version), None)

    @property
    def expires_at_time(self) -> datetime | None:
        return parse_time(self.expires_at)


@dataclass(frozen=True)
class VersionRecord:
    """What the manifest needs to know about a validated version (from its validation.json)."""

    version: str
    path: str
    generated_at: str | None
    expires_at: str | None
    lineage: dict[str, Any]
    validation: dict[str, Any]

    @classmethod
    def from_report(cls, path: str, report: dict[str, Any]) -> VersionRecord:
        return cls(
            version=report["version"],
            path=path,
            generated_at=report.get("generated_at"),
            expires_at=report.get("expires_at"),
            lineage=dict(report.get("lineage", {})),
            validation={
                key: value
                for key, value in report.get("validation", {}).items()
                if key != "checks"  # per-check detail stays in validation.json
            },
        )


def read_manifest(
    warehouse: Warehouse, surface: str, region: str, *, fallback: bool = False
) -> Manifest | None:
    """The partition's manifest, or None if nothing was ever published there."""
    path = manifest_path(surface, region, fallback=fallback)
    try:
        return parse_manifest(warehouse, path, warehouse.read_bytes(path))
    except FileNotFoundError:
        return None


def parse_manifest(warehouse: Warehouse, path: str, data: bytes) -> Manifest:
    """The manifest in `data`, or CorruptManifest naming the file and what is wrong."""
    try:
        return Manifest.from_dict(json.loads(data))
    except json.JSONDecodeError as error:
        problem = f"not valid JSON ({error.msg} at line {error.lineno} column {error.colno})"
    except UnicodeDecodeError:
        problem = "not UTF-8 text"
    except ValueError as error:
        problem = f"not a manifest ({error})"
    raise CorruptManifest(
        f"{warehouse.uri(path)} is {problem}; restore it from a backup, or delete it and "
        "publish the partition again (its history of versions is then lost)"
    )


def update_manifest(
    warehouse: Warehouse,
    surface: str,
    region: str,
    change: Callable[[Manifest | None], Manifest],
    *,
    fallback: bool = False,
) -> Manifest:
    """Apply `change` to the current manifest and write it only if nobody else wrote since.

    On a lost race the manifest is re-read and `change` re-applied, so concurrent updates
    compose instead of overwriting each other. `change` may raise to abort (nothing written).
    """
    path = manifest_path(surface, region, fallback=fallback)
    for attempt in range(_UPDATE_ATTEMPTS):
        etag = warehouse.etag(path)
        current = None
        if etag is not None:
            try:
                current = parse_manifest(warehouse, path, warehouse.read_bytes(path))
            except FileNotFoundError:
                continue
        updated = change(current)
        updated.updated_at = iso(utc_now())
        try:
            warehouse.write_bytes_if(path, updated.to_json_bytes(), expected_etag=etag)
            return updated
        except PreconditionFailed:
            time.sleep(random.uniform(0, 0.005 * (attempt + 1)))
    raise WarehouseError(
        f"could not update {warehouse.uri(path)} after {_UPDATE_ATTEMPTS} attempts: other "
        "writers keep changing it; retry when the concurrent publishes have finished"
    )


def apply_publish(
    current: Manifest | None,
    record: VersionRecord,
    *,
    surface: str,
    region: str,
    retain_versions: int,
    published_at: datetime,
) -> tuple[Manifest, list[str]]:
    """The manifest after publishing `record`, and the versions retention drops.

    The newest version wins: if a concurrent publisher already activated a version created
    later than this one, this one is kept as `previous` rather than replacing newer lists.
    """
    history = [replace(entry) for entry in (current.history if current else [])]
    history = [entry for entry in history if entry.version != record.version]
    becomes_active = current is None or record.version > current.active_version
    entry = HistoryEntry(
        version=record.version,
        path=record.path,
        status=ACTIVE if becomes_active else PREVIOUS,
        generated_at=record.generated_at,
        expires_at=record.expires_at,
        published_at=iso(published_at),
        reason="validation passed"
        if becomes_active
        else f"validation passed, but newer version {current.active_version if current else ''} "
        "was already active",
    )
    if becomes_active:
        for other in history:
            if other.status == ACTIVE:
                other.status = PREVIOUS
                other.reason = f"superseded by {record.version}"
        manifest = _activate(surface, region, record, [entry, *history])
    else:
        assert current is not None
        manifest = replace(current, history=[entry, *history])
    return _retain(manifest, retain_versions)


def _activate(
    surface: str, region: str, record: VersionRecord, history: list[HistoryEntry]
) -> Manifest:
    return Manifest(
        surface=surface,
        region=region,
        active_version=record.version,
        active_path=record.path,
        generated_at=record.generated_at,
        expires_at=record.expires_at,
        lineage=record.lineage,
        validation=record.validation,
        updated_at=None,
        history=history,
    )


def _retain(manifest: Manifest, retain_versions: int) -> tuple[Manifest, list[str]]:
    """Keep the active version plus the `retain_versions` newest others."""
    ordered = sorted(manifest.history, key=lambda entry: entry.version, reverse=True)
    others = [entry for entry in ordered if entry.version != manifest.active_version]
    kept = {entry.version for entry in others[:retain_versions]} | {manifest.active_version}
    dropped = [entry.version for entry in ordered if entry.version not in kept]
    manifest.history = [entry for entry in ordered if entry.version in kept]
    return manifest, dropped


def rollback(
    warehouse: Warehouse,
    surface: str,
    region: str,
    *,
    to_version: str | None = None,
    reason: str = "",
    now: datetime | None = None,
    fallback: bool = False,
    force: bool = False,
) -> Manifest:
    """Make `to_version` (default: the newest `previous` version) active again.

    The version rolled back from is marked `rolled_back`, so no default rollback or retry
    goes back to it. Refused (RollbackRefused, manifest untouched) when the target is
    unknown, expired, invalid, rolled back, already active, or its folder is incomplete,
    unreadable or not a validated version: a flip to lists serving cannot read would lock
    the good version out. `force` (with an explicit `to_version` and a reason) re-activates
    a version rolled back by mistake; the reason is recorded in the history.
    """
    at = naive_utc(now) if now is not None else utc_now()
    where = f"surface={surface} region={region}" + (" (fallback lists)" if fallback else "")
    if force and (to_version is None or not reason.strip()):
        raise RollbackRefused(
            f"cannot force a rollback of {where} without --to VERSION and a --reason: a forced "
            "rollback re-activates one named version, and the history records why"
        )

    def change(current: Manifest | None) -> Manifest:
        if current is None:
            raise RollbackRefused(
                f"nothing is published for {where}: there is nothing to roll back"
            )
        target = _rollback_target(
            warehouse, current, to_version, where, fallback=fallback, force=force
        )
        expires = parse_time(target.expires_at)
        if expires is not None and expires < at:
            raise RollbackRefused(
                f"cannot roll back {where} to {target.version}: it expired at {target.expires_at} "
                f"(now {iso(at)}); serving would treat it as stale. Publish a fresh version instead"
            )
        report = _verified_report(warehouse, target, where)
        forced = " (forced)" if force and target.status in (ROLLED_BACK, INVALID) else ""
        note = f"rolled back from {current.active_version}{forced}" + (
            f": {reason}" if reason else ""
        )
        history = [replace(entry) for entry in current.history]
        for entry in history:
            if entry.version == current.active_version:
                entry.status = ROLLED_BACK
                entry.reason = f"rolled back to {target.version}" + (
                    f": {reason}" if reason else ""
                )
            elif entry.version == target.version:
                entry.status = ACTIVE
                entry.reason = note
        record = VersionRecord.from_report(target.path, report)
        return _activate(current.surface, current.region, record, history)

    return update_manifest(warehouse, surface, region, change, fallback=fallback)


def _verified_report(warehouse: Warehouse, target: HistoryEntry, where: str) -> dict[str, Any]:
    """The target's validation report, once its lists are known to be readable by serving."""
    refused = f"cannot roll back {where} to {target.version}: its folder {target.path}"
    try:
        report = read_version_report(warehouse, target.path)
    except (ValueError, UnicodeDecodeError):
        raise RollbackRefused(f"{refused} has an unreadable {VALIDATION_FILE}") from None
    if not isinstance(report, dict) or not isinstance(report.get("validation"), dict):
        raise RollbackRefused(f"{refused} is missing or not a validated version")
    if not report["validation"].get("passed") or report.get("version") != target.version:
        raise RollbackRefused(f"{refused} is not a validated version of {target.version}")
    lists = f"{target.path}/{LISTS_FILE}"
    try:
        schema = warehouse.dataset(lists).schema
        warehouse.read_arrow(lists, columns=_VERIFIED_COLUMNS)
    except FileNotFoundError:
        raise RollbackRefused(f"{refused} has no {LISTS_FILE}") from None
    except (pa.ArrowException, OSError, ValueError) as error:
        raise RollbackRefused(f"{refused} has an unreadable {LISTS_FILE} ({error})") from None
    missing = [column for column in LIST_COLUMNS if column not in schema.names]
    if missing:
        raise RollbackRefused(f"{refused}: {LISTS_FILE} lacks columns {missing}")
    return report


def _rollback_target(
    warehouse: Warehouse,
    manifest: Manifest,
    to_version: str | None,
    where: str,
    *,
    fallback: bool,
    force: bool,
) -> HistoryEntry:
    retained = ", ".join(f"{entry.version} ({entry.status})" for entry in manifest.history)
    if to_version is None:
        candidates = sorted(
            (entry for entry in manifest.history if entry.status == PREVIOUS),
            key=lambda entry: entry.version,
            reverse=True,
        )
        if not candidates:
            raise RollbackRefused(
                f"cannot roll back {where}: no previous version is retained (history: {retained})"
            )
        return candidates[0]
    if to_version == manifest.active_version:
        raise RollbackRefused(f"cannot roll back {where} to {to_version}: it is already active")
    target = manifest.entry(to_version)
    if target is None:
        folder = version_path(manifest.surface, manifest.region, to_version, fallback=fallback)
        report = read_version_report(warehouse, folder)
        if report is not None and not report.get("validation", {}).get("passed"):
            raise RollbackRefused(
                f"cannot roll back {where} to {to_version}: it failed validation "
                f"({'; '.join(report['validation'].get('failures', []))})"
            )
        raise RollbackRefused(
            f"cannot roll back {where} to {to_version}: not in the retained history ({retained})"
        )
    if target.status == INVALID or (target.status == ROLLED_BACK and not force):
        hint = " (or, if it was rolled back by mistake, add --force --reason TEXT)"
        raise RollbackRefused(
            f"cannot roll back {where} to {to_version}: it is marked {target.status} "
            f"({target.reason}); pick another version or publish a fresh one"
            + (hint if target.status == ROLLED_BACK else "")
        )
    return target


def mark_invalid(
    warehouse: Warehouse,
    surface: str,
    region: str,
    version: str,
    *,
    reason: str,
    fallback: bool = False,
) -> Manifest:
    """Mark a retained, non-active version unsafe: it can no longer be rolled back to."""

    def change(current: Manifest | None) -> Manifest:
        entry = current.entry(version) if current else None
        if current is None or entry is None:
            raise RollbackRefused(f"version {version} is not retained for {surface}/{region}")
        if version == current.active_version:
            raise RollbackRefused(
                f"version {version} is active for {surface}/{region}: roll back first, then mark it"
            )
        history = [replace(item) for item in current.history]
        for item in history:
            if item.version == version:
                item.status = INVALID
                item.reason = reason
        return replace(current, history=history)

    return update_manifest(warehouse, surface, region, change, fallback=fallback)


def collect_garbage(
    warehouse: Warehouse,
    surface: str,
    region: str,
    *,
    retired: Iterable[str] = (),
    now: datetime | None = None,
    orphan_grace: timedelta = DEFAULT_ORPHAN_GRACE,
    fallback: bool = False,
) -> list[str]:
    """Delete version folders the manifest no longer names; return the versions deleted.

    `retired` versions (just dropped by retention) go at once. Any other folder outside the
    manifest (a crashed or refused publish) goes once older than `orphan_grace`, so a publish
    still in flight is never collected under its feet. The manifest is re-read first: the
    active version and every retained one are never deleted.
    """
    at = naive_utc(now) if now is not None else utc_now()
    manifest = read_manifest(warehouse, surface, region, fallback=fallback)
    named = {entry.version for entry in manifest.history} if manifest else set()
    if manifest:
        named.add(manifest.active_version)
    retired = set(retired)
    deleted = []
    for version in warehouse.list_dirs(versions_root(surface, region, fallback=fallback)):
        created = version_created_at(version)
        if version in named or created is None:
            continue
        if version in retired or at - created >= orphan_grace:
            warehouse.delete(
                version_path(surface, region, version, fallback=fallback), recursive=True
            )
            deleted.append(version)
    return deleted


def active_lists(
    warehouse: Warehouse, surface: str, region: str, *, fallback: bool = False
) -> pd.DataFrame:
    """The active version's lists.parquet rows.

    A version can be retired between reading the manifest and reading its lists; then the
    manifest has moved on and is read again. A manifest naming a missing folder is an error.
    """
    where = f"surface={surface} region={region}" + (" (fallback lists)" if fallback else "")
    for _ in range(5):
        manifest = read_manifest(warehouse, surface, region, fallback=fallback)
        if manifest is None:
            raise FileNotFoundError(
                f"nothing is published for {where}: no manifest at "
                f"{warehouse.uri(manifest_path(surface, region, fallback=fallback))}; "
                "materialize published_lists (or fallback_lists) for this partition first"
            )
        lists = f"{manifest.active_path}/{LISTS_FILE}"
        try:
            return warehouse.read_parquet(lists)
        except pa.ArrowException as error:  # ArrowInvalid and kin: damaged bytes
            raise WarehouseError(
                f"the manifest for {where} names {manifest.active_version} but "
                f"{warehouse.uri(lists)} is unreadable ({error}): roll back with "
                f"`recsys rollback --surface {surface} --region {region}`"
            ) from None
        except FileNotFoundError:
            latest = read_manifest(warehouse, surface, region, fallback=fallback)
            if latest is not None and latest.active_version != manifest.active_version:
                continue
            raise WarehouseError(
                f"the manifest for {where} names {manifest.active_version} but "
                f"{warehouse.uri(manifest.active_path)} has no {LISTS_FILE}: roll back with "
                f"`recsys rollback --surface {surface} --region {region}`"
            ) from None
    raise WarehouseError(f"the manifest for {where} kept changing while reading its lists; retry")
