"""deploy/dagster.postgres.yaml: a Dagster instance whose runs and event logs live in a real
PostgreSQL server, configured from the environment, runs the pipeline."""

from __future__ import annotations

import shutil
from pathlib import Path

import dagster as dg
import psycopg2
import pytest

from recsys_assets.definitions import build_definitions
from recsys_assets.deployment import DEPLOYMENT_ENV_VAR
from recsys_assets.pipeline.jobs import REFRESH_JOB
from recsys_assets.pipeline.resources import RecsysResource
from recsys_assets.warehouse import Warehouse
from recsys_assets_tests.deployment.conftest import (
    PARTITION,
    SCORE_TIME,
    published,
    refresh_run_config,
)
from recsys_assets_tests.deployment.services import REPO_ROOT, postgres_server

POSTGRES_INSTANCE = REPO_ROOT / "deploy" / "dagster.postgres.yaml"
_ENV = {
    "host": "DAGSTER_PG_HOST",
    "port": "DAGSTER_PG_PORT",
    "user": "DAGSTER_PG_USER",
    "password": "DAGSTER_PG_PASSWORD",
    "dbname": "DAGSTER_PG_DB",
}


def test_pipeline_runs_on_a_postgres_instance(
    trained_warehouse: Warehouse, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(DEPLOYMENT_ENV_VAR, raising=False)
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copyfile(POSTGRES_INSTANCE, home / "dagster.yaml")
    definitions = build_definitions(
        RecsysResource(warehouse_url=trained_warehouse.url, score_time=SCORE_TIME)
    )
    with postgres_server() as server:
        for key, variable in _ENV.items():
            monkeypatch.setenv(variable, server[key])
        with dg.DagsterInstance.from_config(str(home)) as instance:
            assert type(instance.run_storage).__name__ == "PostgresRunStorage"
            refreshed = definitions.resolve_job_def(REFRESH_JOB).execute_in_process(
                instance=instance,
                partition_key=PARTITION.to_key(),
                run_config=refresh_run_config(trained_warehouse),
            )
            assert refreshed.success
            assert [run.run_id for run in instance.get_runs()] == [refreshed.run_id]
            materialized = instance.get_latest_materialization_event(dg.AssetKey("published_lists"))
            assert materialized is not None and materialized.run_id == refreshed.run_id
        with psycopg2.connect(**server) as connection, connection.cursor() as cursor:
            cursor.execute("SELECT run_id, status FROM runs")
            runs = dict(cursor.fetchall())
            cursor.execute(
                "SELECT count(*) FROM event_logs WHERE run_id = %s AND dagster_event_type = %s",
                (refreshed.run_id, "ASSET_MATERIALIZATION"),
            )
            (materializations,) = cursor.fetchone()
        connection.close()
    assert runs == {refreshed.run_id: "SUCCESS"}
    assert materializations >= len(("subjects", "candidate_pools", "published_lists"))
    assert not published(trained_warehouse).empty
