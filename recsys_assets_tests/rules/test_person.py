"""Person rules: one definition, and the pipeline, publish validation and serving's final
check agree on random people, items, interactions, controls and the serving events received
since the snapshot (consent changes, hides, purchases) (property test)."""

from __future__ import annotations

import numpy as np
import pandas as pd
from hypothesis import given, settings
from hypothesis import strategies as st

from recsys_assets.config import SurfaceConfig, load_settings
from recsys_assets.config.settings import DEFAULT_CONFIG_PATH
from recsys_assets.pipeline.candidates import _blocked_pairs
from recsys_assets.pipeline.subjects import select_subjects
from recsys_assets.publish.validation import rejection_reasons
from recsys_assets.rules.eligibility import (
    ALREADY_CONSUMED,
    CONSENT_REVOKED,
    HIDDEN_BY_USER,
    REASON_BY_CODE,
)
from recsys_assets.rules.engagement import positive_signal
from recsys_assets.rules.person import (
    EVENT_COLUMNS,
    PersonFacts,
    in_apply_order,
    person_requirements,
)
from recsys_assets.rules.tombstones import empty_tombstones
from recsys_assets.serving.final_check import final_reason_codes
from recsys_assets.serving.service import RecommendationService, SurfacePolicy
from recsys_assets.serving.state import (
    Catalog,
    OnlineState,
    PersonalFilters,
    PersonalState,
    UserDirectory,
)

SETTINGS = load_settings(DEFAULT_CONFIG_PATH)
NOW = pd.Timestamp("2026-11-20")
CREATORS = ["c1", "c2", "c3"]
CATEGORIES = ["k1", "k2"]


def test_every_personalized_surface_needs_consent() -> None:
    for surface in SETTINGS.surfaces.values():
        assert ("consent_personalization" in person_requirements(surface)) == surface.personalized
    queue = SETTINGS.surfaces["enterprise_action_queue"]
    assert person_requirements(queue) == ("consent_personalization",)
    assert person_requirements(SETTINGS.surfaces["push"]) == (
        "consent_personalization",
        "push_enabled",
    )


def test_a_rating_is_positive_from_four_everywhere() -> None:
    frame = pd.DataFrame(
        {"event_type": ["rating", "rating", "click", "view", "hide"], "value": [3, 4, 0, 0, 0]}
    )
    assert positive_signal(frame).tolist() == [False, True, True, False, False]


def _items(count: int, draw: st.DrawFn) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "item_id": np.arange(count, dtype="int64"),
            "category": [draw(st.sampled_from(CATEGORIES)) for _ in range(count)],
            "creator_id": [draw(st.sampled_from(CREATORS)) for _ in range(count)],
            "regions": "*",
            "status": "active",
            "policy_state": "approved",
            "stock": 5,
            "is_sponsored": False,
            "campaign_end": pd.Series([pd.NaT] * count, dtype="datetime64[ns]"),
            "tenant_id": pd.Series([None] * count, dtype=object),
            "required_role": pd.Series([None] * count, dtype=object),
            "case_state": pd.Series([None] * count, dtype=object),
        }
    )


def _users(count: int, draw: st.DrawFn) -> pd.DataFrame:
    flags = [draw(st.tuples(st.booleans(), st.booleans(), st.booleans())) for _ in range(count)]
    return pd.DataFrame(
        {
            "user_id": np.arange(100, 100 + count, dtype="int64"),
            "region": "na",
            "tenant_id": "t1",  # every user is a tenant actor: the queue's audience rule holds
            "actor_role": "agent",
            "consent_personalization": [f[0] for f in flags],
            "email_subscribed": [f[1] for f in flags],
            "push_enabled": [f[2] for f in flags],
            "timezone": "UTC",
            "quiet_hours_start": 22,
            "quiet_hours_end": 7,
            "last_active_at": NOW - pd.Timedelta(days=1),
        }
    )


