"""Version ids and version folders: immutable once written, complete before anyone names them.

A version folder holds lists.parquet, decision_log.parquet and validation.json. The report
is written last, so a folder without validation.json is one whose publisher died mid-write:
nothing may point at it, and garbage collection removes it after a grace period.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pandas as pd

from recsys_assets.warehouse import Warehouse, partition_path

PUBLISHED_ROOT = "published"
FALLBACK_ROOT = "published/fallback"
MANIFEST_FILE = "manifest.json"
LISTS_FILE = "lists.parquet"
DECISION_LOG_FILE = "decision_log.parquet"
VALIDATION_FILE = "validation.json"
VERSION_PREFIX = "v"
_VERSION_FORMAT = "%Y%m%dT%H%M%S%f"


def utc_now() -> datetime:
    """Naive UTC wall-clock time (the project's timestamp convention)."""
    return datetime.now(UTC).replace(tzinfo=None)


def naive_utc(value: datetime | pd.Timestamp) -> datetime:
    """`value` as a naive UTC datetime (tz-aware input is converted, naive is kept)."""
    stamp = pd.Timestamp(value)
    if stamp.tzinfo is not None:
        stamp = stamp.tz_convert("UTC").tz_localize(None)
    return stamp.to_pydatetime()


def partition_root(surface: str, region: str, *, fallback: bool = False) -> str:
    """Where one partition's manifest and versions live."""
    base = FALLBACK_ROOT if fallback else PUBLISHED_ROOT
    return f"{base}/{partition_path(surface=surface, region=region)}"


def manifest_path(surface: str, region: str, *, fallback: bool = False) -> str:
    return f"{partition_root(surface, region, fallback=fallback)}/{MANIFEST_FILE}"


def versions_root(surface: str, region: str, *, fallback: bool = False) -> str:
    return f"{partition_root(surface, region, fallback=fallback)}/versions"


def version_path(surface: str, region: str, version: str, *, fallback: bool = False) -> str:
    return f"{versions_root(surface, region, fallback=fallback)}/{version}"


def format_version(created_at: datetime) -> str:
    """`v<YYYYmmddTHHMMSSffffff>`: sorting ids sorts versions by creation time."""
    return VERSION_PREFIX + naive_utc(created_at).strftime(_VERSION_FORMAT)


def version_created_at(version: str) -> datetime | None:
    """When a version id was minted, or None if `version` is not a version id."""
    if not version.startswith(VERSION_PREFIX):
        return None
    try:
        return datetime.strptime(version.removeprefix(VERSION_PREFIX), _VERSION_FORMAT)
    except ValueError:
        return None


def new_version_id(
    warehouse: Warehouse, surface: str, region: str, *, fallback: bool = False
) -> str:
    """A fresh version id from the wall clock, bumped past any folder already there.

    Wall clock, not the run's logical time: two backfills with the same pinned score time
    still get distinct, creation-ordered versions.
    """
    created_at = utc_now()
    while warehouse.exists(
        version_path(surface, region, format_version(created_at), fallback=fallback)
    ):
        created_at += timedelta(microseconds=1)
    return format_version(created_at)


def write_version_report(warehouse: Warehouse, folder: str, report: dict[str, Any]) -> None:
    """Write validation.json: the last file, marking the folder complete."""
    warehouse.write_json(f"{folder}/{VALIDATION_FILE}", report)


def read_version_report(warehouse: Warehouse, folder: str) -> dict[str, Any] | None:
    """The folder's validation.json, or None when the folder is incomplete or gone."""
    try:
        return json.loads(warehouse.read_bytes(f"{folder}/{VALIDATION_FILE}"))
    except FileNotFoundError:
        return None
