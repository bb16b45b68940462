"""The kills document on a local folder and on S3 (moto): concurrent kills from two
processes' switches both land, another switch follows on refresh, a damaged document never
lifts a kill already known and is reported until restored, a switch that starts on one knows
it knows nothing, and kills of unknown regions / campaigns or with control characters are
refused naming the field."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from recsys_assets.config import load_settings
from recsys_assets.config.settings import DEFAULT_CONFIG_PATH
from recsys_assets.serving.kills import (
    KILLS_PATH,
    KillError,
    KillScope,
    KillsUnavailable,
    KillSwitch,
    NoSuchKill,
)
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
                lambda pair: pair[0].kill(
                    pair[1], reason="incident", actor="test", allow_unknown_campaign=True
                ),
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

    operators[0].lift(KillScope("push", "eu"), actor="test")
    assert replica.refresh()
    assert KillScope("push", "eu") not in {kill.scope for kill in replica.active.kills}
    with pytest.raises(NoSuchKill, match="no kill of surface=push region=eu is active"):
        operators[1].lift(KillScope("push", "eu"), actor="test")


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"{not json", "malformed: not JSON"),
        (b'{"kills": [], "extra": 1}', "exactly one key, 'kills'"),
        (b'{"kills": {}}', "'kills' must be a list"),
        (b'{"kills": [{"surface": "push", "colour": "red"}]}', r"kills\[0\] has unknown key"),
        (b'{"kills": [{"surface": "push"}]}', r"kills\[0\] lacks key"),
    ],
)
def test_a_damaged_document_keeps_the_known_kills_and_says_so(
    local_warehouse: Warehouse, content: bytes, problem: str
) -> None:
    switch = KillSwitch(local_warehouse, SETTINGS)
    switch.kill(KillScope("home_feed"), reason="bad model", actor="test")
    replica = KillSwitch(local_warehouse, SETTINGS)
    assert replica.refresh() and replica.problem is None
    local_warehouse.write_bytes(KILLS_PATH, content)
    assert not replica.refresh()
    assert replica.active.partition_kill("home_feed", "na") is not None
    assert replica.ever_read
    assert replica.problem is not None and "serving/kills.json is malformed" in replica.problem
    with pytest.raises(KillsUnavailable, match=problem) as raised:
        replica.read()
    assert raised.value.status_code == 503
    with pytest.raises(KillsUnavailable, match=r"serving/kills\.json is malformed"):
        replica.kill(KillScope("push"), reason="second incident", actor="test")
    with pytest.raises(KillsUnavailable, match=r"serving/kills\.json is malformed"):
        replica.lift(KillScope("home_feed"), actor="test")
    assert local_warehouse.read_bytes(KILLS_PATH) == content  # nothing was written over it

    local_warehouse.write_bytes(KILLS_PATH, b'{"kills": []}')  # restored by hand
    assert replica.refresh()
    assert replica.problem is None and not replica.active


def test_a_switch_started_on_a_damaged_document_knows_no_kill_and_says_so(
    local_warehouse: Warehouse,
) -> None:
    local_warehouse.write_bytes(KILLS_PATH, b'{"kills": [{"surface": "push"}]}')
    switch = KillSwitch(local_warehouse, SETTINGS)
    assert not switch.refresh()
    assert not switch.ever_read and switch.problem is not None
    assert "lacks key(s)" in switch.problem
    local_warehouse.delete(KILLS_PATH)
    assert switch.refresh()
    assert switch.ever_read and switch.problem is None


@pytest.mark.parametrize(
    ("scope", "reason", "message"),
    [
        (KillScope("home"), "x", "surface: unknown surface 'home'"),
        (
            KillScope("home_feed", "mars"),
            "x",
            r"region: surface 'home_feed' is not configured for region 'mars'; its regions: "
            r"\['na', 'eu', 'apac', 'latam'\]",
        ),
        (
            KillScope("enterprise_action_queue", "latam"),
            "x",
            r"its regions: \['na', 'eu', 'apac'\]",
        ),
        (KillScope("home_feed", campaign=" "), "x", "campaign: give the campaign_id"),
        (KillScope("home_feed", campaign="a\nb"), "x", "campaign: control character U\\+000A"),
        (KillScope("home_feed"), "  ", "reason: required"),
        (KillScope("home_feed"), "ok\nFORGED kill lifted", "reason: control character U\\+000A"),
        (KillScope("home_feed"), "nul\x00", "reason: control character U\\+0000 at position 3"),
        (KillScope("home_feed"), "tab\there", "reason: control character U\\+0009"),
        (KillScope("home_feed"), "bidi \u202e", "reason: control character U\\+202E"),
        (KillScope("home_feed"), "line \u2028", "reason: control character U\\+2028"),
        (
            KillScope("home_feed", campaign="spring_sale"),
            "x",
            "campaign: cannot check campaign 'spring_sale' against the raw items",
        ),
    ],
)
def test_bad_scopes_and_reasons_name_the_field(
    local_warehouse: Warehouse, scope: KillScope, reason: str, message: str
) -> None:
    with pytest.raises(KillError, match=message):
        KillSwitch(local_warehouse, SETTINGS).kill(scope, reason=reason, actor="test")
    assert not local_warehouse.exists(KILLS_PATH)


def test_control_characters_in_the_actor_are_refused(local_warehouse: Warehouse) -> None:
    switch = KillSwitch(local_warehouse, SETTINGS)
    with pytest.raises(KillError, match="actor: control character U\\+000D"):
        switch.kill(KillScope("home_feed"), reason="x", actor="cli:op\rFORGED")
    switch.kill(KillScope("home_feed"), reason="x", actor="cli:op")
    with pytest.raises(KillError, match="reason: control character U\\+001B"):
        switch.lift(KillScope("home_feed"), actor="cli:op", reason="\x1b[2J")
    assert switch.read()  # the kill is still there
