"""Candidate-pool serving on lists the real pipeline published: a home_feed × na partition
materialized by Dagster with `storage_mode: candidate_pool`, served by the online rerank,
and by `final_slate` (the stored slate only) in an experiment against it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
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
from recsys_assets_tests.serving.decisions import read_decision_log

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


def _slate_vs_rerank(published: Published, folder: Path) -> Published:
    """A copy of the published warehouse (hides recorded there stay there), served with an
    experiment of final slates against the online rerank, loaded from a YAML file."""
    copy = folder / "warehouse"
    shutil.copytree(Path(published.warehouse.path("")), copy)
    data = yaml.safe_load(published.config_path.read_text())
    data["surfaces"][SURFACE]["experiment"] = {
        "id": "slate_vs_rerank",
        "arms": {
            "control": {"serving_mode": "final_slate", "weight": 1},
            "rerank": {"serving_mode": "candidate_pool_rerank", "weight": 1},
        },
    }
    config_path = folder / "surfaces.yaml"
    config_path.write_text(yaml.safe_dump(data))
    return Published(
        Warehouse(copy.as_uri()), load_settings(config_path), config_path, published.version
    )


def _stored_slates(published: Published) -> dict[int, list[int]]:
    """Subject → the stored slate of their shortlist (the `in_slate` rows), in order."""
    manifest = read_manifest(published.warehouse, SURFACE, REGION)
    assert manifest is not None
    lists = published.warehouse.read_parquet(f"{manifest.active_path}/lists.parquet")
    slates = lists[lists["in_slate"].to_numpy(dtype=bool)].sort_values(["subject_id", "position"])
    return {int(s): rows["item_id"].tolist() for s, rows in slates.groupby("subject_id")}


def test_experiment_serves_the_stored_slate_in_one_arm_and_reranks_in_the_other(
    published: Published, tmp_path: Path
) -> None:
    """final_slate on a candidate-pool surface serves exactly the stored slate: in order,
    and when its items are rejected the fill tops up from the fallback lists, never from
    the shortlist's deeper candidates (which never went through the batch slate policy).
    The other arm reranks; the decision log records each request's arm and mode."""
    experiment = _slate_vs_rerank(published, tmp_path)
    service = _service(experiment)
    slates = _stored_slates(experiment)
    display_count = experiment.settings.surface(SURFACE).display_count
    arms = {subject: service.experiments[SURFACE].assign(subject).arm for subject in slates}
    control = [s for s, arm in arms.items() if arm == "control"]
    rerank = [s for s, arm in arms.items() if arm == "rerank"]
    assert len(control) >= 3 and len(rerank) >= 2
    hidden_subject = control[0]
    hidden = slates[hidden_subject][:-3]  # the whole stored slate but its last three items
    now = TINY_AS_OF + timedelta(minutes=30)
    service.record_events(
        ServingEvent("hide_item", hidden_subject, item_id, ts=now - timedelta(minutes=1))
        for item_id in hidden
    )
    served: dict[int, dict] = {}
    with TestClient(create_app(service)) as client:
        for subject_id in [*control[:3], *rerank[:2]]:
            response = client.get(
                f"/v1/recommendations/{SURFACE}",
                params={"subject_id": subject_id, "region": REGION},
            )
            assert response.status_code == 200, response.text
            served[subject_id] = response.json()
    service.close()  # flushes the decision log
    assert _outcomes(service) == {RERANKED: 2.0}  # the control arm never reranked

    for subject_id in control[1:3]:
        body, slate = served[subject_id], slates[subject_id]
        assert body["experiment"] == {"id": "slate_vs_rerank", "arm": "control"}
        assert body["served_from"] == "precomputed"
        items = [item["item_id"] for item in body["items"]]
        assert all(item["fallback_score"] is None for item in body["items"])
        assert set(items) <= set(slate)
        assert [slate.index(item) for item in items] == sorted(slate.index(i) for i in items)
        passed = len(slate) - sum(body["rejections"].values())  # only slate rows checked
        assert len(items) == min(display_count, passed)

    body = served[hidden_subject]
    own = [item["item_id"] for item in body["items"] if item["fallback_score"] is None]
    topped_up = [item for item in body["items"] if item["fallback_score"] is not None]
    assert body["served_from"] == "precomputed" and own
    assert own == [item for item in slates[hidden_subject][-3:] if item in own]
    assert topped_up  # the rest comes from the fallback lists, not from the deeper pool
    assert body["rejections"]["hidden_by_user"] >= len(hidden)

    for subject_id in rerank[:2]:
        body = served[subject_id]
        assert body["experiment"] == {"id": "slate_vs_rerank", "arm": "rerank"}
        assert len(body["items"]) == display_count
        assert all(item["score"] is not None for item in body["items"])

    log = read_decision_log(experiment.warehouse)
    log = log[log["request_id"].isin([body["request_id"] for body in served.values()])]
    assert len(log) == len(served)
    for row in log.itertuples():
        arm = arms[row.subject_id]
        assert (row.experiment_id, row.experiment_arm) == ("slate_vs_rerank", arm)
        mode = "final_slate" if arm == "control" else "candidate_pool_rerank"
        assert row.serving_mode == mode
        context = json.loads(row.context) if isinstance(row.context, str) else {}
        detail = context.get("serving_detail")
        assert (detail is not None) == (arm == "rerank")
        if detail is not None:
            assert len(detail["slots"]) == display_count


def test_a_final_slate_surface_never_loads_the_rerank_or_torch(published: Published) -> None:
    """Serving without candidate-pool surfaces (the packaged configuration) builds no
    CandidatePoolServing and never imports torch, through loading the published lists and
    answering a request (a fresh interpreter: this test process's own imports do not count)."""
    manifest = read_manifest(published.warehouse, SURFACE, REGION)
    assert manifest is not None
    lists = published.warehouse.read_parquet(
        f"{manifest.active_path}/lists.parquet", columns=["subject_id"]
    )
    subject_id = int(lists["subject_id"].iloc[0])
    script = (
        "import sys\n"
        "from recsys_assets.serving.api import create_app\n"
        "from recsys_assets.serving.service import RecommendationService\n"
        "from recsys_assets.warehouse import Warehouse\n"
        f"service = RecommendationService(Warehouse({published.warehouse.url!r}))\n"
        "create_app(service)\n"
        "service.load()\n"
        f"service.recommend({subject_id}, {SURFACE!r}, {REGION!r})\n"
        "assert service.candidate_pool is None, 'rerank built'\n"
        "assert 'candidate_pool_rerank' not in service.serving_modes\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env={**os.environ, "RECSYS_CONFIG": str(DEFAULT_CONFIG_PATH)},
        check=False,
    )
    assert result.returncode == 0, result.stderr
