"""Person rules: who may get a surface's personalized list, and which items they must not see.

One definition for subject selection, candidate blocking, publish validation and serving's
final check, so a person excluded or an item blocked in one place is excluded or blocked
everywhere (a property test checks that they agree):

- **Consent per surface.** Every personalized surface needs `consent_personalization`, on
  top of what its `eligibility.requires` lists (`email_subscribed`, `push_enabled`). The
  enterprise action queue is personalized too: revoking consent empties it like any other.
- **Already consumed.** A click, a purchase or a rating of the item (any value): the user has
  met it, so it is not proposed again unless the surface sets `repeat_consumption`.
- **Hidden.** The latest control per (user, target) wins: a later unhide lifts an earlier
  hide; on equal timestamps the one recorded later wins. Targets are an item, a creator or
  a category.
- **Positive interaction** lives in `rules/engagement.py` (`positive_signal`).

Facts come from the raw snapshot *and* from the events serving received since
(`serving/events/date=D/<uuid>.parquet`, written by `POST /v1/events`): a consent,
unsubscribe or push opt-out event overrides its raw flag (`PERSON_FLAG_EVENTS`; the latest
one per flag wins, whatever the age of the snapshot, so a re-seeded snapshot cannot forget a
revocation), a hide event is a control recorded after the raw ones, a purchase event a
consumed item. Serving applies the same
events in place (`serving/state.py`); subjects, candidates, publish validation and export
read them here, so a revocation reaches every role.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date

import numpy as np
import pandas as pd
import pyarrow.dataset as ds

from recsys_assets.config import SurfaceConfig
from recsys_assets.data.snapshot import raw_table_path, read_raw
from recsys_assets.rules.eligibility import ALREADY_CONSUMED, CONSENT_REVOKED, HIDDEN_BY_USER
from recsys_assets.warehouse import Warehouse

CONSENT = "consent_personalization"
EMAIL = "email_subscribed"
PUSH = "push_enabled"
PERSON_REQUIREMENTS = (CONSENT, EMAIL, PUSH)
"""Per-person flags a surface can require, in the order exclusions are reported."""

CONSUMED_EVENTS = ("click", "purchase", "rating")
"""Interactions after which an item is not recommended again to the same user (unless the
surface sets `repeat_consumption`)."""

EVENTS_PREFIX = "serving/events"
EVENT_SCHEMA: dict[str, str] = {
    "event_id": "str",
    "type": "str",
    "user_id": "int64",
    "item_id": "Int64",
    "creator_id": "str",
    "category": "str",
    "surface": "str",
    "region": "str",
    "ts": "datetime64[ns]",
    "received_at": "datetime64[ns]",
}
"""Columns of a serving event file (docs/DATA_MODEL.md, "Serving events")."""
EVENT_COLUMNS = list(EVENT_SCHEMA)
EVENT_ORDER = ["ts", "received_at"]
"""Events apply in this order: the later one wins; on an equal `ts` the one received later."""
CONSENT_EVENTS = {"consent_granted": True, "consent_revoked": False}
PERSON_FLAG_EVENTS: dict[str, tuple[str, bool]] = {
    "consent_granted": (CONSENT, True),
    "consent_revoked": (CONSENT, False),
    "email_subscribed": (EMAIL, True),
    "email_unsubscribed": (EMAIL, False),
    "push_enabled": (PUSH, True),
    "push_disabled": (PUSH, False),
}
"""Event type → (the person flag it sets, the value it sets). Opting back in (`True`) is an
admin action over the API, as granting consent is."""
OPT_IN_EVENTS = tuple(kind for kind, (_, value) in PERSON_FLAG_EVENTS.items() if value)
HIDE_EVENTS = {
    "hide_item": ("item", "item_id"),
    "hide_creator": ("creator", "creator_id"),
    "hide_category": ("category", "category"),
}
"""Hide event type → (control target_type, the event column naming the target)."""


def empty_events() -> pd.DataFrame:
    return pd.DataFrame({name: pd.Series(dtype=dtype) for name, dtype in EVENT_SCHEMA.items()})


@dataclass(frozen=True)
class PersonFacts:
    """What the person rules read: raw users (consent flags), interactions and controls, and
    the serving events received since (consent changes, hides, purchases)."""

    users: pd.DataFrame
    interactions: pd.DataFrame
    user_controls: pd.DataFrame
    events: pd.DataFrame = field(default_factory=empty_events)

    @property
    def current_users(self) -> pd.DataFrame:
        """`users` with consent and subscriptions as they stand now (their events applied)."""
        return with_consent_events(self.users, self.events)


def event_files(warehouse: Warehouse, *, since: date | None = None) -> list[str]:
    """Every serving event file (of day folders from `since` on), oldest day first."""
    found: list[str] = []
    for folder in warehouse.list_dirs(EVENTS_PREFIX):
        if since is not None and folder.removeprefix("date=") < since.isoformat():
            continue
        found.extend(warehouse.list(f"{EVENTS_PREFIX}/{folder}", suffix=".parquet"))
    return found


def read_event_files(warehouse: Warehouse, files: Iterable[str]) -> tuple[pd.DataFrame, list[str]]:
    """The events in `files`, in the order they apply, and the files read (a file removed
    between listing and reading is skipped, not an error)."""
    frames, read = [], []
    for name in files:
        try:
            frames.append(warehouse.read_parquet(name))
        except FileNotFoundError:
            continue
        read.append(name)
    if not frames:
        return empty_events(), read
    return in_apply_order(pd.concat(frames, ignore_index=True)), read


def read_events(warehouse: Warehouse) -> pd.DataFrame:
    """Every event serving has recorded, in the order they apply."""
    return read_event_files(warehouse, event_files(warehouse))[0]


def in_apply_order(events: pd.DataFrame) -> pd.DataFrame:
    return events.sort_values(EVENT_ORDER, kind="stable").reset_index(drop=True)


def read_person_facts(warehouse: Warehouse) -> PersonFacts | None:
    """The person rules' inputs as they stand now: raw users, consumed interactions and
    controls, plus every serving event.

    None when the raw snapshot or one of those tables is missing: without users nobody's
    consent can be judged, and the caller says so instead of passing everyone.
    """
    try:
        users = read_raw(warehouse, "users", columns=["user_id", *PERSON_REQUIREMENTS])
        user_controls = read_raw(warehouse, "user_controls")
        interactions = warehouse.dataset(raw_table_path("interactions"))
    except FileNotFoundError:  # RawDataMissing is one
        return None
    consumed = interactions.to_table(
        columns=["user_id", "item_id", "event_type"],
        filter=ds.field("event_type").isin(list(CONSUMED_EVENTS)),
    ).to_pandas()
    return PersonFacts(users, consumed, user_controls, read_events(warehouse))


def person_requirements(surface: SurfaceConfig) -> tuple[str, ...]:
    """The person flags `surface` needs: consent on every personalized surface, plus its
    listed subscriptions."""
    required = set(surface.eligibility.requires)
    if surface.personalized:
        required.add(CONSENT)
    return tuple(flag for flag in PERSON_REQUIREMENTS if flag in required)


def may_receive(surface: SurfaceConfig, flags: Mapping[str, bool]) -> bool:
    """Whether a person with these flags may get `surface`'s personalized list."""
    return all(bool(flags.get(flag, False)) for flag in person_requirements(surface))


