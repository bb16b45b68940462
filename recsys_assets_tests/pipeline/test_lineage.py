"""Lineage in the code location: the raw tables are observed assets upstream of the graph,
and partitioned checks stay partitioned like their assets under any configuration."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest
import yaml

from recsys_assets.config.settings import DEFAULT_CONFIG_PATH
from recsys_assets.contracts.raw import RAW_CONTRACTS
from recsys_assets.data.assets import raw_table_key
from recsys_assets.data.snapshot import SNAPSHOT_PATH, read_snapshot
from recsys_assets.definitions import build_definitions
from recsys_assets.pipeline.metadata import COLUMN_SCHEMA, ROW_COUNT
from recsys_assets.pipeline.resources import RecsysResource
from recsys_assets.warehouse import Warehouse

READS = {
    "subjects": {"users"},
    "candidate_pools": {"items", "interactions", "user_controls", "editorial"},
    "features_asof": {"items", "interactions", "exposures", "user_controls"},
    "fallback_lists": {"items", "interactions", "users", "editorial"},
    "model_bundle": set(RAW_CONTRACTS),
}


def test_raw_tables_are_upstream_of_the_assets_that_read_them() -> None:
    graph = build_definitions().resolve_asset_graph()
    for table in RAW_CONTRACTS:
        node = graph.get(raw_table_key(table))
        assert node.is_observable and not node.is_materializable
        assert node.group_name == "raw"
        schema = node.metadata[COLUMN_SCHEMA]
        assert [column.name for column in schema.columns] == list(
            RAW_CONTRACTS[table].to_schema().columns
        )
    for asset, tables in READS.items():
        parents = graph.get(dg.AssetKey(asset)).parent_keys
        assert {raw_table_key(table) for table in tables} <= parents, asset
    # published_lists is downstream of every table, through the pipeline.
    ancestors, frontier = set(), {dg.AssetKey("published_lists")}
    while frontier:
        frontier = {parent for key in frontier for parent in graph.get(key).parent_keys}
        ancestors |= frontier
    assert {raw_table_key(table) for table in RAW_CONTRACTS} <= ancestors


def _observe(warehouse: Warehouse, instance: dg.DagsterInstance) -> dg.ExecuteInProcessResult:
    """The code location's observation job, as the UI or a schedule launches it."""
    definitions = build_definitions(RecsysResource(warehouse_url=warehouse.url))
    return definitions.resolve_job_def("observe_raw_tables").execute_in_process(
        instance=instance, raise_on_error=False
    )


def test_observing_records_the_snapshot_id_as_data_version(tiny_warehouse: Warehouse) -> None:
    snapshot = read_snapshot(tiny_warehouse)
    with dg.instance_for_test() as instance:

        def observed(table: str) -> dg.AssetObservation:
            (record,) = instance.fetch_observations(raw_table_key(table), limit=1).records
            return record.asset_observation

        assert _observe(tiny_warehouse, instance).success
        for table in RAW_CONTRACTS:
            observation = observed(table)
            assert observation.data_version == snapshot["snapshot_id"]
            assert observation.metadata[ROW_COUNT].value == snapshot["row_counts"][table]
            assert Path(str(observation.metadata["location"].value)).is_dir()

        # A new import is a new snapshot: every table gets a new data version.
        tiny_warehouse.write_json(SNAPSHOT_PATH, {**snapshot, "snapshot_id": "snap_reimported"})
        assert _observe(tiny_warehouse, instance).success
        assert {observed(table).data_version for table in RAW_CONTRACTS} == {"snap_reimported"}


def test_observing_without_a_snapshot_fails_saying_what_to_run(local_warehouse: Warehouse) -> None:
    with dg.instance_for_test() as instance:
        result = _observe(local_warehouse, instance)
    assert not result.success
    (failure,) = [event for event in result.all_events if event.is_step_failure]
    assert "recsys seed" in str(failure.step_failure_data.error)


@pytest.mark.parametrize("regions", [["north", "south"]])
def test_checks_are_partitioned_like_their_assets_in_another_configuration(
    tmp_path: Path, regions: list[str]
) -> None:
    config = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    config["regions"] = regions
    for surface in config["surfaces"].values():
        surface.pop("regions", None)  # they name the packaged regions
    config_path = tmp_path / "surfaces.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))

    definitions = build_definitions(RecsysResource(config_path=str(config_path)))

    checked = [
        assets_def
        for assets_def in definitions.resolve_asset_graph().assets_defs
        if assets_def.partitions_def is not None and assets_def.check_specs
    ]
    assert {key.to_user_string() for assets_def in checked for key in assets_def.keys} == {
        "subjects",
        "candidate_pools",
        "features_asof",
        "scored_candidates",
        "slates",
        "published_lists",
        "fallback_lists",
    }
    for assets_def in checked:
        for spec in assets_def.check_specs:
            assert spec.partitions_def == assets_def.partitions_def, spec.key
            keys = spec.partitions_def.get_partition_keys()
            assert {key.split("|")[0] for key in keys} == set(regions), spec.key
