"""Issue 12 regressions: hostile ids cannot stop the decision log, client errors are 4xx,
a missing raw snapshot or manifest degrades serving instead of breaking it, and the person
rules (consent everywhere, consumed = click/purchase/rating) hold online."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pandas as pd
import pytest
from fastapi.testclient import TestClient

from recsys_assets.data.snapshot import SNAPSHOT_PATH, read_raw
from recsys_assets.serving.api import create_app
from recsys_assets.serving.decision_log import DECISION_LOG_PREFIX, DecisionLog
from recsys_assets.serving.service import InvalidSubject
from recsys_assets_tests.serving.conftest import (
    ADMIN_TOKEN,
    AGENT,
    CONSUMER,
    TENANT,
    TOKENS,
    WRITER,
    World,
)
from recsys_assets_tests.serving.published import write_version

HUGE = 2**63


def _home(world: World, items: list[int]) -> str:
    return write_version(
        world.warehouse,
        "home_feed",
        "na",
        {CONSUMER: items},
        generated_at=world.clock.now - timedelta(hours=1),
        ttl=timedelta(hours=6),
    )


@pytest.fixture
def client(world: World) -> Iterator[TestClient]:
    _home(world, world.good[:30])
    app = create_app(world.service(start=True), tokens=TOKENS)
    with TestClient(app, headers={"Authorization": f"Bearer {WRITER}"}) as test_client:
        yield test_client


def _logged(world: World) -> pd.DataFrame:
    """Every decision-log row written so far."""
    folders = world.warehouse.list_dirs(DECISION_LOG_PREFIX)
    frames = [world.warehouse.read_parquet(f"{DECISION_LOG_PREFIX}/{day}") for day in folders]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame({"subject_id": []})


def test_a_huge_subject_id_is_422_and_the_log_keeps_writing(
    client: TestClient, world: World
) -> None:
    params = {"region": "na"}
    for subject in (HUGE, 10**30, -1):
        response = client.get(
            "/v1/recommendations/home_feed", params={**params, "subject_id": subject}
        )
        assert response.status_code == 422, subject
        assert "subject_id" in response.json()["error"]
    assert (
        client.get(
            "/v1/recommendations/home_feed", params={**params, "subject_id": CONSUMER}
        ).status_code
        == 200
    )
    service = client.app.state.service  # type: ignore[attr-defined]
    service.decision_log.flush()
    assert _logged(world)["subject_id"].tolist() == [CONSUMER]
    with pytest.raises(InvalidSubject):
        service.recommend(HUGE, "home_feed", "na")


@pytest.mark.parametrize(
    ("name", "query"),
    [
        ("subject_id", f"subject_id={CONSUMER}&subject_id=999&region=na"),
        ("region", f"subject_id={CONSUMER}&region=na&region=eu"),
        ("limit", f"subject_id={CONSUMER}&region=na&limit=3&limit=5"),
        ("category_intent", f"subject_id={CONSUMER}&region=na&category_intent=a&category_intent=b"),
    ],
)
def test_a_scalar_query_parameter_given_twice_is_422_naming_it(
    client: TestClient, world: World, name: str, query: str
) -> None:
    response = client.get(f"/v1/recommendations/home_feed?{query}")
    assert response.status_code == 422, response.text
    assert f"query.{name}: given more than once" in response.json()["error"]
    client.app.state.service.decision_log.flush()  # type: ignore[attr-defined]
    assert _logged(world).empty  # nothing was served


def test_repeated_session_items_are_still_a_list(client: TestClient) -> None:
    response = client.get(
        "/v1/recommendations/home_feed",
        params=[
            ("subject_id", CONSUMER),
            ("region", "na"),
            ("session_item_ids", 1),
            ("session_item_ids", 2),
        ],
    )
    assert response.status_code == 200, response.text


def test_a_bad_record_is_isolated_and_counted_good_rows_still_land(world: World) -> None:
    _home(world, world.good[:30])
    service = world.service()
    good = service.recommend(CONSUMER, "home_feed", "na")
    log = DecisionLog(world.warehouse, flush_interval_s=60)
    service.metrics.watch_decision_log(log)
    record = service.decision_log._pending[0]
    bad = replace(record, recommendation=replace(good, subject_id=HUGE, request_id="bad"))
    for item in (record, bad, record, record):
        log.append(item)
    assert log.flush() == 3
    assert log.rejected == 1 and log.pending == 0
    log.append(record)
    assert log.flush() == 1  # nothing wedged
    text = service.metrics.exposition().decode()
    assert 'recsys_serving_decision_log_write_failures_total{cause="bad_record"} 1.0' in text
    assert "recsys_serving_decision_log_rows_written_total 4.0" in text


def test_storage_failures_are_counted_and_the_rows_retried(world: World) -> None:
    _home(world, world.good[:30])
    service = world.service()
    service.recommend(CONSUMER, "home_feed", "na")
    blocker = Path(world.warehouse.root) / DECISION_LOG_PREFIX
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_text("not a folder")  # every write under it fails, as a real outage would
    assert service.decision_log.flush() == 0
    assert service.decision_log.pending == 1
    text = service.metrics.exposition().decode()
    assert 'recsys_serving_decision_log_write_failures_total{cause="storage"} 1.0' in text
    blocker.unlink()
    assert service.decision_log.flush() == 1


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"type": "purchase", "user_id": 10**30, "item_id": 1}, "user_id"),
        ({"type": "purchase", "user_id": 1, "item_id": HUGE}, "item_id"),
        ({"type": "purchase", "user_id": 1, "item_id": 1, "ts": "2999-01-01T00:00:00"}, "ts"),
        ({"type": "purchase", "user_id": 1, "item_id": 1, "ts": "1000-01-01T00:00:00"}, "ts"),
    ],
)
def test_client_mistakes_in_events_are_422_naming_the_field(
    client: TestClient, body: dict, field: str
) -> None:
    response = client.post("/v1/events", json=body)
    assert response.status_code == 422
    assert field in response.json()["error"]


def test_missing_raw_snapshot_at_start_is_not_ready_and_serves_nothing_blindly(
    world: World,
) -> None:
    _home(world, world.good[:30])
    world.warehouse.delete(SNAPSHOT_PATH)
    service = world.service()
    response = service.recommend(CONSUMER, "home_feed", "na")  # was an IndexError
    assert (response.served_from, response.items) == ("empty", [])
    with TestClient(create_app(service)) as http:
        served = http.get(
            "/v1/recommendations/home_feed", params={"subject_id": CONSUMER, "region": "na"}
        )
        assert served.status_code == 200 and served.json()["served_from"] == "empty"
        health = http.get("/healthz")
        assert health.status_code == 503
        assert health.json()["status"] == "not_ready"
        assert "no raw data snapshot" in health.json()["reasons"][0]


def test_raw_snapshot_vanishing_later_keeps_the_loaded_state(world: World) -> None:
    _home(world, world.good[:30])
    service = world.service()
    world.warehouse.delete(SNAPSHOT_PATH)
    service.refresh()
    response = service.recommend(CONSUMER, "home_feed", "na")
    assert response.served_from == "precomputed"
    assert [item["item_id"] for item in response.items] == world.good[:20]
    ready, detail = service.health()
    assert ready and "no raw data snapshot" in detail["warnings"][0]


def test_a_deleted_live_manifest_keeps_the_loaded_version(world: World) -> None:
    version = _home(world, world.good[:30])
    service = world.service()
    world.warehouse.delete("published/surface=home_feed/region=na/manifest.json")
    service.refresh()
    response = service.recommend(CONSUMER, "home_feed", "na")
    assert (response.served_from, response.version) == ("precomputed", version)
    ready, detail = service.health()
    assert ready
    assert detail["partitions"]["home_feed/na"]["lists"] == {
        "version": version,
        "status": "manifest_missing",
    }
    assert any(version in warning for warning in detail["warnings"])


def test_consent_revocation_reaches_the_enterprise_queue(world: World) -> None:
    own = world.failing["own_tenant"]
    write_version(
        world.warehouse,
        "enterprise_action_queue",
        "na",
        {AGENT: [own]},
        generated_at=world.clock.now - timedelta(minutes=10),
        ttl=timedelta(hours=1),
    )
    write_version(
        world.warehouse,
        "enterprise_action_queue",
        "na",
        {f"tenant_default_actions:{TENANT}": [own]},
        generated_at=world.clock.now - timedelta(minutes=5),
        ttl=timedelta(minutes=30),
        fallback=True,
    )
    service = world.service()
    assert service.recommend(AGENT, "enterprise_action_queue", "na").served_from == "precomputed"
    with TestClient(create_app(service, tokens=TOKENS)) as http:
        revoke = {"type": "consent_revoked", "user_id": AGENT}
        auth = {"Authorization": f"Bearer {WRITER}"}
        assert http.post("/v1/events", json=revoke, headers=auth).status_code == 202
    response = service.recommend(AGENT, "enterprise_action_queue", "na")
    assert response.served_from == "fallback"  # the tenant's default actions, not personal
    assert response.list_id and response.list_id.startswith("fallback_")
    assert response.rejections == {"consent_revoked": 1}


def test_consent_granted_needs_admin(client: TestClient) -> None:
    grant = {"type": "consent_granted", "user_id": CONSUMER}
    refused = client.post("/v1/events", json=grant)
    assert refused.status_code == 403 and "admin" in refused.json()["error"]
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    assert client.post("/v1/events", json=grant, headers=admin).status_code == 202


def test_a_click_or_rating_counts_as_consumed_online(world: World) -> None:
    clicked, rated = world.good[0], world.good[1]
    interactions = read_raw(world.warehouse, "interactions")
    extra = interactions.iloc[[0, 0]].copy()
    extra["user_id"] = CONSUMER
    extra["item_id"] = [clicked, rated]
    extra["event_type"] = ["click", "rating"]
    extra["value"] = [1.0, 2.0]
    world.warehouse.write_parquet(
        "raw/interactions/part-00000.parquet", pd.concat([interactions, extra], ignore_index=True)
    )
    _home(world, world.good[:30])
    response = world.service().recommend(CONSUMER, "home_feed", "na", limit=5)
    assert [item["item_id"] for item in response.items] == world.good[2:7]
    assert response.rejections == {"already_consumed": 2}
