"""The policy-change inbox: find new files, apply them, archive them, never twice, never lost.

`policy_changes/incoming/` is read through the Warehouse, so a local folder and an S3
prefix behave alike. A file's *identity* is its name, size and ETag (locally: inode,
mtime and size), so a re-used name with new content is a new file, and file names may
arrive in any order.

Moving a file out of `incoming/` is split over two sensor ticks, because the cursor is
the only commit point a sensor has (Dagster stores it only after the tick's run requests
are reserved):

1. tick N applies a new file (tombstones, quarantine report, archive copy), requests its
   runs and records its identity in the cursor; the file stays in `incoming/`;
2. tick N+1 sees the identity in the stored cursor, so the runs were requested, and only
   then deletes the file from `incoming/` (re-copying the archive first if it is missing).

A crash anywhere in tick N leaves the file in `incoming/` with an unchanged cursor: the
retried tick applies it again, which is harmless (tombstones are written once per
change_id, archive copies are idempotent, run keys dedupe runs). Nothing is skipped.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import PurePosixPath
from typing import Any

import pyarrow as pa

from recsys_assets.automation.policy_changes import InvalidChange, PolicyChange, parse_change
from recsys_assets.config import Settings
from recsys_assets.data import read_raw
from recsys_assets.pipeline.partitions import SurfaceRegion
from recsys_assets.rules.tombstones import write_tombstones
from recsys_assets.warehouse import PreconditionFailed, Warehouse, WarehouseError

POLICY_CHANGES = "policy_changes"
INCOMING = f"{POLICY_CHANGES}/incoming"
PROCESSED = f"{POLICY_CHANGES}/processed"
QUARANTINE = f"{POLICY_CHANGES}/quarantine"
APPLIED = f"{POLICY_CHANGES}/applied"
"""One record per applied change_id (its content), so a reused id is caught, not dropped."""
ERROR_REPORT_SUFFIX = ".errors.json"
MAX_FILES_PER_TICK = 50
"""Bounds one tick's work (a sensor tick has a time limit); the rest wait for the next tick."""
CURSOR_RETENTION = timedelta(days=1)
"""How long an archived file's identity is remembered: a re-delivery of the same object
within this window is archived without being applied again."""
_ERROR_TEXT_LIMIT = 500
_LINE_ERRORS = (ValueError, OverflowError, TypeError, pa.ArrowException)
"""What a line's content can make applying it raise (InvalidChange, ConflictingChange and
pandas/pyarrow conversion errors); storage errors (OSError, WarehouseError) are not among
them and leave the whole file for the next tick."""


class ConflictingChange(ValueError):
    """A change_id already applied arrives again with different content."""


@dataclass(frozen=True)
class IncomingFile:
    """One object under `incoming/`, as listed this tick."""

    path: str
    size: int
    etag: str

    @property
    def name(self) -> str:
        return PurePosixPath(self.path).name

    @property
    def identity(self) -> str:
        """Name, size and ETag: what makes this file this file, across ticks and restarts."""
        return f"{self.name}:{self.size}:{self.etag}"


@dataclass(frozen=True)
class LineError:
    """A rejected line: where, why, and its text (shortened) for the quarantine report."""

    line: int
    error: str
    text: str


@dataclass(frozen=True)
class DeferredRefresh:
    """A refresh owed to a change that takes effect later; requested once it is due."""

    partition: SurfaceRegion
    due_at: datetime
    run_key: str


@dataclass
class PolicyChangeCursor:
    """What the sensor remembers between ticks (stored by Dagster as JSON).

    `applied`: identity → {"applied_at", "archived_as"} for files applied but maybe not yet
    moved out of `incoming/`, and for recently moved ones (CURSOR_RETENTION).
    `deferred`: refreshes owed to changes whose effective_at is still in the future.
    """

    applied: dict[str, dict[str, str]] = field(default_factory=dict)
    deferred: list[DeferredRefresh] = field(default_factory=list)

    @classmethod
    def from_json(cls, text: str | None) -> PolicyChangeCursor:
        if not text:
            return cls()
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(
                f"policy_change_sensor cursor is not JSON ({error}); reset it in the UI "
                "(Automation → policy_change_sensor → Cursor): files still in "
                "policy_changes/incoming/ are then applied again, which is safe"
            ) from None
        deferred = [
            DeferredRefresh(
                partition=SurfaceRegion(entry["surface"], entry["region"]),
                due_at=datetime.fromisoformat(entry["due_at"]),
                run_key=entry["run_key"],
            )
            for entry in data.get("deferred", [])
        ]
        return cls(applied=dict(data.get("applied", {})), deferred=deferred)

    def to_json(self) -> str:
        deferred = [
            {
                "surface": entry.partition.surface,
                "region": entry.partition.region,
                "due_at": entry.due_at.isoformat(),
                "run_key": entry.run_key,
            }
            for entry in self.deferred
        ]
        return json.dumps(
            {"version": 1, "applied": self.applied, "deferred": deferred}, sort_keys=True
        )


