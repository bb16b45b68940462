"""Shard assignment, the merge step's verification, the subject-order merge and a step's
subjects spread over threads."""

from __future__ import annotations

import threading

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from recsys_assets.config.settings import PipelineConfig
from recsys_assets.pipeline.assets import block_threads, usable_cores
from recsys_assets.pipeline.candidates import SOURCES, provenance_labels
from recsys_assets.pipeline.shards import (
    in_subject_blocks,
    merge_in_subject_order,
    part_name,
    shard_parts,
    stage_path,
    verify_shard_parts,
)
from recsys_assets.pipeline.subjects import shard_count, subject_shards
from recsys_assets.pipeline.threads import sharing, thread_share
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


def _candidate_rows() -> pd.DataFrame:
    """Rows grouped by subject, uneven per subject, with coded text."""
    generator = np.random.default_rng(3)
    subjects = np.repeat(np.arange(40, dtype="int64"), generator.integers(1, 30, size=40))
    return pd.DataFrame(
        {
            "subject_id": subjects,
            "item_id": generator.integers(0, 1_000, size=len(subjects)),
            "score": generator.random(len(subjects)).astype("float32"),
            "source": pd.Categorical.from_codes(
                generator.integers(0, 3, size=len(subjects)), ["a", "b", "c"]
            ),
        }
    )


def _top_two(frame: pd.DataFrame) -> pd.DataFrame:
    """Per-subject work: each subject's two best rows."""
    ordered = frame.sort_values(["subject_id", "score"], ascending=[True, False], kind="stable")
    return ordered.groupby("subject_id", sort=False).head(2).reset_index(drop=True)


def test_subject_blocks_on_threads_give_what_one_call_gives() -> None:
    rows = _candidate_rows()
    seen: list[set[int]] = []
    both_running = threading.Barrier(2, timeout=10)

    def work(block: pd.DataFrame) -> pd.DataFrame:
        seen.append(set(block["subject_id"]))
        both_running.wait()  # two blocks at once, or a BrokenBarrierError after 10 s
        return _top_two(block)

    threaded = in_subject_blocks(rows, work, threads=2)
    pd.testing.assert_frame_equal(threaded, _top_two(rows))
    assert threaded["source"].dtype == rows["source"].dtype
    assert len(seen) == 2 and not seen[0] & seen[1]  # whole subjects, none in two blocks
    assert seen[0] | seen[1] == set(rows["subject_id"])


def test_subject_blocks_never_split_a_subject_and_stay_in_order() -> None:
    rows = _candidate_rows()
    for threads in (1, 3, 7, 40, 500):
        blocks: list[pd.DataFrame] = []
        result = in_subject_blocks(rows, lambda b, seen=blocks: seen.append(b) or b, threads)
        pd.testing.assert_frame_equal(result, rows)
        assert 1 <= len(blocks) <= min(threads, rows["subject_id"].nunique())
        owners = pd.concat(
            [block[["subject_id"]].assign(block=i) for i, block in enumerate(blocks)]
        )
        assert (owners.groupby("subject_id")["block"].nunique() == 1).all()


def test_one_thread_one_subject_or_no_rows_is_one_call() -> None:
    rows = _candidate_rows()
    calls: list[int] = []

    def work(block: pd.DataFrame) -> pd.DataFrame:
        calls.append(len(block))
        return block

    in_subject_blocks(rows, work, threads=1)
    in_subject_blocks(rows[rows["subject_id"] == 5], work, threads=4)
    in_subject_blocks(rows.iloc[:0], work, threads=4)
    assert calls == [len(rows), int((rows["subject_id"] == 5).sum()), 0]


def test_subject_blocks_refuse_rows_out_of_subject_order() -> None:
    rows = _candidate_rows().sample(frac=1.0, random_state=0)
    with pytest.raises(ValueError, match="not in subject_id order"):
        in_subject_blocks(rows, _top_two, threads=2)


def test_blocks_that_code_text_by_their_own_rows_are_refused() -> None:
    """Categories taken from a block's rows differ between blocks and from one call's (the
    Parquet dictionary and codes with them): refused, never concatenated to other bytes."""

    def work(block: pd.DataFrame) -> pd.DataFrame:
        return block.assign(label=pd.Categorical(block["subject_id"].astype(str)))

    with pytest.raises(ValueError, match="column 'label' has different categories"):
        in_subject_blocks(_candidate_rows(), work, threads=2)


def test_pool_provenance_codes_the_same_way_in_any_block() -> None:
    """Every source combination is a category, used or not: two blocks with different
    combinations still share one dictionary."""
    first = provenance_labels(np.array([[True] + [False] * (len(SOURCES) - 1)]))
    second = provenance_labels(np.array([[False, True] + [False] * (len(SOURCES) - 2)]))
    assert first.categories.equals(second.categories)
    assert len(first.categories) == 2 ** len(SOURCES)
    assert list(first) == [SOURCES[0]] and list(second) == [SOURCES[1]]


def test_kernels_in_a_block_take_its_share_of_the_threads() -> None:
    """Each of N blocks' kernels (faiss, the retrieval pool) gets threads // N, at least 1,
    not the process's count each; outside a block a kernel keeps its default."""
    seen: list[int] = []

    def work(block: pd.DataFrame) -> pd.DataFrame:
        seen.append(thread_share(99))
        return block

    two_subjects = pd.DataFrame({"subject_id": [1, 1, 2, 2]})  # two blocks at most
    for threads, share in ((2, 1), (3, 1), (8, 4)):
        seen.clear()
        in_subject_blocks(two_subjects, work, threads)
        assert seen == [share, share]
    assert thread_share(99) == 99
    with sharing(3):
        assert thread_share(99) == 3
    assert thread_share(99) == 99


def test_a_failing_block_fails_the_whole_call() -> None:
    def work(block: pd.DataFrame) -> pd.DataFrame:
        if 39 in set(block["subject_id"]):
            raise RuntimeError("subject 39 broke")
        return block

    with pytest.raises(RuntimeError, match="subject 39 broke"):
        in_subject_blocks(_candidate_rows(), work, threads=2)


def test_step_threads_is_a_count_or_auto_for_torch_threads() -> None:
    import torch

    assert PipelineConfig().step_threads == "auto"
    assert block_threads("auto") == min(torch.get_num_threads(), usable_cores())
    assert block_threads(PipelineConfig(step_threads=1).step_threads) == 1
    # Never more threads than cores: past them a block only adds its fixed costs.
    assert block_threads(PipelineConfig(step_threads=100_000).step_threads) == usable_cores()
    for bad in (0, -1, "2", 1.5):
        with pytest.raises(ValidationError, match="step_threads"):
            PipelineConfig(step_threads=bad)
