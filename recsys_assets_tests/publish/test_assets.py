"""The Dagster shells: the blocking gate fails the run, and the rollback job flips back."""

from __future__ import annotations

from datetime import datetime

import dagster as dg
import pytest

from recsys_assets.pipeline.partitions import SurfaceRegion
from recsys_assets.pipeline.resources import RecsysResource
from recsys_assets.publish import read_manifest
from recsys_assets.publish.assets import (
    FALLBACK_CHECK,
    PUBLISH_CHECK,
    fallback_lists,
    published_lists,
    rollback_job,
)
from recsys_assets.warehouse import Warehouse
from recsys_assets_tests.conftest import TINY_AS_OF
from recsys_assets_tests.publish.builders import (
    REGION,
    SURFACE,
    later,
    make_items,
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
    assert read_manifest(local_warehouse, SURFACE, REGION).lineage["source_data_snapshot"] == (
        "snap_assets"
    )

    _stage(local_warehouse, banned=True)
    bad = _materialize(published_lists, local_warehouse, later(2), PARTITION)
    assert not bad.success
    evaluation = _check(bad, PUBLISH_CHECK)
    assert not evaluation.passed
    assert "invalid-item rate" in evaluation.metadata["failures"].value
    assert read_manifest(local_warehouse, SURFACE, REGION).active_version == active


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
    manifest = read_manifest(tiny_warehouse, surface, REGION, fallback=True)
    assert manifest is not None
    assert manifest.validation["metrics"]["lists"] >= 1