@dataclass
class FileOutcome:
    """What applying one file did."""

    file: IncomingFile
    changes: list[PolicyChange]
    errors: list[LineError]
    tombstone_paths: list[str]
    archived_as: str
    quarantined_as: str | None

    def partitions(self, settings: Settings) -> set[SurfaceRegion]:
        return {part for change in self.changes for part in change.affected_partitions(settings)}


@dataclass(frozen=True)
class RefreshRequest:
    """One partition to recompute now, and why (the files that asked for it)."""

    partition: SurfaceRegion
    run_key: str
    files: tuple[str, ...]
    change_types: tuple[str, ...]


@dataclass
class InboxTick:
    """The result of one pass over the inbox."""

    outcomes: list[FileOutcome]
    refreshes: list[RefreshRequest]
    archived: list[str]
    """Incoming paths moved out of `incoming/` this tick (applied in an earlier tick)."""
    cursor: PolicyChangeCursor
    waiting: int
    """New files left for the next tick (MAX_FILES_PER_TICK)."""
    failures: dict[str, str]
    """Incoming path → storage error; such a file is retried on the next tick."""


def list_incoming(warehouse: Warehouse) -> list[IncomingFile]:
    """Every file under `incoming/` (hidden names skipped: uploads in progress), by name."""
    found = []
    for path in warehouse.list(INCOMING):
        if PurePosixPath(path).name.startswith("."):
            continue
        try:
            size = int(warehouse.info(path)["size"])
        except FileNotFoundError:  # removed between listing and looking: nothing to do
            continue
        etag = warehouse.etag(path)
        if etag is not None:
            found.append(IncomingFile(path=path, size=size, etag=etag.strip('"')))
    return found


def parse_file(
    data: bytes, settings: Settings
) -> tuple[list[tuple[int, PolicyChange]], list[LineError]]:
    """Valid changes with their line numbers, and every rejected line with its reason."""
    try:
        text = data.decode("utf-8-sig")  # a BOM is accepted, as `recsys import` accepts it
    except UnicodeDecodeError as error:
        return [], [LineError(0, f"file is not UTF-8 text: {error}", "")]
    changes: list[tuple[int, PolicyChange]] = []
    errors: list[LineError] = []
    first_line: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            change = parse_change(line, settings)
        except InvalidChange as error:
            errors.append(LineError(number, str(error), line[:_ERROR_TEXT_LIMIT]))
            continue
        if change.change_id in first_line:
            errors.append(
                LineError(
                    number,
                    f"duplicate change_id {change.change_id!r} (first on line "
                    f"{first_line[change.change_id]}): give every change its own id",
                    line[:_ERROR_TEXT_LIMIT],
                )
            )
            continue
        first_line[change.change_id] = number
        changes.append((number, change))
    if not changes and not errors:
        errors.append(LineError(0, "file has no changes (empty or blank lines only)", ""))
    return changes, errors


def apply_file(
    warehouse: Warehouse, settings: Settings, file: IncomingFile, *, now: datetime
) -> FileOutcome:
    """Validate a file, write its tombstones, quarantine its bad lines, archive a copy.

    Valid lines take effect even when others in the same file are rejected. A file with
    no valid line is archived in `quarantine/` instead of `processed/`. Safe to repeat.
    """
    data = warehouse.read_bytes(file.path)
    numbered, errors = parse_file(data, settings)
    lines = data.decode("utf-8-sig").splitlines() if numbered else []
    tenants: frozenset[str] | None = None
    changes: list[PolicyChange] = []
    tombstones: list[str] = []
    for number, change in numbered:
        try:
            if change.type == "tenant_permission_revoked":
                tenants = known_tenants(warehouse) if tenants is None else tenants
                _check_tenant(change, tenants)
            _claim_change_id(warehouse, change, file, now=now)
            rows = change.tombstone_rows()
            if rows:
                tombstones.append(
                    write_tombstones(warehouse, change.change_id, rows, created_at=now)
                )
        except _LINE_ERRORS as error:
            # The line's content cannot be applied: quarantine it, let the rest through.
            errors.append(LineError(number, str(error), lines[number - 1][:_ERROR_TEXT_LIMIT]))
            continue
        changes.append(change)
    errors.sort(key=lambda entry: entry.line)
    quarantined_as = None
    if errors:
        rejected = data if not changes else _rejected_lines(data, errors)
        quarantined_as = _archive(warehouse, QUARANTINE, file, rejected)
        warehouse.write_json(
            quarantined_as + ERROR_REPORT_SUFFIX,
            _error_report(file, quarantined_as, errors, applied=len(changes), now=now),
        )
    archived_as = _archive(warehouse, PROCESSED, file, data) if changes else quarantined_as or ""
    return FileOutcome(file, changes, errors, tombstones, archived_as, quarantined_as)


