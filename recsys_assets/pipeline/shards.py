"""Per-partition Parquet outputs written shard by shard, with their contract checked first.

An asset's output is one Parquet part per subject shard (`part_name(shard)`), so memory is
bounded by the shard size. Each part is validated against the stage's contract before it is
written, atomically and under a fixed name, so a retried shard step replaces its part rather
than adding one. The merge step checks that every shard's part is there and holds only that
shard's subjects (`verify_shard_parts`), and `merge_in_subject_order` lays a partition's
hash-sharded parts out again in subject order, in blocks that do not depend on the shard
count, for publishing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import pairwise

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from recsys_assets.contracts import ContractViolation
from recsys_assets.data.snapshot import RawDataMissing, raw_table_path
from recsys_assets.pipeline.threads import with_share
from recsys_assets.warehouse import Warehouse

PIPELINE_ROOT = "pipeline"


def stage_path(asset: str, partition_path: str) -> str:
    return f"{PIPELINE_ROOT}/{asset}/{partition_path}"


def part_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


SHARDS_FOLDER = "shards"
"""Subfolder of a partition for per-shard parts that a merge step rewrites in subject order
(slates): dataset readers of the partition read its direct parts only."""


def shard_part_path(asset: str, partition_path: str, shard: int, table: str = "") -> str:
    """Where shard `shard` writes its part of `asset` (of `table`, a subfolder, if given)."""
    folder = stage_path(asset, f"{partition_path}/{table}" if table else partition_path)
    return f"{folder}/{part_name(shard)}"


def shard_parts(warehouse: Warehouse, asset: str, partition_path: str) -> int:
    """How many shards the partition's `asset` parts are (part-00000 … part-N-1), checked
    to be exactly those names: the subjects asset decides the count, every stage follows."""
    folder = stage_path(asset, partition_path)
    names = [path.rsplit("/", 1)[-1] for path in warehouse.list(folder, suffix=".parquet")]
    if not names:
        raise FileNotFoundError(
            f"no {asset} parts for {partition_path} at {warehouse.uri(folder)}: materialize "
            f"{asset} for this partition first"
        )
    if names != [part_name(index) for index in range(len(names))]:
        raise FileNotFoundError(
            f"{asset} for {partition_path} has parts {names[:5]}… at {warehouse.uri(folder)}, "
            f"not part-00000 … part-{len(names) - 1:05d}: materialize {asset} for this "
            "partition again"
        )
    return len(names)


def in_subject_blocks(
    frame: pd.DataFrame, work: Callable[[pd.DataFrame], pd.DataFrame], threads: int
) -> pd.DataFrame:
    """`work(frame)`, computed as `work` over up to `threads` blocks of whole subjects at
    once, one thread each, and concatenated in block order.

    `frame`'s rows must be in subject order (`subject_id` non-decreasing), and `work` must
    treat each subject on its own, as the shard steps' work does (the same subject gives the
    same rows in any shard), and code text with categories that do not depend on the rows (a
    block's categories would otherwise differ from one call's, and so would the Parquet
    bytes): then the result is the same as one call, byte for byte. Blocks whose categories
    differ raise ValueError. Most of that work is in numpy, pandas, scipy, faiss and pyarrow
    calls that release the GIL, so the blocks share the cores a single step would otherwise
    leave idle. Kernels with threads of their own take the block's share of `threads`
    (pipeline/threads.py), not `threads` each.
    """
    subject_ids = frame["subject_id"].to_numpy()
    if threads <= 1 or len(frame) == 0 or subject_ids[0] == subject_ids[-1]:
        return work(frame)
    if np.any(subject_ids[1:] < subject_ids[:-1]):
        raise ValueError("in_subject_blocks: the frame's rows are not in subject_id order")
    # Each block starts at the first row of the subject an even split would land in.
    even = [len(frame) * block // threads for block in range(1, threads)]
    starts = np.searchsorted(subject_ids, subject_ids[even], side="left")
    bounds = np.unique(np.concatenate(([0], starts, [len(frame)])))
    blocks = [frame.iloc[start:stop] for start, stop in pairwise(bounds)]
    # Each block's kernels (faiss, the retrieval's pool) take its share of the threads.
    share = with_share(threads // len(blocks), work)
    with ThreadPoolExecutor(len(blocks), thread_name_prefix="subject-block") as pool:
        results = list(pool.map(share, blocks))
    for column, dtype in results[0].dtypes.items():
        if isinstance(dtype, pd.CategoricalDtype) and any(
            not result[column].cat.categories.equals(dtype.categories) for result in results[1:]
        ):
            raise ValueError(
                f"in_subject_blocks: column {column!r} has different categories in different "
                "blocks; the work must code text with categories that do not depend on the rows"
            )
    return pd.concat(results, ignore_index=True)


def write_shard_part(
    warehouse: Warehouse,
    path: str,
    frame: pd.DataFrame,
    validate: Callable[[pd.DataFrame], pd.DataFrame],
) -> ContractViolation | None:
    """Validate a shard's part and write it atomically under its fixed name; on a contract
    violation remove the part an earlier attempt left instead, and return the violation."""
    try:
        checked = validate(frame)
    except ContractViolation as violation:
        warehouse.delete(path)
        return violation
    warehouse.write_parquet(path, checked)
    return None


def verify_shard_parts(
    warehouse: Warehouse,
    folder: str,
    shard_subjects: Sequence[np.ndarray],
    expected_rows: Sequence[int],
) -> list[str]:
    """Problems with a stage's per-shard parts in `folder`: a shard's part missing, parts
    beyond the shard count, a row count other than its step reported, or a subject that is
    not one of its shard's `shard_subjects` (lost to, or duplicated from, another shard)."""
    problems: list[str] = []
    present = set(warehouse.list(folder, suffix=".parquet"))
    expected = {f"{folder}/{part_name(index)}" for index in range(len(shard_subjects))}
    problems += [f"unexpected part {path}" for path in sorted(present - expected)]
    for index, subjects in enumerate(shard_subjects):
        path = f"{folder}/{part_name(index)}"
        if path not in present:
            problems.append(f"shard {index}: part {path} is missing")
            continue
        ids = warehouse.read_parquet(path, columns=["subject_id"])["subject_id"].to_numpy()
        if len(ids) != expected_rows[index]:
            problems.append(
                f"shard {index}: {path} has {len(ids)} rows, its step wrote {expected_rows[index]}"
            )
        foreign = np.setdiff1d(ids, subjects)
        if foreign.size:
            problems.append(
                f"shard {index}: {path} holds {foreign.size} subject(s) of other shards, "
                f"e.g. {foreign[:5].tolist()}"
            )
    return problems


