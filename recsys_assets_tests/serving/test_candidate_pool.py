"""Candidate-pool serving on lists the real pipeline published: a home_feed × na partition
materialized by Dagster with `storage_mode: candidate_pool`, served by the online rerank."""

from __future__ import annotations

import json
import shutil
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest
import yaml
from fastapi.testclient import TestClient

from recsys_assets.config import Settings, load_settings
from recsys_assets.config.settings import DEFAULT_CONFIG_PATH
from recsys_assets.data.snapshot import read_raw
from recsys_assets.definitions import build_definitions
from recsys_assets.pipeline.partitions import SurfaceRegion
from recsys_assets.pipeline.resources import RecsysResource
from recsys_assets.pipeline.runner import run_pipeline
from recsys_assets.publish.lists import SHORTLIST_COLUMNS
from recsys_assets.publish.manifest import read_manifest
from recsys_assets.serving.api import create_app
from recsys_assets.serving.decision_log import DECISION_LOG_PREFIX, DecisionLog
from recsys_assets.serving.rerank import BUDGET_EXCEEDED, RERANKED
from recsys_assets.serving.service import RecommendationService
from recsys_assets.serving.state import ServingEvent
from recsys_assets.warehouse import Warehouse
from recsys_assets_tests.conftest import TINY_AS_OF
from recsys_assets_tests.serving.conftest import Clock

SURFACE, REGION = "home_feed", "na"
SHORTLIST_SIZE = 300
OVERLAY_SHARE = 0.2


@dataclass
class Published:
    warehouse: Warehouse
    settings: Settings
    config_path: Path
    version: str


@pytest.fixture(scope="module")
def published(tiny_raw_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Published]:
    """home_feed × na through the whole graph (bundle, subjects … slates, published_lists)
    in real Dagster runs, with home_feed stored as candidate pools."""
    root = tmp_path_factory.mktemp("candidate_pool")
    shutil.copytree(tiny_raw_root, root / "warehouse" / "raw")
    warehouse = Warehouse((root / "warehouse").as_uri())
    data = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    data["surfaces"][SURFACE].update(
        storage_mode="candidate_pool",
        serving_mode="candidate_pool_rerank",
        candidate_pool={
            "shortlist_size": SHORTLIST_SIZE,
            "overlay_share": OVERLAY_SHARE,
            # Generous: these tests judge what the rerank does, on a busy shared machine.
            "latency_budget_ms": 10_000,
        },
    )
    data["pipeline"]["shards"] = 2  # shortlists of hash-sharded subjects, merged for publish
    config_path = root / "surfaces.yaml"
    config_path.write_text(yaml.safe_dump(data))
    settings = load_settings(config_path)
    definitions = build_definitions(
        RecsysResource(
            warehouse_url=warehouse.url,
            config_path=str(config_path),
            score_time=pd.Timestamp(TINY_AS_OF).isoformat(),
        )
    )
    with dg.instance_for_test() as instance:
        (outcome,) = run_pipeline(
            definitions,
            instance,
            [SurfaceRegion(SURFACE, REGION)],
            train_model=True,
            progress=lambda message: None,
        )
    assert outcome.success, outcome.error
    manifest = read_manifest(warehouse, SURFACE, REGION)
    assert manifest is not None
    yield Published(warehouse, settings, config_path, manifest.active_version)


def _service(published: Published, settings: Settings | None = None) -> RecommendationService:
    service = RecommendationService(
        published.warehouse,
        settings or published.settings,
        clock=Clock(TINY_AS_OF + timedelta(minutes=30)),
        decision_log=DecisionLog(published.warehouse, flush_interval_s=0.2),
        poll_interval_s=0.05,
    )
    service.load()
    return service


def _subjects(service: RecommendationService) -> list[int]:
    version = service.store.lists(SURFACE, REGION).personalized
    assert version is not None
    return [int(subject) for subject in version.subject_ids]


def _shortlist_items(service: RecommendationService, subject_id: int) -> list[int]:
    version = service.store.lists(SURFACE, REGION).personalized
    assert version is not None
    index = version.find_subject(subject_id)
    return version.item_ids[int(version.starts[index]) : int(version.starts[index + 1])].tolist()


def _outcomes(service: RecommendationService) -> dict[str, float]:
    samples = service.candidate_pool.requests.collect()[0].samples
    return {s.labels["outcome"]: s.value for s in samples if s.name.endswith("_total")}


