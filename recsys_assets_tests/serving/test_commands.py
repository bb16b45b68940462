"""`recsys recommend` prints the response; a bad request is a clear error, not a traceback."""

from __future__ import annotations

import argparse
import json
from datetime import timedelta

import pytest

from recsys_assets.serving import commands
from recsys_assets.serving.api import ItemOut, RecommendationOut
from recsys_assets.serving.decision_log import DECISION_LOG_PREFIX
from recsys_assets_tests.serving.conftest import CONSUMER, World
from recsys_assets_tests.serving.published import write_version


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="recsys")
    commands.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.handler(args))


def test_recommend_prints_the_response_json(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    write_version(
        world.warehouse,
        "home_feed",
        "na",
        {CONSUMER: world.good[:30]},
        generated_at=world.clock.now,  # the CLI runs on the wall clock: still fresh
        ttl=timedelta(days=3650),
    )
    argv = ["recommend", "--subject", str(CONSUMER), "--surface", "home_feed", "--region", "na"]
    assert _run([*argv, "--limit", "4"]) == 0
    body = json.loads(capsys.readouterr().out)
    assert body["served_from"] == "precomputed"
    assert [item["item_id"] for item in body["items"]] == world.good[:4]
    assert set(body) == set(RecommendationOut.model_fields)  # the HTTP response's shape
    assert set(body["items"][0]) == set(ItemOut.model_fields)
    assert body["items"][0]["score"] == 0.8  # the calibrated probability, as over HTTP
    assert world.warehouse.list_dirs(DECISION_LOG_PREFIX)  # flushed on exit


def test_recommend_rejects_an_unknown_surface(world: World) -> None:
    with pytest.raises(ValueError, match="unknown surface 'homefeed'"):
        _run(["recommend", "--subject", "1", "--surface", "homefeed", "--region", "na"])


def test_serve_is_registered() -> None:
    parser = argparse.ArgumentParser(prog="recsys")
    commands.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["serve", "--port", "8123"])
    assert (args.host, args.port, args.access_log) == ("127.0.0.1", 8123, False)
