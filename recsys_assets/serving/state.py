"""Online state for the final check: what changed since the lists were generated.

Built from the raw snapshot (items, users, purchases, exposures, user controls), the
tombstones, and the serving events appended since (`serving/events/date=D/<uuid>.parquet`,
docs/DATA_MODEL.md "Serving events"), listed and ordered by `rules.person`: the batch side
reads the same files the same way, so the next run honours what serving was told. Item
state is an immutable `Catalog` (arrays by item position, tombstones merged in) swapped
whole when items or tombstones change.

Per-person state is columnar, so memory follows the rows serving needs, not Python objects
per event: at load, the consumed items, the latest control per target, the exposures of the
frequency-cap window and the consent events become numpy arrays grouped by user
(`UserRows`: one binary search per lookup), built from the raw tables read in batches and
from every serving event recorded so far. Events recorded after the load (here or by
another replica) go to a small overlay of dicts, applied in place under the same rules, so
a hide is effective on the very next request; a new raw snapshot folds them into the arrays.
A request builds the few sets its final check needs for that one person.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from array import array
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from recsys_assets.config import Settings
from recsys_assets.data.snapshot import RawDataMissing, raw_table_path, read_raw, read_snapshot
from recsys_assets.rules.eligibility import TOMBSTONED, ItemStateArrays
from recsys_assets.rules.person import (
    CONSENT_EVENTS,
    CONSUMED_EVENTS,
    EMAIL,
    EVENT_COLUMNS,
    EVENTS_PREFIX,
    HIDE_EVENTS,
    PERSON_FLAG_EVENTS,
    PUSH,
    blocks_consumed,
    consumed_mask,
    empty_events,
    event_files,
    hide_event_controls,
    in_apply_order,
    latest_controls,
    read_event_files,
)
from recsys_assets.rules.tombstones import (
    PersonTombstones,
    empty_tombstones,
    load_tombstones,
    next_effective_at,
    person_tombstones,
    tombstone_files,
    tombstoned_items,
)
from recsys_assets.warehouse import Warehouse

log = logging.getLogger(__name__)

EVENT_TYPES = (
    "hide_item",
    "hide_creator",
    "hide_category",
    "exposure",
    "purchase",
    *PERSON_FLAG_EVENTS,
)
_ITEM_EVENTS = ("hide_item", "exposure", "purchase")
FREQUENCY_WINDOW_NS = 24 * 3600 * 1_000_000_000
INT64_MAX = int(np.iinfo(np.int64).max)
"""Ids are int64 everywhere (raw tables, lists, logs): a larger one is a client error."""
_FUTURE_SLACK_NS = 5 * 60 * 1_000_000_000
USER_COLUMNS = [
    "user_id",
    "consent_personalization",
    "email_subscribed",
    "push_enabled",
    "tenant_id",
    "actor_role",
]
"""The raw users columns serving reads (the rest is never needed online)."""
CONTROL_TARGETS = ("item", "creator", "category")
"""A control's target_type, as coded in `PersonalState`'s control rows."""
_SCAN_BATCH_ROWS = 262_144
"""Rows per batch when streaming a raw table: bounds what one read holds."""


class InvalidEvent(ValueError):
    """A serving event that cannot be applied; the message says which field and why."""


def naive_utc_ns(moment: datetime) -> int:
    stamp = pd.Timestamp(moment)
    if stamp.tzinfo is not None:
        stamp = stamp.tz_convert("UTC").tz_localize(None)
    return int(stamp.as_unit("ns").value)


def _nanoseconds(stamps: pd.Series) -> np.ndarray:
    return stamps.astype("datetime64[ns]").to_numpy().view(np.int64)


@dataclass(frozen=True, slots=True)
class ServingEvent:
    """One user action reported to serving (hide, exposure, purchase, consent change)."""

    type: str
    user_id: int
    item_id: int | None = None
    creator_id: str | None = None
    category: str | None = None
    surface: str | None = None
    region: str | None = None
    ts: datetime | None = None

    def check(self, settings: Settings, *, now_ns: int) -> None:
        """Raise InvalidEvent unless the event names what its type needs, with storable values."""
        if self.type not in EVENT_TYPES:
            raise InvalidEvent(f"type {self.type!r} is not one of {list(EVENT_TYPES)}")
        for name, value in (("user_id", self.user_id), ("item_id", self.item_id)):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= INT64_MAX
            ):
                raise InvalidEvent(f"{name} must be an integer in 0..{INT64_MAX}, got {value!r}")
        if self.type in _ITEM_EVENTS and self.item_id is None:
            raise InvalidEvent(f"a {self.type} event needs item_id")
        if self.type == "hide_creator" and not self.creator_id:
            raise InvalidEvent("a hide_creator event needs creator_id")
        if self.type == "hide_category" and not self.category:
            raise InvalidEvent("a hide_category event needs category")
        if self.type == "exposure" and self.surface is None:
            raise InvalidEvent("an exposure event needs the surface it was shown on")
        if self.surface is not None and self.surface not in settings.surfaces:
            raise InvalidEvent(
                f"unknown surface {self.surface!r}; configured surfaces: {sorted(settings.surfaces)}"
            )
        if self.region is not None and self.region not in settings.regions:
            raise InvalidEvent(
                f"unknown region {self.region!r}; configured regions: {list(settings.regions)}"
            )
        if self.ts is not None:
            try:
                ts_ns = naive_utc_ns(self.ts)
            except (OverflowError, ValueError) as error:  # outside datetime64[ns]: 1677..2262
                raise InvalidEvent(f"ts {self.ts} is out of range ({error})") from error
            if ts_ns > now_ns + _FUTURE_SLACK_NS:
                raise InvalidEvent(f"ts {self.ts} is in the future; send UTC timestamps")


class Catalog:
    """Item state by item position: rule codes per region plus creator, category and
    sponsored campaign (`campaign_codes` index `campaign_index`'s ids; -1 = none)."""

    __slots__ = ("arrays", "campaign_codes", "campaign_index", "category_of", "creator_of")

    def __init__(
        self,
        arrays: ItemStateArrays,
        creator_of: list[str],
        category_of: list[str],
        campaign_codes: np.ndarray,
        campaign_index: dict[str, int],
    ):
        self.arrays = arrays
        self.creator_of = creator_of
        self.category_of = category_of
        self.campaign_codes = campaign_codes
        self.campaign_index = campaign_index

    def in_campaigns(self, positions: np.ndarray, campaigns: frozenset[str]) -> np.ndarray:
        """Whether each item (by catalog position, -1 = unknown) belongs to `campaigns`."""
        codes = [self.campaign_index[c] for c in campaigns if c in self.campaign_index]
        if not codes or len(positions) == 0:
            return np.zeros(len(positions), dtype=bool)
        found = np.isin(self.campaign_codes.take(np.maximum(positions, 0)), codes)
        return found & (positions >= 0)

    @classmethod
    def build(
        cls, items: pd.DataFrame, tombstones: pd.DataFrame, regions: tuple[str, ...], now: datetime
    ) -> Catalog:
        items = items.sort_values("item_id", kind="stable").reset_index(drop=True)
        arrays = ItemStateArrays.from_items(items, regions)
        withdrawn = {
            region: tombstoned_items(tombstones, items, region=region, now=now)
            for region in regions
        }
        if any(mask.any() for mask in withdrawn.values()):
            arrays = arrays.with_reason(TOMBSTONED, withdrawn)
        # Frames without campaigns (no sponsored items) have no campaign to kill.
        campaigns = items.get("campaign_id", pd.Series(None, index=items.index, dtype=object))
        codes, names = pd.factorize(campaigns, use_na_sentinel=True)
        return cls(
            arrays,
            items["creator_id"].astype(str).tolist(),
            items["category"].astype(str).tolist(),
            codes.astype(np.int32),
            {str(name): code for code, name in enumerate(names)},
        )


@dataclass(slots=True)
class Subject:
    """What serving knows about the recipient of a list."""

    user_id: int
    known: bool
    consent_personalization: bool
    email_subscribed: bool
    push_enabled: bool
    tenant_id: str | None
    actor_role: str | None


def _flags(values: pd.Series) -> bytes:
    """One byte per row: indexing bytes is as cheap as a list, at an eighth of the memory."""
    return values.astype(bool).to_numpy(dtype=np.uint8).tobytes()


def _labels(values: pd.Series) -> tuple[array, tuple[str | None, ...]]:
    """(code per row, labels): labels[-1] is None, the code of a missing value."""
    codes, uniques = pd.factorize(values, use_na_sentinel=True)
    return array("i", codes.astype(np.int32).tobytes()), (*map(str, uniques), None)


class UserDirectory:
    """Raw users as sorted columns: binary search per request, no per-user Python objects
    (ids in an `array("q")`, flags one byte each, tenant and role as codes)."""

    __slots__ = (
        "consent",
        "email",
        "push",
        "role_codes",
        "roles",
        "tenant_codes",
        "tenants",
        "user_ids",
    )

    def __init__(self, users: pd.DataFrame) -> None:
        users = users.sort_values("user_id", kind="stable")
        self.user_ids = array("q", users["user_id"].to_numpy(dtype=np.int64).tobytes())
        self.consent = _flags(users["consent_personalization"])
        self.email = _flags(users["email_subscribed"])
        self.push = _flags(users["push_enabled"])
        self.tenant_codes, self.tenants = _labels(users["tenant_id"])
        self.role_codes, self.roles = _labels(users["actor_role"])

    def find(self, user_id: int) -> int:
        ids = self.user_ids
        found = bisect_left(ids, user_id)
        if found < len(ids) and ids[found] == user_id:
            return found
        return -1

    def subject(self, user_id: int) -> Subject:
        """The raw flags of `user_id` (an unknown user has none)."""
        index = self.find(user_id)
        if index < 0:
            return Subject(user_id, False, False, False, False, None, None)
        return Subject(
            user_id,
            True,
            self.consent[index] == 1,
            self.email[index] == 1,
            self.push[index] == 1,
            self.tenants[self.tenant_codes[index]],
            self.roles[self.role_codes[index]],
        )


class UserRows:
    """One table's rows grouped by user, as columns: user `user_ids[i]` owns rows
    `offsets[i]:offsets[i + 1]` of every column, in their input order.

    The ids and offsets are `array("q")`: a C binary search (`bisect`) over them returns
    Python ints, cheaper per request than a numpy scalar lookup, in the same 8 bytes each.
    """

    __slots__ = ("columns", "offsets", "user_ids")

    def __init__(self, user_ids: np.ndarray, **columns: np.ndarray) -> None:
        user_ids = np.asarray(user_ids, dtype=np.int64)
        order = np.argsort(user_ids, kind="stable")
        grouped = user_ids[order]
        first = np.ones(len(grouped), dtype=bool)
        first[1:] = grouped[1:] != grouped[:-1]
        starts = np.flatnonzero(first)
        self.user_ids = array("q", grouped[starts].tobytes())
        self.offsets = array("q", np.append(starts, len(grouped)).astype(np.int64).tobytes())
        self.columns = {
            name: np.ascontiguousarray(values[order]) for name, values in columns.items()
        }

    def __len__(self) -> int:
        return self.offsets[-1]

    def span(self, user_id: int) -> tuple[int, int]:
        """(start, stop) of `user_id`'s rows; (0, 0) when there are none."""
        ids = self.user_ids
        index = bisect_left(ids, user_id)
        if index < len(ids) and ids[index] == user_id:
            return self.offsets[index], self.offsets[index + 1]
        return 0, 0

    def keep(self, kept: np.ndarray) -> UserRows:
        """The rows where `kept` is True (same grouping and order)."""
        owners = np.repeat(np.frombuffer(self.user_ids, dtype=np.int64), np.diff(self.offsets))
        return UserRows(
            owners[kept], **{name: values[kept] for name, values in self.columns.items()}
        )


def _smallest_int(values: np.ndarray) -> np.ndarray:
    """int32 when every value fits (item ids usually do): half the memory, same numbers."""
    values = np.asarray(values, dtype=np.int64)
    if len(values) == 0 or (values.min() >= 0 and values.max() <= np.iinfo(np.int32).max):
        return values.astype(np.int32)
    return values


@dataclass(slots=True)
class PersonalFilters:
    """The per-person sets one request checks; built only for people who have any."""

    tombstoned_items: set[int] | None
    tombstoned_creators: set[str] | None
    hidden_items: set[int] | None
    hidden_creators: set[str] | None
    hidden_categories: set[str] | None
    consumed: set[int] | None
    exposures: dict[int, list[int]] | None


def _control_rows(
    user_controls: pd.DataFrame, events: pd.DataFrame
) -> tuple[UserRows, tuple[str, ...]]:
    """The control that holds now per (user, target), raw controls then hide events (the
    later wins, on an equal ts the one recorded later), in ts order per user.

    Columns: `kind` (index into CONTROL_TARGETS), `target` (the item id, or the index of the
    creator or category into the returned names), `ts`, `hide`.
    """
    if events["type"].isin(list(HIDE_EVENTS)).any():
        user_controls = pd.concat([user_controls, hide_event_controls(events)], ignore_index=True)
    latest = latest_controls(user_controls)
    kind = np.select(
        [
            (latest["target_type"] == "item").to_numpy(),
            (latest["target_type"] == "creator").to_numpy(),
        ],
        [0, 1],
        2,
    ).astype(np.int8)
    targets = latest["target_id"].astype(str)
    item_ids = pd.to_numeric(targets.where(kind == 0), errors="coerce").to_numpy(dtype=np.float64)
    valid = (kind != 0) | ~np.isnan(item_ids)  # an item target that is not a number names nothing
    codes, names = pd.factorize(targets.where(kind != 0))
    target = np.where(kind == 0, np.nan_to_num(item_ids).astype(np.int64), codes)
    rows = UserRows(
        latest["user_id"].to_numpy(dtype=np.int64)[valid],
        kind=kind[valid],
        target=target[valid],
        ts=_nanoseconds(latest["ts"])[valid],
        hide=(latest["action"] == "hide").to_numpy()[valid],
    )
    return rows, tuple(map(str, names))


def _exposure_rows(exposures: pd.DataFrame, surface: str) -> UserRows:
    shown = exposures[(exposures["surface"] == surface).to_numpy()]
    return UserRows(
        shown["user_id"].to_numpy(dtype=np.int64),
        item_id=shown["item_id"].to_numpy(dtype=np.int64),
        ts=_nanoseconds(shown["ts"]),
    )


class PersonalState:
    """Hides, consumed items, recent exposures and consent changes per person.

    Columnar `UserRows` hold raw data plus the events known when the state was built; the
    `*_since` dicts are the overlay of events applied afterwards (in place, one writer at a
    time), consulted with the columns at request time.
    """

    def __init__(
        self,
        *,
        controls: UserRows | None = None,
        control_names: tuple[str, ...] = (),
        consumed: UserRows | None = None,
        exposures: dict[str, UserRows] | None = None,
        consent: UserRows | None = None,
    ) -> None:
        none = np.empty(0, dtype=np.int64)
        self.controls = (
            UserRows(none, kind=none.astype(np.int8), target=none, ts=none, hide=none.astype(bool))
            if controls is None
            else controls
        )
        self.control_names = control_names
        self.consumed = UserRows(none, item_id=none) if consumed is None else consumed
        self.exposures = {} if exposures is None else exposures
        """Per capped surface, exposure rows (item_id, ts) by user."""
        self.consent = (
            UserRows(none, ts=none, granted=none.astype(bool)) if consent is None else consent
        )
        self.controls_since: dict[int, dict[tuple[int, int | str], tuple[int, bool]]] = {}
        self.consumed_since: dict[int, set[int]] = {}
        self.exposures_since: dict[tuple[int, str], dict[int, list[int]]] = {}
        self.consent_since: dict[int, tuple[int, bool]] = {}
        self.subscriptions: dict[tuple[int, str], tuple[int, bool]] = {}
        """(user, `email_subscribed` | `push_enabled`) → (ts, value) of the latest event:
        opt-outs are rare, so a dict, not columns."""

    @classmethod
    def build(
        cls,
        *,
        user_controls: pd.DataFrame,
        consumed_users: np.ndarray,
        consumed_items: np.ndarray,
        events: pd.DataFrame,
        exposures: pd.DataFrame | None = None,
        capped_surfaces: Iterable[str] = (),
    ) -> PersonalState:
        """Raw controls, consumed (user, item) pairs and the frequency-cap window's
        `exposures` of the `capped_surfaces`, plus every serving event in `events`."""
        events = in_apply_order(events)
        controls, names = _control_rows(user_controls, events)
        bought = events[events["type"].isin(CONSUMED_EVENTS) & events["item_id"].notna()]
        users = np.concatenate([consumed_users, bought["user_id"].to_numpy(dtype=np.int64)])
        items = np.concatenate([consumed_items, bought["item_id"].to_numpy(dtype=np.int64)])
        order = np.lexsort((items, users))
        users, items = users[order], items[order]
        distinct = np.ones(len(users), dtype=bool)
        distinct[1:] = (users[1:] != users[:-1]) | (items[1:] != items[:-1])
        surfaces = tuple(capped_surfaces)
        shown = events.loc[
            (events["type"] == "exposure")
            & events["item_id"].notna()
            & events["surface"].isin(surfaces),
            ["user_id", "item_id", "surface", "ts"],
        ]
        if exposures is not None:
            shown = pd.concat([exposures, shown], ignore_index=True) if len(shown) else exposures
        changes = events[events["type"].isin(list(CONSENT_EVENTS))]
        changes = changes.drop_duplicates("user_id", keep="last")
        personal = cls(
            controls=controls,
            control_names=names,
            consumed=UserRows(users[distinct], item_id=_smallest_int(items[distinct])),
            exposures={surface: _exposure_rows(shown, surface) for surface in surfaces},
            consent=UserRows(
                changes["user_id"].to_numpy(dtype=np.int64),
                ts=_nanoseconds(changes["ts"]),
                granted=changes["type"].map(CONSENT_EVENTS).to_numpy(dtype=bool),
            ),
        )
        subscribed = events[events["type"].isin(list(PERSON_FLAG_EVENTS))]
        subscribed = subscribed[~subscribed["type"].isin(list(CONSENT_EVENTS))]
        for kind, user_id, ts_ns in zip(
            subscribed["type"].tolist(),
            subscribed["user_id"].tolist(),
            _nanoseconds(subscribed["ts"]).tolist(),
            strict=True,
        ):
            personal.set_subscription(int(user_id), *PERSON_FLAG_EVENTS[kind], ts_ns)
        return personal

    @classmethod
    def from_frames(cls, user_controls: pd.DataFrame, interactions: pd.DataFrame) -> PersonalState:
        """Hides and consumed items from the raw tables, by the person rules."""
        consumed = interactions[consumed_mask(interactions)]
        return cls.build(
            user_controls=user_controls,
            consumed_users=consumed["user_id"].to_numpy(dtype=np.int64),
            consumed_items=consumed["item_id"].to_numpy(dtype=np.int64),
            events=empty_events(),
        )

    # -- reading (hot path) ---------------------------------------------------------------

    def hidden(self, user_id: int) -> tuple[set[int] | None, set[str] | None, set[str] | None]:
        """(items, creators, categories) the person has hidden now."""
        start, stop = self.controls.span(user_id)
        since = self.controls_since.get(user_id)
        if start == stop and not since:
            return None, None, None
        hidden: tuple[set[Any], set[Any], set[Any]] = (set(), set(), set())
        if stop > start:
            columns = self.controls.columns
            names = self.control_names
            for kind, target, hide in zip(
                columns["kind"][start:stop].tolist(),
                columns["target"][start:stop].tolist(),
                columns["hide"][start:stop].tolist(),
                strict=True,
            ):
                value = target if kind == 0 else names[target]
                if hide:
                    hidden[kind].add(value)
                else:
                    hidden[kind].discard(value)
        if since:
            for (kind, value), (_, hide) in list(since.items()):
                if hide:
                    hidden[kind].add(value)
                else:
                    hidden[kind].discard(value)
        items, creators, categories = hidden
        return items or None, creators or None, categories or None

    def consumed_items(self, user_id: int) -> set[int] | None:
        start, stop = self.consumed.span(user_id)
        since = self.consumed_since.get(user_id)
        if start == stop:
            return since
        found = set(self.consumed.columns["item_id"][start:stop].tolist())
        if since:
            found |= since
        return found

    def exposures_on(self, user_id: int, surface: str) -> dict[int, list[int]] | None:
        """Exposure times per item of the person on `surface` (the window and newer)."""
        since = self.exposures_since.get((user_id, surface))
        rows = self.exposures.get(surface)  # read once: pruning swaps in new rows
        start, stop = rows.span(user_id) if rows is not None else (0, 0)
        if start == stop:
            return since
        found: dict[int, list[int]] = {}
        for item_id, ts in zip(
            rows.columns["item_id"][start:stop].tolist(),
            rows.columns["ts"][start:stop].tolist(),
            strict=True,
        ):
            found.setdefault(item_id, []).append(ts)
        if since:
            for item_id, stamps in list(since.items()):
                found.setdefault(item_id, []).extend(stamps)
        return found

    def consent_override(self, user_id: int) -> bool | None:
        """The consent the person's latest consent event left, or None without one."""
        latest = self.consent_since.get(user_id) or self._column_consent(user_id)
        return None if latest is None else latest[1]

    def subscription_override(self, user_id: int, flag: str) -> bool | None:
        """The value of `flag` the person's latest event about it left, or None without one."""
        latest = self.subscriptions.get((user_id, flag))
        return None if latest is None else latest[1]

    def _column_consent(self, user_id: int) -> tuple[int, bool] | None:
        start, stop = self.consent.span(user_id)
        if start == stop:
            return None
        columns = self.consent.columns
        return int(columns["ts"][start]), bool(columns["granted"][start])

    def _column_control(
        self, user_id: int, kind: int, target: int | str
    ) -> tuple[int, bool] | None:
        start, stop = self.controls.span(user_id)
        found = None
        columns = self.controls.columns
        for row in range(start, stop):
            value = int(columns["target"][row])
            if int(columns["kind"][row]) == kind and (
                value == target if kind == 0 else self.control_names[value] == target
            ):
                found = int(columns["ts"][row]), bool(columns["hide"][row])
        return found

    # -- events (one writer at a time) -------------------------------------------------------

    def control(self, user_id: int, target_type: str, target_id: str, ts_ns: int, hide: bool):
        """Apply a hide or unhide unless a newer action on the same target is already known."""
        kind = CONTROL_TARGETS.index(target_type) if target_type in CONTROL_TARGETS else 2
        target: int | str = int(target_id) if kind == 0 else target_id
        since = self.controls_since.get(user_id, {})
        previous = since.get((kind, target)) or self._column_control(user_id, kind, target)
        if previous is not None and previous[0] > ts_ns:
            return
        self.controls_since.setdefault(user_id, since)[(kind, target)] = (ts_ns, hide)

    def consume(self, user_id: int, item_id: int) -> None:
        self.consumed_since.setdefault(user_id, set()).add(item_id)

    def set_consent(self, user_id: int, ts_ns: int, granted: bool) -> None:
        previous = self.consent_since.get(user_id) or self._column_consent(user_id)
        if previous is None or previous[0] <= ts_ns:
            self.consent_since[user_id] = (ts_ns, granted)

    def set_subscription(self, user_id: int, flag: str, value: bool, ts_ns: int) -> None:
        previous = self.subscriptions.get((user_id, flag))
        if previous is None or previous[0] <= ts_ns:
            self.subscriptions[(user_id, flag)] = (ts_ns, value)

    def expose(self, user_id: int, surface: str, item_id: int, ts_ns: int) -> None:
        self.exposures_since.setdefault((user_id, surface), {}).setdefault(item_id, []).append(
            ts_ns
        )

    def prune_exposures(self, now_ns: int) -> None:
        """Forget exposures older than the frequency-cap window."""
        cutoff = now_ns - FREQUENCY_WINDOW_NS
        pruned = {}
        for surface, rows in self.exposures.items():
            recent = rows.columns["ts"] > cutoff
            pruned[surface] = rows if recent.all() else rows.keep(recent)
        self.exposures = pruned  # one reference swap for readers
        for key in list(self.exposures_since):
            by_item = self.exposures_since[key]
            for item_id in list(by_item):
                kept = [ts for ts in by_item[item_id] if ts > cutoff]
                if kept:
                    by_item[item_id] = kept
                else:
                    del by_item[item_id]
            if not by_item:
                del self.exposures_since[key]


class OnlineState:
    """Items, users and per-person state, kept current by `sync()` and `record()`."""

    def __init__(
        self, warehouse: Warehouse, settings: Settings, *, clock: Callable[[], int] = time.time_ns
    ) -> None:
        self.warehouse = warehouse
        self.settings = settings
        self.clock = clock
        self.capped_surfaces = {
            name: surface.channel_rules.frequency_cap_per_day
            for name, surface in settings.surfaces.items()
            if surface.channel_rules.frequency_cap_per_day > 0
        }
        self.consumed_blocked = frozenset(
            name for name, surface in settings.surfaces.items() if blocks_consumed(surface)
        )
        self.catalog = Catalog.build(_no_items(), empty_tombstones(), settings.regions, _now(clock))
        self.users = UserDirectory(_no_users())
        self.personal = PersonalState()
        self.persons = PersonTombstones()
        self.snapshot_id: str | None = None
        self.ready = False
        """True once item and user state were loaded: without them nothing can be checked."""
        self.problem: str | None = None
        """Why the state is missing or may be out of date (for /healthz), or None."""
        self._items = _no_items()
        self._tombstone_files: tuple[str, ...] = ()
        self._next_tombstone_ns: int | None = None
        self._seen_event_files: set[str] = set()
        self._lock = threading.RLock()

    # -- reading (hot path) ---------------------------------------------------------------

    def subject(self, user_id: int) -> Subject:
        subject = self.users.subject(user_id)
        override = self.personal.consent_override(user_id)
        if override is not None:
            subject.consent_personalization = override
            subject.known = True
        if user_id in self.persons.no_personalization:
            subject.consent_personalization = False
        if self.personal.subscriptions:
            for flag in (EMAIL, PUSH):
                value = self.personal.subscription_override(user_id, flag)
                if value is not None:
                    setattr(subject, flag, value)  # Subject's fields are named like the flags
        return subject

    def filters(self, user_id: int, surface: str) -> PersonalFilters | None:
        """The person's sets for one request, or None when they have none (the common case)."""
        personal = self.personal
        persons = self.persons
        hidden_items, hidden_creators, hidden_categories = personal.hidden(user_id)
        found = PersonalFilters(
            persons.items.get(user_id),
            persons.creators.get(user_id),
            hidden_items,
            hidden_creators,
            hidden_categories,
            personal.consumed_items(user_id) if surface in self.consumed_blocked else None,
            personal.exposures_on(user_id, surface) if surface in self.capped_surfaces else None,
        )
        if (
            not found.tombstoned_items
            and not found.tombstoned_creators
            and not found.hidden_items
            and not found.hidden_creators
            and not found.hidden_categories
            and not found.consumed
            and not found.exposures
        ):
            return None
        return found

    # -- loading and syncing ----------------------------------------------------------------

    def load(self) -> None:
        """Rebuild everything from the raw snapshot, tombstones and all serving events.

        If the raw data cannot be read, the state loaded before stays (degraded, reported
        in `problem`); with nothing loaded yet, every item is unknown and `ready` is False.
        """
        with self._lock:
            try:
                snapshot = read_snapshot(self.warehouse)
                items = read_raw(self.warehouse, "items")
                users = read_raw(self.warehouse, "users", columns=USER_COLUMNS)
                person_tables = self._person_tables()
            except Exception as error:  # missing or unreadable: never drop a loaded state
                if self.ready:
                    self.problem = (
                        f"cannot reload raw data ({error}); serving the state of snapshot "
                        f"{self.snapshot_id}"
                    )
                    log.warning("serving: %s", self.problem)
                    return
                self.problem = f"no item state, every item is refused: {error}"
                log.warning("serving: %s", self.problem)
                snapshot, items, users = {}, _no_items(), _no_users()
                person_tables = _no_person_tables()
            else:
                self.ready, self.problem = True, None
            events, read = read_event_files(self.warehouse, event_files(self.warehouse))
            self._items = items
            self.users = UserDirectory(users)
            self.personal = PersonalState.build(
                **person_tables, events=events, capped_surfaces=self.capped_surfaces
            )
            self.snapshot_id = snapshot.get("snapshot_id")
            self._seen_event_files = set(read)
            self._load_tombstones(tombstone_files(self.warehouse))

    def sync(self) -> bool:
        """Pick up a new raw snapshot, new tombstones and other replicas' events."""
        with self._lock:
            try:
                snapshot_id = read_snapshot(self.warehouse).get("snapshot_id")
            except RawDataMissing as missing:
                snapshot_id = self.snapshot_id  # keep the loaded state (if any)
                if self.ready:
                    self.problem = f"{missing}; serving the state of snapshot {snapshot_id}"
            else:
                if snapshot_id == self.snapshot_id and self.ready:
                    self.problem = None  # the snapshot we serve from is back
            if snapshot_id != self.snapshot_id:
                self.load()
                return True
            changed = False
            files = tuple(tombstone_files(self.warehouse))
            now_ns = self.clock()
            due = self._next_tombstone_ns is not None and now_ns >= self._next_tombstone_ns
            if files != self._tombstone_files or due:
                self._load_tombstones(list(files))
                changed = True
            since = (_now(self.clock) - timedelta(days=1)).date()
            changed |= self._apply_event_files(self._event_files(since=since)) > 0
            self.personal.prune_exposures(now_ns)
            return changed

    def _person_tables(self) -> dict[str, Any]:
        """Raw controls, consumed (user, item) pairs and the window's exposures of capped
        surfaces: interactions and exposures are scanned a row group at a time, keeping only
        those rows and columns."""
        users, items = [], []
        scan = _scan(
            self.warehouse, "interactions", ["user_id", "item_id", "event_type"], text="event_type"
        )
        for batch in scan:
            consumed = _text_in(batch.column("event_type"), CONSUMED_EVENTS)
            users.append(batch.column("user_id").to_numpy(zero_copy_only=False)[consumed])
            items.append(batch.column("item_id").to_numpy(zero_copy_only=False)[consumed])
        tables: dict[str, Any] = {
            "user_controls": read_raw(self.warehouse, "user_controls"),
            "consumed_users": np.concatenate([np.empty(0, np.int64), *users]).astype(np.int64),
            "consumed_items": np.concatenate([np.empty(0, np.int64), *items]).astype(np.int64),
            "exposures": None,
        }
        if self.capped_surfaces:
            cutoff = _now(self.clock) - timedelta(microseconds=FREQUENCY_WINDOW_NS // 1000)
            columns = ["user_id", "item_id", "surface", "ts"]
            recent = [
                batch.filter(
                    _text_in(batch.column("surface"), self.capped_surfaces)
                    & (batch.column("ts").to_numpy(zero_copy_only=False) > np.datetime64(cutoff))
                )
                for batch in _scan(self.warehouse, "exposures", columns, text="surface")
            ]
            frames = [batch.to_pandas() for batch in recent if batch.num_rows]
            tables["exposures"] = pd.concat(frames, ignore_index=True) if frames else None
        return tables

    def _load_tombstones(self, files: list[str]) -> None:
        tombstones = load_tombstones(self.warehouse, files)
        now = _now(self.clock)
        self.catalog = Catalog.build(self._items, tombstones, self.settings.regions, now)
        self.persons = person_tombstones(tombstones, now=now)
        pending = next_effective_at(tombstones, now)
        self._next_tombstone_ns = None if pending is None else naive_utc_ns(pending)
        self._tombstone_files = tuple(files)

    # -- events -----------------------------------------------------------------------------

    def _event_files(self, *, since: Any) -> list[str]:
        found = event_files(self.warehouse, since=since)
        return [name for name in found if name not in self._seen_event_files]

    def _apply_event_files(self, files: list[str]) -> int:
        events, read = read_event_files(self.warehouse, files)
        self._seen_event_files.update(read)
        self._apply_frame(events)
        return len(events)

    def _apply_frame(self, events: pd.DataFrame) -> None:
        stamps = _nanoseconds(events["ts"]).tolist()
        for row, ts_ns in zip(events.itertuples(index=False), stamps, strict=True):
            self._apply(
                row.type,
                int(row.user_id),
                None if pd.isna(row.item_id) else int(row.item_id),
                None if pd.isna(row.creator_id) else str(row.creator_id),
                None if pd.isna(row.category) else str(row.category),
                None if pd.isna(row.surface) else str(row.surface),
                ts_ns,
            )

    def _apply(
        self,
        event_type: str,
        user_id: int,
        item_id: int | None,
        creator_id: str | None,
        category: str | None,
        surface: str | None,
        ts_ns: int,
    ) -> None:
        personal = self.personal
        if event_type == "hide_item":
            personal.control(user_id, "item", str(item_id), ts_ns, True)
        elif event_type == "hide_creator" and creator_id is not None:
            personal.control(user_id, "creator", creator_id, ts_ns, True)
        elif event_type == "hide_category" and category is not None:
            personal.control(user_id, "category", category, ts_ns, True)
        elif event_type in CONSUMED_EVENTS and item_id is not None:
            personal.consume(user_id, item_id)
        elif event_type == "exposure" and item_id is not None and surface in self.capped_surfaces:
            personal.expose(user_id, surface, item_id, ts_ns)
        elif event_type in CONSENT_EVENTS:
            personal.set_consent(user_id, ts_ns, event_type == "consent_granted")
        elif event_type in PERSON_FLAG_EVENTS:
            personal.set_subscription(user_id, *PERSON_FLAG_EVENTS[event_type], ts_ns)

    def record(self, events: Iterable[ServingEvent]) -> str:
        """Persist events as one Parquet file, then apply them; returns the file's path."""
        now_ns = self.clock()
        batch = list(events)
        for event in batch:
            event.check(self.settings, now_ns=now_ns)
        received_at = pd.Timestamp(now_ns, unit="ns")
        frame = pd.DataFrame(
            {
                "event_id": [uuid.uuid4().hex for _ in batch],
                "type": [event.type for event in batch],
                "user_id": pd.array([event.user_id for event in batch], dtype="int64"),
                "item_id": pd.array([event.item_id for event in batch], dtype="Int64"),
                "creator_id": pd.array([event.creator_id for event in batch], dtype="str"),
                "category": pd.array([event.category for event in batch], dtype="str"),
                "surface": pd.array([event.surface for event in batch], dtype="str"),
                "region": pd.array([event.region for event in batch], dtype="str"),
                "ts": pd.to_datetime(
                    [naive_utc_ns(e.ts) if e.ts else now_ns for e in batch], unit="ns"
                ),
                "received_at": [received_at] * len(batch),
            },
            columns=EVENT_COLUMNS,
        )
        path = f"{EVENTS_PREFIX}/date={received_at.date().isoformat()}/{uuid.uuid4().hex}.parquet"
        with self._lock:
            self.warehouse.write_parquet(path, frame)
            self._seen_event_files.add(path)
            self._apply_frame(frame)
        return path


def _scan(
    warehouse: Warehouse, table: str, columns: list[str], *, text: str
) -> Iterator[pa.RecordBatch]:
    """A raw table's `columns`, a row group at a time, the `text` column dictionary-encoded:
    memory holds one row group, however large the table."""
    parts = warehouse.parquet_parts(raw_table_path(table))
    if not parts:
        raise RawDataMissing(f"source table {table!r} is missing in {warehouse.uri('raw')}")
    for part in parts:
        with warehouse.fs.open(warehouse.path(part), "rb") as handle:
            reader = pq.ParquetFile(handle, read_dictionary=[text])
            for row_group in range(reader.num_row_groups):  # flat memory: see store._streamed
                yield from reader.iter_batches(
                    batch_size=_SCAN_BATCH_ROWS, columns=columns, row_groups=[row_group]
                )


def _text_in(column: pa.Array, wanted: Iterable[str]) -> np.ndarray:
    """Mask of the rows whose text is one of `wanted`, decided once per distinct value."""
    if not pa.types.is_dictionary(column.type):
        column = column.dictionary_encode()
    hit = np.isin(np.asarray(column.dictionary.to_pylist(), dtype=object), list(wanted))
    indices = pc.fill_null(column.indices, -1).to_numpy(zero_copy_only=False)
    return np.append(hit, False)[indices]


def _now(clock: Callable[[], int]) -> datetime:
    return datetime.fromtimestamp(clock() / 1e9, UTC).replace(tzinfo=None)


def _no_person_tables() -> dict[str, Any]:
    none = np.empty(0, dtype=np.int64)
    controls = pd.DataFrame(
        {
            "user_id": pd.Series(dtype="int64"),
            "target_type": pd.Series(dtype="str"),
            "target_id": pd.Series(dtype="str"),
            "action": pd.Series(dtype="str"),
            "ts": pd.Series(dtype="datetime64[ns]"),
        }
    )
    return {
        "user_controls": controls,
        "consumed_users": none,
        "consumed_items": none,
        "exposures": None,
    }


def _no_items() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "item_id": pd.Series(dtype="int64"),
            "category": pd.Series(dtype="str"),
            "creator_id": pd.Series(dtype="str"),
            "regions": pd.Series(dtype="str"),
            "status": pd.Series(dtype="str"),
            "policy_state": pd.Series(dtype="str"),
            "stock": pd.Series(dtype="int64"),
            "is_sponsored": pd.Series(dtype="bool"),
            "campaign_id": pd.Series(dtype="str"),
            "campaign_end": pd.Series(dtype="datetime64[ns]"),
            "tenant_id": pd.Series(dtype="str"),
            "required_role": pd.Series(dtype="str"),
            "case_state": pd.Series(dtype="str"),
        }
    )


def _no_users() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "user_id": pd.Series(dtype="int64"),
            "consent_personalization": pd.Series(dtype="bool"),
            "email_subscribed": pd.Series(dtype="bool"),
            "push_enabled": pd.Series(dtype="bool"),
            "tenant_id": pd.Series(dtype="str"),
            "actor_role": pd.Series(dtype="str"),
        }
    )
