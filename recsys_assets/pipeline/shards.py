"""Per-partition Parquet outputs written shard by shard, with their contract checked first.

An asset streams its output as one Parquet part per subject shard, so memory is bounded by
the shard size. Each part is validated against the stage's contract before it is written;
on a violation the partition's folder is removed (never half-written data downstream) and
the violation is returned for the blocking asset check to report.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow.dataset as ds

from recsys_assets.contracts import ContractViolation
from recsys_assets.data.snapshot import RawDataMissing, raw_table_path
from recsys_assets.warehouse import Warehouse

PIPELINE_ROOT = "pipeline"


def stage_path(asset: str, partition_path: str) -> str:
    return f"{PIPELINE_ROOT}/{asset}/{partition_path}"


def part_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def read_parts(
    warehouse: Warehouse, asset: str, partition_path: str, *, columns: list[str] | None = None
) -> Iterator[tuple[str, pd.DataFrame]]:
    """(part name, frame) for each part of an upstream partition, in shard order; only
    `columns` when given (converting unused columns to pandas costs more than reading).

    The next part is read in a background thread while the caller works on this one
    (Parquet decoding releases the GIL), so at most two parts are in memory.
    """
    parts = warehouse.parquet_parts(stage_path(asset, partition_path))
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"read-{asset}") as reader:
        ahead: Future[pd.DataFrame] | None = None
        for index, part in enumerate(parts):
            current = ahead or reader.submit(warehouse.read_parquet, part, columns=columns)
            ahead = (
                reader.submit(warehouse.read_parquet, parts[index + 1], columns=columns)
                if index + 1 < len(parts)
                else None
            )
            yield part.rsplit("/", 1)[-1], current.result()


def raw_dataset(warehouse: Warehouse, table: str) -> ds.Dataset:
    """A source table's Parquet parts as a lazy dataset: scans read only the columns and rows
    they need, so a partition's memory does not grow with the table (e.g. interactions)."""
    try:
        return warehouse.dataset(raw_table_path(table))
    except FileNotFoundError:
        raise RawDataMissing(
            f"source table {table!r} is missing in {warehouse.uri('raw')}: "
            "run `recsys seed` or `recsys import` first"
        ) from None


@dataclass
class ShardWriteResult:
    rows: int = 0
    parts: int = 0
    violation: ContractViolation | None = None
    per_part_rows: list[int] = field(default_factory=list)


def write_shards(
    warehouse: Warehouse,
    asset: str,
    partition_path: str,
    shards: Iterable[pd.DataFrame],
    validate: Callable[[pd.DataFrame], pd.DataFrame],
) -> ShardWriteResult:
    """Validate and write each shard as a part; replace the partition's previous parts."""
    return write_table_shards(
        warehouse,
        asset,
        partition_path,
        ({"": frame} for frame in shards),
        {"": validate},
    )[""]


def write_table_shards(
    warehouse: Warehouse,
    asset: str,
    partition_path: str,
    shards: Iterable[dict[str, pd.DataFrame]],
    validate: dict[str, Callable[[pd.DataFrame], pd.DataFrame]],
) -> dict[str, ShardWriteResult]:
    """Validate and write each shard's tables (name → frame; the name "" is the partition's
    folder itself, any other a subfolder) as parts; replace their previous parts.

    Parts are written in a background thread while the next shard is computed (Parquet
    encoding and the upload release the GIL); at most one shard's writes are in flight, so
    memory holds at most two shards. A contract violation in any table removes every
    table's folder (never half-written data downstream) and is returned in that table's
    result.
    """
    folders = {
        name: stage_path(asset, f"{partition_path}/{name}" if name else partition_path)
        for name in validate
    }
    results = {name: ShardWriteResult() for name in validate}
    written: set[str] = set()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"write-{asset}") as writer:
        in_flight: list[Future[None]] = []
        for index, tables in enumerate(shards):
            checked: dict[str, pd.DataFrame] = {}
            for name, frame in tables.items():
                try:
                    checked[name] = validate[name](frame)
                except ContractViolation as violation:
                    for pending in in_flight:
                        pending.result()
                    for folder in folders.values():
                        warehouse.delete(folder, recursive=True)
                    results[name].violation = violation
                    return results
            for pending in in_flight:
                pending.result()
            in_flight = []
            for name, frame in checked.items():
                path = f"{folders[name]}/{part_name(index)}"
                in_flight.append(writer.submit(warehouse.write_parquet, path, frame))
                written.add(path)
                result = results[name]
                result.rows += len(frame)
                result.parts += 1
                result.per_part_rows.append(len(frame))
        for pending in in_flight:
            pending.result()
    for folder in folders.values():
        for stale in set(warehouse.list(folder, suffix=".parquet")) - written:
            warehouse.delete(stale)
    return results