def _events(
    draw: st.DrawFn, user_ids: list[int], items: pd.DataFrame, seconds: list[int]
) -> pd.DataFrame:
    """Serving events as `OnlineState.record` writes them. Their timestamps are drawn from the
    controls' (and each other's), so ties between a raw control and an event, and between
    events (then the one received later wins), are exercised."""
    rows = []
    for index in range(draw(st.integers(0, 10))):
        kind = draw(
            st.sampled_from(
                ["consent_revoked", "consent_granted", "hide_item", "hide_creator",
                 "hide_category", "purchase"]
            )
        )  # fmt: skip
        item_id = draw(st.integers(0, len(items) - 1))
        rows.append(
            {
                "event_id": f"e{index}",
                "type": kind,
                "user_id": draw(st.sampled_from(user_ids)),
                "item_id": item_id if kind in ("hide_item", "purchase") else None,
                "creator_id": draw(st.sampled_from(CREATORS)) if kind == "hide_creator" else None,
                "category": draw(st.sampled_from(CATEGORIES)) if kind == "hide_category" else None,
                "surface": None,
                "region": None,
                "ts": NOW - pd.Timedelta(seconds=draw(st.sampled_from([*seconds, 0, 1]))),
                "received_at": NOW + pd.Timedelta(seconds=draw(st.integers(0, 2))),
            }
        )
    return pd.DataFrame(rows, columns=EVENT_COLUMNS).astype(
        {"user_id": "int64", "item_id": "Int64", "ts": "datetime64[ns]",
         "received_at": "datetime64[ns]"}
    )  # fmt: skip


