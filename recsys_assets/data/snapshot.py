"""Reading and writing the source tables under `raw/` as one consistent snapshot.

`raw/_snapshot.json` is written last and removed first: a reader that finds it knows every
table beside it is complete, and one that does not is told to seed or import.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import pandas as pd

from recsys_assets.contracts.raw import RAW_CONTRACTS
from recsys_assets.warehouse import Warehouse

RAW_PREFIX = "raw"
SNAPSHOT_PATH = f"{RAW_PREFIX}/_snapshot.json"


class RawDataMissing(FileNotFoundError):
    """The warehouse has no complete raw snapshot yet."""


def raw_table_path(table: str) -> str:
    """Warehouse-relative folder of a source table's Parquet parts."""
    if table not in RAW_CONTRACTS:
        raise ValueError(f"unknown source table {table!r}; known: {list(RAW_CONTRACTS)}")
    return f"{RAW_PREFIX}/{table}"


def part_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def _missing(warehouse: Warehouse, what: str) -> RawDataMissing:
    return RawDataMissing(
        f"{what} in {warehouse.uri(RAW_PREFIX)}: run `recsys seed` or `recsys import` first"
    )


def read_snapshot(warehouse: Warehouse) -> dict[str, Any]:
    """The metadata of the current raw snapshot (snapshot_id, source, as_of, row_counts, ...)."""
    if not warehouse.exists(SNAPSHOT_PATH):
        raise _missing(warehouse, "no raw data snapshot")
    return dict(warehouse.read_json(SNAPSHOT_PATH))


def read_raw(warehouse: Warehouse, table: str, columns: list[str] | None = None) -> pd.DataFrame:
    """One source table (all its parts), with the column types of its contract.

    Optional tables may be empty; they still come back with every column and its type.
    """
    path = raw_table_path(table)
    if not warehouse.exists(SNAPSHOT_PATH):
        raise _missing(warehouse, f"no raw data snapshot (wanted table {table!r})")
    if not warehouse.parquet_parts(path):
        raise _missing(warehouse, f"source table {table!r} is missing")
    return warehouse.read_parquet(path, columns=columns)


def empty_table(table: str) -> pd.DataFrame:
    """A zero-row frame with every column of `table`'s contract in its contract type."""
    columns = RAW_CONTRACTS[table].to_schema().columns
    frame = pd.DataFrame(
        {name: pd.Series(dtype=str(column.dtype)) for name, column in columns.items()}
    )
    return RAW_CONTRACTS[table].validate(frame)


def naive_utc(moment: datetime) -> datetime:
    """Timestamps in the warehouse are naive UTC; convert an aware datetime to that."""
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC).replace(tzinfo=None)
    return moment


def new_snapshot_id(created_at: datetime) -> str:
    """Sortable by creation time, unique across writers: `snap_<UTC stamp>_<random>`."""
    return f"snap_{created_at:%Y%m%dT%H%M%S}_{uuid.uuid4().hex[:8]}"


class RawSnapshotWriter:
    """Writes the parts of every source table, then the snapshot file that vouches for them.

    Call `begin()` only once everything to write is known to be valid (or, for streamed
    seeding, generated and validated chunk by chunk): it withdraws the old snapshot so no
    reader mixes old and new tables. `finish()` removes parts of an earlier, larger write
    and publishes `_snapshot.json`.
    """

    def __init__(self, warehouse: Warehouse) -> None:
        self.warehouse = warehouse
        self.parts: dict[str, list[str]] = {table: [] for table in RAW_CONTRACTS}
        self.row_counts: dict[str, int] = dict.fromkeys(RAW_CONTRACTS, 0)
        self._begun = False

    def begin(self) -> None:
        self.warehouse.delete(SNAPSHOT_PATH)
        self._begun = True

    def write_part(self, table: str, frame: pd.DataFrame) -> None:
        """Append one part to `table`; an empty frame is written only as a table's sole part."""
        if not self._begun:
            self.begin()
        if frame.empty and self.parts[table]:
            return
        relative = f"{raw_table_path(table)}/{part_name(len(self.parts[table]))}"
        self.warehouse.write_parquet(relative, frame)
        self.parts[table].append(relative)
        self.row_counts[table] += len(frame)

    def finish(self, metadata: dict[str, Any]) -> dict[str, Any]:
        """Write empty tables never given a part, drop stale parts, then the snapshot file."""
        for table, written in self.parts.items():
            if not written:
                self.write_part(table, empty_table(table))
        for table, written in self.parts.items():
            for stale in set(self.warehouse.parquet_parts(raw_table_path(table))) - set(written):
                self.warehouse.delete(stale)
        created_at = datetime.now(UTC).replace(tzinfo=None)
        snapshot = {
            "snapshot_id": new_snapshot_id(created_at),
            "created_at": created_at.isoformat(),
            **metadata,
            "row_counts": dict(self.row_counts),
        }
        self.warehouse.write_json(SNAPSHOT_PATH, snapshot)
        return snapshot
