"""Shortlists: what publish stores per subject for a `storage_mode: candidate_pool` surface.

A shortlist is the subject's stored slate (positions 1..store_depth, in slate order, with its
batch exploration draws), then the best of the rest of the candidate pool by batch utility,
with up to `candidate_pool.exploration_candidates` of the pool's exploration candidates
(new-item / long-tail) kept even below that cut, up to `candidate_pool.shortlist_size` rows.
So position order is the batch order: what final-slate serving would have shown first.

Each row is a list record (provenance, batch score, calibrated prediction, lineage) plus
`SHORTLIST_COLUMNS`: the slate policy's item attributes and the ranker's inputs exactly as the
batch gather computed them (`gather_features` over the partition's features_asof tables), so
the online rerank starts from the numbers batch scored and changes only what changed since.
It goes through the same versioned, validated manifest as final slates (publisher.py).

Built shard by shard: slates, scored_candidates, candidate_pools and features_asof hold one
part per subject shard under the same part name, so a shard's parts are read together.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial

import numpy as np
import pandas as pd

from recsys_assets.config import SurfaceConfig
from recsys_assets.pipeline.feature_tables import PER_SUBJECT_TABLES, FeatureTables, gather_features
from recsys_assets.pipeline.shards import (
    SHARDS_FOLDER,
    merge_in_subject_order,
    part_name,
    stage_path,
)
from recsys_assets.pipeline.text import plain_text_columns
from recsys_assets.publish.lists import (
    SHORTLIST_FEATURE_COLUMNS,
    SHORTLIST_ITEM_COLUMNS,
    lists_from_slates,
)
from recsys_assets.warehouse import Warehouse, partition_path

_KEYS = ["subject_id", "item_id"]
SHORTLISTS = "shortlists"
"""Staging stage of multi-shard shortlists (`pipeline/shortlists/…`), rewritten by each
publish of the partition."""


def shortlist_shard(
    slate: pd.DataFrame,
    scored: pd.DataFrame,
    pool: pd.DataFrame,
    tables: FeatureTables,
    surface: SurfaceConfig,
) -> pd.DataFrame:
    """One shard's shortlists: slate-table columns plus `SHORTLIST_COLUMNS`, sorted by subject
    and position (dense from 1). `slate`, `scored` and `pool` are the shard's slates,
    scored_candidates and candidate_pools parts; `tables` its features_asof tables."""
    config = surface.candidate_pool
    slate = slate.sort_values(["subject_id", "position"], kind="stable").reset_index(drop=True)
    ranked = scored.sort_values(
        ["subject_id", "utility", "item_id"], ascending=[True, False, True], kind="stable"
    ).drop_duplicates(_KEYS)
    flags = ranked.set_index(_KEYS)["is_exploration_candidate"]
    slate["is_exploration_candidate"] = (
        flags.reindex(pd.MultiIndex.from_frame(slate[_KEYS])).fillna(False).to_numpy(dtype=bool)
    )
    in_slate = pd.MultiIndex.from_frame(ranked[_KEYS]).isin(pd.MultiIndex.from_frame(slate[_KEYS]))
    rest = ranked.loc[~in_slate].reset_index(drop=True)
    slate_sizes = slate.groupby("subject_id").size()
    room = (
        config.shortlist_size
        - rest["subject_id"].map(slate_sizes).fillna(0).to_numpy(dtype=np.int64)
    ).clip(min=0)
    kept = _kept_rest(rest, room, config.exploration_candidates)
    rest = rest.loc[kept].copy()
    rest["score"] = rest["utility"]
    rest["reason_codes"] = rest["source_provenance"].astype(str).str.split("|", n=1).str[0]
    rest["exploration"] = False
    rest["propensity"] = 1.0
    rest["slate_policy_version"] = surface.slate_policy.version
    slate["in_slate"] = True
    rest["in_slate"] = False
    columns = [c for c in slate.columns if c in rest.columns]
    shortlist = pd.concat([slate[columns], rest[columns]], ignore_index=True)
    order = np.lexsort(
        (
            np.arange(len(shortlist)),  # slate rows first (in slate order), then by utility
            shortlist["subject_id"].to_numpy(dtype=np.int64),
        )
    )
    shortlist = shortlist.take(order).reset_index(drop=True)
    shortlist["position"] = shortlist.groupby("subject_id").cumcount().to_numpy() + 1
    inputs = shortlist[_KEYS].merge(pool, on=_KEYS, how="left", suffixes=("", "_pool"))
    gathered = gather_features(tables, inputs)
    features = pd.DataFrame(gathered.matrix, columns=SHORTLIST_FEATURE_COLUMNS)
    return pd.concat([shortlist, features], axis=1)


def _kept_rest(rest: pd.DataFrame, room: np.ndarray, exploration: int) -> np.ndarray:
    """Rows of `rest` (ranked by utility within subject) that fill each subject's `room`:
    the top ones, with up to `exploration` exploration candidates kept whatever their rank."""
    subject = rest["subject_id"]
    rank = subject.groupby(subject).cumcount().to_numpy()
    explore = rest["is_exploration_candidate"].to_numpy(dtype=bool)
    explore_rank = np.full(len(rest), np.iinfo(np.int64).max)
    explore_rank[explore] = subject[explore].groupby(subject[explore]).cumcount().to_numpy()
    reserve = np.minimum(exploration, room)
    kept = (rank < room - reserve) | (explore & (explore_rank < reserve))
    # What the reserve left unused (a subject with few exploration candidates) goes by rank.
    kept_per_subject = pd.Series(kept).groupby(subject.to_numpy()).transform("sum").to_numpy()
    others = ~kept
    other_rank = np.zeros(len(rest), dtype=np.int64)
    other_rank[others] = subject[others].groupby(subject[others]).cumcount().to_numpy()
    return kept | (others & (other_rank < room - kept_per_subject))


def shortlist_parts(
    warehouse: Warehouse,
    surface: SurfaceConfig,
    region: str,
    *,
    source_data_snapshot: str | None,
    candidate_policy_version: str | None,
    pipeline_run_id: str | None,
) -> Iterator[pd.DataFrame]:
    """List records of a partition's shortlists in subject order, a block at a time.

    A shortlist is built where its inputs align, per subject shard (the per-shard slates
    under `slates/…/shards/`, else the slates parts themselves). Shards hash subjects, so
    with more than one the shards' shortlists are staged under `pipeline/shortlists/…/shards/`
    and merged in subject order into the blocks of the merged slates (`merge_in_subject_order`):
    one block in memory at a time, the same blocks whatever the shard count.
    """
    where = partition_path(surface=surface.name, region=region)
    lineage = {
        "source_data_snapshot": source_data_snapshot,
        "candidate_policy_version": candidate_policy_version,
        "pipeline_run_id": pipeline_run_id,
    }
    slates_folder = stage_path("slates", where)
    shard_slates = warehouse.parquet_parts(f"{slates_folder}/{SHARDS_FOLDER}")
    if len(shard_slates) <= 1:
        for path in shard_slates or warehouse.parquet_parts(slates_folder):
            yield _shard_records(warehouse, surface, region, path, where, lineage)
        return
    staging = stage_path(SHORTLISTS, where)
    staged = []
    for path in shard_slates:
        records = _shard_records(warehouse, surface, region, path, where, lineage)
        if records.empty:
            continue
        staged.append(f"{staging}/{SHARDS_FOLDER}/{path.rsplit('/', 1)[-1]}")
        warehouse.write_parquet(staged[-1], records)
    last_subjects = [
        int(warehouse.read_parquet(block, columns=["subject_id"])["subject_id"].max())
        for block in warehouse.parquet_parts(slates_folder)
    ]
    merge_in_subject_order(warehouse, staged, staging, last_subjects)
    for block in warehouse.parquet_parts(staging):
        yield warehouse.read_parquet(block)


def _shard_records(
    warehouse: Warehouse,
    surface: SurfaceConfig,
    region: str,
    slate_path: str,
    where: str,
    lineage: dict[str, str | None],
) -> pd.DataFrame:
    """List records of one subject shard's shortlists, sorted by subject and position."""
    records_of = partial(
        lists_from_slates, surface=surface, region=region, ttl=surface.ttl, **lineage
    )
    slate = warehouse.read_parquet(slate_path)
    if slate.empty:  # a shard without lists: nothing to shortlist
        return records_of(slate)
    name = slate_path.rsplit("/", 1)[-1]
    tables = FeatureTables(
        score_time=pd.Timestamp(slate["score_time"].iloc[0]),
        tables={
            "items": _part(warehouse, "features_asof", f"{where}/items", part_name(0)),
            **{
                table: _part(warehouse, "features_asof", f"{where}/{table}", name)
                for table in PER_SUBJECT_TABLES
            },
        },
    )
    shortlist = shortlist_shard(
        slate,
        plain_text_columns(_part(warehouse, "scored_candidates", where, name)),
        plain_text_columns(_part(warehouse, "candidate_pools", where, name)),
        tables,
        surface,
    )
    records = records_of(shortlist)
    records["in_slate"] = shortlist["in_slate"].to_numpy(dtype=bool)
    for column in SHORTLIST_ITEM_COLUMNS:
        records[column] = shortlist[column].to_numpy()
    records["is_sponsored"] = records["is_sponsored"].astype(bool)
    records["is_exploration_candidate"] = records["is_exploration_candidate"].astype(bool)
    for column in SHORTLIST_FEATURE_COLUMNS:
        records[column] = shortlist[column].to_numpy(dtype=np.float32)
    return records


def _part(warehouse: Warehouse, asset: str, folder: str, name: str) -> pd.DataFrame:
    path = f"{stage_path(asset, folder)}/{name}"
    try:
        return warehouse.read_parquet(path)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"a candidate_pool shortlist needs {asset} part {name} at {warehouse.uri(path)}: "
            f"materialize {asset} for this partition (in one run with slates) before publishing"
        ) from None