def quantiles(
    values: np.ndarray | pd.Series, points: tuple[float, ...] = (0.5, 0.95)
) -> dict[str, float]:
    """{'p50': …, 'p95': …} of `values`, 0.0 for an empty input."""
    array = np.asarray(values, dtype=np.float64)
    if array.size == 0:
        return {f"p{round(point * 100)}": 0.0 for point in points}
    return {
        f"p{round(point * 100)}": round(float(np.quantile(array, point)), 4) for point in points
    }


class UniformSample:
    """A uniform sample without replacement of at most `capacity` values of a stream.

    Every value gets a random key and the `capacity` smallest keys are kept, so a
    partition's metadata quantiles take bounded memory however many rows it has; below
    `capacity` values the sample is every value and the quantiles are exact.
    """

    def __init__(self, capacity: int, seed: int = 0) -> None:
        self.capacity = capacity
        self.seen = 0
        self.values = np.empty(0, dtype=np.float64)
        self._keys = np.empty(0, dtype=np.float64)
        self._rng = np.random.default_rng(seed)

    def add(self, values: np.ndarray | pd.Series) -> None:
        batch = np.asarray(values, dtype=np.float64).ravel()
        self.seen += batch.size
        values_all = np.concatenate((self.values, batch))
        keys_all = np.concatenate((self._keys, self._rng.random(batch.size)))
        if values_all.size > self.capacity:
            kept = np.argpartition(keys_all, self.capacity - 1)[: self.capacity]
            values_all, keys_all = values_all[kept], keys_all[kept]
        self.values, self._keys = values_all, keys_all


class RowSample:
    """A uniform sample without replacement of at most `capacity` rows of a stream of
    frames, built only for the rows that may enter it (a debug sample of a partition)."""

    def __init__(self, capacity: int, seed: int = 0) -> None:
        self.capacity = capacity
        self._kept = pd.DataFrame()
        self._keys = np.empty(0, dtype=np.float64)
        self._rng = np.random.default_rng(seed)

    def add(self, count: int, rows: Callable[[np.ndarray], pd.DataFrame]) -> None:
        """Offer `count` rows; `rows(positions)` builds the frame of those positions."""
        keys = self._rng.random(count)
        offered = np.sort(np.argsort(keys, kind="stable")[: self.capacity])
        if offered.size == 0:
            return
        frame = rows(offered).reset_index(drop=True)
        kept = pd.concat([self._kept, frame], ignore_index=True) if len(self._kept) else frame
        all_keys = np.concatenate((self._keys, keys[offered]))
        best = np.sort(np.argsort(all_keys, kind="stable")[: self.capacity])
        self._kept = kept.iloc[best].reset_index(drop=True)
        self._keys = all_keys[best]

    def rows(self) -> pd.DataFrame:
        return self._kept


def markdown_table(rows: dict[str, object], headers: tuple[str, str]) -> str:
    lines = [f"| {headers[0]} | {headers[1]} |", "| --- | --- |"]
    lines += [f"| {key} | {value} |" for key, value in rows.items()]
    return "\n".join(lines)
