"""The whole graph on tiny data, for every partition, through real Dagster runs."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest

from recsys_assets.config import load_settings
from recsys_assets.contracts.pipeline import validate_stage
from recsys_assets.definitions import build_definitions
from recsys_assets.pipeline import assets as pipeline_assets
from recsys_assets.pipeline.feature_tables import FeatureTables
from recsys_assets.pipeline.jobs import MODEL_JOB, REFRESH_JOB
from recsys_assets.pipeline.metadata import COLUMN_SCHEMA, LOCATION, ROW_COUNT
from recsys_assets.pipeline.partitions import SurfaceRegion
from recsys_assets.pipeline.resources import RecsysResource
from recsys_assets.pipeline.runner import run_pipeline, select_partitions
from recsys_assets.warehouse import Warehouse
from recsys_assets_tests.conftest import TINY_AS_OF

SCORE_TIME = pd.Timestamp(TINY_AS_OF).isoformat()


@dataclass
class PipelineRun:
    warehouse: Warehouse
    definitions: dg.Definitions
    instance: dg.DagsterInstance
    outcomes: list


@pytest.fixture(scope="module")
def pipeline_run(
    tiny_raw_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PipelineRun]:
    root = tmp_path_factory.mktemp("pipeline")
    shutil.copytree(tiny_raw_root, root / "raw")
    warehouse = Warehouse(root.as_uri())
    definitions = build_definitions(
        RecsysResource(warehouse_url=warehouse.url, score_time=SCORE_TIME)
    )
    with dg.instance_for_test() as instance:
        outcomes = run_pipeline(
            definitions,
            instance,
            select_partitions(load_settings(), None, None),
            train_model=True,
            progress=lambda message: None,
        )
        yield PipelineRun(warehouse, definitions, instance, outcomes)


def test_every_partition_materializes(pipeline_run: PipelineRun) -> None:
    settings = load_settings()
    assert len(pipeline_run.outcomes) == len(settings.enabled_partitions())
    failed = [(o.partition, o.error) for o in pipeline_run.outcomes if not o.success]
    assert not failed
    for outcome in pipeline_run.outcomes:
        assert {
            "subjects",
            "candidate_pools",
            "features_asof",
            "scored_candidates",
            "slates",
            "published_lists",
            "fallback_lists",
        } <= set(outcome.metadata)


@pytest.mark.parametrize(
    ("asset", "check"),
    [
        ("subjects", "subjects_contract"),
        ("features_asof", "no_future_feature_values"),
        ("slates", "slates_contract"),
        ("published_lists", "publish_validation"),
        ("fallback_lists", "fallback_validation"),
    ],
)
def test_check_evaluations_are_recorded_per_partition(
    pipeline_run: PipelineRun, asset: str, check: str
) -> None:
    """The UI's check history names each verdict's partition (not one row per run with
    "Partition: —"): the instance stores the partition with every evaluation."""
    records = pipeline_run.instance.event_log_storage.get_asset_check_execution_history(
        dg.AssetCheckKey(dg.AssetKey(asset), check), limit=1_000
    )
    evaluated = {record.partition for record in records}
    assert evaluated == {str(outcome.partition.to_key()) for outcome in pipeline_run.outcomes}
    for record in records:
        evaluation = record.event.dagster_event.asset_check_evaluation_data
        assert evaluation.partition == record.partition


def _histogram_total(table: str) -> int:
    """The sum of a Markdown histogram's counts (second column, after the header rows)."""
    return sum(int(line.split("|")[2]) for line in table.splitlines()[2:])


def test_metadata_is_chartable_and_linked(pipeline_run: PipelineRun) -> None:
    """Numbers the Plots view can chart (floats, not JSON), Dagster's row count, where the
    data lies, and the calibrated-score histogram on scored candidates and published lists."""
    (outcome,) = [
        o for o in pipeline_run.outcomes if o.partition == SurfaceRegion("home_feed", "na")
    ]
    metadata = outcome.metadata
    for asset in ("subjects", "candidate_pools", "features_asof", "scored_candidates", "slates"):
        assert metadata[asset][ROW_COUNT] > 0, asset
        assert Path(metadata[asset][LOCATION]).is_dir(), asset
        assert not {"rows", "list_length", "candidates_per_subject", "utility_distribution"} & set(
            metadata[asset]
        )
    pools = metadata["candidate_pools"]
    assert 0 < pools["candidates_per_subject_p50"] <= pools["candidates_per_subject_p95"]
    assert isinstance(pools["candidates_per_subject_mean"], float)
    shares = [value for key, value in pools.items() if key.startswith("candidate_share_")]
    assert sum(shares) == pytest.approx(1.0, abs=1e-3)
    scored = metadata["scored_candidates"]
    assert scored["utility_p5"] <= scored["utility_p50"] <= scored["utility_p95"]
    assert _histogram_total(scored["score_histogram"]) == scored[ROW_COUNT]
    slates = metadata["slates"]
    assert 0 < slates["items_per_list_p50"] <= slates["items_per_list_p95"]
    assert isinstance(slates["exploration_seed"], str)  # a constant: text, not a flat line
    published = metadata["published_lists"]
    assert _histogram_total(published["score_histogram"]) == published[ROW_COUNT]
    assert Path(published[LOCATION], "lists.parquet").is_file()
    graph = pipeline_run.definitions.resolve_asset_graph()
    schema = graph.get(dg.AssetKey("slates")).metadata[COLUMN_SCHEMA]
    assert {"subject_id", "item_id", "position"} <= {column.name for column in schema.columns}


