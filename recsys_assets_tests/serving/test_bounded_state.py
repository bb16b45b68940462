"""Serving's columnar per-person state answers exactly as the per-event dicts it replaced.

`ReferenceState` below is the state serving kept before (a Python set or dict entry per
person, control and exposure, every event applied in place), reduced to what the final
check reads. On random people, items, interactions, controls, exposures and serving events
(part of them known at load, the rest arriving afterwards), the columnar state built at
load plus its overlay gives the same subject and the same final-check reason for every
item, person and surface; and so does `OnlineState.load` reading a real warehouse in
row-group batches.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import numpy as np
import pandas as pd
from hypothesis import given, settings
from hypothesis import strategies as st

from recsys_assets.config import load_settings
from recsys_assets.config.settings import DEFAULT_CONFIG_PATH
from recsys_assets.data.snapshot import read_raw
from recsys_assets.rules.person import (
    CONSUMED_EVENTS,
    EVENT_COLUMNS,
    blocks_consumed,
    consumed_mask,
    in_apply_order,
    latest_controls,
)
from recsys_assets.rules.tombstones import empty_tombstones
from recsys_assets.serving.final_check import final_reason_codes
from recsys_assets.serving.state import (
    FREQUENCY_WINDOW_NS,
    Catalog,
    OnlineState,
    PersonalFilters,
    PersonalState,
    ServingEvent,
    Subject,
    UserDirectory,
)
from recsys_assets.warehouse import Warehouse
from recsys_assets_tests.conftest import TINY_AS_OF

SETTINGS = load_settings(DEFAULT_CONFIG_PATH)
NOW = pd.Timestamp("2026-11-20 12:00")
CREATORS = ["c1", "c2", "c3"]
CATEGORIES = ["k1", "k2"]
CAPPED = {
    name: surface.channel_rules.frequency_cap_per_day
    for name, surface in SETTINGS.surfaces.items()
    if surface.channel_rules.frequency_cap_per_day > 0
}


class ReferenceState:
    """The dict-of-sets person state serving kept before, as the oracle."""

    def __init__(
        self,
        users: pd.DataFrame,
        user_controls: pd.DataFrame,
        interactions: pd.DataFrame,
        exposures: pd.DataFrame,
        now_ns: int,
    ) -> None:
        self.users = users.drop_duplicates("user_id").set_index("user_id")
        self.control_actions: dict[tuple[int, str, str], tuple[int, bool]] = {}
        self.hidden: dict[str, dict[int, set[Any]]] = {"item": {}, "creator": {}, "category": {}}
        self.consumed: dict[int, set[int]] = {}
        self.exposures: dict[tuple[int, str], dict[int, list[int]]] = {}
        self.consent: dict[int, tuple[int, bool]] = {}
        for row in latest_controls(user_controls).itertuples(index=False):
            self.control(
                int(row.user_id),
                row.target_type,
                str(row.target_id),
                _ns(row.ts),
                row.action == "hide",
            )
        consumed = interactions[consumed_mask(interactions)]
        for user_id, item_ids in consumed.groupby("user_id")["item_id"]:
            self.consumed[int(user_id)] = set(item_ids.astype(int).tolist())
        recent = exposures[exposures["ts"] > pd.Timestamp(now_ns - FREQUENCY_WINDOW_NS)]
        for row in recent.itertuples(index=False):
            self.expose(int(row.user_id), row.surface, int(row.item_id), _ns(row.ts))

    def control(
        self, user_id: int, target_type: str, target_id: str, ts_ns: int, hide: bool
    ) -> None:
        key = (user_id, target_type, target_id)
        previous = self.control_actions.get(key)
        if previous is not None and previous[0] > ts_ns:
            return
        self.control_actions[key] = (ts_ns, hide)
        kind = target_type if target_type in ("item", "creator") else "category"
        target: Any = int(target_id) if kind == "item" else target_id
        if hide:
            self.hidden[kind].setdefault(user_id, set()).add(target)
        elif user_id in self.hidden[kind]:
            self.hidden[kind][user_id].discard(target)

    def expose(self, user_id: int, surface: str, item_id: int, ts_ns: int) -> None:
        self.exposures.setdefault((user_id, surface), {}).setdefault(item_id, []).append(ts_ns)

    def apply(self, events: pd.DataFrame) -> None:
        """Events in place, in their apply order, as serving's `_apply` did."""
        for row in in_apply_order(events).itertuples(index=False):
            user_id, ts_ns = int(row.user_id), _ns(row.ts)
            item_id = None if pd.isna(row.item_id) else int(row.item_id)
            if row.type == "hide_item":
                self.control(user_id, "item", str(item_id), ts_ns, True)
            elif row.type == "hide_creator":
                self.control(user_id, "creator", str(row.creator_id), ts_ns, True)
            elif row.type == "hide_category":
                self.control(user_id, "category", str(row.category), ts_ns, True)
            elif row.type in CONSUMED_EVENTS and item_id is not None:
                self.consumed.setdefault(user_id, set()).add(item_id)
            elif row.type == "exposure" and item_id is not None and row.surface in CAPPED:
                self.expose(user_id, row.surface, item_id, ts_ns)
            elif row.type in ("consent_revoked", "consent_granted"):
                previous = self.consent.get(user_id)
                if previous is None or previous[0] <= ts_ns:
                    self.consent[user_id] = (ts_ns, row.type == "consent_granted")

    def subject(self, user_id: int) -> Subject:
        if user_id in self.users.index:
            user = self.users.loc[user_id]
            subject = Subject(
                user_id, True, bool(user["consent_personalization"]), bool(user["email_subscribed"]),
                bool(user["push_enabled"]), _text(user["tenant_id"]), _text(user["actor_role"]),
            )  # fmt: skip
        else:
            subject = Subject(user_id, False, False, False, False, None, None)
        if user_id in self.consent:
            subject.consent_personalization = self.consent[user_id][1]
            subject.known = True
        return subject

    def filters(self, user_id: int, surface: str) -> PersonalFilters:
        blocked = blocks_consumed(SETTINGS.surfaces[surface])
        return PersonalFilters(
            None,
            None,
            self.hidden["item"].get(user_id),
            self.hidden["creator"].get(user_id),
            self.hidden["category"].get(user_id),
            self.consumed.get(user_id) if blocked else None,
            self.exposures.get((user_id, surface)) if surface in CAPPED else None,
        )