def flag_overrides(events: pd.DataFrame, flag: str) -> pd.Series:
    """Per user_id, the value of `flag` their latest event about it left (True = opted in)."""
    kinds = {kind: value for kind, (named, value) in PERSON_FLAG_EVENTS.items() if named == flag}
    changes = in_apply_order(events[events["type"].isin(list(kinds))])
    latest = changes.drop_duplicates("user_id", keep="last")
    return pd.Series(
        latest["type"].map(kinds).to_numpy(dtype=bool),
        index=pd.Index(latest["user_id"].to_numpy(dtype=np.int64), name="user_id"),
        name=flag,
    )


def consent_overrides(events: pd.DataFrame) -> pd.Series:
    """Per user_id, the consent their latest consent event left (True = granted)."""
    return flag_overrides(events, CONSENT)


def with_consent_events(users: pd.DataFrame, events: pd.DataFrame) -> pd.DataFrame:
    """`users` whose person flags (consent, email, push; those it has) are overridden by
    their latest event about each."""
    changed: dict[str, np.ndarray] = {}
    for flag in PERSON_REQUIREMENTS:
        if flag not in users.columns:
            continue
        overrides = flag_overrides(events, flag)
        hit = users["user_id"].isin(overrides.index).to_numpy()
        if hit.any():
            values = users[flag].astype(bool).to_numpy(copy=True)
            values[hit] = users.loc[hit, "user_id"].map(overrides).to_numpy(dtype=bool)
            changed[flag] = values
    return users.assign(**changed) if changed else users


def without_consent(
    subject_ids: pd.Series, *, surface: SurfaceConfig, facts: PersonFacts
) -> np.ndarray:
    """True where the subject may not get `surface`'s personalized list now: a required flag
    is off (consent as its latest event left it), or the subject is not a known user."""
    flags = facts.current_users.drop_duplicates("user_id").set_index("user_id")
    allowed = np.ones(len(subject_ids), dtype=bool)
    for flag in person_requirements(surface):
        allowed &= subject_ids.map(flags[flag]).fillna(False).astype(bool).to_numpy()
    return ~allowed


def blocks_consumed(surface: SurfaceConfig) -> bool:
    return not surface.repeat_consumption


def consumed_mask(interactions: pd.DataFrame) -> np.ndarray:
    """True where an interaction means the user consumed the item."""
    return interactions["event_type"].isin(CONSUMED_EVENTS).to_numpy(dtype=bool)


def latest_controls(user_controls: pd.DataFrame) -> pd.DataFrame:
    """The latest control per (user_id, target_type, target_id): the one that holds now."""
    ordered = user_controls.sort_values("ts", kind="stable")
    return ordered.drop_duplicates(["user_id", "target_type", "target_id"], keep="last")


