"""A partition's candidate sources, built once per run and stored for its shard steps.

The candidate_pools fan-out step builds the partition's `CandidateContext` (eligible items,
history, engagement, blocked pairs, the item-neighbour graph, trending, editorial, long
tail, new items) once and writes it under the partition's candidate_pools folder:

    pipeline/candidate_pools/surface=S/region=R/_sources/
      items.parquet, new_items.parquet       partition-wide tables
      similarity.npz                         the item-neighbour graph (CSR arrays)
      ranked.npz                             trending, editorial, long_tail item ids
      history/part-<shard>.parquet           per-shard tables: only that shard's subjects
      engagement/part-<shard>.parquet
      blocked/part-<shard>.parquet
      manifest.json                          written last: run id, score_time, versions

A shard step in another process (multiprocess, Celery, Kubernetes) reads the
partition-wide pieces and its own shard's rows, so its memory follows the shard, not the
partition; one that shares the fan-out's process uses the context the fan-out built
(`BuiltSources`). Sources another run wrote, or built for another bundle, candidate policy
or shard count, are refused (`CandidateSourcesError`). The merge step removes the folder
(`remove_sources`). Part listings of the candidate_pools partition (`Warehouse.list`) read
direct files only, so the `_sources/` subfolder is never taken for a shard's part.
"""

from __future__ import annotations

import dataclasses
import io
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import scipy.sparse as sp

from recsys_assets.models.collaborative import CollaborativeModel
from recsys_assets.pipeline.candidates import (
    CANDIDATE_POLICY_VERSION,
    CandidateContext,
    SimilarityGraph,
)
from recsys_assets.pipeline.shards import part_name, stage_path
from recsys_assets.warehouse import Warehouse

SOURCES_FOLDER = "_sources"
MANIFEST_NAME = "manifest.json"
SCHEMA = "recsys.candidate_sources/1"
PER_SHARD_TABLES: dict[str, str] = {
    "history": "user_id",
    "engagement": "subject_id",
    "blocked": "subject_id",
}
"""The context's tables with a subject column (table → column), stored split by shard."""
RANKED_ARRAYS = ("trending", "editorial", "long_tail")
WRITE_THREADS = 8
"""Parts written at a time: on S3 each is one PUT, mostly waiting on the network."""


class CandidateSourcesError(RuntimeError):
    """Stored candidate sources a shard step must not use: missing, written by another run,
    or built for another model bundle, candidate policy or shard count."""


def sources_folder(partition_path: str) -> str:
    """Where the candidate_pools fan-out of a partition stores its candidate sources."""
    return f"{stage_path('candidate_pools', partition_path)}/{SOURCES_FOLDER}"


@dataclass(frozen=True)
class SourcesManifest:
    """Who built the stored sources, for what, and what they hold."""

    run_id: str
    score_time: pd.Timestamp
    model_version: str
    candidate_policy_version: str
    shards: int
    tenant_items: bool
    recent_history_items: int
    rows: dict[str, int]
    """Rows per table (per-shard tables: all shards together)."""
    build_seconds: float
    write_seconds: float

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            **dataclasses.asdict(self),
            "score_time": self.score_time.isoformat(),
        }

    @classmethod
    def from_json(cls, value: Mapping[str, Any], where: str) -> SourcesManifest:
        if value.get("schema") != SCHEMA:
            raise CandidateSourcesError(
                f"{where} is not a candidate sources manifest of schema {SCHEMA!r} "
                f"(schema {value.get('schema')!r}): materialize candidate_pools for this "
                "partition again"
            )
        fields = {field.name for field in dataclasses.fields(cls)}
        return cls(
            **{name: value[name] for name in fields - {"score_time"}},
            score_time=pd.Timestamp(value["score_time"]),
        )


@dataclass(frozen=True)
class BuiltSources:
    """Sources built in this process (the fan-out ran here): the whole partition's context,
    which `generate_candidates` narrows to a shard's subjects itself."""

    context: CandidateContext

    def for_shard(self, shard: int) -> CandidateContext:
        return self.context


