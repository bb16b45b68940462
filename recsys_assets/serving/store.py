"""The list store: the active published version of every surface × region, in memory.

Serving trusts only `published/.../manifest.json` (docs/DATA_MODEL.md, "Published lists").
A refresh reads each manifest; when its active version changed, the version's
lists.parquet is loaded into a `PublishedVersion` (numpy arrays, indexed by subject or by
fallback context key) and swapped in as one new immutable `PartitionLists` object. A
request takes that object once, so a publish flip mid-request can never mix two versions.
A manifest that cannot be read, or that disappeared, never unloads a version: the loaded
one keeps serving (and /healthz says so) until a readable manifest names another.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recsys_assets.config import Settings
from recsys_assets.rules.eligibility import ItemStateArrays
from recsys_assets.warehouse import Warehouse, partition_path

log = logging.getLogger(__name__)

PUBLISHED_ROOT = "published"
FALLBACK_ROOT = "published/fallback"
PERSONALIZED_CONTEXT = "default"
LIST_COLUMNS = [
    "list_id",
    "subject_id",
    "context_key",
    "generated_at",
    "expires_at",
    "model_version",
    "position",
    "item_id",
    "score",
    "reason_codes",
    "source_provenance",
]
OPTIONAL_LIST_COLUMNS = ["calibrated"]
"""Read when present: versions published before the calibrated probability was stored lack
it, and still serve (their items' `score` is null)."""

STORE_OK = "ok"
MANIFEST_MISSING = "manifest_missing"
STORE_UNAVAILABLE = "store_unavailable"


def manifest_location(surface: str, region: str, *, fallback: bool = False) -> str:
    root = FALLBACK_ROOT if fallback else PUBLISHED_ROOT
    return f"{root}/{partition_path(surface=surface, region=region)}/manifest.json"


def _nanoseconds(column: pa.ChunkedArray) -> np.ndarray:
    stamps = pc.cast(column.combine_chunks(), pa.timestamp("ns"))
    return stamps.to_numpy(zero_copy_only=False).view(np.int64)


def _dictionary(column: pa.ChunkedArray) -> tuple[np.ndarray, tuple[tuple[str, ...], ...]]:
    """Codes into the distinct `|`-joined token lists (a handful per version), pre-split."""
    encoded = pc.dictionary_encode(pc.fill_null(column.combine_chunks(), ""))
    values = tuple(
        tuple(token for token in (value or "").split("|") if token)
        for value in encoded.dictionary.to_pylist()
    )
    return encoded.indices.to_numpy(zero_copy_only=False).astype(np.int32), values


class PublishedVersion:
    """One published version of one partition, read-only after construction.

    Lists are numbered 0..n-1; list i owns rows starts[i]:starts[i+1], already in position
    order. Personalized lists are found by subject (binary search over sorted ids), fallback
    lists by context key.
    """

    __slots__ = (
        "_iso_cache",
        "_positions",
        "calibrated",
        "context_index",
        "expires_at_ns",
        "fallback",
        "generated_at_ns",
        "item_ids",
        "list_ids",
        "model_versions",
        "path",
        "provenance_codes",
        "provenance_values",
        "reason_codes",
        "reason_values",
        "region",
        "scores",
        "starts",
        "subject_ids",
        "surface",
        "version",
    )

    def __init__(
        self, *, surface: str, region: str, version: str, path: str, table: pa.Table, fallback: bool
    ) -> None:
        self.surface = surface
        self.region = region
        self.version = version
        self.path = path
        self.fallback = fallback
        if fallback:
            table = table.sort_by([("context_key", "ascending"), ("position", "ascending")])
            keys = table.column("context_key").to_pylist()
            boundaries = [i for i in range(1, len(keys)) if keys[i] != keys[i - 1]]
        else:
            table = table.filter(pc.equal(table.column("context_key"), PERSONALIZED_CONTEXT))
            table = table.sort_by([("subject_id", "ascending"), ("position", "ascending")])
            subjects = table.column("subject_id").to_numpy().astype(np.int64)
            boundaries = (np.flatnonzero(np.diff(subjects)) + 1).tolist()
        rows = table.num_rows
        starts = np.array([0, *boundaries, rows] if rows else [0], dtype=np.int64)
        firsts = starts[:-1]
        self.starts = starts
        all_subjects = table.column("subject_id").to_numpy().astype(np.int64)
        self.subject_ids = np.ascontiguousarray(all_subjects[firsts])
        contexts = table.column("context_key").to_pylist()
        self.context_index = {contexts[int(first)]: i for i, first in enumerate(firsts)}
        list_ids = table.column("list_id").to_pylist()
        self.list_ids = [list_ids[int(first)] for first in firsts]
        models = table.column("model_version").to_pylist()
        self.model_versions = [models[int(first)] or "" for first in firsts]
        self.generated_at_ns = _nanoseconds(table.column("generated_at"))[firsts]
        self.expires_at_ns = _nanoseconds(table.column("expires_at"))[firsts]
        self.item_ids = table.column("item_id").to_numpy().astype(np.int64)
        self.scores = table.column("score").to_numpy().astype(np.float64)
        self.calibrated = (
            table.column("calibrated").cast(pa.float64()).to_numpy(zero_copy_only=False)
            if "calibrated" in table.column_names
            else np.full(rows, np.nan)
        )
        self.reason_codes, self.reason_values = _dictionary(table.column("reason_codes"))
        self.provenance_codes, self.provenance_values = _dictionary(
            table.column("source_provenance")
        )
        self._iso_cache: dict[int, str] = {}
        self._positions: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def list_count(self) -> int:
        return len(self.starts) - 1

    def find_subject(self, subject_id: int) -> int:
        """List number of `subject_id`'s personalized list, or -1."""
        found = int(self.subject_ids.searchsorted(subject_id))
        if found < len(self.subject_ids) and self.subject_ids[found] == subject_id:
            return found
        return -1

    def find_context(self, context_key: str) -> int:
        """List number of the fallback list called `context_key`, or -1."""
        return self.context_index.get(context_key, -1)

    def positions_in(self, arrays: ItemStateArrays) -> np.ndarray:
        """Every row's item position in `arrays` (-1 = unknown), computed once per catalog.

        Keyed on the catalog's item-id array, which tombstone updates share: only a new
        items table costs one vectorized lookup over the whole version.
        """
        cached = self._positions
        if cached is not None and cached[0] is arrays.item_ids:
            return cached[1]
        positions = arrays.positions(self.item_ids)
        self._positions = (arrays.item_ids, positions)
        return positions

    def iso(self, nanoseconds: int) -> str:
        """ISO-8601 text of a timestamp; cached, since a version has few distinct ones."""
        text = self._iso_cache.get(nanoseconds)
        if text is None:
            text = str(np.datetime64(nanoseconds, "ns").astype("datetime64[us]"))
            self._iso_cache[nanoseconds] = text
        return text


@dataclass(frozen=True, slots=True)
class PartitionLists:
    """What one partition serves from right now: swapped as a whole, never edited."""

    personalized: PublishedVersion | None
    personalized_status: str
    fallback: PublishedVersion | None
    fallback_status: str


_EMPTY = PartitionLists(None, MANIFEST_MISSING, None, MANIFEST_MISSING)


class ListStore:
    """Active versions of every configured surface × region, refreshed from the manifests."""

    def __init__(self, warehouse: Warehouse, settings: Settings) -> None:
        self.warehouse = warehouse
        self.settings = settings
        self._partitions: dict[tuple[str, str], PartitionLists] = {
            (surface, region): _EMPTY
            for surface in settings.surfaces
            for region in settings.regions
        }
        self._refresh_lock = threading.Lock()
        self.refresh_errors = 0

    def lists(self, surface: str, region: str) -> PartitionLists:
        return self._partitions.get((surface, region), _EMPTY)

    def partitions(self) -> dict[tuple[str, str], PartitionLists]:
        """Every partition's current lists (a snapshot of the references)."""
        return dict(self._partitions)

    def refresh(self) -> list[str]:
        """Re-read every manifest; returns what changed (for logs)."""
        changes: list[str] = []
        with self._refresh_lock:
            for key in list(self._partitions):
                changes.extend(self._refresh_partition(*key))
        return changes

    def _refresh_partition(self, surface: str, region: str) -> list[str]:
        current = self._partitions[(surface, region)]
        personalized, personalized_status = self._load(
            surface, region, current.personalized, fallback=False
        )
        fallback, fallback_status = self._load(surface, region, current.fallback, fallback=True)
        updated = replace(
            current,
            personalized=personalized,
            personalized_status=personalized_status,
            fallback=fallback,
            fallback_status=fallback_status,
        )
        if updated == current:
            return []
        self._partitions[(surface, region)] = updated  # one reference swap: atomic for readers
        return [
            f"{surface}/{region}: {kind} {old.version if old else None} -> "
            f"{new.version if new else None} ({status})"
            for kind, old, new, status in (
                ("lists", current.personalized, personalized, personalized_status),
                ("fallback", current.fallback, fallback, fallback_status),
            )
            if old is not new
        ]

    def _load(
        self, surface: str, region: str, loaded: PublishedVersion | None, *, fallback: bool
    ) -> tuple[PublishedVersion | None, str]:
        """The version the manifest names now; on a read failure, keep what was loaded."""
        location = manifest_location(surface, region, fallback=fallback)
        try:
            manifest = _read_manifest(self.warehouse, location)
        except FileNotFoundError:
            if loaded is not None:  # a deleted live manifest: keep serving what we had
                self.refresh_errors += 1
                log.warning(
                    "%s is missing; still serving version %s",
                    self.warehouse.uri(location),
                    loaded.version,
                )
            return loaded, MANIFEST_MISSING
        except Exception as error:  # storage down or a torn manifest: keep serving what we had
            self.refresh_errors += 1
            log.warning("cannot read %s: %s", self.warehouse.uri(location), error)
            return loaded, STORE_UNAVAILABLE
        version = manifest["active_version"]
        if loaded is not None and loaded.version == version:
            return loaded, STORE_OK
        path = manifest.get("active_path") or location.rsplit("/", 1)[0] + f"/versions/{version}"
        try:
            lists = self.warehouse.dataset(f"{path}/lists.parquet")
            present = [c for c in OPTIONAL_LIST_COLUMNS if c in lists.schema.names]
            table = lists.to_table(columns=LIST_COLUMNS + present)
            return (
                PublishedVersion(
                    surface=surface,
                    region=region,
                    version=version,
                    path=path,
                    table=table,
                    fallback=fallback,
                ),
                STORE_OK,
            )
        except Exception as error:
            self.refresh_errors += 1
            log.warning("cannot load %s version %s: %s", location, version, error)
            return loaded, STORE_UNAVAILABLE


def _read_manifest(warehouse: Warehouse, location: str) -> dict[str, Any]:
    manifest = json.loads(warehouse.read_bytes(location))
    if not isinstance(manifest, dict) or not manifest.get("active_version"):
        raise ValueError(f"{warehouse.uri(location)} names no active_version")
    return manifest