def known_tenants(warehouse: Warehouse) -> frozenset[str]:
    """Tenant ids of the raw users and items: the tenants a revocation can name."""
    tenants: set[str] = set()
    for table in ("users", "items"):
        try:
            column = read_raw(warehouse, table, columns=["tenant_id"])["tenant_id"]
        except FileNotFoundError:  # no raw data yet: no tenant is known
            continue
        tenants.update(str(value) for value in column.dropna().unique())
    return frozenset(tenants)


def _check_tenant(change: PolicyChange, tenants: frozenset[str]) -> None:
    if change.tenant_id not in tenants:
        shown = sorted(tenants)[:10]
        raise InvalidChange(
            f"tenant_id {change.tenant_id!r} is not a tenant of the raw users or items "
            f"(known: {shown}{' …' if len(tenants) > 10 else ''}); a typo here would revoke "
            "nothing"
        )


def change_record_path(change_id: str) -> str:
    return f"{APPLIED}/{change_id}.json"


def _claim_change_id(
    warehouse: Warehouse, change: PolicyChange, file: IncomingFile, *, now: datetime
) -> None:
    """Record the change under its id, once; a re-delivery must carry the same content.

    An identical change (a retried tick, a re-sent file) passes, so applying stays
    idempotent; the same id with other content raises ConflictingChange instead of being
    dropped silently while reported as applied.
    """
    path = change_record_path(change.change_id)
    record = {
        "change": change.content(),
        "first_file": file.identity,
        "applied_at": now.isoformat(),
    }
    try:
        warehouse.write_bytes_if(
            path, json.dumps(record, indent=2, sort_keys=True).encode(), expected_etag=None
        )
        return
    except PreconditionFailed:
        pass
    try:
        earlier = json.loads(warehouse.read_bytes(path))
        content = dict(earlier["change"])
        first_file = earlier.get("first_file", "?")
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ConflictingChange(
            f"change_id {change.change_id!r}: its record {path} is unreadable, so this line "
            "cannot be told apart from the applied change; give it a new change_id"
        ) from None
    if content != record["change"]:
        differing = sorted(
            key for key, value in record["change"].items() if content.get(key) != value
        )
        raise ConflictingChange(
            f"change_id {change.change_id!r} was already applied with other content (differs "
            f"in {differing}; first applied from {first_file}); a change is never edited: "
            "give this one a new change_id"
        )


def scan_inbox(
    warehouse: Warehouse,
    settings: Settings,
    cursor: PolicyChangeCursor,
    *,
    now: datetime,
    max_files: int = MAX_FILES_PER_TICK,
) -> InboxTick:
    """One sensor tick's work, in plain Python: archive, apply, plan refreshes, next cursor."""
    incoming = list_incoming(warehouse)
    applied = {identity: dict(entry) for identity, entry in cursor.applied.items()}
    failures: dict[str, str] = {}
    archived = []
    for file in incoming:
        if file.identity not in applied:
            continue
        try:
            if _finish_move(warehouse, file, applied):
                archived.append(file.path)
        except (OSError, WarehouseError) as error:  # stays in incoming/: retried next tick
            failures[file.path] = f"{type(error).__name__}: {error}"
    listed = {file.identity for file in incoming}
    applied = {
        identity: entry
        for identity, entry in applied.items()
        if identity in listed
        or datetime.fromisoformat(entry["applied_at"]) > now - CURSOR_RETENTION
    }
    new = sorted(
        (file for file in incoming if file.identity not in applied),
        key=lambda file: (file.name, file.identity),
    )
    outcomes: list[FileOutcome] = []
    for file in new[:max_files]:
        try:
            outcome = apply_file(warehouse, settings, file, now=now)
        except (OSError, WarehouseError) as error:
            # Storage trouble: not recorded in the cursor, so the next tick retries it.
            failures[file.path] = f"{type(error).__name__}: {error}"
            continue
        outcomes.append(outcome)
        applied[file.identity] = {"applied_at": now.isoformat(), "archived_as": outcome.archived_as}
    refreshes, deferred = _plan_refreshes(outcomes, settings, cursor.deferred, now=now)
    return InboxTick(
        outcomes=outcomes,
        refreshes=refreshes,
        archived=archived,
        cursor=PolicyChangeCursor(applied=applied, deferred=deferred),
        waiting=max(0, len(new) - max_files),
        failures=failures,
    )


