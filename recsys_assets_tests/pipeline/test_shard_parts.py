"""Shard assignment, the merge step's verification and the subject-order merge."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from recsys_assets.pipeline.shards import (
    merge_in_subject_order,
    part_name,
    shard_parts,
    stage_path,
    verify_shard_parts,
)
from recsys_assets.pipeline.subjects import shard_count, subject_shards
from recsys_assets.warehouse import Warehouse


def test_shard_of_a_subject_is_a_fixed_hash() -> None:
    """Pinned values: a change here moves subjects between shards of running deployments."""
    ids = np.array([1, 2, 3, 42, 10_000_019])
    assert subject_shards(ids, 8).tolist() == [1, 6, 5, 5, 7]
    assert subject_shards(ids, 1).tolist() == [0, 0, 0, 0, 0]
    counts = np.bincount(subject_shards(np.arange(1, 80_001), 8), minlength=8)
    assert counts.min() > 0.95 * 10_000 and counts.max() < 1.05 * 10_000


def test_auto_shard_count_follows_the_target_subjects_per_shard() -> None:
    assert shard_count(0, "auto", 4_000) == 1
    assert shard_count(4_000, "auto", 4_000) == 1
    assert shard_count(4_001, "auto", 4_000) == 2
    assert shard_count(10, 8, 4_000) == 8
    # An explicit count above the subjects would only add empty parts and idle steps.
    assert shard_count(163, 100_000, 4_000) == 163
    assert shard_count(0, 8, 4_000) == 1


def _slates(subject_ids: np.ndarray) -> pd.DataFrame:
    """Three rows per subject, positions in order, as a slate shard holds them."""
    return pd.DataFrame(
        {
            "subject_id": np.repeat(subject_ids, 3),
            "position": np.tile([1, 2, 3], len(subject_ids)),
            "item_id": np.repeat(subject_ids, 3) * 10 + np.tile([1, 2, 3], len(subject_ids)),
        }
    )


def _hash_sharded(warehouse: Warehouse, folder: str, ids: np.ndarray, shards: int) -> list[str]:
    shard_of = subject_shards(ids, shards)
    paths = []
    for index in range(shards):
        path = f"{folder}/{part_name(index)}"
        warehouse.write_parquet(path, _slates(ids[shard_of == index]))
        paths.append(path)
    return paths


def test_merge_lays_shards_out_in_subject_order_whatever_the_shard_count(
    local_warehouse: Warehouse,
) -> None:
    ids = np.arange(1, 101) * 7
    blocks_last = [int(ids[39]), int(ids[79]), int(ids[99])]  # blocks of 40 subjects
    merged = {}
    for shards in (1, 3, 8):
        paths = _hash_sharded(local_warehouse, f"s{shards}/shards", ids, shards)
        local_warehouse.write_parquet(f"s{shards}/{part_name(7)}", _slates(ids[:1]))  # stale
        rows = merge_in_subject_order(
            local_warehouse, paths, f"s{shards}", blocks_last, batch_rows=16
        )
        assert rows == [120, 120, 60]
        parts = local_warehouse.parquet_parts(f"s{shards}")
        assert [part.rsplit("/", 1)[-1] for part in parts] == [part_name(i) for i in range(3)]
        merged[shards] = [local_warehouse.read_parquet(part) for part in parts]
    for shards in (3, 8):
        for one, many in zip(merged[1], merged[shards], strict=True):
            pd.testing.assert_frame_equal(one, many)
    whole = pd.concat(merged[8], ignore_index=True)
    pd.testing.assert_frame_equal(
        whole[["subject_id", "position"]], _slates(ids)[["subject_id", "position"]]
    )


def test_verification_names_missing_extra_and_foreign_parts(local_warehouse: Warehouse) -> None:
    ids = np.arange(1, 41)
    shard_of = subject_shards(ids, 4)
    subjects = [ids[shard_of == index] for index in range(4)]
    for index in (0, 1, 2):
        local_warehouse.write_parquet(
            f"stage/{part_name(index)}", pd.DataFrame({"subject_id": subjects[index]})
        )
    stray = pd.DataFrame({"subject_id": np.concatenate([subjects[1][:1], subjects[0]])})
    local_warehouse.write_parquet(f"stage/{part_name(0)}", stray)  # a subject of shard 1
    local_warehouse.write_parquet(f"stage/{part_name(5)}", pd.DataFrame({"subject_id": [1]}))
    rows = [len(stray), len(subjects[1]), len(subjects[2]) + 1, len(subjects[3])]
    problems = verify_shard_parts(local_warehouse, "stage", subjects, rows)
    assert len(problems) == 4
    assert "unexpected part stage/part-00005.parquet" in problems[0]
    assert "shard 0" in problems[1] and "1 subject(s) of other shards" in problems[1]
    assert "shard 2" in problems[2] and "its step wrote" in problems[2]
    assert "shard 3: part stage/part-00003.parquet is missing" in problems[3]


def test_shard_count_comes_from_the_subjects_parts(local_warehouse: Warehouse) -> None:
    partition = "surface=home_feed/region=na"
    with pytest.raises(FileNotFoundError, match="materialize subjects for this partition first"):
        shard_parts(local_warehouse, "subjects", partition)
    folder = stage_path("subjects", partition)
    for index in (0, 1):
        local_warehouse.write_parquet(f"{folder}/{part_name(index)}", pd.DataFrame({"x": [1]}))
    assert shard_parts(local_warehouse, "subjects", partition) == 2
    local_warehouse.delete(f"{folder}/{part_name(0)}")
    with pytest.raises(FileNotFoundError, match=r"has parts \['part-00001.parquet'\]"):
        shard_parts(local_warehouse, "subjects", partition)
