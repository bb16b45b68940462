"""Subject selection honours consent changes posted to serving since the raw snapshot."""

from __future__ import annotations

from datetime import timedelta

import pandas as pd

from recsys_assets.config import load_settings
from recsys_assets.config.settings import DEFAULT_CONFIG_PATH
from recsys_assets.data.snapshot import read_raw
from recsys_assets.pipeline.subjects import NO_CONSENT, select_subjects
from recsys_assets.rules.person import read_events
from recsys_assets.serving.state import OnlineState, ServingEvent
from recsys_assets.warehouse import Warehouse
from recsys_assets_tests.conftest import TINY_AS_OF
from recsys_assets_tests.serving.conftest import Clock

SETTINGS = load_settings(DEFAULT_CONFIG_PATH)
NOW = pd.Timestamp(TINY_AS_OF)
SURFACES = ("home_feed", "enterprise_action_queue")


def _subjects(warehouse: Warehouse, surface: str, region: str) -> tuple[set[int], int]:
    """(subject ids, users excluded for lack of consent) with every recorded event applied."""
    selection = select_subjects(
        read_raw(warehouse, "users"),
        SETTINGS.surface(surface),
        region=region,
        now=NOW,
        events=read_events(warehouse),
    )
    return set(selection.subjects["subject_id"].tolist()), selection.excluded[NO_CONSENT]


def test_a_consent_event_decides_every_personalized_surface(tiny_warehouse: Warehouse) -> None:
    users = read_raw(tiny_warehouse, "users")
    queue = select_subjects(
        users, SETTINGS.surface("enterprise_action_queue"), region="na", now=NOW
    )
    agent = int(queue.subjects["subject_id"].iloc[0])
    before = {surface: _subjects(tiny_warehouse, surface, "na") for surface in SURFACES}
    assert all(agent in subjects for subjects, _ in before.values())
    clock = Clock(TINY_AS_OF)
    state = OnlineState(tiny_warehouse, SETTINGS, clock=clock)

    state.record([ServingEvent("consent_revoked", user_id=agent)])  # as POST /v1/events does
    for surface in SURFACES:
        subjects, no_consent = _subjects(tiny_warehouse, surface, "na")
        assert subjects == before[surface][0] - {agent}
        assert no_consent == before[surface][1] + 1

    # The latest consent event wins; on an equal ts the one received later.
    later = TINY_AS_OF + timedelta(seconds=1)
    clock.advance(timedelta(seconds=2))
    state.record([ServingEvent("consent_granted", user_id=agent, ts=later)])
    assert all(agent in _subjects(tiny_warehouse, s, "na")[0] for s in SURFACES)
    clock.advance(timedelta(seconds=1))
    state.record([ServingEvent("consent_revoked", user_id=agent, ts=later)])
    assert all(agent not in _subjects(tiny_warehouse, s, "na")[0] for s in SURFACES)
