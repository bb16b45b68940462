"""End to end on tiny seeded data: a banned item disappears from served responses as soon
as the sensor has applied the file, and from the version the requested run publishes."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import dagster as dg
import pandas as pd
import yaml
from dagster_duckdb import DuckDBResource

from recsys_assets.automation.sensors import policy_change_sensor
from recsys_assets.config import load_settings
from recsys_assets.config.settings import DEFAULT_CONFIG_PATH
from recsys_assets.pipeline.assets import PIPELINE_ASSETS
from recsys_assets.pipeline.jobs import (
    MODEL_JOB,
    REFRESH_JOB,
    refresh_lists_job,
    train_model_bundle_job,
)
from recsys_assets.pipeline.resources import RecsysResource
from recsys_assets.publish.assets import PUBLISH_ASSETS
from recsys_assets.publish.manifest import read_manifest
from recsys_assets.serving.service import RecommendationService
from recsys_assets.warehouse import Warehouse
from recsys_assets_tests.automation.helpers import change, drop_file
from recsys_assets_tests.conftest import TINY_AS_OF

PARTITION = "na|home_feed"


def published_items(warehouse: Warehouse) -> set[int]:
    manifest = read_manifest(warehouse, "home_feed", "na")
    assert manifest is not None, "home_feed × na was not published"
    lists = warehouse.read_parquet(f"{manifest.active_path}/lists.parquet", columns=["item_id"])
    return set(lists["item_id"].astype(int))


def test_banned_item_leaves_served_responses_at_once_and_the_next_version(
    tiny_warehouse: Warehouse, instance: dg.DagsterInstance, tmp_path: Path
) -> None:
    # One training epoch: this test is about what happens to lists, not about the model.
    config = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    config["training"]["epochs"] = 1
    config_path = tmp_path / "surfaces.yaml"
    config_path.write_text(yaml.safe_dump(config))
    settings = load_settings(config_path)
    recsys = RecsysResource(
        warehouse_url=tiny_warehouse.url,
        config_path=str(config_path),
        score_time=TINY_AS_OF.isoformat(),
    )
    definitions = dg.Definitions(
        assets=[*PIPELINE_ASSETS, *PUBLISH_ASSETS],
        jobs=[train_model_bundle_job, refresh_lists_job],
        sensors=[policy_change_sensor],
        resources={"recsys": recsys, "duckdb": DuckDBResource(database=":memory:")},
    )
    assert definitions.resolve_job_def(MODEL_JOB).execute_in_process(instance=instance).success
    refresh = definitions.resolve_job_def(REFRESH_JOB)
    assert refresh.execute_in_process(partition_key=PARTITION, instance=instance).success

    clock = lambda: int(pd.Timestamp(TINY_AS_OF).value)  # noqa: E731
    service = RecommendationService(tiny_warehouse, settings, clock=clock)
    service.load()
    try:
        served = {}
        for subject in tiny_warehouse.read_parquet(
            "pipeline/subjects/surface=home_feed/region=na", columns=["subject_id"]
        )["subject_id"].head(20):
            response = service.recommend(int(subject), "home_feed", "na")
            if response.served_from == "precomputed" and response.items:
                served[int(subject)] = [item["item_id"] for item in response.items]
        assert served, "no subject got a precomputed list"
        subject, items = next(iter(served.items()))
        banned = items[0]
        assert banned in published_items(tiny_warehouse)

        effective = (TINY_AS_OF - timedelta(minutes=1)).isoformat()
        ban = change("e2e-ban", item_ids=[banned], region="na", effective_at=effective)
        drop_file(tiny_warehouse, "ban.jsonl", ban)
        with dg.build_sensor_context(
            instance=instance, definitions=definitions, resources={"recsys": recsys}
        ) as context:
            result = policy_change_sensor(context)
        requests = {request.partition_key: request for request in result.run_requests or []}
        assert PARTITION in requests

        # At once: the tombstone is honoured before any list is rebuilt.
        service.refresh()
        after = service.recommend(subject, "home_feed", "na")
        assert banned not in [item["item_id"] for item in after.items]
        assert after.rejections.get("tombstoned", 0) >= 1

        # The run the sensor requested publishes a version without the item.
        before_version = read_manifest(tiny_warehouse, "home_feed", "na").active_version  # type: ignore[union-attr]
        run = refresh.execute_in_process(
            partition_key=PARTITION, tags=requests[PARTITION].tags, instance=instance
        )
        assert run.success
        manifest = read_manifest(tiny_warehouse, "home_feed", "na")
        assert manifest is not None and manifest.active_version != before_version
        assert banned not in published_items(tiny_warehouse)
    finally:
        service.close()
