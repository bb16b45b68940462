"""Regression (issue 12): a consent revocation posted to serving's events API reaches the
batch side. `recsys export` withholds the person's lists at once; the next `recsys run`
(the runner's Python API) selects them on no personalized surface, the enterprise action
queue included, so no published list holds them; a hide posted the same way never comes
back as a candidate; publish validation judged consent with the same facts.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest
import yaml
from fastapi.testclient import TestClient

from recsys_assets import cli
from recsys_assets.config import load_settings
from recsys_assets.config.settings import DEFAULT_CONFIG_PATH
from recsys_assets.definitions import build_definitions
from recsys_assets.pipeline.partitions import SurfaceRegion
from recsys_assets.pipeline.resources import RecsysResource
from recsys_assets.pipeline.runner import run_pipeline
from recsys_assets.publish.manifest import active_lists, read_manifest
from recsys_assets.publish.validation import PERSON_RULES_APPLIED
from recsys_assets.serving.api import create_app
from recsys_assets.serving.service import RecommendationService
from recsys_assets.warehouse import Warehouse
from recsys_assets_tests.conftest import TINY_AS_OF
from recsys_assets_tests.serving.conftest import TOKENS, WRITER

QUEUE, HOME = "enterprise_action_queue", "home_feed"
PARTITIONS = [SurfaceRegion(QUEUE, "na"), SurfaceRegion(HOME, "na")]


@dataclass
class Pipeline:
    warehouse: Warehouse
    definitions: dg.Definitions
    instance: dg.DagsterInstance
    config_path: Path

    def run(self, *, train_model: bool) -> None:
        outcomes = run_pipeline(
            self.definitions,
            self.instance,
            PARTITIONS,
            train_model=train_model,
            progress=lambda message: None,
        )
        assert all(outcome.success for outcome in outcomes), [o.error for o in outcomes]

    def published(self, surface: str) -> pd.DataFrame:
        return active_lists(self.warehouse, surface, "na")


@pytest.fixture
def pipeline(tiny_warehouse: Warehouse, tmp_path: Path) -> Iterator[Pipeline]:
    # One training epoch: this test is about who gets a list, not about the model.
    config = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    config["training"]["epochs"] = 1
    config_path = tmp_path / "surfaces.yaml"
    config_path.write_text(yaml.safe_dump(config))
    recsys = RecsysResource(
        warehouse_url=tiny_warehouse.url,
        config_path=str(config_path),
        score_time=TINY_AS_OF.isoformat(),
    )
    with dg.instance_for_test() as instance:
        yield Pipeline(tiny_warehouse, build_definitions(recsys), instance, config_path)


def _export(surface: str, out: Path, capsys: pytest.CaptureFixture[str]) -> tuple[set[int], str]:
    """`recsys export` of the partition: (subjects exported, what it printed)."""
    capsys.readouterr()
    assert cli.main(["export", "--surface", surface, "--region", "na", "--out", str(out)]) == 0
    return set(pd.read_parquet(out)["subject_id"].astype(int)), capsys.readouterr().out


def test_a_revocation_posted_to_serving_is_honoured_by_export_and_the_next_run(
    pipeline: Pipeline, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pipeline.run(train_model=True)
    queue, home = pipeline.published(QUEUE), pipeline.published(HOME)
    agents = set(queue["subject_id"].astype(int)) & set(home["subject_id"].astype(int))
    assert agents, "tiny seed changed: no subject has both an action queue and a home feed"
    agent = min(agents)
    consumer = int(home.loc[~home["subject_id"].isin(agents), "subject_id"].iloc[0])
    hidden = int(home.loc[home["subject_id"] == consumer, "item_id"].iloc[0])

    settings = load_settings(pipeline.config_path)
    service = RecommendationService(
        pipeline.warehouse, settings, clock=lambda: int(pd.Timestamp(TINY_AS_OF).value)
    )
    service.load()
    app = create_app(service, tokens=TOKENS)
    with TestClient(app, headers={"Authorization": f"Bearer {WRITER}"}) as client:
        for event in (
            {"type": "consent_revoked", "user_id": agent},
            {"type": "hide_item", "user_id": consumer, "item_id": hidden},
        ):
            assert client.post("/v1/events", json=event).status_code == 202
        served = client.get(
            f"/v1/recommendations/{QUEUE}", params={"subject_id": agent, "region": "na"}
        ).json()
    assert served["served_from"] != "precomputed"

    # Export, before any rerun: the published lists still hold the agent; export withholds.
    for surface in (QUEUE, HOME):
        exported, printed = _export(surface, tmp_path / f"{surface}.parquet", capsys)
        assert agent not in exported
        assert f"withheld 1 list(s) of people who may not get {surface} now" in printed

    pipeline.run(train_model=False)
    for surface in (QUEUE, HOME):
        subjects = pipeline.warehouse.read_parquet(f"pipeline/subjects/surface={surface}/region=na")
        assert agent not in set(subjects["subject_id"].astype(int))
        assert agent not in set(pipeline.published(surface)["subject_id"].astype(int))
        manifest = read_manifest(pipeline.warehouse, surface, "na")
        assert manifest is not None and manifest.validation is not None
        metrics = manifest.validation["metrics"]
        assert metrics["person_rules"] == PERSON_RULES_APPLIED
        assert metrics["lists_without_consent"] == 0
        exported, printed = _export(surface, tmp_path / f"{surface}-rerun.parquet", capsys)
        assert agent not in exported
        assert "withheld 0 list(s)" in printed
    home = pipeline.published(HOME)
    assert consumer in set(home["subject_id"].astype(int))
    assert hidden not in set(home.loc[home["subject_id"] == consumer, "item_id"].astype(int))