def remove_parts_beyond(warehouse: Warehouse, folder: str, shards: int) -> None:
    """Delete parts an earlier run with more shards left in `folder`."""
    keep = {f"{folder}/{part_name(index)}" for index in range(shards)}
    for stale in set(warehouse.list(folder, suffix=".parquet")) - keep:
        warehouse.delete(stale)


class _SubjectCursor:
    """Reads one part sorted by subject_id a record batch at a time and hands out its rows
    up to a subject, so a merge holds one batch per part in memory."""

    def __init__(self, warehouse: Warehouse, path: str, batch_rows: int) -> None:
        self._file = pq.ParquetFile(warehouse.fs.open(warehouse.path(path), "rb"))
        self._batches = self._file.iter_batches(batch_size=batch_rows)
        self._buffer = self._file.schema_arrow.empty_table()
        self._exhausted = False

    def take_through(self, last_subject: int) -> pa.Table:
        """Every remaining row whose subject_id is at most `last_subject`."""
        while not self._exhausted and (
            self._buffer.num_rows == 0
            or self._buffer.column("subject_id")[-1].as_py() <= last_subject
        ):
            batch = next(self._batches, None)
            if batch is None:
                self._exhausted = True
            else:
                self._buffer = pa.concat_tables([self._buffer, pa.Table.from_batches([batch])])
        ids = self._buffer.column("subject_id").to_numpy()
        cut = int(np.searchsorted(ids, last_subject, side="right"))
        taken, self._buffer = self._buffer.slice(0, cut), self._buffer.slice(cut)
        return taken

    def close(self) -> None:
        self._file.close()


def merge_in_subject_order(
    warehouse: Warehouse,
    shard_paths: Sequence[str],
    folder: str,
    block_last_subjects: Sequence[int],
    *,
    batch_rows: int = 65_536,
) -> list[int]:
    """Merge per-shard parts (each sorted by subject_id, every subject in one part only)
    into parts of `folder` in subject order: part k holds the subjects up to
    `block_last_subjects[k]`, so the layout depends on the subjects, not on the shard
    count. Returns the rows of each part written; parts of an earlier layout are removed.

    Memory: one record batch per shard part plus one output part.
    """
    cursors = [_SubjectCursor(warehouse, path, batch_rows) for path in shard_paths]
    rows: list[int] = []
    try:
        for index, last in enumerate(block_last_subjects):
            pieces = [cursor.take_through(last) for cursor in cursors]
            block = pa.concat_tables(pieces, promote_options="permissive")
            # A stable sort: each subject's rows come from one part, already in order.
            block = block.take(pc.sort_indices(block, sort_keys=[("subject_id", "ascending")]))
            warehouse.write_parquet(f"{folder}/{part_name(index)}", block)
            rows.append(block.num_rows)
    finally:
        for cursor in cursors:
            cursor.close()
    remove_parts_beyond(warehouse, folder, len(block_last_subjects))
    return rows


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
        self._keep(batch, self._rng.random(batch.size))

    def merge(self, other: UniformSample) -> None:
        """Fold in a sample of another stream (another shard, drawn with another seed): the
        result is a uniform sample of both streams together."""
        self.seen += other.seen
        self._keep(other.values, other._keys)

    def _keep(self, values: np.ndarray, keys: np.ndarray) -> None:
        values_all = np.concatenate((self.values, values))
        keys_all = np.concatenate((self._keys, keys))
        if values_all.size > self.capacity:
            kept = _smallest(keys_all, self.capacity)
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
        offered = np.sort(_smallest(keys, self.capacity))
        if offered.size == 0:
            return
        frame = rows(offered).reset_index(drop=True)
        kept = pd.concat([self._kept, frame], ignore_index=True) if len(self._kept) else frame
        all_keys = np.concatenate((self._keys, keys[offered]))
        best = np.sort(_smallest(all_keys, self.capacity))
        self._kept = kept.iloc[best].reset_index(drop=True)
        self._keys = all_keys[best]

    def rows(self) -> pd.DataFrame:
        return self._kept


def _smallest(keys: np.ndarray, count: int) -> np.ndarray:
    """Positions of the `count` smallest keys, in no order: a partial sort (the keys are
    random draws, a million per shard, of which a hundred are kept)."""
    if keys.size <= count:
        return np.arange(keys.size)
    if count <= 0:
        return np.empty(0, dtype=np.int64)
    return np.argpartition(keys, count - 1)[:count]


def markdown_table(rows: dict[str, object], headers: tuple[str, str]) -> str:
    lines = [f"| {headers[0]} | {headers[1]} |", "| --- | --- |"]
    lines += [f"| {key} | {value} |" for key, value in rows.items()]
    return "\n".join(lines)
