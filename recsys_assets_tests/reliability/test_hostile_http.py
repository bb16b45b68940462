"""A barrage of hostile requests against a real `recsys serve` app over a real socket: every
one is a 4xx (never a 5xx), and the decision log keeps writing afterwards, losing nothing.

The counts (tried / failed safely / lost) are documented in docs/SERVING.md.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import uvicorn

from recsys_assets.serving.api import create_app
from recsys_assets.serving.decision_log import DECISION_LOG_PREFIX
from recsys_assets.serving.service import RecommendationService
from recsys_assets_tests.serving import conftest as serving_world
from recsys_assets_tests.serving.conftest import CONSUMER, READER, TOKENS, WRITER, World

world = serving_world.world  # the serving tests' fixture: tiny data, fixed clock, fast flushes

RECS = "/v1/recommendations/home_feed"
OK = {"subject_id": CONSUMER, "region": "na"}
JSON = {"content-type": "application/json"}


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _get(params: dict[str, Any], path: str = RECS, token: str = READER) -> dict[str, Any]:
    return {"method": "GET", "url": path, "params": params, "headers": _bearer(token)}


def _event(body: Any, token: str = WRITER, **headers: str) -> dict[str, Any]:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return {
        "method": "POST",
        "url": "/v1/events",
        "content": content,
        "headers": {**JSON, **_bearer(token), **headers},
    }


def _hostile() -> list[dict[str, Any]]:
    hide = {"type": "hide_item", "user_id": CONSUMER, "item_id": 1}
    return [
        # ids that do not fit int64, negative or not numbers
        _get({**OK, "subject_id": 2**63}),
        _get({**OK, "subject_id": 10**30}),
        _get({**OK, "subject_id": -1}),
        _get({**OK, "subject_id": "abc"}),
        _get({**OK, "subject_id": "1.5"}),
        _get({**OK, "subject_id": ""}),
        _get({**OK, "subject_id": "1e3"}),
        _get({"region": "na"}),
        # regions, limits
        _get({**OK, "region": "mars"}),
        _get({**OK, "region": ""}),
        _get({**OK, "region": "x" * 500}),
        _get({**OK, "region": "../../etc"}),
        _get({**OK, "limit": 0}),
        _get({**OK, "limit": -5}),
        _get({**OK, "limit": 10**30}),
        _get({**OK, "limit": 99}),
        _get({**OK, "limit": "abc"}),
        # surfaces, including traversal-ish names
        _get(OK, path="/v1/recommendations/nope"),
        _get(OK, path="/v1/recommendations/..%2F..%2Fetc%2Fpasswd"),
        _get(OK, path="/v1/recommendations/%00"),
        _get(OK, path="/v1/recommendations/home_feed%20"),
        _get(OK, path="/v1/recommendations/" + "a" * 3000),
        # authentication
        {"method": "GET", "url": RECS, "params": OK},
        {"method": "GET", "url": RECS, "params": OK, "headers": {"Authorization": "Bearer"}},
        _get(OK, token="garbage"),
        {"method": "GET", "url": RECS, "params": OK, "headers": {"Authorization": "Basic eA=="}},
        _get(OK, token="x" * 5000),
        _event(hide, token=READER),
        _event({"type": "consent_granted", "user_id": CONSUMER}),
        {
            "method": "POST",
            "url": "/v1/events",
            "json": hide,
            "headers": {"Authorization": b"Bearer writer-token\xc3\xa9"},
        },
        # malformed or wrong events
        _event(b"{not json"),
        _event(b"[]"),
        _event(b"null"),
        _event(b'{"type": "purchase", "user_id": NaN, "item_id": 1}'),
        _event(b"[" * 2000 + b"]" * 2000),
        _event({"type": "hide_item"}),
        _event({**hide, "user_id": 10**30}),
        _event({**hide, "user_id": -1}),
        _event({**hide, "user_id": "abc"}),
        _event({**hide, "user_id": 1.5}),
        _event({**hide, "user_id": True}),
        _event({**hide, "user_id": "1"}),
        _event({**hide, "user_id": 1.0}),
        _event({**hide, "item_id": False}),
        _event({**hide, "item_id": 2**63}),
        _event({**hide, "ts": "2999-01-01T00:00:00"}),
        _event({**hide, "ts": "1000-01-01T00:00:00"}),
        _event({**hide, "ts": "yesterday"}),
        _event({**hide, "type": "launch"}),
        _event({**hide, "extra": 1}),
        _event({"type": "exposure", "user_id": 1, "item_id": 2, "surface": "moon"}),
        _event({**hide, "region": "../../"}),
        _event({"type": "hide_category", "user_id": 1, "category": "x" * 500}),
        _event({"type": "hide_creator", "user_id": 1, "creator_id": ""}),
        _event(b'{"type": "hide_creator", "user_id": 1, "creator_id": "\\ud800"}'),
        _event({"type": "hide_category", "user_id": 1, "category": "x" * 20_000}),
        _event(hide, **{"content-type": "text/plain"}),
        # wrong methods
        {"method": "PUT", "url": "/v1/events", "content": b"{}", "headers": _bearer(WRITER)},
        {"method": "GET", "url": "/v1/events", "headers": _bearer(WRITER)},
        {"method": "POST", "url": RECS, "params": OK, "headers": _bearer(WRITER)},
    ]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def served(world: World) -> Iterator[tuple[str, RecommendationService]]:
    world.publish_consumer_list(30)
    service = world.service(start=True)
    port = _free_port()
    config = uvicorn.Config(
        create_app(service, tokens=TOKENS), host="127.0.0.1", port=port, log_level="error"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started
    try:
        yield f"http://127.0.0.1:{port}", service
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_hostile_requests_fail_safely_and_nothing_is_lost(
    served: tuple[str, RecommendationService], world: World
) -> None:
    url, service = served
    barrage = _hostile()
    assert len(barrage) >= 40
    answered: list[tuple[int, dict[str, Any]]] = []
    good_ids: list[str] = []
    with httpx.Client(base_url=url, timeout=10) as http:
        for number, request in enumerate(barrage):
            answered.append((http.request(**request).status_code, request))
            if number % 10 == 9:  # real traffic in between
                response = http.get(RECS, params=OK, headers=_bearer(READER))
                assert response.status_code == 200
                good_ids.append(response.json()["request_id"])
        after = http.get(RECS, params=OK, headers=_bearer(READER))
        assert after.status_code == 200
        good_ids.append(after.json()["request_id"])
    unsafe = [(status, request) for status, request in answered if not 400 <= status < 500]
    assert not unsafe, unsafe
    deadline = time.monotonic() + 10
    logged: set[str] = set()
    while time.monotonic() < deadline and not set(good_ids) <= logged:
        time.sleep(0.1)
        folders = world.warehouse.list_dirs(DECISION_LOG_PREFIX)
        for day in folders:
            frame = world.warehouse.read_parquet(f"{DECISION_LOG_PREFIX}/{day}")
            logged |= set(frame["request_id"])
    assert set(good_ids) <= logged  # rows written after the barrage: lost = 0
    log = service.decision_log
    assert (log.write_failures, log.rejected, log.dropped) == (0, 0, 0)
