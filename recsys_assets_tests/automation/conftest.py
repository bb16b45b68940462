"""Dagster fixtures for automation tests: a real instance and a small code location."""

from __future__ import annotations

from collections.abc import Iterator

import dagster as dg
import pytest
from dagster_duckdb import DuckDBResource

from recsys_assets.automation.schedules import SCHEDULES
from recsys_assets.automation.sensors import SENSORS
from recsys_assets.pipeline.assets import PIPELINE_ASSETS
from recsys_assets.pipeline.jobs import refresh_lists_job
from recsys_assets.pipeline.resources import RecsysResource
from recsys_assets.publish.assets import PUBLISH_ASSETS
from recsys_assets.warehouse import Warehouse
from recsys_assets_tests.automation.helpers import NOW


@pytest.fixture(scope="session")
def instance() -> Iterator[dg.DagsterInstance]:
    """A real (temporary) Dagster instance: run storage, sensor and run-key bookkeeping.

    Shared by the automation tests; a test that adds a run deletes it again.
    """
    with dg.instance_for_test() as test_instance:
        yield test_instance


def recsys_for(warehouse: Warehouse) -> RecsysResource:
    """The resource pointed at `warehouse`, with the clock pinned at NOW."""
    return RecsysResource(warehouse_url=warehouse.url, score_time=NOW.isoformat())


def automation_definitions(warehouse: Warehouse) -> dg.Definitions:
    """The pipeline assets, refresh_lists, and this package's sensors and schedules."""
    return dg.Definitions(
        assets=[*PIPELINE_ASSETS, *PUBLISH_ASSETS],
        jobs=[refresh_lists_job],
        sensors=SENSORS,
        schedules=SCHEDULES,
        resources={"recsys": recsys_for(warehouse), "duckdb": DuckDBResource(database=":memory:")},
    )


def sensor_tick(
    sensor: dg.SensorDefinition,
    instance: dg.DagsterInstance,
    warehouse: Warehouse,
    cursor: str | None = None,
) -> dg.SensorResult:
    """One evaluation of `sensor` on a real instance, as the daemon would tick it."""
    # As a context manager: the instance and resources it opens are closed again.
    with dg.build_sensor_context(
        instance=instance,
        definitions=automation_definitions(warehouse),
        resources={"recsys": recsys_for(warehouse)},
        cursor=cursor,
    ) as context:
        result = sensor(context)
    assert isinstance(result, dg.SensorResult)
    return result
