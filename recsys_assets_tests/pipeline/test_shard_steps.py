"""Subject shards as Dagster steps: the published lists do not depend on the shard count, and
a shard step that fails is retried without losing or duplicating subjects. Real runs of the
refresh job on a real instance over tiny seeded data."""

from __future__ import annotations

import io
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from pydantic import ValidationError

from recsys_assets.config.settings import DEFAULT_CONFIG_PATH, PipelineConfig
from recsys_assets.definitions import build_definitions
from recsys_assets.models.bundle import load_bundle
from recsys_assets.pipeline import candidates as candidate_stage
from recsys_assets.pipeline.assets import SCORING_BLOCK_ROWS, SHARD_FAULT_ENV_VAR, score_in_blocks
from recsys_assets.pipeline.jobs import REFRESH_JOB
from recsys_assets.pipeline.partitions import SurfaceRegion
from recsys_assets.pipeline.resources import RecsysResource
from recsys_assets.publish.manifest import read_manifest
from recsys_assets.warehouse import Warehouse
from recsys_assets_tests.conftest import TINY_AS_OF

PARTITION = SurfaceRegion("home_feed", "na")
RUN_IDENTITY = ["list_id", "version", "pipeline_run_id"]
"""Columns that name the run or version that wrote a list, not what the list holds."""


@dataclass
class ShardedRun:
    """A refresh run and what it left, read right after it (a later run may replace it)."""

    result: dg.ExecuteInProcessResult
    events: list[dg.EventLogEntry]
    lists: pa.Table
    """The published version's lists.parquet."""
    parts: dict[str, int]
    """Parquet parts per stage folder."""
    scored: pd.DataFrame
    pools: pd.DataFrame
    subjects: pd.Series


def _refresh(
    tiny_trained_root: Path, folder: Path, shards: int, step_threads: int = 1
) -> ShardedRun:
    """The partition's refresh run with `pipeline.shards` and `pipeline.step_threads`, on the
    warehouse in `folder` (a copy of `tiny_trained_root` the first time)."""
    if not (folder / "warehouse").exists():
        shutil.copytree(tiny_trained_root, folder / "warehouse")
    config = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    config["pipeline"]["shards"] = shards
    config["pipeline"]["step_threads"] = step_threads
    config_path = folder / f"surfaces_{shards}.yaml"
    config_path.write_text(yaml.safe_dump(config))
    warehouse = Warehouse((folder / "warehouse").as_uri())
    definitions = build_definitions(
        RecsysResource(
            warehouse_url=warehouse.url,
            config_path=str(config_path),
            score_time=TINY_AS_OF.isoformat(),
        )
    )
    with dg.instance_for_test() as instance:
        result = definitions.resolve_job_def(REFRESH_JOB).execute_in_process(
            instance=instance, partition_key=PARTITION.to_key(), raise_on_error=False
        )
        events = list(instance.all_logs(result.run_id))
    assert result.success
    manifest = read_manifest(warehouse, PARTITION.surface, PARTITION.region)
    assert manifest is not None
    stages = {
        "subjects": "subjects",
        "candidate_pools": "candidate_pools",
        "scored_candidates": "scored_candidates",
        "slates": "slates",
        "slate_shards": "slates/shards",
        "subject_categories": "features_asof/subject_categories",
    }
    return ShardedRun(
        result=result,
        events=events,
        lists=pq.read_table(warehouse.path(f"{manifest.active_path}/lists.parquet")),
        parts={
            name: len(warehouse.parquet_parts(_stage(folder_name)))
            for name, folder_name in stages.items()
        },
        scored=warehouse.read_parquet(
            _stage("scored_candidates"), columns=["subject_id", "item_id"]
        ),
        pools=warehouse.read_parquet(_stage("candidate_pools"), columns=["subject_id", "item_id"]),
        subjects=warehouse.read_parquet(_stage("subjects"))["subject_id"],
    )


def _stage(folder: str) -> str:
    asset, _, table = folder.partition("/")
    return f"pipeline/{asset}/{PARTITION.path}" + (f"/{table}" if table else "")


@pytest.fixture(scope="module")
def eight_shards_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sharded")


@pytest.fixture(scope="module")
def eight_shards(
    tiny_trained_root: Path, eight_shards_folder: Path
) -> Iterator[tuple[ShardedRun, Path]]:
    """Eight shards, each step's subjects over three threads, and shard 3 of
    scored_candidates dies once right after writing its part (SHARD_FAULT_ENV_VAR): its step
    is retried."""
    marker = eight_shards_folder / "fault"
    marker.write_text("scored_candidates/3")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(SHARD_FAULT_ENV_VAR, str(marker))
        yield _refresh(tiny_trained_root, eight_shards_folder, shards=8, step_threads=3), marker