def hide_event_controls(events: pd.DataFrame) -> pd.DataFrame:
    """Hide events as user_controls rows (action `hide`), in the order they apply."""
    events = in_apply_order(events)
    target_id = pd.Series(None, index=events.index, dtype=object)
    for kind, (_, column) in HIDE_EVENTS.items():
        chosen = ((events["type"] == kind) & events[column].notna()).to_numpy()
        target_id[chosen] = events.loc[chosen, column].astype(str).to_numpy()
    hides = target_id.notna().to_numpy()
    targets = {kind: target for kind, (target, _) in HIDE_EVENTS.items()}
    return pd.DataFrame(
        {
            "user_id": events.loc[hides, "user_id"].astype("int64"),
            "target_type": events.loc[hides, "type"].map(targets).astype(object),
            "target_id": target_id[hides],
            "action": "hide",
            "ts": events.loc[hides, "ts"].astype("datetime64[ns]"),
        }
    ).reset_index(drop=True)


def hidden_pairs(
    user_controls: pd.DataFrame, items: pd.DataFrame, events: pd.DataFrame | None = None
) -> pd.DataFrame:
    """(user_id, item_id) pairs the user hid, directly or through a creator or category.

    Hide `events` count as controls recorded after the raw ones (on an equal timestamp the
    event wins, as serving applies them).
    """
    if events is not None and events["type"].isin(list(HIDE_EVENTS)).any():
        user_controls = pd.concat([user_controls, hide_event_controls(events)], ignore_index=True)
    hides = latest_controls(user_controls)
    hides = hides[hides["action"] == "hide"]
    direct = hides[hides["target_type"] == "item"]
    found = [
        pd.DataFrame(
            {
                "user_id": direct["user_id"].to_numpy(),
                "item_id": pd.to_numeric(direct["target_id"], errors="coerce"),
            }
        ).dropna()
    ]
    for target, column in (("creator", "creator_id"), ("category", "category")):
        chosen = hides.loc[hides["target_type"] == target, ["user_id", "target_id"]]
        if chosen.empty:
            continue
        keys = pd.DataFrame({"item_id": items["item_id"], "target_id": items[column].astype(str)})
        joined = chosen.assign(target_id=chosen["target_id"].astype(str)).merge(
            keys, on="target_id"
        )
        found.append(joined[["user_id", "item_id"]])
    pairs = pd.concat(found, ignore_index=True).astype("int64")
    return pairs.drop_duplicates().reset_index(drop=True)


def consumed_pairs(interactions: pd.DataFrame, events: pd.DataFrame | None = None) -> pd.DataFrame:
    """(user_id, item_id) pairs the user consumed, in raw interactions or purchase `events`."""
    found = [interactions.loc[consumed_mask(interactions), ["user_id", "item_id"]]]
    if events is not None:
        bought = events[events["type"].isin(CONSUMED_EVENTS) & events["item_id"].notna()]
        found.append(bought[["user_id", "item_id"]])
    consumed = pd.concat(found, ignore_index=True).astype("int64")
    return consumed.drop_duplicates().reset_index(drop=True)


def person_rejection_reasons(
    rows: pd.DataFrame,
    *,
    surface: SurfaceConfig,
    facts: PersonFacts,
    items: pd.DataFrame,
) -> pd.Series:
    """The person reason each (subject_id, item_id) row would be refused for (None = none).

    As serving reports them: a subject without the surface's consent gets no personalized
    list, so every row is `consent_revoked` (an unknown subject counts as not consenting);
    otherwise hidden before already consumed.
    """
    reasons = pd.Series(None, index=rows.index, dtype=object, name="person_reason")
    if rows.empty:
        return reasons
    blocked = [(HIDDEN_BY_USER, hidden_pairs(facts.user_controls, items, facts.events))]
    if blocks_consumed(surface):
        blocked.append((ALREADY_CONSUMED, consumed_pairs(facts.interactions, facts.events)))
    keys = pd.MultiIndex.from_arrays(
        [rows["subject_id"].astype("int64"), rows["item_id"].astype("int64")]
    )
    for reason, pairs in reversed(blocked):  # earlier reasons win: assign them last
        hit = keys.isin(pd.MultiIndex.from_frame(pairs[["user_id", "item_id"]]))
        reasons[hit] = reason
    revoked = without_consent(rows["subject_id"], surface=surface, facts=facts)
    reasons[revoked] = CONSENT_REVOKED  # no list at all: every row fails
    return reasons


def in_quiet_hours(hour: int, start: int, end: int) -> bool:
    """Whether a local hour is inside a person's quiet hours [start, end), the window
    wrapping midnight when start > end; start == end means no quiet hours."""
    if start == end:
        return False
    return start <= hour < end if start < end else hour >= start or hour < end


def known_timezone(name: str) -> str:
    """`name` when it is a timezone pandas knows, else "UTC": a message to someone with an
    unknown zone is scheduled and judged in UTC rather than dropped."""
    try:
        pd.Timestamp(0, tz=name)
    except (KeyError, ValueError):
        return "UTC"
    return name
