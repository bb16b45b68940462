"""RECSYS_DEPLOYMENT=celery: a partition's steps run on two real Celery workers behind a
real Redis broker, and publish the same lists as the local deployment."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest
import yaml

from recsys_assets.config.settings import CONFIG_ENV_VAR, DEFAULT_CONFIG_PATH
from recsys_assets.deployment import DEPLOYMENT_ENV_VAR
from recsys_assets.deployment.deployments import CELERY_BROKER_ENV_VAR
from recsys_assets.publish.lists import TRACKING_SECRET_ENV_VAR
from recsys_assets.warehouse import WAREHOUSE_ENV_VAR, Warehouse
from recsys_assets_tests.deployment import jobs
from recsys_assets_tests.deployment.conftest import (
    LocalReference,
    partition_tags,
    published,
    refresh_run_config,
)
from recsys_assets_tests.deployment.services import CeleryWorkers, celery_workers, redis_server

ENGINE_EVENT = dg.DagsterEventType.ENGINE_EVENT


@dataclass(frozen=True)
class CeleryCluster:
    environment: dict[str, str]
    """What a process of the celery deployment has in its environment."""
    workers: CeleryWorkers


SHARDS = 3


@pytest.fixture
def celery_cluster(
    trained_warehouse: Warehouse,
    tracking_secret: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[CeleryCluster]:
    """Redis and two workers, still starting (they import the code location meanwhile).
    The configuration splits a partition into SHARDS shards, here and in the workers (and
    so in the local reference run too)."""
    config = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text(encoding="utf-8"))
    config["pipeline"]["shards"] = SHARDS
    config_path = tmp_path / "surfaces.yaml"
    config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
    monkeypatch.setenv(CONFIG_ENV_VAR, str(config_path))
    with redis_server(tmp_path / "redis") as broker:
        environment = {
            DEPLOYMENT_ENV_VAR: "celery",
            CELERY_BROKER_ENV_VAR: broker,
            CONFIG_ENV_VAR: str(config_path),
            WAREHOUSE_ENV_VAR: trained_warehouse.url,
            TRACKING_SECRET_ENV_VAR: tracking_secret,
        }
        with celery_workers(2, environment, tmp_path / "workers", preload=jobs.__name__) as workers:
            yield CeleryCluster(environment, workers)


# dagster-celery's executor registers its task on a new app for each run it polls.
@pytest.mark.filterwarnings("ignore::celery.exceptions.DuplicateTaskNameWarning")
def test_celery_run_publishes_the_local_lists(
    celery_cluster: CeleryCluster,
    local_reference: LocalReference,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    warehouse = local_reference.warehouse
    for name, value in celery_cluster.environment.items():
        monkeypatch.setenv(name, value)
    job = dg.reconstructable(jobs.refresh_lists_job)
    assert job.get_definition().executor_def.name == "celery"
    celery_cluster.workers.wait_ready()
    dagster_home = tmp_path / "dagster_home"
    dagster_home.mkdir()
    with dg.instance_for_test(temp_dir=str(dagster_home)) as instance:
        result = dg.execute_job(
            job,
            instance=instance,
            run_config=refresh_run_config(warehouse),
            tags=partition_tags(job.get_definition()),
        )
        assert result.success, celery_cluster.workers.log_tails()
        steps_by_worker = [
            (data.metadata["Celery worker"].value, data.metadata["step_keys"].value)
            for record in instance.all_logs(result.run_id, of_type=ENGINE_EVENT)
            if record.dagster_event is not None
            and (data := record.dagster_event.event_specific_data) is not None
            and "Celery worker" in data.metadata
        ]
    assert {worker for worker, _ in steps_by_worker} <= set(celery_cluster.workers.names)
    scoring_steps = {step for _, step in steps_by_worker if "scored_candidates_shard[" in step}
    assert len(scoring_steps) == SHARDS, steps_by_worker
    pd.testing.assert_frame_equal(published(warehouse), local_reference.lists)


def test_a_worker_without_a_broker_says_which_variable() -> None:
    environment = {k: v for k, v in os.environ.items() if k != CELERY_BROKER_ENV_VAR}
    worker = subprocess.run(
        [sys.executable, "-c", "import recsys_assets.deployment.celery_worker"],
        env=environment,
        capture_output=True,
        text=True,
    )
    assert worker.returncode != 0
    assert f"a Celery worker needs {CELERY_BROKER_ENV_VAR}" in worker.stderr
