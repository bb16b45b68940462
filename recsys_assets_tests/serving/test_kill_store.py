"""The kills document on a local folder and on S3 (moto): concurrent kills from two
processes' switches both land, another switch follows on refresh, a damaged document never
lifts a kill already known."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from recsys_assets.config import load_settings
from recsys_assets.config.settings import DEFAULT_CONFIG_PATH
from recsys_assets.serving.kills import KILLS_PATH, KillError, KillScope, KillSwitch, NoSuchKill
from recsys_assets.warehouse import Warehouse

SETTINGS = load_settings(DEFAULT_CONFIG_PATH)


def test_concurrent_kills_all_land_and_other_switches_follow(warehouse: Warehouse) -> None:
    operators = [KillSwitch(warehouse, SETTINGS) for _ in range(4)]
    scopes = [
        KillScope("home_feed"),
        KillScope("push", "eu"),
        KillScope("email_daily", campaign="spring_sale"),
        KillScope("digest_weekly", "na", "spring_sale"),
    ]
    with ThreadPoolExecutor(len(operators)) as pool:
        list(
            pool.map(
                lambda pair: pair[0].kill(pair[1], reason="incident", actor="test"),
                zip(operators, scopes, strict=True),
            )
        )
    replica = KillSwitch(warehouse, SETTINGS)
    assert replica.refresh()
    assert {kill.scope for kill in replica.active.kills} == set(scopes)
    active = replica.active
    assert active.partition_kill("home_feed", "apac") is not None
    assert active.partition_kill("push", "eu") is not None
    assert active.partition_kill("push", "na") is None
    assert active.killed_campaigns("email_daily", "latam") == {"spring_sale"}
    assert active.killed_campaigns("digest_weekly", "na") == {"spring_sale"}
    assert active.killed_campaigns("digest_weekly", "eu") == frozenset()
    assert not replica.refresh()  # unchanged document: nothing re-read

    operators[0].lift(KillScope("push", "eu"))
    assert replica.refresh()
    assert KillScope("push", "eu") not in {kill.scope for kill in replica.active.kills}
    with pytest.raises(NoSuchKill, match="no kill of surface=push region=eu is active"):
        operators[1].lift(KillScope("push", "eu"))


def test_a_damaged_document_keeps_the_known_kills(local_warehouse: Warehouse) -> None:
    switch = KillSwitch(local_warehouse, SETTINGS)
    switch.kill(KillScope("home_feed"), reason="bad model", actor="test")
    replica = KillSwitch(local_warehouse, SETTINGS)
    replica.refresh()
    local_warehouse.write_bytes(KILLS_PATH, b"{not json")
    assert not replica.refresh()
    assert replica.active.partition_kill("home_feed", "na") is not None
    with pytest.raises(ValueError, match=r"serving/kills\.json is malformed"):
        replica.kill(KillScope("push"), reason="second incident", actor="test")


@pytest.mark.parametrize(
    ("scope", "reason", "message"),
    [
        (KillScope("home"), "x", "surface: unknown surface 'home'"),
        (KillScope("home_feed", "mars"), "x", "region: unknown region 'mars'"),
        (KillScope("home_feed", campaign=" "), "x", "campaign: give the campaign_id"),
        (KillScope("home_feed"), "  ", "reason: required"),
    ],
)
def test_bad_scopes_and_reasons_name_the_field(
    local_warehouse: Warehouse, scope: KillScope, reason: str, message: str
) -> None:
    with pytest.raises(KillError, match=message):
        KillSwitch(local_warehouse, SETTINGS).kill(scope, reason=reason, actor="test")
    assert not local_warehouse.exists(KILLS_PATH)