@pytest.fixture(scope="module")
def one_shard(
    tiny_trained_root: Path, eight_shards_folder: Path, eight_shards: tuple[ShardedRun, Path]
) -> ShardedRun:
    """One shard on one thread, on the warehouse the eight-shard run left: its extra parts
    must go."""
    return _refresh(tiny_trained_root, eight_shards_folder, shards=1)


def _parquet_bytes(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


def _step_events(run: ShardedRun, event_type: str, step: str) -> list[str]:
    return [
        entry.dagster_event.step_key
        for entry in run.events
        if entry.dagster_event is not None
        and entry.dagster_event.event_type_value == event_type
        and step in (entry.dagster_event.step_key or "")
    ]


def test_each_heavy_asset_runs_one_step_per_shard(
    eight_shards: tuple[ShardedRun, Path],
) -> None:
    run, _ = eight_shards
    assert run.result.success
    for asset in ("candidate_pools", "features_asof", "scored_candidates", "slates"):
        steps = _step_events(run, "STEP_SUCCESS", f"{asset}_shard[")
        assert len(steps) == 8, asset
    subjects = run.result.asset_materializations_for_node("subjects")[0]
    assert subjects.metadata["shards"].value == 8


def test_published_lists_are_byte_identical_with_one_shard_and_eight_threaded_shards(
    one_shard: ShardedRun, eight_shards: tuple[ShardedRun, Path]
) -> None:
    run, _ = eight_shards
    one, eight = one_shard.lists, run.lists
    assert one.num_rows > 1_000
    assert _parquet_bytes(one.drop_columns(RUN_IDENTITY)) == _parquet_bytes(
        eight.drop_columns(RUN_IDENTITY)
    )


def test_scores_do_not_depend_on_the_block_a_row_lands_in(tiny_trained_root: Path) -> None:
    bundle = load_bundle(Warehouse(tiny_trained_root.as_uri()))
    rng = np.random.default_rng(0)
    matrix = rng.normal(size=(SCORING_BLOCK_ROWS + 1_000, len(bundle.ranker.feature_columns)))
    matrix = matrix.astype(np.float32)
    whole = score_in_blocks(bundle, matrix)
    order = rng.permutation(len(matrix))
    cut = 777  # rows land in other blocks, at other offsets, with other neighbours
    parts = [
        score_in_blocks(bundle, matrix[order[:cut]]),
        score_in_blocks(bundle, matrix[order[cut:]]),
    ]
    for whole_column, part_columns in zip(whole, zip(*parts, strict=True), strict=True):
        np.testing.assert_array_equal(np.concatenate(part_columns), whole_column[order])


def test_a_failed_shard_step_is_retried_without_losing_or_duplicating_subjects(
    eight_shards: tuple[ShardedRun, Path],
) -> None:
    """The retried step rewrote its part under the same name: every subject's candidates
    are scored once, and (test above) the lists equal the one-shard run's."""
    run, marker = eight_shards
    assert not marker.exists()  # the drill fired, once
    faulty = "scored_candidates.scored_candidates_shard[shard_00003]"
    assert _step_events(run, "STEP_UP_FOR_RETRY", "_shard[") == [faulty]
    assert _step_events(run, "STEP_SUCCESS", faulty) == [faulty]
    assert run.parts["scored_candidates"] == 8
    assert not run.scored.duplicated().any()
    assert set(map(tuple, run.scored.to_numpy())) == set(map(tuple, run.pools.to_numpy()))
    lists = run.lists.to_pandas()
    assert set(lists["subject_id"]) <= set(run.subjects)
    assert not lists.duplicated(["subject_id", "item_id"]).any()


def test_fewer_shards_than_the_last_run_leave_no_stale_parts(
    eight_shards: tuple[ShardedRun, Path], one_shard: ShardedRun
) -> None:
    run, _ = eight_shards
    assert set(run.parts.values()) - {1} == {8}  # slates: one subject-order block
    assert one_shard.parts == dict.fromkeys(run.parts, 1)


def test_shard_steps_of_one_run_build_the_candidate_sources_once(
    tiny_trained_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In one process (the in-process executor of `recsys run`), the partition's candidate
    sources are built once, by the fan-out step, and reused by every shard step of the run."""
    built = []
    original = candidate_stage.build_context

    def counted(**arguments: object) -> candidate_stage.CandidateContext:
        built.append(arguments["region"])
        return original(**arguments)  # type: ignore[arg-type]

    monkeypatch.setattr(candidate_stage, "build_context", counted)
    run = _refresh(tiny_trained_root, tmp_path, shards=4)
    assert run.parts["candidate_pools"] == 4
    assert built == [PARTITION.region]


def test_pipeline_shards_is_a_positive_count_or_auto() -> None:
    assert PipelineConfig().shards == "auto"
    assert PipelineConfig(shards=8).shards == 8
    for bad in (0, -1, True, "8", "many", 2.5):
        with pytest.raises(ValidationError, match="shards"):
            PipelineConfig(shards=bad)
