"""Bearer tokens: RECSYS_API_TOKENS parsing, 401/403 paths, the development default, and
`recsys serve` refusing a malformed configuration."""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from recsys_assets.serving import commands
from recsys_assets.serving.api import create_app
from recsys_assets.serving.auth import ADMIN, EVENTS_WRITE, ApiTokens, TokenConfigError
from recsys_assets.serving.service import RecommendationService
from recsys_assets_tests.serving.conftest import (
    ADMIN_TOKEN,
    CONSUMER,
    READER,
    TOKENS,
    WRITER,
    World,
)

RECS = "/v1/recommendations/home_feed"
PARAMS = {"subject_id": CONSUMER, "region": "na"}
HIDE = {"type": "hide_item", "user_id": CONSUMER, "item_id": 1}


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def service(world: World) -> RecommendationService:
    world.publish_consumer_list(30)
    return world.service()


@pytest.fixture
def secured(service: RecommendationService) -> Iterator[TestClient]:
    with TestClient(create_app(service, tokens=TOKENS)) as client:
        yield client


def test_parse_scopes_and_admin_includes_everything() -> None:
    tokens = ApiTokens.parse(" s3cret:events:write+recommendations:read , boss:admin ")
    assert tokens.scopes_of("s3cret") == {EVENTS_WRITE, "recommendations:read"}
    assert tokens.scopes_of("boss") == {ADMIN}
    assert tokens.scopes_of("s3cre") is None and tokens.scopes_of("") is None
    assert not ApiTokens.from_env({}).configured


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("justatoken", "entry 1 is not TOKEN:SCOPE"),
        ("a:admin,:admin", "entry 2 is not TOKEN:SCOPE"),
        ("a:admin,b:events:read", "entry 2"),
        ("a:admin,b:", "unknown scope"),
        ("a:admin,a:events:write", "listed twice"),
        ("a b:admin", "whitespace"),
    ],
)
def test_malformed_tokens_name_the_bad_entry(text: str, message: str) -> None:
    with pytest.raises(TokenConfigError, match=message) as raised:
        ApiTokens.parse(text)
    assert "b:" not in str(raised.value) or "***" in str(raised.value)  # secrets masked


def test_reads_and_writes_need_the_right_scope(secured: TestClient) -> None:
    assert secured.get(RECS, params=PARAMS).status_code == 401
    unknown = secured.get(RECS, params=PARAMS, headers=_bearer("guess"))
    assert unknown.status_code == 401 and unknown.headers["www-authenticate"] == "Bearer"
    assert secured.get(RECS, params=PARAMS, headers=_bearer(READER)).status_code == 200
    assert secured.get(RECS, params=PARAMS, headers=_bearer(ADMIN_TOKEN)).status_code == 200
    assert secured.post("/v1/events", json=HIDE).status_code == 401
    lacking = secured.post("/v1/events", json=HIDE, headers=_bearer(READER))
    assert lacking.status_code == 403 and "events:write" in lacking.json()["error"]
    assert secured.post("/v1/events", json=HIDE, headers=_bearer(WRITER)).status_code == 202
    assert secured.post("/v1/events", json=HIDE, headers=_bearer(ADMIN_TOKEN)).status_code == 202
    basic = secured.post("/v1/events", json=HIDE, headers={"Authorization": f"Basic {WRITER}"})
    assert basic.status_code == 401


def test_metrics_need_a_reader_token_unless_public(
    secured: TestClient, service: RecommendationService
) -> None:
    assert secured.get("/metrics").status_code == 401
    assert secured.get("/metrics", headers=_bearer(READER)).status_code == 200
    assert secured.get("/healthz").status_code == 200
    with TestClient(create_app(service, tokens=TOKENS, metrics_public=True)) as public:
        assert public.get("/metrics").status_code == 200


def test_development_default_refuses_writes_and_opens_reads(service: RecommendationService) -> None:
    with TestClient(create_app(service)) as client:
        assert client.get(RECS, params=PARAMS).status_code == 200
        assert client.get("/metrics").status_code == 200
        refused = client.post("/v1/events", json=HIDE, headers=_bearer(WRITER))
        assert refused.status_code == 401 and "RECSYS_API_TOKENS" in refused.json()["error"]


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="recsys")
    commands.register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_serve_refuses_malformed_tokens_before_starting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECSYS_API_TOKENS", "good:admin,oops")
    args = _parse(["serve", "--metrics-public"])
    assert args.metrics_public
    with pytest.raises(TokenConfigError, match="entry 2"):
        args.handler(args)
