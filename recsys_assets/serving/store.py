"""The list store: the active published version of every surface × region, in memory.

Serving trusts only `published/.../manifest.json` (docs/DATA_MODEL.md, "Published lists").
A refresh reads each manifest; when its active version changed, the version's
lists.parquet is loaded into a `PublishedVersion` (a few numpy numbers per list, indexed by
subject or by fallback context key; the rows in a local file read per request) and swapped
in as one new immutable `PartitionLists` object. A
request takes that object once, so a publish flip mid-request can never mix two versions.
A manifest that cannot be read, or that disappeared, never unloads a version: the loaded
one keeps serving (and /healthz says so) until a readable manifest names another.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

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
IN_SLATE = "in_slate"
OPTIONAL_LIST_COLUMNS = ["calibrated", IN_SLATE]
"""Read when present: versions published before the calibrated probability was stored lack
it, and still serve (their items' `score` is null); only candidate-pool shortlists carry
`in_slate` (their stored slate's rows, first in each list)."""

STORE_OK = "ok"
MANIFEST_MISSING = "manifest_missing"
STORE_UNAVAILABLE = "store_unavailable"


def manifest_location(surface: str, region: str, *, fallback: bool = False) -> str:
    root = FALLBACK_ROOT if fallback else PUBLISHED_ROOT
    return f"{root}/{partition_path(surface=surface, region=region)}/manifest.json"


def _nanoseconds(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    stamps = pc.cast(column, pa.timestamp("ns"))
    if isinstance(stamps, pa.ChunkedArray):
        stamps = stamps.combine_chunks()
    return stamps.to_numpy(zero_copy_only=False).view(np.int64)


def _encoded(column: pa.Array) -> tuple[np.ndarray, list[str | None]]:
    """(index per row into values, values) of a text column; a null row's index is -1."""
    encoded = column if pa.types.is_dictionary(column.type) else pc.dictionary_encode(column)
    indices = pc.fill_null(encoded.indices, -1).to_numpy(zero_copy_only=False)
    return indices.astype(np.int64), encoded.dictionary.to_pylist()


def _plain_texts(column: pa.Array, *, null: str | None = None) -> pa.Array:
    """A (possibly dictionary-encoded) text column as plain strings, nulls as `null`."""
    if pa.types.is_dictionary(column.type):
        column = column.dictionary_decode()
    column = column.cast(pa.string())
    return column if null is None else pc.fill_null(column, null)


class _Texts:
    """Text per list, read by index as `str`: one Arrow array, not one Python object each."""

    __slots__ = ("_values",)

    def __init__(self, values: pa.Array) -> None:
        self._values = values

    def __getitem__(self, index: int) -> str | None:
        return self._values[index].as_py()

    def __len__(self) -> int:
        return len(self._values)


class _RowField:
    """One field of a version's rows, sliced by row range like an array (`[start:stop]`)."""

    __slots__ = ("_field", "_version")

    def __init__(self, version: PublishedVersion, field: str) -> None:
        self._version = version
        self._field = field

    def __getitem__(self, rows: slice) -> np.ndarray:
        return self._version.rows(rows.start, rows.stop)[self._field]


class _Positions:
    """Catalog positions of a version's rows, computed for the rows a request reads."""

    __slots__ = ("_find", "_version")

    def __init__(self, version: PublishedVersion, find: Callable[[np.ndarray], np.ndarray]) -> None:
        self._version = version
        self._find = find

    def __getitem__(self, rows: slice) -> np.ndarray:
        return self._find(self._version.rows(rows.start, rows.stop)["item_id"])


_DENSE_SLOTS_PER_ITEM = 8
"""A catalog whose largest id is below this many slots per item gets a direct id → position
table (one `take` per list instead of a binary search); sparser ids keep the search."""


def _position_finder(arrays: ItemStateArrays) -> Callable[[np.ndarray], np.ndarray]:
    """`arrays.positions`, as a table lookup when the catalog's ids are dense enough."""
    ids = arrays.item_ids
    if len(ids) == 0 or ids[0] < 0 or ids[-1] >= _DENSE_SLOTS_PER_ITEM * len(ids) + 1024:
        return arrays.positions
    # Slot id + 1 holds the position; slot 0 and the last slot hold -1, where `take` clips
    # every id outside the catalog's range (a negative id, or one above its largest).
    table = np.full(int(ids[-1]) + 3, -1, dtype=np.int64)
    table[ids + 1] = np.arange(len(ids))
    return lambda item_ids: table.take(item_ids + 1, mode="clip")


class _PositionFinders:
    """The latest catalog's position finder, shared by every version (a catalog changes
    only with the raw snapshot or the tombstones; tombstones keep the same item ids)."""

    def __init__(self) -> None:
        self._latest: tuple[np.ndarray, Callable[[np.ndarray], np.ndarray]] | None = None

    def of(self, arrays: ItemStateArrays) -> Callable[[np.ndarray], np.ndarray]:
        latest = self._latest
        if latest is None or latest[0] is not arrays.item_ids:
            latest = (arrays.item_ids, _position_finder(arrays))
            self._latest = latest
        return latest[1]


_POSITION_FINDERS = _PositionFinders()


class _NotInOrder(ValueError):
    """The rows are not in (subject, position) order: the version is sorted in memory."""


ROW = np.dtype(
    [
        ("item_id", "<i8"),
        ("score", "<f8"),
        ("calibrated", "<f8"),
        ("reason_code", "<u4"),
        ("provenance_code", "<u4"),
    ]
)
"""One list row as serving reads it: 32 bytes in the version's row file."""
CACHE_DIR_ENV_VAR = "RECSYS_LIST_CACHE_DIR"
"""Folder of the versions' row files (default: the system temp folder). Put it on a local
disk: on a RAM-backed tmpfs the rows would take memory again, outside the process."""
_BATCH_ROWS = 65_536
_TEXT_COLUMNS = ["list_id", "context_key", "model_version", "reason_codes", "source_provenance"]


class PublishedVersion:
    """One published version of one partition, read-only after construction.

    Lists are numbered 0..n-1; list i owns rows starts[i]:starts[i+1], in position order.
    Personalized lists are found by subject (binary search over sorted ids), fallback lists
    by context key. List i's stored slate is rows starts[i]:slate_stops[i]: every row of a
    final slate, the `in_slate` rows (first in position order) of a candidate-pool shortlist. Memory holds only a few numbers per list: the rows themselves (item,
    scores, reason and provenance codes) are written once, at load, to an anonymous local
    file, and a request reads its list's rows with one `pread` (the OS page cache keeps hot
    lists in RAM without growing the process). `item_ids`, `scores`, `calibrated`,
    `reason_codes` and `provenance_codes` slice those rows like arrays.
    """

    __slots__ = (
        "_file",
        "_iso_cache",
        "_recent",
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
        "row_count",
        "scores",
        "slate_stops",
        "starts",
        "subject_ids",
        "surface",
        "version",
    )

    def __init__(
        self,
        *,
        surface: str,
        region: str,
        version: str,
        path: str,
        batches: Iterable[pa.RecordBatch],
        fallback: bool,
    ) -> None:
        """Build from list rows in list order: by subject and position (personalized; out of
        order raises `_NotInOrder`), or one batch sorted by context key and position."""
        self.surface = surface
        self.region = region
        self.version = version
        self.path = path
        self.fallback = fallback
        # Lives as long as the version: closed (and, unlinked already, freed) when it is dropped.
        self._file = tempfile.TemporaryFile(  # noqa: SIM115
            prefix=f"recsys-lists-{version}-", dir=os.environ.get(CACHE_DIR_ENV_VAR) or None
        )
        starts: list[np.ndarray] = []
        subjects: list[np.ndarray] = []
        generated: list[np.ndarray] = []
        expires: list[np.ndarray] = []
        list_ids: list[pa.Array] = []
        models: list[pa.Array] = []
        contexts: list[pa.Array] = []
        reasons: dict[str, int] = {}
        provenance: dict[str, int] = {}
        slate_rows: list[np.ndarray] = []  # per batch, its in-slate rows' list numbers
        previous_in_slate = False  # whether the last row read was in its list's slate
        rows = lists = 0
        previous: tuple[int, int] | None = None  # (subject, position) of the last row read
        for batch in batches:
            count = batch.num_rows
            if count == 0:
                continue
            subject = batch.column("subject_id").to_numpy(zero_copy_only=False).astype(np.int64)
            if fallback:
                key = _encoded(batch.column("context_key"))[0]
                first = np.ones(count, dtype=bool)
                first[1:] = key[1:] != key[:-1]
            else:
                position = batch.column("position").to_numpy(zero_copy_only=False)
                before = np.empty(count, dtype=np.int64)
                before[1:] = subject[:-1]
                before_position = np.empty(count, dtype=np.int64)
                before_position[1:] = position[:-1]
                before[0], before_position[0] = previous or (subject[0] - 1, 0)
                first = subject != before
                if (subject < before).any() or (~first & (position < before_position)).any():
                    raise _NotInOrder(f"{path}: list rows are not in subject, position order")
                previous = int(subject[-1]), int(position[-1])
            firsts = np.flatnonzero(first)
            if IN_SLATE in batch.schema.names:
                in_slate = pc.fill_null(batch.column(IN_SLATE), False).to_numpy(
                    zero_copy_only=False
                )
                before_in_slate = np.empty(count, dtype=bool)
                before_in_slate[1:] = in_slate[:-1]
                before_in_slate[0] = previous_in_slate
                if (in_slate & ~first & ~before_in_slate).any():
                    raise ValueError(
                        f"{path}: a list's in_slate rows do not come first in position "
                        "order; republish the partition"
                    )
                previous_in_slate = bool(in_slate[-1])
                slate_rows.append(lists - 1 + np.cumsum(first)[in_slate])
            taken = pa.array(firsts, type=pa.int64())
            starts.append(firsts + rows)
            lists += len(firsts)
            subjects.append(subject[firsts])
            generated.append(_nanoseconds(batch.column("generated_at").take(taken)))
            expires.append(_nanoseconds(batch.column("expires_at").take(taken)))
            list_ids.append(_plain_texts(batch.column("list_id").take(taken)))
            models.append(_plain_texts(batch.column("model_version").take(taken), null=""))
            if fallback:
                contexts.append(_plain_texts(batch.column("context_key").take(taken)))
            packed = np.empty(count, dtype=ROW)
            packed["item_id"] = pc.fill_null(batch.column("item_id"), -1).to_numpy(
                zero_copy_only=False
            )
            for field, name in (("score", "score"), ("calibrated", "calibrated")):
                packed[field] = (
                    pc.cast(batch.column(name), pa.float64()).to_numpy(zero_copy_only=False)
                    if name in batch.schema.names
                    else np.nan
                )
            packed["reason_code"] = _codes(batch.column("reason_codes"), reasons)
            packed["provenance_code"] = _codes(batch.column("source_provenance"), provenance)
            self._file.write(packed.data)
            rows += count
        self._file.flush()
        self.row_count = rows
        self.starts = np.concatenate([*starts, np.array([rows], dtype=np.int64)])
        self.slate_stops = (
            self.starts[:-1] + np.bincount(np.concatenate(slate_rows), minlength=self.list_count)
            if slate_rows
            else self.starts[1:]
        )
        self.subject_ids = np.ascontiguousarray(np.concatenate([np.empty(0, np.int64), *subjects]))
        self.generated_at_ns = np.concatenate([np.empty(0, np.int64), *generated])
        self.expires_at_ns = np.concatenate([np.empty(0, np.int64), *expires])
        self.list_ids = _Texts(
            pa.concat_arrays(list_ids) if list_ids else pa.array([], pa.string())
        )
        self.model_versions = _Texts(
            pa.concat_arrays(models).dictionary_encode() if models else pa.array([], pa.string())
        )
        self.context_index = (
            {key: index for index, key in enumerate(pa.concat_arrays(contexts).to_pylist())}
            if contexts
            else {}
        )
        self.reason_values = _token_lists(reasons)
        self.provenance_values = _token_lists(provenance)
        self.item_ids = _RowField(self, "item_id")
        self.scores = _RowField(self, "score")
        self.calibrated = _RowField(self, "calibrated")
        self.reason_codes = _RowField(self, "reason_code")
        self.provenance_codes = _RowField(self, "provenance_code")
        self._recent = threading.local()
        self._iso_cache: dict[int, str] = {}

    @property
    def list_count(self) -> int:
        return len(self.starts) - 1

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows start:stop as a `ROW` array; the last range read by this thread is reused
        (a fill reads several fields of one list)."""
        recent = getattr(self._recent, "rows", None)
        if recent is not None and recent[0] == start and recent[1] == stop:
            return recent[2]
        size = ROW.itemsize
        found = np.frombuffer(
            os.pread(self._file.fileno(), (stop - start) * size, start * size), dtype=ROW
        )
        self._recent.rows = (start, stop, found)
        return found

    def find_subject(self, subject_id: int) -> int:
        """List number of `subject_id`'s personalized list, or -1."""
        found = int(self.subject_ids.searchsorted(subject_id))
        if found < len(self.subject_ids) and self.subject_ids[found] == subject_id:
            return found
        return -1

    def find_context(self, context_key: str) -> int:
        """List number of the fallback list called `context_key`, or -1."""
        return self.context_index.get(context_key, -1)

    def positions_in(self, arrays: ItemStateArrays) -> _Positions:
        """Every row's item position in `arrays` (-1 = unknown), sliced like an array and
        computed for the rows read."""
        return _Positions(self, _POSITION_FINDERS.of(arrays))

    def iso(self, nanoseconds: int) -> str:
        """ISO-8601 text of a timestamp; cached, since a version has few distinct ones."""
        text = self._iso_cache.get(nanoseconds)
        if text is None:
            text = str(np.datetime64(nanoseconds, "ns").astype("datetime64[us]"))
            self._iso_cache[nanoseconds] = text
        return text


def _codes(column: pa.Array, index: dict[str, int]) -> np.ndarray:
    """Codes of a `|`-joined token column in the version-wide `index` (value -> code)."""
    indices, values = _encoded(column)
    lookup = np.array(
        [index.setdefault(value or "", len(index)) for value in [*values, None]], dtype=np.uint32
    )
    return lookup[indices]


def _token_lists(index: dict[str, int]) -> tuple[tuple[str, ...], ...]:
    """Per code, its value split into tokens (a handful of distinct values per version)."""
    return tuple(tuple(token for token in value.split("|") if token) for value in index)


def read_version(
    warehouse: Warehouse, *, surface: str, region: str, version: str, path: str, fallback: bool
) -> PublishedVersion:
    """Load `path`/lists.parquet. Personalized rows are streamed batch by batch when they
    are in (subject, position) order, as publish writes them; anything else (and fallback
    lists, which are small) is read whole and sorted first."""
    location = f"{path}/lists.parquet"
    parts = warehouse.parquet_parts(location)
    if not parts:
        raise FileNotFoundError(f"not in the warehouse: {warehouse.uri(location)}")
    build = partial(PublishedVersion, surface=surface, region=region, version=version, path=path)
    if not fallback:
        try:
            return build(batches=_streamed(warehouse, parts), fallback=False)
        except _NotInOrder as disorder:
            log.info("%s; sorting it in memory", disorder)
    lists = warehouse.dataset(location)
    present = [c for c in OPTIONAL_LIST_COLUMNS if c in lists.schema.names]
    table = lists.to_table(columns=LIST_COLUMNS + present)
    if fallback:
        order = [("context_key", "ascending"), ("position", "ascending")]
    else:
        table = table.filter(pc.equal(table.column("context_key"), PERSONALIZED_CONTEXT))
        order = [("subject_id", "ascending"), ("position", "ascending")]
    return build(batches=table.sort_by(order).combine_chunks().to_batches(), fallback=fallback)


def _streamed(warehouse: Warehouse, parts: list[str]) -> Iterator[pa.RecordBatch]:
    """The personalized rows of every part, in file order, a bounded batch at a time."""
    for part in parts:
        with warehouse.fs.open(warehouse.path(part), "rb") as handle:
            reader = pq.ParquetFile(handle, read_dictionary=_TEXT_COLUMNS)
            columns = LIST_COLUMNS + [
                c for c in OPTIONAL_LIST_COLUMNS if c in reader.schema_arrow.names
            ]
            # One pass per row group: a single pass over a whole file grows the allocator's
            # footprint with the file's length, one per row group stays flat.
            for row_group in range(reader.num_row_groups):
                for batch in reader.iter_batches(
                    batch_size=_BATCH_ROWS, columns=columns, row_groups=[row_group]
                ):
                    keys = _plain_texts(batch.column("context_key"))
                    yield batch.filter(pc.equal(keys, PERSONALIZED_CONTEXT))


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
            found = read_version(
                self.warehouse,
                surface=surface,
                region=region,
                version=version,
                path=path,
                fallback=fallback,
            )
        except Exception as error:
            self.refresh_errors += 1
            log.warning("cannot load %s version %s: %s", location, version, error)
            return loaded, STORE_UNAVAILABLE
        return found, STORE_OK


def _read_manifest(warehouse: Warehouse, location: str) -> dict[str, Any]:
    manifest = json.loads(warehouse.read_bytes(location))
    if not isinstance(manifest, dict) or not manifest.get("active_version"):
        raise ValueError(f"{warehouse.uri(location)} names no active_version")
    return manifest
