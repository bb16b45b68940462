"""The kill switch over real HTTP: a kill takes effect on the next request, a lift restores,
a second service over the same warehouse sees both, only admins may use it, bad bodies are
4xx naming the field (unconfigured regions, unknown campaigns, control characters), every
kill and lift is audited in the decision log, and a damaged kills file is reported (503 on
the admin endpoints, /healthz) while the kills last read stay enforced; `recsys kill` does the
same without a server and exits 2 on a damaged file."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator
from datetime import timedelta

import pandas as pd
import pytest
from fastapi.testclient import TestClient

from recsys_assets.cli import main
from recsys_assets.data.snapshot import read_raw
from recsys_assets.serving import commands
from recsys_assets.serving.api import create_app
from recsys_assets.serving.kills import KILLS_PATH
from recsys_assets.serving.service import RecommendationService
from recsys_assets_tests.serving.conftest import ADMIN_TOKEN, CONSUMER, TOKENS, WRITER, World
from recsys_assets_tests.serving.decisions import read_decision_log
from recsys_assets_tests.serving.published import write_version

RECS = "/v1/recommendations/home_feed"
NA = {"subject_id": CONSUMER, "region": "na"}
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
CAMPAIGN = "spring_sale"


def _fallback(world: World) -> list[int]:
    items = world.good[40:60]
    write_version(
        world.warehouse,
        "home_feed",
        "na",
        {"popular_by_region": items, "new_user_default": items},
        generated_at=world.clock.now - timedelta(minutes=5),
        ttl=timedelta(minutes=30),
        fallback=True,
    )
    return items


def _sponsor(world: World, item_ids: list[int]) -> None:
    """Put `item_ids` in a live campaign (ending in a week)."""
    items = read_raw(world.warehouse, "items").set_index("item_id")
    items.loc[item_ids, ["is_sponsored", "campaign_id", "campaign_end"]] = [
        True,
        CAMPAIGN,
        pd.Timestamp(world.clock.now + timedelta(days=7)),
    ]
    world.warehouse.write_parquet("raw/items/part-00000.parquet", items.reset_index())


@pytest.fixture
def served(world: World) -> Iterator[tuple[TestClient, RecommendationService, list[int]]]:
    world.publish_consumer_list(40)
    fallback = _fallback(world)
    _sponsor(world, world.good[:2])
    service = world.service()
    with TestClient(create_app(service, tokens=TOKENS), headers=ADMIN) as client:
        yield client, service, fallback


def _ids(body: dict) -> list[int]:
    return [item["item_id"] for item in body["items"]]


def test_surface_kill_serves_fallback_on_the_next_request_and_lift_restores(
    served: tuple[TestClient, RecommendationService, list[int]], world: World
) -> None:
    client, _, fallback = served
    assert client.get(RECS, params=NA).json()["served_from"] == "precomputed"

    killed = client.post("/v1/admin/kill", json={"surface": "home_feed", "reason": "bad model"})
    assert killed.status_code == 201, killed.text
    assert killed.json()["actor"].startswith("token:")
    body = client.get(RECS, params=NA).json()
    assert body["served_from"] == "killed_fallback"
    assert _ids(body) == fallback
    listed = client.get("/v1/admin/kill").json()["kills"]
    assert [(k["surface"], k["region"], k["reason"]) for k in listed] == [
        ("home_feed", None, "bad model")
    ]
    metrics = client.get("/metrics").text
    assert 'recsys_serving_kills_active{campaign="*",region="*",surface="home_feed"} 1.0' in metrics
    assert 'served_from="killed_fallback"' in metrics

    lifted = client.request("DELETE", "/v1/admin/kill", json={"surface": "home_feed"})
    assert lifted.status_code == 200 and lifted.json()["reason"] == "bad model"
    restored = client.get(RECS, params=NA).json()
    assert restored["served_from"] == "precomputed"
    assert _ids(restored) == world.good[:20]
    assert "recsys_serving_kills_active{" not in client.get("/metrics").text


def test_region_kill_leaves_other_regions_alone(
    served: tuple[TestClient, RecommendationService, list[int]], world: World
) -> None:
    client, _, _ = served
    response = client.post(
        "/v1/admin/kill", json={"surface": "home_feed", "region": "eu", "reason": "eu outage"}
    )
    assert response.status_code == 201
    assert client.get(RECS, params=NA).json()["served_from"] == "precomputed"
    eu = client.get(RECS, params={"subject_id": CONSUMER, "region": "eu"}).json()
    assert eu["served_from"] != "precomputed"


def test_campaign_kill_removes_its_items_and_fills_from_deeper(
    served: tuple[TestClient, RecommendationService, list[int]], world: World
) -> None:
    client, service, _ = served
    assert _ids(client.get(RECS, params=NA).json())[:2] == world.good[:2]
    world.clock.advance(timedelta(seconds=1))  # the log below is read back in time order
    response = client.post(
        "/v1/admin/kill",
        json={"surface": "home_feed", "campaign": CAMPAIGN, "reason": "brand complaint"},
    )
    assert response.status_code == 201
    body = client.get(RECS, params=NA).json()
    assert body["served_from"] == "precomputed"
    assert _ids(body) == world.good[2:22]  # the campaign's two items out, two more in
    assert body["rejections"] == {"campaign_killed": 2}
    metrics = client.get("/metrics").text
    assert 'reason="campaign_killed",region="na"' in metrics
    assert 'reason="tombstoned"' not in metrics
    world.clock.advance(timedelta(seconds=1))
    client.request("DELETE", "/v1/admin/kill", json={"surface": "home_feed", "campaign": CAMPAIGN})
    assert _ids(client.get(RECS, params=NA).json()) == world.good[:20]
    service.decision_log.flush()
    answered = read_decision_log(world.warehouse)
    answered = answered[answered["kind"] == "recommendation"]
    assert [json.loads(r) for r in answered["rejections"]] == [{}, {"campaign_killed": 2}, {}]


def test_a_second_service_over_the_same_warehouse_sees_kill_and_lift(
    served: tuple[TestClient, RecommendationService, list[int]], world: World
) -> None:
    client, _, _ = served
    other = world.service(start=True)  # polls every 50 ms, like another replica
    with TestClient(create_app(other, tokens=TOKENS), headers=ADMIN) as replica:
        assert replica.get(RECS, params=NA).json()["served_from"] == "precomputed"
        client.post("/v1/admin/kill", json={"surface": "home_feed", "reason": "incident 42"})
        assert _eventually(replica, "killed_fallback")
        client.request("DELETE", "/v1/admin/kill", json={"surface": "home_feed"})
        assert _eventually(replica, "precomputed")


def _eventually(client: TestClient, served_from: str, within_s: float = 5.0) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if client.get(RECS, params=NA).json()["served_from"] == served_from:
            return True
        time.sleep(0.02)
    return False


def test_only_admins_may_kill(
    served: tuple[TestClient, RecommendationService, list[int]],
) -> None:
    client, _, _ = served
    body = {"surface": "home_feed", "reason": "x"}
    anonymous = client.post("/v1/admin/kill", json=body, headers={"Authorization": ""})
    assert anonymous.status_code == 401
    writer = client.post("/v1/admin/kill", json=body, headers={"Authorization": f"Bearer {WRITER}"})
    assert writer.status_code == 403 and "admin" in writer.json()["error"]
    lift = client.request(
        "DELETE", "/v1/admin/kill", json=body, headers={"Authorization": f"Bearer {WRITER}"}
    )
    assert lift.status_code == 403
    assert client.get("/v1/admin/kill", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert client.get(RECS, params=NA).json()["served_from"] == "precomputed"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"reason": "no surface"}, "surface"),
        ({"surface": "home_feed"}, "reason"),
        ({"surface": "home_feed", "reason": ""}, "reason"),
        ({"surface": "home_feed", "reason": "x", "regoin": "na"}, "regoin"),
        ({"surface": "home_feed", "reason": "x", "campaign": 7}, "campaign"),
        ({"surface": "nope", "reason": "x"}, "surface"),
        ({"surface": "home_feed", "region": "mars", "reason": "x"}, "region"),
        ({"surface": "enterprise_action_queue", "region": "latam", "reason": "x"}, "region"),
        ({"surface": "home_feed", "reason": "ok\n2026 kill lifted by root"}, "reason"),
        ({"surface": "home_feed", "reason": "x\u0000"}, "reason"),
        ({"surface": "home_feed", "campaign": "winter_sale", "reason": "x"}, "campaign"),
        (
            {
                "surface": "home_feed",
                "campaign": CAMPAIGN,
                "reason": "x",
                "allow_unknown_campaign": 1,
            },
            "allow_unknown_campaign",
        ),
    ],
)
def test_bad_bodies_are_4xx_naming_the_field(
    served: tuple[TestClient, RecommendationService, list[int]], body: dict, field: str
) -> None:
    client, _, _ = served
    response = client.post("/v1/admin/kill", json=body)
    assert response.status_code == 422, response.text
    assert field in response.json()["error"]


def test_lifting_what_is_not_killed_is_404(
    served: tuple[TestClient, RecommendationService, list[int]],
) -> None:
    client, _, _ = served
    response = client.request("DELETE", "/v1/admin/kill", json={"surface": "push"})
    assert response.status_code == 404 and "surface=push" in response.json()["error"]


def test_kills_and_lifts_are_audited_in_the_decision_log(
    served: tuple[TestClient, RecommendationService, list[int]], world: World
) -> None:
    client, service, _ = served
    # The world's clock stands still unless moved: the log is read back in time order, and
    # its writer thread may put the kill and the lift in different files, read in any order.
    client.post("/v1/admin/kill", json={"surface": "home_feed", "region": "na", "reason": "r1"})
    world.clock.advance(timedelta(seconds=1))
    client.get(RECS, params=NA)
    world.clock.advance(timedelta(seconds=1))
    client.request(
        "DELETE", "/v1/admin/kill", json={"surface": "home_feed", "region": "na", "reason": "ok"}
    )
    service.decision_log.flush()
    log = read_decision_log(world.warehouse)
    audits = log[log["kind"].isin(["kill", "lift"])]
    assert audits["kind"].tolist() == ["kill", "lift"]
    assert audits["surface"].tolist() == ["home_feed", "home_feed"]
    assert audits["region"].tolist() == ["na", "na"]
    assert audits["actor"].str.startswith("token:").all()
    assert [json.loads(c)["reason"] for c in audits["context"]] == ["r1", "ok"]
    answered = log[log["kind"] == "recommendation"]
    assert answered["served_from"].tolist() == ["killed_fallback"]
    assert answered["fallback_cause"].tolist() == ["killed"]


def test_recsys_kill_command_kills_lists_and_lifts(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    world.publish_consumer_list(30)
    service = world.service()

    def run(*argv: str) -> dict:
        parser = argparse.ArgumentParser()
        commands.register(parser.add_subparsers(dest="command"))
        args = parser.parse_args(["kill", *argv])
        assert args.handler(args) == 0
        return json.loads(capsys.readouterr().out)

    killed = run("--surface", "home_feed", "--region", "na", "--reason", "cli test")
    assert killed["killed"]["actor"].startswith("cli:")
    assert world.warehouse.exists(KILLS_PATH)
    assert [k["reason"] for k in run("--list")["kills"]] == ["cli test"]
    service.refresh()  # what the poller does within manifest_poll_interval_s
    assert service.recommend(CONSUMER, "home_feed", "na").served_from != "precomputed"
    run("--lift", "--surface", "home_feed", "--region", "na")
    service.refresh()
    assert service.recommend(CONSUMER, "home_feed", "na").served_from == "precomputed"
    assert run("--list")["kills"] == []


def test_recsys_kill_needs_a_reason(world: World) -> None:
    parser = argparse.ArgumentParser()
    commands.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["kill", "--surface", "home_feed"])
    with pytest.raises(ValueError, match="--reason is required"):
        args.handler(args)
    assert not world.warehouse.exists(KILLS_PATH)


def test_unconfigured_region_and_unknown_campaign_errors_say_what_is_known(
    served: tuple[TestClient, RecommendationService, list[int]],
) -> None:
    client, _, _ = served
    region = client.post(
        "/v1/admin/kill",
        json={"surface": "enterprise_action_queue", "region": "latam", "reason": "x"},
    )
    assert region.status_code == 422
    assert "its regions: ['na', 'eu', 'apac']" in region.json()["error"]
    campaign = client.post(
        "/v1/admin/kill", json={"surface": "home_feed", "campaign": "winter_sale", "reason": "x"}
    )
    assert campaign.status_code == 422
    assert "known campaigns: " in campaign.json()["error"]
    assert f"{CAMPAIGN}" in campaign.json()["error"]
    assert '"allow_unknown_campaign": true' in campaign.json()["error"]
    pre_emptive = client.post(
        "/v1/admin/kill",
        json={
            "surface": "home_feed",
            "campaign": "winter_sale",
            "reason": "launch blocked",
            "allow_unknown_campaign": True,
        },
    )
    assert pre_emptive.status_code == 201, pre_emptive.text
    assert [k["campaign"] for k in client.get("/v1/admin/kill").json()["kills"]] == ["winter_sale"]


def test_a_damaged_kills_file_is_reported_while_the_known_kills_stay_enforced(
    served: tuple[TestClient, RecommendationService, list[int]], world: World
) -> None:
    client, service, _ = served
    client.post("/v1/admin/kill", json={"surface": "home_feed", "reason": "bad model"})
    service.refresh()
    damaged = b'{"kills": [{"surface": "home_feed", "colour": "red"}]}'
    world.warehouse.write_bytes(KILLS_PATH, damaged)
    service.refresh()  # what the poller does

    assert client.get(RECS, params=NA).json()["served_from"] == "killed_fallback"
    health = client.get("/healthz")
    assert health.status_code == 200  # degraded: still serving, with the kills last read
    (warning,) = [w for w in health.json()["warnings"] if w.startswith("kill switch:")]
    assert "serving/kills.json is malformed: kills[0] has unknown key(s) ['colour']" in warning

    for method, body in [
        ("POST", {"surface": "push", "reason": "second incident"}),
        ("DELETE", {"surface": "home_feed"}),
    ]:
        response = client.request(method, "/v1/admin/kill", json=body)
        assert response.status_code == 503, response.text
        assert "serving/kills.json is malformed" in response.json()["error"]
    listed = client.get("/v1/admin/kill")
    assert listed.status_code == 503
    assert "unknown key(s) ['colour']" in listed.json()["error"]
    assert [k["reason"] for k in listed.json()["kills"]] == ["bad model"]
    assert world.warehouse.read_bytes(KILLS_PATH) == damaged  # nothing written over it

    world.warehouse.write_bytes(KILLS_PATH, b'{"kills": []}')  # restored by hand
    service.refresh()
    assert not [w for w in client.get("/healthz").json()["warnings"] if "kill" in w]
    assert client.get(RECS, params=NA).json()["served_from"] == "precomputed"


def test_a_service_started_on_a_damaged_kills_file_is_not_ready_until_restored(
    world: World,
) -> None:
    world.publish_consumer_list(30)
    world.warehouse.write_bytes(KILLS_PATH, b"{not json")
    service = world.service()
    with TestClient(create_app(service, tokens=TOKENS), headers=ADMIN) as client:
        health = client.get("/healthz")
        assert health.status_code == 503
        assert health.json()["status"] == "not_ready"
        (reason,) = health.json()["reasons"]
        assert reason.startswith("kill switch: no kill is known, ")
        assert "serving/kills.json is malformed: not JSON" in reason
        world.warehouse.write_bytes(KILLS_PATH, b'{"kills": []}')
        service.refresh()
        assert client.get("/healthz").status_code == 200


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_recsys_kill_on_a_damaged_file_exits_2_naming_it(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    world.publish_consumer_list(30)
    world.warehouse.write_bytes(KILLS_PATH, b'{"kills": [{"surface": "push"}]}')
    for argv in [
        ("kill", "--list"),
        ("kill", "--surface", "push", "--reason", "incident"),
        ("kill", "--lift", "--surface", "push"),
        ("recommend", "--subject", str(CONSUMER), "--surface", "home_feed", "--region", "na"),
        ("serve", "--port", "1"),
    ]:
        code, out, err = _cli(capsys, *argv)
        assert code == 2, argv
        assert out == ""
        assert f"recsys {argv[0]}: error:" in err
        assert "serving/kills.json is malformed: kills[0] lacks key(s)" in err
    assert world.warehouse.read_bytes(KILLS_PATH) == b'{"kills": [{"surface": "push"}]}'


def test_recsys_kill_refuses_bad_targets_and_control_characters(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    _sponsor(world, world.good[:2])
    for argv, message in [
        (
            ("--surface", "enterprise_action_queue", "--region", "latam", "--reason", "x"),
            "region: surface 'enterprise_action_queue' is not configured for region 'latam'; "
            "its regions: ['na', 'eu', 'apac']",
        ),
        (
            ("--surface", "home_feed", "--campaign", "winter_sale", "--reason", "x"),
            "campaign: no catalog item carries campaign_id 'winter_sale' (known campaigns: "
            "campaign_test, cmp_0000, cmp_0001, cmp_0002, spring_sale); to kill it before it "
            "launches, pass --allow-unknown-campaign",
        ),
        (
            ("--surface", "home_feed", "--reason", "ok\x1b[2J"),
            "reason: control character U+001B at position 2",
        ),
    ]:
        code, out, err = _cli(capsys, "kill", *argv)
        assert (code, out) == (2, ""), argv
        assert message in err
    assert not world.warehouse.exists(KILLS_PATH)

    code, out, _ = _cli(
        capsys,
        "kill",
        "--surface",
        "home_feed",
        "--campaign",
        "winter_sale",
        "--reason",
        "launch blocked",
        "--allow-unknown-campaign",
    )
    assert code == 0
    assert json.loads(out)["killed"]["campaign"] == "winter_sale"
    code, out, _ = _cli(
        capsys, "kill", "--surface", "home_feed", "--campaign", CAMPAIGN, "--reason", "complaint"
    )
    assert code == 0


def test_recsys_kill_list_applies_its_filters(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    for argv in [
        ("--surface", "home_feed", "--region", "eu"),
        ("--surface", "push"),
        ("--surface", "push", "--region", "eu"),
        ("--surface", "email_daily", "--campaign", "spring", "--allow-unknown-campaign"),
    ]:
        assert _cli(capsys, "kill", *argv, "--reason", "r")[0] == 0

    def listed(*filters: str) -> list[tuple[str, str | None, str | None]]:
        code, out, _ = _cli(capsys, "kill", "--list", *filters)
        assert code == 0
        return [(k["surface"], k["region"], k["campaign"]) for k in json.loads(out)["kills"]]

    assert len(listed()) == 4
    assert listed("--surface", "push") == [("push", None, None), ("push", "eu", None)]
    assert listed("--region", "eu") == [("home_feed", "eu", None), ("push", "eu", None)]
    assert listed("--surface", "push", "--region", "eu") == [("push", "eu", None)]
    assert listed("--campaign", "spring") == [("email_daily", None, "spring")]
    assert listed("--surface", "digest_weekly") == []
    code, _, err = _cli(capsys, "kill", "--list", "--reason", "x")
    assert code == 2 and "--list takes only --surface, --region and --campaign" in err
