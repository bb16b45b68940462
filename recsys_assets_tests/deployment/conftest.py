"""A trained model bundle (once per session) and one partition refreshed on the local
deployment: the reference each distributed deployment's run must reproduce."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd
import pytest

from recsys_assets.definitions import build_definitions
from recsys_assets.deployment import DEPLOYMENT_ENV_VAR
from recsys_assets.pipeline.jobs import MODEL_JOB, REFRESH_JOB
from recsys_assets.pipeline.partitions import SurfaceRegion
from recsys_assets.pipeline.resources import RecsysResource
from recsys_assets.publish.manifest import active_lists
from recsys_assets.warehouse import WAREHOUSE_ENV_VAR, Warehouse
from recsys_assets_tests.conftest import TINY_AS_OF

SCORE_TIME = pd.Timestamp(TINY_AS_OF).isoformat()
PARTITION = SurfaceRegion("home_feed", "na")
PER_RUN_COLUMNS = ["list_id", "version", "pipeline_run_id"]
"""List columns that name the run or version that wrote them; everything else must agree."""


def refresh_run_config(warehouse: Warehouse) -> dict[str, Any]:
    """The refresh run's config: the warehouse and the pinned clock travel with the run, so
    every process that executes one of its steps scores as of the same time."""
    return {
        "resources": {
            "recsys": {"config": {"warehouse_url": warehouse.url, "score_time": SCORE_TIME}}
        }
    }


def published(warehouse: Warehouse) -> pd.DataFrame:
    """The partition's active lists without the per-run columns."""
    lists = active_lists(warehouse, PARTITION.surface, PARTITION.region)
    return lists.drop(columns=PER_RUN_COLUMNS).reset_index(drop=True)


@dataclass(frozen=True)
class LocalReference:
    warehouse: Warehouse
    lists: pd.DataFrame


@pytest.fixture(scope="session")
def trained_root(tiny_raw_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny raw tables and a model bundle trained on them (local deployment), once."""
    root = tmp_path_factory.mktemp("trained")
    shutil.copytree(tiny_raw_root, root / "raw")
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv(DEPLOYMENT_ENV_VAR, raising=False)
        definitions = build_definitions(
            RecsysResource(warehouse_url=root.as_uri(), score_time=SCORE_TIME)
        )
        with dg.instance_for_test() as instance:
            trained = definitions.resolve_job_def(MODEL_JOB).execute_in_process(instance=instance)
    assert trained.success
    return root


@pytest.fixture
def trained_warehouse(
    trained_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Warehouse:
    """A fresh copy of the trained warehouse, also selected via the env var."""
    root = tmp_path / "trained_warehouse"
    shutil.copytree(trained_root, root)
    monkeypatch.setenv(WAREHOUSE_ENV_VAR, root.as_uri())
    return Warehouse(root.as_uri())


@pytest.fixture
def local_reference(
    trained_warehouse: Warehouse, monkeypatch: pytest.MonkeyPatch
) -> Iterator[LocalReference]:
    """PARTITION refreshed on the local deployment, in its own throwaway instance; the
    lists it published."""
    monkeypatch.delenv(DEPLOYMENT_ENV_VAR, raising=False)
    definitions = build_definitions(
        RecsysResource(warehouse_url=trained_warehouse.url, score_time=SCORE_TIME)
    )
    with dg.instance_for_test() as instance:
        refreshed = definitions.resolve_job_def(REFRESH_JOB).execute_in_process(
            instance=instance,
            partition_key=PARTITION.to_key(),
            run_config=refresh_run_config(trained_warehouse),
        )
        assert refreshed.success
    yield LocalReference(trained_warehouse, published(trained_warehouse))


def partition_tags(job: dg.JobDefinition) -> dict[str, str]:
    """The run tags that make a run of `job` a run of PARTITION."""
    assert job.partitions_def is not None
    return dict(job.partitions_def.get_tags_for_partition_key(PARTITION.to_key()))
