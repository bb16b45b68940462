"""Fresh signals for the online rerank: serving events read back the way other replicas
wrote them, kept for the horizon, trending counted over its window."""

from __future__ import annotations

from datetime import datetime, timedelta

import pandas as pd

from recsys_assets.config import load_settings
from recsys_assets.serving.fresh import FreshSignals
from recsys_assets.serving.state import OnlineState, ServingEvent
from recsys_assets.warehouse import Warehouse
from recsys_assets_tests.serving.conftest import Clock

NOW = datetime(2026, 11, 20, 12, 0)
HOUR_NS = 3600 * 1_000_000_000


def test_events_of_other_replicas_feed_person_signals_and_trending(
    local_warehouse: Warehouse,
) -> None:
    clock = Clock(NOW)
    other_replica = OnlineState(local_warehouse, load_settings(), clock=clock)
    other_replica.record(
        [
            ServingEvent("purchase", 1, 10, region="na", ts=NOW - timedelta(minutes=50)),
            ServingEvent("purchase", 2, 10, region="na", ts=NOW - timedelta(minutes=10)),
            ServingEvent("purchase", 2, 11, region="na", ts=NOW - timedelta(hours=2)),
            ServingEvent("purchase", 3, 12, region="eu", ts=NOW - timedelta(minutes=5)),
            ServingEvent("exposure", 1, 13, surface="home_feed", ts=NOW - timedelta(minutes=5)),
            ServingEvent("hide_item", 1, 14, ts=NOW - timedelta(minutes=5)),
        ]
    )
    fresh = FreshSignals(
        local_warehouse,
        horizon_ns=6 * HOUR_NS,
        trending_window_ns=HOUR_NS,
        trending_items=5,
        clock=clock,
    )
    assert fresh.sync() == 6
    assert fresh.trending("na") == {10: 2}  # item 11's purchase is outside the hour
    assert fresh.trending("eu") == {12: 1}
    since = pd.Timestamp(NOW - timedelta(hours=1)).value
    found = fresh.person_events(1, since)
    assert [(event.type, event.item_id) for event in found] == [("purchase", 10), ("exposure", 13)]
    assert fresh.person_events(2, since)[0].item_id == 10  # the older purchase is before `since`

    assert fresh.sync() == 0  # a file is read once
    fresh.record(
        "serving/events/this-replica.parquet", [ServingEvent("purchase", 4, 11, region="na")]
    )
    assert fresh.trending("na") == {10: 2, 11: 1}

    clock.advance(timedelta(hours=7))
    fresh.sync()
    assert fresh.trending("na") == {}
    assert fresh.person_events(1, 0) == []  # beyond the horizon
