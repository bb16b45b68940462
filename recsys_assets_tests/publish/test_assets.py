"""The Dagster shells: the blocking gate fails the run, and the rollback job flips back."""

from __future__ import annotations

from datetime import datetime

import dagster as dg
import pandas as pd
import pytest

from recsys_assets.pipeline.metadata import ROW_COUNT
from recsys_assets.pipeline.partitions import SurfaceRegion
from recsys_assets.pipeline.resources import RecsysResource
from recsys_assets.publish import read_manifest
from recsys_assets.publish.assets import (
    DIAGNOSIS_KEY,
    FALLBACK_CHECK,
    PUBLISH_CHECK,
    fallback_lists,
    published_lists,
    rollback_job,
)
from recsys_assets.publish.versions import manifest_path
from recsys_assets.warehouse import Warehouse
from recsys_assets_tests.conftest import TINY_AS_OF
from recsys_assets_tests.publish.builders import (
    REGION,
    SURFACE,
    later,
    make_interactions,
    make_items,
    make_pools,
    make_slates,
    make_subjects,
    settings,
)

PARTITION = SurfaceRegion(surface=SURFACE, region=REGION)


def _stage(warehouse: Warehouse, *, banned: bool = False) -> None:
    """Raw items + snapshot and the partition's subjects and slates, as the pipeline leaves them."""
    items = make_items(60)
    subjects = make_subjects(5)
    slates = make_slates(subjects, items, depth=settings().surface(SURFACE).store_depth)
    if banned:
        items.loc[items["item_id"] <= 20, "policy_state"] = "banned"
    warehouse.write_parquet("raw/items/part-00000.parquet", items)
    interactions = make_interactions(dict.fromkeys(subjects["subject_id"], 4))
    warehouse.write_parquet("raw/interactions/part-00000.parquet", interactions)
    warehouse.write_json("raw/_snapshot.json", {"snapshot_id": "snap_assets"})
    warehouse.write_parquet(f"pipeline/subjects/{PARTITION.path}/part-00000.parquet", subjects)
    warehouse.write_parquet(f"pipeline/slates/{PARTITION.path}/part-00000.parquet", slates)


def _resource(warehouse: Warehouse, now: datetime) -> RecsysResource:
    return RecsysResource(warehouse_url=warehouse.url, score_time=now.isoformat())


def _materialize(asset: dg.AssetsDefinition, warehouse: Warehouse, now: datetime, partition):
    return dg.materialize(
        [asset],
        partition_key=partition.to_key(),
        resources={"recsys": _resource(warehouse, now)},
        raise_on_error=False,
    )


def _check(result: dg.ExecuteInProcessResult, name: str) -> dg.AssetCheckEvaluation:
    (evaluation,) = [e for e in result.get_asset_check_evaluations() if e.check_name == name]
    return evaluation


def test_published_lists_passes_the_gate_then_a_bad_batch_fails_the_run(
    local_warehouse: Warehouse,
) -> None:
    _stage(local_warehouse)
    good = _materialize(published_lists, local_warehouse, later(1), PARTITION)
    assert good.success
    assert _check(good, PUBLISH_CHECK).passed
    active = read_manifest(local_warehouse, SURFACE, REGION).active_version
    metadata = good.asset_materializations_for_node("published_lists")[0].metadata
    assert metadata["active_version"].value == active
    assert _check(good, PUBLISH_CHECK).partition == str(PARTITION.to_key())
    # Five subjects' full lists; every listed item's calibrated score is in the histogram.
    assert metadata[ROW_COUNT].value == 5 * settings().surface(SURFACE).store_depth
    assert f"| {metadata[ROW_COUNT].value} |" in metadata["score_histogram"].value
    assert DIAGNOSIS_KEY not in metadata
    assert DIAGNOSIS_KEY not in _check(good, PUBLISH_CHECK).metadata
    assert read_manifest(local_warehouse, SURFACE, REGION).lineage["source_data_snapshot"] == (
        "snap_assets"
    )

    _stage(local_warehouse, banned=True)
    bad = _materialize(published_lists, local_warehouse, later(2), PARTITION)
    assert not bad.success
    evaluation = _check(bad, PUBLISH_CHECK)
    assert not evaluation.passed
    assert "invalid-item rate" in evaluation.metadata["failures"].value
    # Banned items emptied 4 of 5 lists; every subject has 4 events, so one segment holds them.
    assert "80% of subjects have no item eligible now: for subjects with 3-5 events" in (
        evaluation.metadata["failures"].value
    )
    assert read_manifest(local_warehouse, SURFACE, REGION).active_version == active