def refresh_run_key(partition: SurfaceRegion, identity: str, due_at: datetime | None = None) -> str:
    """Run key of a policy-change refresh: the partition and the identity of its file."""
    key = f"policy_change:{partition.region}:{partition.surface}:{identity}"
    return key if due_at is None else f"{key}:due={due_at.isoformat()}"


def _plan_refreshes(
    outcomes: list[FileOutcome],
    settings: Settings,
    owed: Iterable[DeferredRefresh],
    *,
    now: datetime,
) -> tuple[list[RefreshRequest], list[DeferredRefresh]]:
    """One run per partition this tick (several files banning items in one region need one
    recompute); changes not yet in effect are owed for later."""
    files: dict[SurfaceRegion, list[str]] = {}
    types: dict[SurfaceRegion, set[str]] = {}
    keys: dict[SurfaceRegion, str] = {}
    deferred: dict[str, DeferredRefresh] = {}
    for entry in owed:
        if not settings.is_enabled(entry.partition.surface, entry.partition.region):
            continue  # the configuration dropped the pair since the change was deferred
        if entry.due_at <= now:
            keys.setdefault(entry.partition, entry.run_key)
            files.setdefault(entry.partition, [])
            types.setdefault(entry.partition, set()).add("deferred")
        else:
            deferred[entry.run_key] = entry
    for outcome in outcomes:
        for change in outcome.changes:
            for partition in sorted(change.affected_partitions(settings), key=str):
                if change.effective_at > now:
                    key = refresh_run_key(partition, outcome.file.identity, change.effective_at)
                    deferred[key] = DeferredRefresh(partition, change.effective_at, key)
                    continue
                keys.setdefault(partition, refresh_run_key(partition, outcome.file.identity))
                names = files.setdefault(partition, [])
                if outcome.file.name not in names:
                    names.append(outcome.file.name)
                types.setdefault(partition, set()).add(change.type)
    refreshes = [
        RefreshRequest(
            partition, keys[partition], tuple(files[partition]), tuple(sorted(types[partition]))
        )
        for partition in sorted(keys, key=lambda part: (part.region, part.surface))
    ]
    return refreshes, sorted(deferred.values(), key=lambda entry: (entry.due_at, entry.run_key))


def _finish_move(
    warehouse: Warehouse, file: IncomingFile, applied: dict[str, dict[str, str]]
) -> bool:
    """Second phase: the file's runs are requested, so it leaves `incoming/`.

    The archive copy is re-made if missing (copy, then delete). A file whose ETag changed
    since listing is a new upload under the same name and is left for the next tick.
    """
    target = applied[file.identity].get("archived_as")
    if not target or not warehouse.exists(target):
        applied[file.identity]["archived_as"] = _archive(
            warehouse, PROCESSED, file, warehouse.read_bytes(file.path)
        )
    current = warehouse.etag(file.path)
    if current is None or current.strip('"') != file.etag:
        return False
    warehouse.delete(file.path)
    return True


def _archive(warehouse: Warehouse, folder: str, file: IncomingFile, data: bytes) -> str:
    """Write `data` to `folder/<name>` once; returns where it is.

    Repeating it is a no-op. If another file already took that name with other bytes, this
    one goes to `folder/<stem>.<digest of identity><suffix>` instead of overwriting it.
    """
    plain = f"{folder}/{file.name}"
    if not warehouse.exists(plain):
        warehouse.write_bytes(plain, data)
        return plain
    if warehouse.read_bytes(plain) == data:
        return plain
    digest = hashlib.sha256(file.identity.encode()).hexdigest()[:12]
    name = PurePosixPath(file.name)
    unique = f"{folder}/{name.stem}.{digest}{name.suffix}"
    if not warehouse.exists(unique):
        warehouse.write_bytes(unique, data)
    return unique


def _rejected_lines(data: bytes, errors: list[LineError]) -> bytes:
    lines = data.decode("utf-8-sig").splitlines(keepends=True)
    wanted = {error.line for error in errors}
    return "".join(line for number, line in enumerate(lines, start=1) if number in wanted).encode()


def _error_report(
    file: IncomingFile, quarantined_as: str, errors: list[LineError], *, applied: int, now: datetime
) -> dict[str, Any]:
    return {
        "file": file.path,
        "identity": file.identity,
        "quarantined_as": quarantined_as,
        "quarantined_at": now.isoformat(),
        "changes_applied": applied,
        "lines_rejected": len([error for error in errors if error.line > 0]),
        "errors": [
            {"line": error.line, "error": error.error, "text": error.text} for error in errors
        ],
        "what_to_do": "fix the lines listed here and drop them into policy_changes/incoming/ "
        "as a new file (the other lines of the file have already taken effect)",
    }