@st.composite
def _world(
    draw: st.DrawFn,
) -> tuple[SurfaceConfig, pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    surface = SETTINGS.surfaces[draw(st.sampled_from(sorted(SETTINGS.surfaces)))]
    if draw(st.booleans()):
        surface = surface.model_copy(update={"repeat_consumption": True})
    items = _items(draw(st.integers(1, 12)), draw)
    users = _users(draw(st.integers(1, 5)), draw)
    user_ids = users["user_id"].tolist()
    n_events = draw(st.integers(0, 15))
    interactions = pd.DataFrame(
        {
            "user_id": [draw(st.sampled_from(user_ids)) for _ in range(n_events)],
            "item_id": [draw(st.integers(0, len(items) - 1)) for _ in range(n_events)],
            "event_type": [
                draw(st.sampled_from(["view", "click", "purchase", "rating", "hide"]))
                for _ in range(n_events)
            ],
            "value": [float(draw(st.integers(1, 5))) for _ in range(n_events)],
            "ts": NOW - pd.Timedelta(days=2),
        }
    ).astype({"user_id": "int64", "item_id": "int64"})
    n_controls = draw(st.integers(0, 12))
    targets = []
    for _ in range(n_controls):
        kind = draw(st.sampled_from(["item", "creator", "category"]))
        choices = {
            "item": [str(i) for i in items["item_id"]],
            "creator": CREATORS,
            "category": CATEGORIES,
        }[kind]
        targets.append((kind, draw(st.sampled_from(choices))))
    seconds = draw(
        st.lists(st.integers(0, 10**6), min_size=n_controls, max_size=n_controls, unique=True)
    )
    user_controls = pd.DataFrame(
        {
            "user_id": pd.Series(
                [draw(st.sampled_from(user_ids)) for _ in range(n_controls)], dtype="int64"
            ),
            "target_type": [kind for kind, _ in targets],
            "target_id": [target for _, target in targets],
            "action": [draw(st.sampled_from(["hide", "unhide"])) for _ in range(n_controls)],
            "ts": pd.to_datetime([NOW - pd.Timedelta(seconds=s) for s in seconds]).astype(
                "datetime64[ns]"
            ),
        }
    )
    events = _events(draw, user_ids, items, seconds)
    return surface, items, users, interactions, user_controls, events


@settings(max_examples=80, deadline=None)
@given(world=_world())
def test_pipeline_publish_validation_and_serving_agree(world: tuple) -> None:
    surface, items, users, interactions, user_controls, events = world
    # Pipeline: who gets a list, and which (subject, item) pairs are never proposed.
    selected = set(
        select_subjects(users, surface, region="na", now=NOW, events=events)
        .subjects["subject_id"]
        .tolist()
    )
    blocked = _blocked_pairs(
        interactions,
        user_controls,
        items,
        repeat_consumption=surface.repeat_consumption,
        events=events,
    )
    pipeline_blocked = set(zip(blocked["subject_id"], blocked["item_id"], strict=True))
    # Publish validation: a list of every item for every user.
    lists = pd.DataFrame(
        [(u, i) for u in users["user_id"] for i in items["item_id"]],
        columns=["subject_id", "item_id"],
    ).assign(list_id=lambda f: f["subject_id"].astype(str), context_key="default")
    validation = rejection_reasons(
        lists,
        items,
        region="na",
        now=NOW,
        subjects=None,
        surface=surface,
        person=PersonFacts(users, interactions, user_controls, events),
    )
    # Serving: the same raw tables through the online state and the final check, then the
    # events applied in place, in the order a (re)loading replica applies them.
    state = OnlineState(None, SETTINGS.model_copy(update={"surfaces": {surface.name: surface}}))  # type: ignore[arg-type]
    state.users = UserDirectory(users)
    state.personal = PersonalState.from_frames(user_controls, interactions)
    state._apply_frame(in_apply_order(events))
    catalog = Catalog.build(items, empty_tombstones(), ("na",), NOW.to_pydatetime())
    policy = SurfacePolicy.of(surface)
    item_ids = items["item_id"].to_numpy()
    positions = catalog.arrays.positions(item_ids)
    for row, user_id in enumerate(users["user_id"].tolist()):
        subject = state.subject(user_id)
        consented = RecommendationService._consented(policy, subject)
        judged = validation[lists["subject_id"] == user_id].tolist()
        assert consented == (user_id in selected)
        if not consented:
            assert judged == [CONSENT_REVOKED] * len(item_ids)
            continue
        codes = final_reason_codes(
            item_ids,
            positions,
            catalog=catalog,
            region="na",
            now_ns=NOW.value,
            subject=subject,
            filters=state.filters(user_id, surface.name),
            frequency_cap=0,
        )
        served = [REASON_BY_CODE[code] for code in codes]
        assert served == judged, (user_id, row)
        for item_id, reason in zip(item_ids.tolist(), served, strict=True):
            assert reason in (None, HIDDEN_BY_USER, ALREADY_CONSUMED)
            assert (reason is not None) == ((user_id, item_id) in pipeline_blocked)


def test_hidden_precedes_consumed_whatever_the_target() -> None:
    """A consumed item whose creator is hidden is reported hidden (REJECTION_REASONS order)."""
    items = pd.DataFrame(
        {
            "item_id": np.array([0, 1], dtype="int64"),
            "category": "k1",
            "creator_id": ["c1", "c2"],
            "regions": "*",
            "status": "active",
            "policy_state": "approved",
            "stock": 5,
            "is_sponsored": False,
            "campaign_end": pd.Series([pd.NaT] * 2, dtype="datetime64[ns]"),
            "tenant_id": pd.Series([None] * 2, dtype=object),
            "required_role": pd.Series([None] * 2, dtype=object),
            "case_state": pd.Series([None] * 2, dtype=object),
        }
    )
    catalog = Catalog.build(items, empty_tombstones(), ("na",), NOW.to_pydatetime())
    ids = items["item_id"].to_numpy()
    filters = PersonalFilters(None, None, None, {"c1"}, None, {0, 1}, None)
    subject = OnlineState(None, SETTINGS).subject(100)  # type: ignore[arg-type]
    codes = final_reason_codes(
        ids,
        catalog.arrays.positions(ids),
        catalog=catalog,
        region="na",
        now_ns=NOW.value,
        subject=subject,
        filters=filters,
        frequency_cap=0,
    )
    assert [REASON_BY_CODE[code] for code in codes] == [HIDDEN_BY_USER, ALREADY_CONSUMED]