def test_slates_satisfy_contract_and_surface_depth(pipeline_run: PipelineRun) -> None:
    settings = load_settings()
    lists = 0
    for outcome in pipeline_run.outcomes:
        partition = outcome.partition
        folder = f"pipeline/slates/{partition.path}"
        slate = pipeline_run.warehouse.read_parquet(folder)
        validate_stage("slates", slate)
        if slate.empty:  # a partition without eligible subjects (no tenant actors there)
            continue
        depth = settings.surface(partition.surface).store_depth
        assert slate.groupby("subject_id").size().max() <= depth
        lists += slate["subject_id"].nunique()
    assert lists > 100


def test_home_feed_lists_are_full_and_diverse(pipeline_run: PipelineRun) -> None:
    slate = pipeline_run.warehouse.read_parquet("pipeline/slates/surface=home_feed/region=na")
    sizes = slate.groupby("subject_id").size()
    assert sizes.median() >= load_settings().surface("home_feed").display_count
    sources = set("|".join(slate["source_provenance"]).split("|"))
    assert {"two_tower", "item_to_item", "content"} <= sources


def test_refresh_is_deterministic_for_a_fixed_clock(pipeline_run: PipelineRun) -> None:
    partition = SurfaceRegion("email_daily", "eu")
    folder = f"pipeline/slates/{partition.path}"
    before = pipeline_run.warehouse.read_parquet(folder).drop(columns=["pipeline_run_id"])
    result = pipeline_run.definitions.resolve_job_def(REFRESH_JOB).execute_in_process(
        instance=pipeline_run.instance, partition_key=partition.to_key()
    )
    assert result.success
    after = pipeline_run.warehouse.read_parquet(folder).drop(columns=["pipeline_run_id"])
    pd.testing.assert_frame_equal(before, after)


def test_planted_future_feature_value_fails_the_leakage_check(
    pipeline_run: PipelineRun, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = pipeline_assets.feature_tables

    def leaky(*args: object, **kwargs: object) -> FeatureTables:
        built = real(*args, **kwargs)  # type: ignore[arg-type]
        if "subjects" in built.tables:
            subjects = built["subjects"]
            subjects.loc[subjects.index[:3], "feature_timestamp"] = built.score_time + pd.Timedelta(
                hours=1
            )
        return built

    monkeypatch.setattr(pipeline_assets, "feature_tables", leaky)
    partition = SurfaceRegion("push", "apac")
    result = pipeline_run.definitions.resolve_job_def(REFRESH_JOB).execute_in_process(
        instance=pipeline_run.instance, partition_key=partition.to_key(), raise_on_error=False
    )
    evaluations = {
        evaluation.check_name: evaluation for evaluation in result.get_asset_check_evaluations()
    }
    assert not evaluations["no_future_feature_values"].passed
    assert evaluations["no_future_feature_values"].metadata["rows_with_future_values"].value == 3
    assert not result.success
    assert "scored_candidates" not in {
        event.asset_key.to_user_string() for event in result.get_asset_materialization_events()
    }


def test_model_bundle_records_versions_and_metrics(pipeline_run: PipelineRun) -> None:
    current = pipeline_run.warehouse.read_json("models/current.json")
    bundle = pipeline_run.warehouse.read_json(f"models/{current['model_version']}/bundle.json")
    assert bundle["feature_set_version"]
    assert 0.5 < bundle["metrics"]["ranker_auc"] <= 1.0


def test_definitions_load_with_every_part() -> None:
    definitions = build_definitions()
    for job in (MODEL_JOB, REFRESH_JOB):  # a chain of steps: one process, not one per step
        assert definitions.resolve_job_def(job).executor_def is dg.in_process_executor
    assert definitions.resolve_sensor_def("policy_change_sensor")