@dataclass(frozen=True)
class StoredSources:
    """Sources read back from the warehouse: the partition-wide pieces, loaded once per
    process, and each shard's own rows of the per-shard tables on demand."""

    warehouse: Warehouse
    folder: str
    manifest: SourcesManifest
    partition_wide: Mapping[str, Any]

    def for_shard(self, shard: int) -> CandidateContext:
        if not 0 <= shard < self.manifest.shards:
            raise CandidateSourcesError(
                f"shard {shard} is not one of the {self.manifest.shards} shards the candidate "
                f"sources at {self.warehouse.uri(self.folder)} were built for"
            )
        tables = {}
        for table in PER_SHARD_TABLES:
            path = f"{self.folder}/{table}/{part_name(shard)}"
            try:
                tables[table] = self.warehouse.read_parquet(path)
            except FileNotFoundError:
                raise CandidateSourcesError(
                    f"the candidate sources of shard {shard} are incomplete: "
                    f"{self.warehouse.uri(path)} is missing; materialize candidate_pools for "
                    "this partition again"
                ) from None
        return CandidateContext(**self.partition_wide, **tables)


def write_sources(
    warehouse: Warehouse,
    folder: str,
    context: CandidateContext,
    shard_subjects: Sequence[np.ndarray],
    *,
    run_id: str,
    score_time: pd.Timestamp,
    model_version: str,
    build_seconds: float,
) -> SourcesManifest:
    """Replace `folder` with `context`: partition-wide pieces once, the per-shard tables
    split by the shard of their subject (`shard_subjects[k]`: shard k's subject ids; rows
    of anyone else are dropped), the manifest last, so a reader that finds it finds every
    file."""
    started = time.perf_counter()
    warehouse.delete(folder, recursive=True)
    writes: list[tuple[str, pd.DataFrame | pa.Table]] = [
        (f"{folder}/items.parquet", context.items),
        (f"{folder}/new_items.parquet", context.new_items),
    ]
    rows = {"items": len(context.items), "new_items": len(context.new_items)}
    subject_ids, shard_of = _shard_lookup(shard_subjects)
    for table, column in PER_SHARD_TABLES.items():
        parts = _split_by_shard(
            getattr(context, table), column, subject_ids, shard_of, len(shard_subjects)
        )
        writes += [
            (f"{folder}/{table}/{part_name(index)}", part) for index, part in enumerate(parts)
        ]
        rows[table] = sum(part.num_rows for part in parts)
    with ThreadPoolExecutor(WRITE_THREADS) as pool:
        list(pool.map(lambda write: warehouse.write_parquet(*write), writes))
    graph = context.similarity
    warehouse.write_bytes(
        f"{folder}/similarity.npz",
        _npz(
            item_ids=graph.item_ids,
            data=graph.matrix.data,
            indices=graph.matrix.indices,
            indptr=graph.matrix.indptr,
        ),
    )
    warehouse.write_bytes(
        f"{folder}/ranked.npz", _npz(**{name: getattr(context, name) for name in RANKED_ARRAYS})
    )
    rows["similarity"] = int(graph.matrix.nnz)
    manifest = SourcesManifest(
        run_id=run_id,
        score_time=score_time,
        model_version=model_version,
        candidate_policy_version=CANDIDATE_POLICY_VERSION,
        shards=len(shard_subjects),
        tenant_items=context.tenant_items,
        recent_history_items=context.recent_history_items,
        rows=rows,
        build_seconds=round(build_seconds, 3),
        write_seconds=round(time.perf_counter() - started, 3),
    )
    warehouse.write_json(f"{folder}/{MANIFEST_NAME}", manifest.to_json())
    return manifest


def read_sources_manifest(warehouse: Warehouse, folder: str) -> SourcesManifest:
    path = f"{folder}/{MANIFEST_NAME}"
    try:
        value = warehouse.read_json(path)
    except FileNotFoundError:
        raise CandidateSourcesError(
            f"no candidate sources at {warehouse.uri(folder)} (no {MANIFEST_NAME}): the "
            "candidate_pools_shards step of this run writes them; materialize candidate_pools "
            "for this partition again"
        ) from None
    return SourcesManifest.from_json(value, warehouse.uri(path))


