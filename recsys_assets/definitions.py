"""The Dagster code location: every asset, check, job, sensor and schedule, and their resources."""

from __future__ import annotations

import dagster as dg
from dagster_duckdb import DuckDBResource

from recsys_assets.automation.schedules import SCHEDULES
from recsys_assets.automation.sensors import SENSORS
from recsys_assets.evaluation.assets import evaluation
from recsys_assets.pipeline.assets import PIPELINE_ASSETS
from recsys_assets.pipeline.jobs import refresh_lists_job, train_model_bundle_job
from recsys_assets.pipeline.resources import RecsysResource
from recsys_assets.publish.assets import PUBLISH_ASSETS, PUBLISH_JOBS


def build_definitions(recsys: RecsysResource | None = None) -> dg.Definitions:
    """Definitions with `recsys` (default: warehouse and config from the environment)."""
    return dg.Definitions(
        assets=[*PIPELINE_ASSETS, *PUBLISH_ASSETS, evaluation],
        jobs=[train_model_bundle_job, refresh_lists_job, *PUBLISH_JOBS],
        sensors=SENSORS,
        schedules=SCHEDULES,
        resources={
            "recsys": recsys or RecsysResource(),
            # One in-memory database per connection: parallel steps never share a file.
            "duckdb": DuckDBResource(database=":memory:"),
        },
    )


defs = build_definitions()
