"""The six source tables under `raw/` as observable Dagster assets (group `raw`).

They are written by `recsys seed` / `recsys import`, not by Dagster, so they are observed
rather than materialized: an observation records the raw snapshot id as each table's data
version. The assets that read a table depend on it (`raw_tables(...)`), so the asset graph
shows where every list comes from, and a new import (a new snapshot id) marks what it made
stale.
"""

from collections.abc import Iterator

import dagster as dg

from recsys_assets.contracts.raw import RAW_CONTRACTS
from recsys_assets.data.snapshot import SNAPSHOT_PATH, raw_table_path, read_snapshot
from recsys_assets.pipeline.metadata import COLUMN_SCHEMA, LOCATION, ROW_COUNT, column_schema
from recsys_assets.pipeline.metadata import location as warehouse_location
from recsys_assets.pipeline.resources import RecsysResource

RAW_GROUP = "raw"
RAW_KEY_PREFIX = "raw"


def raw_table_key(table: str) -> dg.AssetKey:
    """`raw/<table>`: the asset key of a source table, named like its warehouse folder."""
    raw_table_path(table)  # an unknown table is refused here, not as a dangling dep
    return dg.AssetKey([RAW_KEY_PREFIX, table])


def raw_tables(*tables: str) -> list[dg.AssetKey]:
    """The keys of the source tables an asset reads, for its `deps`."""
    return [raw_table_key(table) for table in tables]


RAW_TABLE_SPECS = [
    dg.AssetSpec(
        raw_table_key(table),
        group_name=RAW_GROUP,
        description=f"{(contract.__doc__ or '').strip()} Written by `recsys seed` or "
        "`recsys import`; its data version is the raw snapshot id.",
        metadata={COLUMN_SCHEMA: column_schema(contract)},
        kinds={"parquet"},
    )
    for table, contract in RAW_CONTRACTS.items()
]


@dg.multi_observable_source_asset(specs=RAW_TABLE_SPECS, name="raw_tables")
def raw_table_observations(
    context: dg.AssetExecutionContext, recsys: RecsysResource
) -> Iterator[dg.ObserveResult]:
    """Every table shares the version of the snapshot that vouches for all of them together
    (raw/_snapshot.json): tables are only ever replaced as one snapshot."""
    warehouse = recsys.warehouse()
    snapshot = read_snapshot(warehouse)
    snapshot_id = str(snapshot["snapshot_id"])
    row_counts = snapshot.get("row_counts", {})
    context.log.info("raw snapshot %s (%s)", snapshot_id, warehouse.uri(SNAPSHOT_PATH))
    for table in RAW_CONTRACTS:
        metadata: dict[str, dg.RawMetadataValue] = {
            "snapshot_id": snapshot_id,
            "snapshot_source": str(snapshot.get("source", "unknown")),
            "snapshot_created_at": str(snapshot.get("created_at", "unknown")),
            LOCATION: warehouse_location(warehouse, raw_table_path(table)),
        }
        if table in row_counts:
            metadata[ROW_COUNT] = int(row_counts[table])
        yield dg.ObserveResult(
            asset_key=raw_table_key(table),
            data_version=dg.DataVersion(snapshot_id),
            metadata=metadata,
        )


observe_raw_tables_job = dg.define_asset_job(
    "observe_raw_tables",
    selection=dg.AssetSelection.groups(RAW_GROUP, include_sources=True),
    description="Record the current raw snapshot id as the data version of every source "
    "table (run after `recsys seed` / `recsys import`).",
)

RAW_ASSETS = [raw_table_observations]
RAW_JOBS = [observe_raw_tables_job]