def _ns(stamp: Any) -> int:
    return int(pd.Timestamp(stamp).as_unit("ns").value)


def _text(value: Any) -> str | None:
    return None if pd.isna(value) else str(value)


def _answers(state: Any, catalog: Catalog, user_ids: list[int], now_ns: int) -> dict:
    """Subject and final-check reason per item, for every person and surface."""
    item_ids = catalog.arrays.item_ids
    positions = catalog.arrays.positions(item_ids)
    found = {}
    for user_id in user_ids:
        subject = state.subject(user_id)
        for surface, config in SETTINGS.surfaces.items():
            codes = final_reason_codes(
                item_ids,
                positions,
                catalog=catalog,
                region="na",
                now_ns=now_ns,
                subject=subject,
                filters=state.filters(user_id, surface),
                frequency_cap=config.channel_rules.frequency_cap_per_day,
            )
            found[(user_id, surface)] = (subject, codes.tolist())
    return found


def _items(categories: list[str], creators: list[str]) -> pd.DataFrame:
    count = len(categories)
    return pd.DataFrame(
        {
            "item_id": np.arange(count, dtype="int64"),
            "category": categories,
            "creator_id": creators,
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


@st.composite
def _world(draw: st.DrawFn) -> dict[str, Any]:
    count = draw(st.integers(1, 6))
    items = _items(
        [draw(st.sampled_from(CATEGORIES)) for _ in range(count)],
        [draw(st.sampled_from(CREATORS)) for _ in range(count)],
    )
    n_users = draw(st.integers(1, 3))
    user_ids = list(range(100, 100 + n_users))
    users = pd.DataFrame(
        {
            "user_id": np.array(user_ids, dtype="int64"),
            "consent_personalization": [draw(st.booleans()) for _ in user_ids],
            "email_subscribed": [draw(st.booleans()) for _ in user_ids],
            "push_enabled": [draw(st.booleans()) for _ in user_ids],
            "tenant_id": [draw(st.sampled_from([None, "t1"])) for _ in user_ids],
            "actor_role": [draw(st.sampled_from([None, "agent"])) for _ in user_ids],
        }
    )
    any_user = st.sampled_from(user_ids)
    any_item = st.integers(0, len(items) - 1)
    seconds = st.sampled_from([0, 60, 3_600, 50_000, 90_000])
    n = draw(st.integers(0, 15))
    interactions = pd.DataFrame(
        {
            "user_id": [draw(any_user) for _ in range(n)],
            "item_id": [draw(any_item) for _ in range(n)],
            "event_type": [
                draw(st.sampled_from(["view", "click", "purchase", "rating", "hide"]))
                for _ in range(n)
            ],
        },
        columns=["user_id", "item_id", "event_type"],
    ).astype({"user_id": "int64", "item_id": "int64"})
    n = draw(st.integers(0, 12))
    targets = []
    for _ in range(n):
        kind = draw(st.sampled_from(["item", "creator", "category"]))
        choices = {"item": [str(i) for i in items["item_id"]], "creator": CREATORS}
        targets.append((kind, draw(st.sampled_from(choices.get(kind, CATEGORIES)))))
    user_controls = pd.DataFrame(
        {
            "user_id": pd.Series([draw(any_user) for _ in range(n)], dtype="int64"),
            "target_type": [kind for kind, _ in targets],
            "target_id": [target for _, target in targets],
            "action": [draw(st.sampled_from(["hide", "unhide"])) for _ in range(n)],
            "ts": pd.to_datetime([NOW - pd.Timedelta(seconds=draw(seconds)) for _ in range(n)]),
        }
    ).astype({"ts": "datetime64[ns]"})
    n = draw(st.integers(0, 12))
    exposures = pd.DataFrame(
        {
            "user_id": pd.Series([draw(any_user) for _ in range(n)], dtype="int64"),
            "item_id": pd.Series([draw(any_item) for _ in range(n)], dtype="int64"),
            "surface": [draw(st.sampled_from(sorted(CAPPED))) for _ in range(n)],
            "ts": pd.to_datetime([NOW - pd.Timedelta(seconds=draw(seconds)) for _ in range(n)]),
        }
    ).astype({"ts": "datetime64[ns]"})
    rows = []
    for index in range(draw(st.integers(0, 20))):
        kind = draw(
            st.sampled_from(
                ["consent_revoked", "consent_granted", "hide_item", "hide_creator",
                 "hide_category", "purchase", "exposure"]
            )
        )  # fmt: skip
        rows.append(
            {
                "event_id": f"e{index}",
                "type": kind,
                "user_id": draw(any_user),
                "item_id": draw(any_item)
                if kind in ("hide_item", "purchase", "exposure")
                else None,
                "creator_id": draw(st.sampled_from(CREATORS)) if kind == "hide_creator" else None,
                "category": draw(st.sampled_from(CATEGORIES)) if kind == "hide_category" else None,
                "surface": draw(st.sampled_from([*sorted(CAPPED), "home_feed"]))
                if kind == "exposure"
                else None,
                "region": None,
                "ts": NOW - pd.Timedelta(seconds=draw(seconds)),
                "received_at": NOW + pd.Timedelta(seconds=draw(st.integers(0, 2))),
                "at_load": draw(st.booleans()),
            }
        )
    events = pd.DataFrame(rows, columns=[*EVENT_COLUMNS, "at_load"]).astype(
        {"user_id": "int64", "item_id": "Int64", "ts": "datetime64[ns]",
         "received_at": "datetime64[ns]", "at_load": bool}
    )  # fmt: skip
    return {
        "items": items,
        "users": users,
        "interactions": interactions,
        "user_controls": user_controls,
        "exposures": exposures,
        "events": events,
    }


def _both(world: dict[str, Any], now_ns: int) -> tuple[OnlineState, ReferenceState, Catalog]:
    """The columnar state as `load` builds it (raw tables plus the events known then) with
    the later events applied in place, and the reference given the same, in the same order."""
    events = world["events"]
    at_load = events["at_load"].to_numpy()
    loaded, later = events.loc[at_load, EVENT_COLUMNS], events.loc[~at_load, EVENT_COLUMNS]
    reference = ReferenceState(
        world["users"], world["user_controls"], world["interactions"], world["exposures"], now_ns
    )
    reference.apply(loaded)
    reference.apply(later)
    state = OnlineState(None, SETTINGS, clock=lambda: now_ns)  # type: ignore[arg-type]
    state.users = UserDirectory(world["users"])
    consumed = world["interactions"][consumed_mask(world["interactions"])]
    window = world["exposures"]["ts"] > pd.Timestamp(now_ns - FREQUENCY_WINDOW_NS)
    state.personal = PersonalState.build(
        user_controls=world["user_controls"],
        consumed_users=consumed["user_id"].to_numpy(),
        consumed_items=consumed["item_id"].to_numpy(),
        exposures=world["exposures"][window],
        events=loaded,
        capped_surfaces=state.capped_surfaces,
    )
    state._apply_frame(in_apply_order(later))
    catalog = Catalog.build(world["items"], empty_tombstones(), ("na",), NOW.to_pydatetime())
    return state, reference, catalog


@settings(max_examples=300, deadline=None)
@given(world=_world())
def test_columnar_state_answers_as_the_dict_state(world: dict[str, Any]) -> None:
    now_ns = NOW.value
    state, reference, catalog = _both(world, now_ns)
    people = [*world["users"]["user_id"].tolist(), 999]  # and someone unknown
    assert _answers(state, catalog, people, now_ns) == _answers(reference, catalog, people, now_ns)
    later_ns = now_ns + 12 * 3_600 * 1_000_000_000  # some exposures leave the window
    state.personal.prune_exposures(later_ns)
    assert _answers(state, catalog, people, later_ns) == _answers(
        reference, catalog, people, later_ns
    )


def _at(seconds_before: int) -> pd.Timestamp:
    return NOW - pd.Timedelta(seconds=seconds_before)


def test_events_after_the_load_meet_what_was_loaded() -> None:
    """The overlay defers to newer loaded facts and adds to the loaded ones, as events
    applied in place did: an older hide loses to a newer raw unhide, a tie goes to the event
    applied later, an older consent change loses, exposures and purchases add up."""
    person = 100
    users = pd.DataFrame(
        {"user_id": [person], "consent_personalization": [True], "email_subscribed": [True],
         "push_enabled": [True], "tenant_id": [None], "actor_role": [None]}
    )  # fmt: skip
    controls = pd.DataFrame(
        {
            "user_id": [person] * 4,
            "target_type": ["item", "item", "category", "category"],
            "target_id": ["1", "1", "k2", "k2"],
            "action": ["hide", "unhide", "hide", "unhide"],
            "ts": [_at(500), _at(100), _at(500), _at(100)],
        }
    )
    events = pd.DataFrame(
        [
            ("consent_revoked", None, None, None, _at(100), True),
            ("exposure", 4, None, "push", _at(60), True),
            ("hide_item", 1, None, None, _at(300), False),  # older than the raw unhide
            ("hide_category", None, "k2", None, _at(100), False),  # a tie: applied later
            ("hide_item", 2, None, None, _at(900), False),
            ("consent_granted", None, None, None, _at(200), False),  # older than the revoke
            ("exposure", 4, None, "push", _at(30), False),
            ("purchase", 5, None, None, _at(10), False),
        ],
        columns=["type", "item_id", "category", "surface", "ts", "at_load"],
    ).assign(
        event_id=lambda f: [f"e{i}" for i in range(len(f))],
        user_id=person,
        creator_id=None,
        region=None,
        received_at=NOW,
    )
    world = {
        "items": _items(["k1", "k1", "k2", "k1", "k1", "k1"], ["c1"] * 6),
        "users": users,
        "interactions": pd.DataFrame(
            {"user_id": [person], "item_id": [3], "event_type": ["purchase"]}
        ),
        "user_controls": controls,
        "exposures": pd.DataFrame(
            {"user_id": [person], "item_id": [4], "surface": ["email_daily"], "ts": [_at(60)]}
        ),
        "events": events.astype({"item_id": "Int64", "ts": "datetime64[ns]"}),
    }
    state, reference, catalog = _both(world, NOW.value)
    assert _answers(state, catalog, [person], NOW.value) == _answers(
        reference, catalog, [person], NOW.value
    )
    filters = state.filters(person, "push")
    assert filters is not None
    assert (filters.hidden_items, filters.hidden_categories) == ({2}, {"k2"})  # not 1
    assert filters.consumed == {3, 5}
    assert filters.exposures == {4: [_at(60).value, _at(30).value]}
    assert state.subject(person).consent_personalization is False


def test_loading_a_warehouse_answers_as_the_dict_state(tiny_warehouse: Warehouse) -> None:
    """`load` scans interactions and exposures a row group at a time and folds the recorded
    events in; events another replica records afterwards arrive through `sync`."""
    clock = lambda: pd.Timestamp(TINY_AS_OF).value  # noqa: E731
    users = read_raw(tiny_warehouse, "users")
    items = read_raw(tiny_warehouse, "items")
    interactions = read_raw(tiny_warehouse, "interactions")
    consumed = interactions[consumed_mask(interactions)]
    someone, other = (int(u) for u in consumed["user_id"].iloc[:2])
    plain = items[
        (items["status"] == "active")
        & (items["policy_state"] == "approved")
        & (items["regions"] == "*")
        & (items["stock"] != 0)
        & ~items["is_sponsored"]
        & items["tenant_id"].isna()
        & items["required_role"].isna()
    ]
    theirs = set(consumed.loc[consumed["user_id"] == someone, "item_id"])
    item, shown = [i for i in plain["item_id"].astype(int) if i not in theirs][:2]
    category = items.loc[
        items["category"] != plain.set_index("item_id").at[shown, "category"], "category"
    ].iloc[0]
    bought = int(consumed["item_id"].iloc[0])
    writer = OnlineState(tiny_warehouse, SETTINGS, clock=clock)
    known = writer.record(
        [
            ServingEvent("hide_item", someone, item_id=item),
            ServingEvent("hide_creator", other, creator_id=str(items["creator_id"].iloc[1])),
            ServingEvent("consent_revoked", other),
            ServingEvent("purchase", other, item_id=bought),
            ServingEvent("exposure", someone, item_id=shown, surface="push"),
        ]
    )
    state = OnlineState(tiny_warehouse, SETTINGS, clock=clock)
    state.load()
    assert state.ready
    arrived = writer.record(  # after the load, from another replica
        [
            ServingEvent("consent_granted", other, ts=TINY_AS_OF + timedelta(seconds=1)),
            ServingEvent("exposure", someone, item_id=shown, surface="push"),
            ServingEvent("hide_category", someone, category=str(category)),
        ]
    )
    assert state.sync()

    reference = ReferenceState(
        users,
        read_raw(tiny_warehouse, "user_controls"),
        interactions,
        read_raw(tiny_warehouse, "exposures"),
        clock(),
    )
    for path in (known, arrived):
        reference.apply(tiny_warehouse.read_parquet(path))
    people = [*users["user_id"].tolist(), 10**12]
    assert _answers(state, state.catalog, people, clock()) == _answers(
        reference, state.catalog, people, clock()
    )