def _stage_sparse(warehouse: Warehouse) -> None:
    """Ten subjects: 3 without history and 3 with 1-2 events get one-item lists from a
    trending-only pool; 4 with 12 events get full lists from two-tower and item-to-item."""
    items = make_items(60)
    subjects = make_subjects(10)
    cold, warm = subjects.iloc[:6], subjects.iloc[6:]
    slates = pd.concat(
        [
            make_slates(cold, items, depth=1),
            make_slates(warm, items, depth=settings().surface(SURFACE).store_depth),
        ]
    )
    history = {100: 0, 101: 0, 102: 0, 103: 1, 104: 2, 105: 2} | dict.fromkeys(range(106, 110), 12)
    interactions = pd.concat(
        [
            make_interactions(history),
            make_interactions({101: 5}).assign(event_type="hide"),  # hides are not engagement
            make_interactions({102: 5}, before=later(600)).iloc[:3],  # after score time
        ]
    )
    pools = make_pools(
        {subject: {"trending": [subject % 60 + 1]} for subject in cold["subject_id"]}
        | {
            subject: {"two_tower": list(range(1, 31)), "item_to_item": list(range(31, 41))}
            for subject in warm["subject_id"]
        }
    )
    warehouse.write_parquet("raw/items/part-00000.parquet", items)
    warehouse.write_parquet("raw/interactions/part-00000.parquet", interactions)
    warehouse.write_json("raw/_snapshot.json", {"snapshot_id": "snap_sparse"})
    warehouse.write_parquet(f"pipeline/subjects/{PARTITION.path}/part-00000.parquet", subjects)
    warehouse.write_parquet(f"pipeline/slates/{PARTITION.path}/part-00000.parquet", slates)
    warehouse.write_parquet(f"pipeline/candidate_pools/{PARTITION.path}/part-00000.parquet", pools)


def test_short_lists_are_refused_naming_the_short_segments_and_starved_sources(
    local_warehouse: Warehouse,
) -> None:
    _stage(local_warehouse)
    assert _materialize(published_lists, local_warehouse, later(1), PARTITION).success
    before = local_warehouse.read_bytes(manifest_path(SURFACE, REGION))
    _stage_sparse(local_warehouse)

    result = _materialize(published_lists, local_warehouse, later(2), PARTITION)

    assert not result.success
    evaluation = _check(result, PUBLISH_CHECK)
    assert not evaluation.passed
    failures = evaluation.metadata["failures"].value
    assert "mean list length 4.6 is 0.460 of store_depth 10" in failures
    assert "60% of subjects have < 5 items" in failures
    cold = failures.split("60% of subjects have < 5 items: ")[1]
    assert cold.startswith(
        "for subjects with 0-2 events (6 subjects, 100% short, mean list length 1.0) "
        "the candidate pool averaged 1.0 (sources: trending 1.0; starved: two_tower"
    )
    assert "item_to_item" in cold.split("starved: ")[1]
    assert "11+ events" not in cold  # full lists: not where the short ones are
    table = evaluation.metadata[DIAGNOSIS_KEY].value
    assert "| events before score time | subjects | short (< 5 items) |" in table
    assert "| 0 | 3 | 100% | 0% | 1.0 | 1.0 | 0.0 |" in table  # pool 1, two_tower 0
    assert "| 11+ | 4 | 0% | 0% | 10.0 | 40.0 | 30.0 |" in table
    assert local_warehouse.read_bytes(manifest_path(SURFACE, REGION)) == before


def test_rollback_job_flips_back_and_refuses_an_unknown_target(local_warehouse: Warehouse) -> None:
    _stage(local_warehouse)
    for minutes in (1, 2):
        assert _materialize(published_lists, local_warehouse, later(minutes), PARTITION).success
    manifest = read_manifest(local_warehouse, SURFACE, REGION)
    previous = manifest.history[1].version

    def run(**config: str) -> dg.ExecuteInProcessResult:
        return rollback_job.execute_in_process(
            run_config={"ops": {"rollback_published_version": {"config": config}}},
            resources={"recsys": _resource(local_warehouse, later(3))},
            raise_on_error=False,
        )

    assert run(surface=SURFACE, region=REGION).success
    assert read_manifest(local_warehouse, SURFACE, REGION).active_version == previous
    refused = run(surface=SURFACE, region=REGION, to_version="v20000101T000000000000")
    assert not refused.success
    assert read_manifest(local_warehouse, SURFACE, REGION).active_version == previous


@pytest.mark.parametrize("surface", ["home_feed", "enterprise_action_queue"])
def test_fallback_lists_publish_from_tiny_seeded_data(
    tiny_warehouse: Warehouse, surface: str
) -> None:
    partition = SurfaceRegion(surface=surface, region=REGION)
    result = _materialize(fallback_lists, tiny_warehouse, TINY_AS_OF, partition)
    assert result.success
    assert _check(result, FALLBACK_CHECK).passed
    assert _check(result, FALLBACK_CHECK).partition == str(partition.to_key())
    manifest = read_manifest(tiny_warehouse, surface, REGION, fallback=True)
    assert manifest is not None
    assert manifest.validation["metrics"]["lists"] >= 1
