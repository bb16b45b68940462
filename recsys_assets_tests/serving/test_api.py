"""The HTTP API: responses, events, 4xx paths, metrics, and a publish flip under load."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient

from recsys_assets.serving.api import create_app
from recsys_assets.serving.state import EVENTS_PREFIX
from recsys_assets_tests.serving.conftest import CONSUMER, TOKENS, WRITER, World
from recsys_assets_tests.serving.published import activate_version, write_version


@pytest.fixture
def client(world: World) -> Iterator[TestClient]:
    write_version(
        world.warehouse,
        "home_feed",
        "na",
        {CONSUMER: world.good[:40]},
        generated_at=world.clock.now - timedelta(hours=1),
        ttl=timedelta(hours=6),
    )
    service = world.service()
    app = create_app(service, max_body_bytes=1024, tokens=TOKENS)
    with TestClient(app, headers={"Authorization": f"Bearer {WRITER}"}) as test_client:
        yield test_client


def test_recommendation_endpoint(client: TestClient, world: World) -> None:
    response = client.get(
        "/v1/recommendations/home_feed", params={"subject_id": CONSUMER, "region": "na"}
    )
    assert response.status_code == 200
    body = response.json()
    assert body["served_from"] == "precomputed"
    assert [item["item_id"] for item in body["items"]] == world.good[:20]
    assert set(body) == {
        "request_id", "subject_id", "surface", "region", "list_id", "version", "served_from",
        "generated_at", "expires_at", "model_version", "items", "rejections", "experiment",
    }  # fmt: skip
    assert set(body["items"][0]) == {
        "item_id", "position", "score", "utility", "fallback_score", "reason_codes",
        "source_provenance",
    }  # fmt: skip
    first = body["items"][0]
    assert (first["score"], first["utility"], first["fallback_score"]) == (0.8, 1.0, None)


def test_each_item_has_one_probability_score_and_its_other_numbers_apart(world: World) -> None:
    """A personalized item: `score` the calibrated probability, `utility` apart (> 1 here);
    a topped-up fallback item: no probability, its list's value in `fallback_score`; a list
    published before the probability was stored: null score, still served."""
    write_version(
        world.warehouse, "home_feed", "na", {CONSUMER: world.good[:2]},
        generated_at=world.clock.now - timedelta(hours=1), ttl=timedelta(hours=6),
        score_offset=0.25,
    )  # fmt: skip
    write_version(
        world.warehouse, "home_feed", "na", {"popular_by_region": world.good[10:12]},
        generated_at=world.clock.now - timedelta(minutes=5), ttl=timedelta(minutes=30),
        fallback=True, score_offset=256.0,
    )  # fmt: skip
    params = {"subject_id": CONSUMER, "region": "na", "limit": 4}
    with TestClient(create_app(world.service())) as http:
        response = http.get("/v1/recommendations/home_feed", params=params)
    assert "NaN" not in response.text
    numbers = [
        (item["score"], item["utility"], item["fallback_score"])
        for item in response.json()["items"]
    ]
    assert numbers == [(0.8, 1.25, None), (0.4, 0.75, None), (None, None, 257.0),
                       (None, None, 256.5)]  # fmt: skip
    assert all(0 <= score <= 1 for score, _, _ in numbers if score is not None)

    write_version(
        world.warehouse, "home_feed", "na", {CONSUMER: world.good[:2]},
        generated_at=world.clock.now - timedelta(minutes=30), ttl=timedelta(hours=6),
        with_calibrated=False,
    )  # fmt: skip
    service = world.service()
    older = service.recommend(CONSUMER, "home_feed", "na", limit=2)
    assert older.served_from == "precomputed"
    assert [(item["score"], item["utility"]) for item in older.items] == [(None, 1.0), (None, 0.5)]


def test_hide_through_the_events_api_applies_to_the_next_request(
    client: TestClient, world: World
) -> None:
    params = {"subject_id": CONSUMER, "region": "na", "limit": 5}
    before = client.get("/v1/recommendations/home_feed", params=params).json()
    hidden = before["items"][0]["item_id"]
    accepted = client.post(
        "/v1/events", json={"type": "hide_item", "user_id": CONSUMER, "item_id": hidden}
    )
    assert accepted.status_code == 202
    after = client.get("/v1/recommendations/home_feed", params=params).json()
    assert hidden not in [item["item_id"] for item in after["items"]]
    assert after["rejections"] == {"hidden_by_user": 1}
    day = world.warehouse.list_dirs(EVENTS_PREFIX)
    persisted = world.warehouse.read_parquet(f"{EVENTS_PREFIX}/{day[0]}")
    assert persisted[["type", "user_id", "item_id"]].values.tolist() == [
        ["hide_item", CONSUMER, hidden]
    ]
    fresh = world.service()  # another replica sees it from storage
    again = fresh.recommend(CONSUMER, "home_feed", "na", limit=5)
    assert hidden not in [item["item_id"] for item in again.items]


@pytest.mark.parametrize(
    ("path", "params", "status", "message"),
    [
        ("/v1/recommendations/nope", {"subject_id": 1, "region": "na"}, 404, "unknown surface"),
        ("/v1/recommendations/home_feed", {"subject_id": 1, "region": "mars"}, 422, "region"),
        ("/v1/recommendations/home_feed", {"subject_id": 1, "region": "na", "limit": 0}, 422, "limit"),
        ("/v1/recommendations/home_feed", {"subject_id": 1, "region": "na", "limit": 99}, 422, "display_count"),
        ("/v1/recommendations/home_feed", {"subject_id": 1, "region": "na", "limit": "x"}, 422, "limit"),
        ("/v1/recommendations/home_feed", {"region": "na"}, 422, "subject_id"),
        ("/v1/recommendations/home_feed", {"subject_id": "abc", "region": "na"}, 422, "subject_id"),
        ("/nowhere", {}, 404, "Not Found"),
    ],
)  # fmt: skip
def test_bad_requests_are_4xx_with_a_message(
    client: TestClient, path: str, params: dict, status: int, message: str
) -> None:
    response = client.get(path, params=params)
    assert response.status_code == status
    assert message in response.json()["error"]


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b"{not json", 422, "JSON"),
        (b'{"type": "hide_item", "user_id": 1}', 422, "item_id"),
        (b'{"type": "launch", "user_id": 1}', 422, "type"),
        (b'{"type": "purchase", "user_id": 1, "item_id": 2, "extra": 1}', 422, "extra"),
        (b'{"type": "exposure", "user_id": 1, "item_id": 2, "surface": "moon"}', 422, "surface"),
        (b'{"type": "hide_item", "user_id": -1, "item_id": 2}', 422, "user_id"),
        (b"[]", 422, "invalid request"),
        (b'{"type": "hide_category", "user_id": 1, "category": "' + b"x" * 2000 + b'"}', 413, "too large"),
    ],
)  # fmt: skip
def test_bad_events_are_4xx_with_a_message(
    client: TestClient, body: bytes, status: int, message: str
) -> None:
    response = client.post("/v1/events", content=body, headers={"content-type": "application/json"})
    assert response.status_code == status
    assert message in response.json()["error"]


def test_chunked_oversized_body_is_refused(client: TestClient) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"type": "hide_item", "user_id": 1, "item_id": 2, "pad": "'
        for _ in range(20):
            yield b"x" * 100
        yield b'"}'

    response = client.post(
        "/v1/events", content=chunks(), headers={"content-type": "application/json"}
    )
    assert response.status_code == 413


def test_metrics_healthz_and_openapi(client: TestClient) -> None:
    client.get("/v1/recommendations/home_feed", params={"subject_id": CONSUMER, "region": "na"})
    metrics = client.get("/metrics")
    assert metrics.status_code == 200
    assert (
        'recsys_serving_requests_total{model_version="model_a",region="na",'
        'served_from="precomputed",surface="home_feed"} 1.0'
    ) in metrics.text
    assert "recsys_serving_latency_seconds_bucket" in metrics.text
    health = client.get("/healthz", headers={"Authorization": ""})
    assert health.status_code == 200
    assert health.json()["status"] == "ok"
    assert health.json()["partitions"]["home_feed/na"]["lists"]["status"] == "ok"
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/recommendations/{surface}", "/v1/events", "/metrics", "/healthz"} <= set(paths)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_publish_flip_during_a_burst_over_a_real_socket(world: World) -> None:
    """Zero errors, and every response's items come from the one version it names."""
    subjects = [CONSUMER]
    by_version: dict[str, list[int]] = {}
    for step, items in enumerate((world.good[:30], world.good[30:60])):
        version = write_version(
            world.warehouse,
            "home_feed",
            "na",
            dict.fromkeys(subjects, items),
            generated_at=world.clock.now - timedelta(minutes=30 - step),
            ttl=timedelta(hours=6),
            activate=step == 0,
        )
        by_version[version] = items[:20]
    first, second = by_version
    service = world.service(start=True)
    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(service), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started

    stop = threading.Event()
    seen: list[tuple[int, str | None, list[int]]] = []

    def burst() -> None:
        with httpx.Client(base_url=url, timeout=5) as http:
            while not stop.is_set():
                response = http.get(
                    "/v1/recommendations/home_feed",
                    params={"subject_id": CONSUMER, "region": "na"},
                )
                body = response.json()
                seen.append(
                    (
                        response.status_code,
                        body.get("version"),
                        [i["item_id"] for i in body["items"]],
                    )
                )

    try:
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(burst) for _ in range(4)]
            root = "published/surface=home_feed/region=na"
            for flip in range(6):
                time.sleep(0.15)
                target = second if flip % 2 == 0 else first
                activate_version(world.warehouse, root, target, world.clock.now, timedelta(hours=6))
            time.sleep(0.15)
            stop.set()
            for future in futures:
                future.result()
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    assert len(seen) > 50
    assert {status for status, _, _ in seen} == {200}
    versions = {version for _, version, _ in seen}
    assert versions == {first, second}
    for _, version, items in seen:
        assert items == by_version[version]
