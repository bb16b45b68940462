"""The Dagster code location: every asset, check, job, sensor and schedule, and their resources."""

from __future__ import annotations

import dagster as dg
from dagster_duckdb import DuckDBResource

from recsys_assets.pipeline.assets import PIPELINE_ASSETS
from recsys_assets.pipeline.resources import RecsysResource


def build_definitions(recsys: RecsysResource | None = None) -> dg.Definitions:
    """Definitions with `recsys` (default: warehouse and config from the environment)."""
    return dg.Definitions(
        assets=[*PIPELINE_ASSETS],
        resources={
            "recsys": recsys or RecsysResource(),
            # One in-memory database per connection: parallel steps never share a file.
            "duckdb": DuckDBResource(database=":memory:"),
        },
    )


defs = build_definitions()