def test_publish_stores_validated_shortlists_with_features(published: Published) -> None:
    manifest = read_manifest(published.warehouse, SURFACE, REGION)
    assert manifest is not None and manifest.validation["passed"]
    lists = published.warehouse.read_parquet(f"{manifest.active_path}/lists.parquet")
    assert set(SHORTLIST_COLUMNS) <= set(lists.columns)
    lengths = lists.groupby("subject_id").size()
    assert lengths.max() <= SHORTLIST_SIZE
    store_depth = published.settings.surface(SURFACE).store_depth
    assert lengths.max() > store_depth  # more than a slate: candidates to rerank from
    assert not lists.duplicated(["subject_id", "item_id"]).any()
    for _, rows in lists.groupby("subject_id"):
        flags = rows.sort_values("position")["in_slate"].to_numpy()
        assert flags.sum() <= store_depth
        assert (np.diff(flags.astype(int)) <= 0).all()  # the stored slate comes first
        assert rows["position"].tolist() == list(range(1, len(rows) + 1))
    features = lists[[c for c in SHORTLIST_COLUMNS if c.startswith("f_")]].to_numpy()
    assert np.isfinite(features).all() and (features != 0).any(axis=0).sum() > 10


def test_click_on_a_category_after_generation_moves_it_up(published: Published) -> None:
    """Interactions since generation (purchases recorded as serving events) and the
    session's clicks (the request's context) raise a category's share of the top slots."""
    service = _service(published)
    items = read_raw(published.warehouse, "items").set_index("item_id")
    now = TINY_AS_OF + timedelta(minutes=30)
    before = after = 0
    for subject_id in _subjects(service)[:12]:
        listed = _shortlist_items(service, subject_id)
        served = [i["item_id"] for i in service.recommend(subject_id, SURFACE, REGION).items]
        categories = items.loc[listed, "category"]
        served_categories = items.loc[served, "category"].tolist()
        counts = categories.value_counts()
        target = min(counts[counts >= 5].index, key=served_categories.count)
        outside = items.index[(items["category"] == target) & ~items.index.isin(listed)]
        clicked, bought = [int(i) for i in outside[:2]], [int(i) for i in outside[2:5]]
        service.record_events(
            ServingEvent("purchase", subject_id, item_id, region=REGION,
                         ts=now - timedelta(minutes=5))
            for item_id in bought
        )  # fmt: skip
        reranked = service.recommend(
            subject_id, SURFACE, REGION, context={"session_item_ids": clicked}
        )
        before += served_categories.count(target)
        after += (
            items.loc[[i["item_id"] for i in reranked.items], "category"].tolist().count(target)
        )
    assert after > before
    assert _outcomes(service).get(RERANKED, 0) >= 24
    service.close()


def _with_new_items(published: Published, folder: Path, count: int) -> tuple[Published, list[int]]:
    """A copy of the published warehouse whose catalog gained `count` plain items after the
    lists were generated (copies of an eligible item under new ids)."""
    copy = folder / "warehouse"
    shutil.copytree(Path(published.warehouse.path("")), copy)
    warehouse = Warehouse(copy.as_uri())
    items = read_raw(warehouse, "items")
    plain = items[
        (items["status"] == "active")
        & (items["policy_state"] == "approved")
        & (items["regions"] == "*")
        & (items["stock"] != 0)
        & ~items["is_sponsored"]
        & items["tenant_id"].isna()
        & items["required_role"].isna()
    ]
    new = pd.concat([plain.iloc[[0]]] * count, ignore_index=True)
    new["item_id"] = int(items["item_id"].max()) + 1 + np.arange(count)
    new["creator_id"] = [f"creator_new_{n}" for n in range(count)]
    new["created_at"] = pd.Timestamp(TINY_AS_OF + timedelta(minutes=10))
    warehouse.write_parquet("raw/items/part-00000.parquet", pd.concat([items, new]))
    return (
        Published(warehouse, published.settings, published.config_path, published.version),
        new["item_id"].astype(int).tolist(),
    )


def test_overlays_take_their_configured_share(published: Published, tmp_path: Path) -> None:
    """Fresh items fill `overlay_share` of the slots, each saying which fresh source it came
    from: trending in the region (serving events of the last hour) and items created after
    the list was generated."""
    fresh, new_items = _with_new_items(published, tmp_path, 12)
    service = _service(fresh)
    subject_id, *others = _subjects(service)[:6]
    trending = new_items[:6]
    now = TINY_AS_OF + timedelta(minutes=30)
    service.record_events(
        ServingEvent("purchase", other, item_id, region=REGION, ts=now - timedelta(minutes=10))
        for other in others
        for item_id in trending
    )
    for limit in (20, 10):
        response = service.recommend(subject_id, SURFACE, REGION, limit=limit)
        overlay = [i for i in response.items if i["source_provenance"][0].startswith("overlay_")]
        assert len(response.items) == limit
        assert len(overlay) == round(OVERLAY_SHARE * limit)
        for item in overlay:
            source = "overlay_trending" if item["item_id"] in trending else "overlay_new_item"
            assert item["source_provenance"] == (source,)
            assert item["item_id"] in new_items
    samples = service.candidate_pool.overlay_items.collect()[0].samples
    assert sum(s.value for s in samples if s.name.endswith("_total")) == 4 + 2
    service.close()