def open_sources(
    warehouse: Warehouse,
    folder: str,
    *,
    run_lineage: Sequence[str],
    model_version: str,
    shards: int,
    collaborative: CollaborativeModel | None,
) -> StoredSources:
    """The stored sources, if this run may use them: written by this run (`run_lineage[0]`)
    or by a run it re-executes (the rest: a re-execution from failure does not rerun the
    fan-out step that succeeded), for this bundle, candidate policy and shard count."""
    manifest = read_sources_manifest(warehouse, folder)
    where = warehouse.uri(folder)
    again = "materialize candidate_pools for this partition again"
    if manifest.run_id not in run_lineage:
        raise CandidateSourcesError(
            f"the candidate sources at {where} were written by run {manifest.run_id}, not by "
            f"this run {run_lineage[0]} or a run it re-executes: another run of this "
            f"partition replaced them while this one ran; {again}"
        )
    expected = {
        "model bundle": (manifest.model_version, model_version),
        "candidate policy": (manifest.candidate_policy_version, CANDIDATE_POLICY_VERSION),
        "shard count": (manifest.shards, shards),
    }
    for what, (stored, current) in expected.items():
        if stored != current:
            raise CandidateSourcesError(
                f"the candidate sources at {where} were built for {what} {stored}, this step "
                f"has {current}; {again}"
            )
    graph = _load_npz(warehouse, f"{folder}/similarity.npz")
    ranked = _load_npz(warehouse, f"{folder}/ranked.npz")
    size = len(graph["item_ids"])
    partition_wide = {
        "items": warehouse.read_parquet(f"{folder}/items.parquet"),
        "new_items": warehouse.read_parquet(f"{folder}/new_items.parquet"),
        "similarity": SimilarityGraph(
            graph["item_ids"],
            sp.csr_matrix((graph["data"], graph["indices"], graph["indptr"]), shape=(size, size)),
        ),
        **{name: ranked[name] for name in RANKED_ARRAYS},
        "tenant_items": manifest.tenant_items,
        "recent_history_items": manifest.recent_history_items,
        "collaborative": collaborative,
    }
    return StoredSources(warehouse, folder, manifest, partition_wide)


def remove_sources(warehouse: Warehouse, folder: str) -> tuple[SourcesManifest, int] | None:
    """Delete the stored sources; their manifest and size in bytes (None if there were
    none, e.g. a merge step re-executed after they went)."""
    try:
        manifest = read_sources_manifest(warehouse, folder)
    except CandidateSourcesError:
        manifest = None
    size = int(warehouse.fs.du(warehouse.path(folder), total=True)) if manifest else 0
    warehouse.delete(folder, recursive=True)
    return (manifest, size) if manifest else None


def _shard_lookup(shard_subjects: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Sorted subject ids of the partition and the shard of each."""
    ids = np.concatenate([np.asarray(part, dtype=np.int64) for part in shard_subjects])
    shard_of = np.repeat(
        np.arange(len(shard_subjects), dtype=np.int64), [len(part) for part in shard_subjects]
    )
    order = np.argsort(ids, kind="stable")
    return ids[order], shard_of[order]


def _split_by_shard(
    frame: pd.DataFrame,
    column: str,
    subject_ids: np.ndarray,
    shard_of: np.ndarray,
    shards: int,
) -> list[pa.Table]:
    """`frame`'s rows per shard of their `column` subject, each in `frame`'s row order;
    rows whose subject is in no shard are left out."""
    ids = frame[column].to_numpy(dtype=np.int64)
    if len(subject_ids):
        at = np.minimum(np.searchsorted(subject_ids, ids), len(subject_ids) - 1)
        label = np.where(subject_ids[at] == ids, shard_of[at], shards)
    else:
        label = np.full(len(ids), shards, dtype=np.int64)
    order = np.argsort(label, kind="stable")
    bounds = np.searchsorted(label[order], np.arange(shards + 1))
    table = pa.Table.from_pandas(frame, preserve_index=False).take(order[: bounds[-1]])
    return [table.slice(start, stop - start) for start, stop in pairwise(bounds)]


def _npz(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _load_npz(warehouse: Warehouse, path: str) -> dict[str, np.ndarray]:
    try:
        data = warehouse.read_bytes(path)
    except FileNotFoundError:
        raise CandidateSourcesError(
            f"the candidate sources are incomplete: {warehouse.uri(path)} is missing; "
            "materialize candidate_pools for this partition again"
        ) from None
    with np.load(io.BytesIO(data), allow_pickle=False) as stored:
        return {name: stored[name] for name in stored.files}
