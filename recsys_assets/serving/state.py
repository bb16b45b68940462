"""Online state for the final check: what changed since the lists were generated.

Built from the raw snapshot (items, users, purchases, exposures, user controls), the
tombstones, and the serving events appended since (`serving/events/date=D/<uuid>.parquet`,
docs/DATA_MODEL.md "Serving events"), listed and ordered by `rules.person`: the batch side
reads the same files the same way, so the next run honours what serving was told. Item
state is an immutable `Catalog` (arrays by item position, tombstones merged in) swapped
whole when items or tombstones change; per-person state (hides, purchases, exposures,
consent) lives in dicts of sets that events update in place, so a hide is effective on the
very next request.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pandas as pd

from recsys_assets.config import Settings
from recsys_assets.data.snapshot import RawDataMissing, read_raw, read_snapshot
from recsys_assets.rules.eligibility import TOMBSTONED, ItemStateArrays
from recsys_assets.rules.person import (
    CONSUMED_EVENTS,
    EVENT_COLUMNS,
    EVENTS_PREFIX,
    blocks_consumed,
    consumed_mask,
    event_files,
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
    "consent_revoked",
    "consent_granted",
)
_ITEM_EVENTS = ("hide_item", "exposure", "purchase")
FREQUENCY_WINDOW_NS = 24 * 3600 * 1_000_000_000
INT64_MAX = int(np.iinfo(np.int64).max)
"""Ids are int64 everywhere (raw tables, lists, logs): a larger one is a client error."""
_FUTURE_SLACK_NS = 5 * 60 * 1_000_000_000


class InvalidEvent(ValueError):
    """A serving event that cannot be applied; the message says which field and why."""


def naive_utc_ns(moment: datetime) -> int:
    stamp = pd.Timestamp(moment)
    if stamp.tzinfo is not None:
        stamp = stamp.tz_convert("UTC").tz_localize(None)
    return int(stamp.as_unit("ns").value)


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
    """Item state by item position: rule codes per region plus creator and category."""

    __slots__ = ("arrays", "category_of", "creator_of")

    def __init__(self, arrays: ItemStateArrays, creator_of: list[str], category_of: list[str]):
        self.arrays = arrays
        self.creator_of = creator_of
        self.category_of = category_of

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
        return cls(
            arrays,
            items["creator_id"].astype(str).tolist(),
            items["category"].astype(str).tolist(),
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


class UserDirectory:
    """Raw users as sorted arrays: binary search per request, no per-user Python objects."""

    __slots__ = ("actor_role", "consent", "email", "push", "tenant_id", "user_ids")

    def __init__(self, users: pd.DataFrame) -> None:
        users = users.sort_values("user_id", kind="stable")
        self.user_ids = np.ascontiguousarray(users["user_id"].to_numpy(dtype=np.int64))
        # Python lists: indexing one is ~10x cheaper than a numpy scalar on the hot path.
        self.consent: list[bool] = users["consent_personalization"].astype(bool).tolist()
        self.email: list[bool] = users["email_subscribed"].astype(bool).tolist()
        self.push: list[bool] = users["push_enabled"].astype(bool).tolist()
        self.tenant_id = users["tenant_id"].astype(object).where(users["tenant_id"].notna(), None)
        self.tenant_id = self.tenant_id.tolist()
        roles = users["actor_role"].astype(object).where(users["actor_role"].notna(), None)
        self.actor_role = roles.tolist()

    def find(self, user_id: int) -> int:
        found = int(self.user_ids.searchsorted(user_id))
        if found < len(self.user_ids) and self.user_ids[found] == user_id:
            return found
        return -1


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


@dataclass
class PersonalState:
    """Per-person state, updated in place by raw data and events (one writer at a time)."""

    control_actions: dict[tuple[int, str, str], tuple[int, bool]] = field(default_factory=dict)
    hidden_items: dict[int, set[int]] = field(default_factory=dict)
    hidden_creators: dict[int, set[str]] = field(default_factory=dict)
    hidden_categories: dict[int, set[str]] = field(default_factory=dict)
    consumed: dict[int, set[int]] = field(default_factory=dict)
    exposures: dict[tuple[int, str], dict[int, list[int]]] = field(default_factory=dict)
    consent: dict[int, tuple[int, bool]] = field(default_factory=dict)

    def control(self, user_id: int, target_type: str, target_id: str, ts_ns: int, hide: bool):
        """Apply a hide or unhide unless a newer action on the same target is already known."""
        key = (user_id, target_type, target_id)
        previous = self.control_actions.get(key)
        if previous is not None and previous[0] > ts_ns:
            return
        self.control_actions[key] = (ts_ns, hide)
        if target_type == "item":
            target: Any = int(target_id)
            sets: dict[int, set[Any]] = self.hidden_items
        elif target_type == "creator":
            target, sets = target_id, self.hidden_creators
        else:
            target, sets = target_id, self.hidden_categories
        if hide:
            sets.setdefault(user_id, set()).add(target)
        elif user_id in sets:
            sets[user_id].discard(target)

    @classmethod
    def from_frames(cls, user_controls: pd.DataFrame, interactions: pd.DataFrame) -> PersonalState:
        """Hides and consumed items from the raw tables, by the person rules."""
        personal = cls()
        for row in latest_controls(user_controls).itertuples(index=False):
            personal.control(
                int(row.user_id),
                row.target_type,
                str(row.target_id),
                naive_utc_ns(row.ts),
                row.action == "hide",
            )
        consumed = interactions[consumed_mask(interactions)]
        for user_id, item_ids in consumed.groupby("user_id")["item_id"]:
            personal.consumed[int(user_id)] = set(item_ids.astype(int).tolist())
        return personal

    def set_consent(self, user_id: int, ts_ns: int, granted: bool) -> None:
        previous = self.consent.get(user_id)
        if previous is None or previous[0] <= ts_ns:
            self.consent[user_id] = (ts_ns, granted)

    def expose(self, user_id: int, surface: str, item_id: int, ts_ns: int) -> None:
        self.exposures.setdefault((user_id, surface), {}).setdefault(item_id, []).append(ts_ns)

    def prune_exposures(self, now_ns: int) -> None:
        """Forget exposures older than the frequency-cap window."""
        cutoff = now_ns - FREQUENCY_WINDOW_NS
        for key in list(self.exposures):
            by_item = self.exposures[key]
            for item_id in list(by_item):
                recent = [ts for ts in by_item[item_id] if ts > cutoff]
                if recent:
                    by_item[item_id] = recent
                else:
                    del by_item[item_id]
            if not by_item:
                del self.exposures[key]


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
        users = self.users
        index = users.find(user_id)
        if index < 0:
            subject = Subject(user_id, False, False, False, False, None, None)
        else:
            subject = Subject(
                user_id,
                True,
                users.consent[index],
                users.email[index],
                users.push[index],
                users.tenant_id[index],
                users.actor_role[index],
            )
        override = self.personal.consent.get(user_id)
        if override is not None:
            subject.consent_personalization = override[1]
            subject.known = True
        if user_id in self.persons.no_personalization:
            subject.consent_personalization = False
        return subject

    def filters(self, user_id: int, surface: str) -> PersonalFilters | None:
        """The person's sets for one request, or None when they have none (the common case)."""
        personal = self.personal
        persons = self.persons
        found = PersonalFilters(
            persons.items.get(user_id),
            persons.creators.get(user_id),
            personal.hidden_items.get(user_id),
            personal.hidden_creators.get(user_id),
            personal.hidden_categories.get(user_id),
            personal.consumed.get(user_id) if surface in self.consumed_blocked else None,
            personal.exposures.get((user_id, surface)) if surface in self.capped_surfaces else None,
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
                users = read_raw(self.warehouse, "users")
                personal = self._personal_from_raw()
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
                snapshot, items, users, personal = {}, _no_items(), _no_users(), PersonalState()
            else:
                self.ready, self.problem = True, None
            self._items = items
            self.users = UserDirectory(users)
            self.personal = personal
            self.snapshot_id = snapshot.get("snapshot_id")
            self._seen_event_files = set()
            self._load_tombstones(tombstone_files(self.warehouse))
            self._apply_event_files(self._event_files(since=None))

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

    def _personal_from_raw(self) -> PersonalState:
        personal = PersonalState.from_frames(
            read_raw(self.warehouse, "user_controls"),
            read_raw(self.warehouse, "interactions", columns=["user_id", "item_id", "event_type"]),
        )
        if self.capped_surfaces:
            exposures = read_raw(self.warehouse, "exposures")
            cutoff = pd.Timestamp(_now(self.clock)) - pd.Timedelta(FREQUENCY_WINDOW_NS, "ns")
            recent = exposures[
                exposures["surface"].isin(list(self.capped_surfaces)) & (exposures["ts"] > cutoff)
            ]
            stamps = recent["ts"].astype("datetime64[ns]").to_numpy().view(np.int64)
            for user_id, item_id, surface, ts_ns in zip(
                recent["user_id"].tolist(),
                recent["item_id"].tolist(),
                recent["surface"].tolist(),
                stamps.tolist(),
                strict=True,
            ):
                personal.expose(user_id, surface, item_id, ts_ns)
        return personal

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
        stamps = events["ts"].astype("datetime64[ns]").to_numpy().view(np.int64).tolist()
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
            personal.consumed.setdefault(user_id, set()).add(item_id)
        elif event_type == "exposure" and item_id is not None and surface in self.capped_surfaces:
            personal.expose(user_id, surface, item_id, ts_ns)
        elif event_type in ("consent_revoked", "consent_granted"):
            personal.set_consent(user_id, ts_ns, event_type == "consent_granted")

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


def _now(clock: Callable[[], int]) -> datetime:
    return datetime.fromtimestamp(clock() / 1e9, UTC).replace(tzinfo=None)


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