def test_exploration_propensities_are_logged_and_sum_to_one(published: Published) -> None:
    """Each served slot's seed and propensity are in the decision log; over many requests
    the first exploration slot's items are drawn as often as their propensity says, and
    the propensities of the items that can be drawn there sum to 1."""
    service = _service(published)
    service.decision_log.start()
    subject_id = _subjects(service)[1]
    requests = 300
    ids = {service.recommend(subject_id, SURFACE, REGION).request_id for _ in range(requests)}
    service.close()
    log = published.warehouse.read_parquet(
        f"{DECISION_LOG_PREFIX}/date={(TINY_AS_OF + timedelta(minutes=30)).date()}"
    )
    mine = log[log["request_id"].isin(ids)]
    details = [json.loads(context)["serving_detail"] for context in mine["context"]]
    assert len(details) == requests
    seeds = {detail["exploration_seed"] for detail in details}
    assert len(seeds) == len(details)  # a fresh seed per request
    first_slot: dict[int, list[float]] = defaultdict(list)
    for detail in details:
        explored = [slot for slot in detail["slots"] if slot["exploration"]]
        assert all(0 < slot["propensity"] <= 1 for slot in explored)
        assert all(slot["propensity"] == 1.0 for slot in detail["slots"] if not slot["exploration"])
        if explored:
            first_slot[explored[0]["item_id"]].append(explored[0]["propensity"])
    assert first_slot, "the subject's shortlist has no exploration candidates"
    drawn = sum(len(found) for found in first_slot.values())
    probability = {item: float(np.mean(found)) for item, found in first_slot.items()}
    for item, found in first_slot.items():
        assert max(found) - min(found) < 1e-9  # one item, one step-0 probability
        assert abs(len(found) / drawn - probability[item]) < 0.1
    assert 0.9 < sum(probability.values()) <= 1.0 + 1e-9


def test_over_the_latency_budget_serves_the_batch_order_and_counts_it(
    published: Published,
) -> None:
    surface = published.settings.surface(SURFACE)
    tight = surface.model_copy(
        update={
            "candidate_pool": surface.candidate_pool.model_copy(update={"latency_budget_ms": 1e-6})
        }
    )
    settings = published.settings.model_copy(
        update={"surfaces": {**published.settings.surfaces, SURFACE: tight}}
    )
    service = _service(published, settings)
    subject_id = _subjects(service)[2]
    response = service.recommend(subject_id, SURFACE, REGION)
    assert response.served_from == "precomputed"
    listed = _shortlist_items(service, subject_id)
    at = [listed.index(item["item_id"]) for item in response.items]
    assert len(at) == published.settings.surface(SURFACE).display_count
    assert at == sorted(at)  # the shortlist's own (batch) order
    assert _outcomes(service) == {BUDGET_EXCEEDED: 1.0}
    service.close()


def test_candidate_pool_over_http(published: Published) -> None:
    """A real request through the FastAPI app: the rerank answers with the request's
    session context, and /metrics counts the outcome."""
    service = _service(published)
    subject_id = _subjects(service)[3]
    items = read_raw(published.warehouse, "items")
    category = str(items["category"].iloc[0])
    with TestClient(create_app(service)) as client:
        response = client.get(
            f"/v1/recommendations/{SURFACE}",
            params={
                "subject_id": subject_id,
                "region": REGION,
                "session_item_ids": [int(items["item_id"].iloc[0])],
                "category_intent": category,
            },
        )
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["served_from"] == "precomputed"
        assert body["version"] == published.version
        assert len(body["items"]) == published.settings.surface(SURFACE).display_count
        assert all(item["score"] is not None for item in body["items"])
        bad = client.get(
            f"/v1/recommendations/{SURFACE}",
            params={"subject_id": subject_id, "region": REGION, "session_item_ids": "x"},
        )
        assert bad.status_code == 422
        metrics = client.get("/metrics").text
    assert (
        'recsys_candidate_pool_requests_total{outcome="reranked",region="na",surface="home_feed"}'
        in metrics
    )
