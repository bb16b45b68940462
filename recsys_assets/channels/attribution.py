"""Attribution: an open or a click, presented with its tracking token, linked to its send.

Publish signs every item of a messaging list, `HMAC-SHA256(RECSYS_TRACKING_SECRET,
"list_id|item_id|position")`; the sender records each token it handed over in the sends
ledger. An event is accepted only when its token is in the ledger (it was really sent: a
token of a skipped or never-sent list is unknown) and re-computing the HMAC over the
ledger's (list_id, item_id, position) with the secret gives the same token (a ledger row or
token not minted with this secret is refused). Accepted events go to
`channels/engagement/date=D/<uuid>.parquet`, one row each, with the send they belong to.
An open or a click counts once per token: a repeat (a mail client re-fetching the pixel, a
replayed request) is answered like the first and neither stored nor counted again, so one
leaked message cannot inflate the counters or fill storage.

The token is the credential of these events (mail clients and devices hold no API token),
so `POST /v1/events` takes opens and clicks without a bearer token; it proves which send and
item, nothing more, and cannot be used for any other event type. The links in a message are
the same events as GETs on the public URL of `recsys serve` (`RECSYS_TRACKING_BASE_URL`):
`OPEN_PATH/<token>` (the email's pixel) and `CLICK_PATH/<token>?item_id=N`; the sender
renders them and the API routes them from the constants here, so they cannot drift apart.
"""

from __future__ import annotations

import hmac
import os
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from urllib.parse import urlsplit

import pandas as pd

from recsys_assets.channels.ledger import (
    PLANS_PREFIX,
    all_ledger_files,
    empty_sends,
    read_ledger_files,
    read_sends,
)
from recsys_assets.channels.unsubscribes import (
    UNSUBSCRIBE_WINDOW,
    Unsubscribes,
    opt_outs_of,
    sends_of,
    unsubscribes_after_send,
)
from recsys_assets.publish.lists import tracking_token
from recsys_assets.rules.person import empty_events, event_files, read_event_files
from recsys_assets.warehouse import Warehouse

ENGAGEMENT_PREFIX = "channels/engagement"
ENGAGEMENT_TYPES = ("open", "click")
ENGAGEMENT_SCHEMA: dict[str, str] = {
    "event_id": "str",
    "type": "str",
    "tracking_token": "str",
    "send_key": "str",
    "subject_id": "int64",
    "surface": "str",
    "region": "str",
    "model_version": "str",
    "list_id": "str",
    "item_id": "int64",
    "position": "int32",
    "ts": "datetime64[ns]",
}
TRACKING_BASE_URL_ENV = "RECSYS_TRACKING_BASE_URL"
"""The public URL of `recsys serve` that message links point at, e.g. https://t.example.com."""
CLICK_LANDING_URL_ENV = "RECSYS_CLICK_LANDING_URL"
"""Where a followed click link redirects, the item id appended as a path segment."""
OPEN_PATH = "/v1/t/open"
CLICK_PATH = "/v1/t/click"
_MISS_REFRESH_S = 1.0
"""On an unknown token, re-read the ledger at most this often (new sends since the last
poll), so a flood of forged tokens cannot turn into a flood of listings."""

Partition = tuple[str, str, str]
"""(surface, region, model_version): the labels attribution metrics carry."""


class AttributionError(ValueError):
    """An open or click that cannot be attributed; `status_code` is its HTTP status."""

    status_code = 400


class UnknownTrackingToken(AttributionError):
    status_code = 404


class TokenDoesNotVerify(AttributionError):
    status_code = 403


class ItemMismatch(AttributionError):
    status_code = 422


class TrackingNotConfigured(AttributionError):
    status_code = 503


class TrackingLinksNotConfigured(ValueError):
    """Messages cannot be rendered with working tracking links."""


def http_url(value: str, *, name: str) -> str:
    """`value` checked to be an absolute http(s) URL without query or fragment, trailing `/`
    removed (paths are appended to it); ValueError naming `name` otherwise."""
    parts = urlsplit(value.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(
            f"{name}={value!r} is not an http(s) URL: give scheme and host, e.g. "
            "https://t.example.com"
        )
    if parts.query or parts.fragment:
        raise ValueError(f"{name}={value!r}: a URL without query or fragment is expected")
    return value.strip().rstrip("/")


def tracking_base_url_from_env(env: Mapping[str, str] = os.environ) -> str | None:
    """`RECSYS_TRACKING_BASE_URL`, validated; None when unset or empty."""
    value = env.get(TRACKING_BASE_URL_ENV, "")
    return http_url(value, name=TRACKING_BASE_URL_ENV) if value.strip() else None


def click_landing_url_from_env(env: Mapping[str, str] = os.environ) -> str | None:
    """`RECSYS_CLICK_LANDING_URL`, validated; None when unset or empty."""
    value = env.get(CLICK_LANDING_URL_ENV, "")
    return http_url(value, name=CLICK_LANDING_URL_ENV) if value.strip() else None


def open_link(base_url: str, token: str) -> str:
    """The open pixel's URL for `token` under the serving app at `base_url`."""
    return f"{base_url}{OPEN_PATH}/{token}"


def click_link(base_url: str, token: str, item_id: int) -> str:
    """The click link of one item for `token` under the serving app at `base_url`."""
    return f"{base_url}{CLICK_PATH}/{token}?item_id={int(item_id)}"


def landing_url(landing: str, item_id: int | None) -> str:
    """Where a click lands: `landing`, plus `/<item_id>` when the link named its item."""
    return landing if item_id is None else f"{landing}/{int(item_id)}"


@dataclass(frozen=True, slots=True)
class SentItem:
    """One item of one send, as the ledger recorded it."""

    send_key: str
    subject_id: int
    surface: str
    region: str
    model_version: str
    list_id: str
    item_id: int
    position: int


def engagement_files(warehouse: Warehouse) -> list[str]:
    found: list[str] = []
    for folder in warehouse.list_dirs(ENGAGEMENT_PREFIX):
        found.extend(warehouse.list(f"{ENGAGEMENT_PREFIX}/{folder}", suffix=".parquet"))
    return found


def read_engagement(warehouse: Warehouse, files: list[str] | None = None) -> pd.DataFrame:
    """Engagement events, one per (type, tracking token): the first one recorded."""
    files = engagement_files(warehouse) if files is None else files
    frames = [warehouse.read_parquet(name) for name in files]
    if not frames:
        return pd.DataFrame({k: pd.Series(dtype=v) for k, v in ENGAGEMENT_SCHEMA.items()})
    events = pd.concat(frames, ignore_index=True).sort_values("ts", kind="stable")
    return events.drop_duplicates(["type", "tracking_token"]).reset_index(drop=True)


@dataclass(frozen=True)
class AttributionSummary:
    """Sends, opens and clicks of one channel partition; CTR = sends clicked / sends."""

    sends: int
    opens: int
    clicks: int
    ctr: float


def attribution_summary(warehouse: Warehouse, *, surface: str, region: str) -> AttributionSummary:
    """The partition's attribution so far, from the ledger and the engagement events."""
    sends = read_sends(warehouse, surface=surface, region=region)
    events = read_engagement(warehouse)
    events = events[(events["surface"] == surface) & (events["region"] == region)]
    sent = sends["send_key"].nunique()
    clicked = events.loc[events["type"] == "click", "send_key"].nunique()
    return AttributionSummary(
        sends=int(sent),
        opens=int((events["type"] == "open").sum()),
        clicks=int((events["type"] == "click").sum()),
        ctr=float(clicked / sent) if sent else 0.0,
    )


class TrackingIndex:
    """Tracking token → sent item, from the sends ledger, kept current by `refresh()`;
    records opens and clicks and keeps the counts `/metrics` exports."""

    def __init__(
        self,
        warehouse: Warehouse,
        *,
        secret: str | None,
        clock: Callable[[], int] = time.time_ns,
        unsubscribe_window: timedelta = UNSUBSCRIBE_WINDOW,
    ) -> None:
        self.warehouse = warehouse
        self.secret = secret
        self.clock = clock
        self.tokens: dict[str, SentItem] = {}
        self.sends: dict[Partition, set[str]] = {}
        self.events: Counter[tuple[Partition, str]] = Counter()
        self.clicked: dict[Partition, set[str]] = {}
        self.skips: dict[tuple[str, str, str], int] = {}
        """(surface, region, reason) → skips in the partition's current send plan."""
        self.unsubscribe_window = unsubscribe_window
        self.unsubscribes: dict[Unsubscribes, int] = {}
        """Sends followed by their subject's opt-out of their medium within
        `unsubscribe_window`, by partition and opt-out event type."""
        self._send_heads = sends_of(empty_sends())
        self._opt_outs = opt_outs_of(empty_events())
        self._events_seen: set[str] = set()
        self._ledger_seen: set[str] = set()
        self._engagement_seen: set[str] = set()
        self._recorded: set[tuple[str, str]] = set()
        """(type, tracking token) of every open and click counted."""
        self._last_miss_refresh = 0.0
        self._lock = threading.Lock()

    def refresh(self) -> None:
        """Read ledger and engagement files not seen yet, and the plans' skip counts."""
        ledger = [
            name for name in all_ledger_files(self.warehouse) if name not in self._ledger_seen
        ]
        engaged = [
            name for name in engagement_files(self.warehouse) if name not in self._engagement_seen
        ]
        sends = read_ledger_files(self.warehouse, ledger)
        events = read_engagement(self.warehouse, engaged)
        skips = self._plan_skips()
        serving_events, serving_read = read_event_files(
            self.warehouse, [n for n in event_files(self.warehouse) if n not in self._events_seen]
        )
        send_heads = _appended(self._send_heads, sends_of(sends))
        opt_outs = _appended(self._opt_outs, opt_outs_of(serving_events))
        unsubscribes = unsubscribes_after_send(send_heads, opt_outs, window=self.unsubscribe_window)
        with self._lock:
            for row in sends.itertuples(index=False):
                item = SentItem(
                    row.send_key,
                    int(row.subject_id),
                    row.surface,
                    row.region,
                    row.model_version,
                    row.list_id,
                    int(row.item_id),
                    int(row.position),
                )
                self.tokens[row.tracking_token] = item
                self.sends.setdefault(_partition(item), set()).add(item.send_key)
            for row in events.itertuples(index=False):
                if (row.type, row.tracking_token) in self._recorded:
                    continue
                self._recorded.add((row.type, row.tracking_token))
                self._count((row.surface, row.region, row.model_version), row.type, row.send_key)
            self._ledger_seen.update(ledger)
            self._engagement_seen.update(engaged)
            self.skips = skips
            self._events_seen.update(serving_read)
            self._send_heads, self._opt_outs = send_heads, opt_outs
            self.unsubscribes = unsubscribes

    def _plan_skips(self) -> dict[tuple[str, str, str], int]:
        found: dict[tuple[str, str, str], int] = {}
        for surface in self.warehouse.list_dirs(PLANS_PREFIX):
            for region in self.warehouse.list_dirs(f"{PLANS_PREFIX}/{surface}"):
                path = f"{PLANS_PREFIX}/{surface}/{region}/summary.json"
                try:
                    summary = self.warehouse.read_json(path)
                except FileNotFoundError:
                    continue
                for reason, count in (summary.get("skips_by_reason") or {}).items():
                    key = (surface.removeprefix("surface="), region.removeprefix("region="))
                    found[(*key, str(reason))] = int(count)
        return found

    def _count(self, partition: Partition, event_type: str, send_key: str) -> None:
        self.events[(partition, event_type)] += 1
        if event_type == "click":
            self.clicked.setdefault(partition, set()).add(send_key)

    def resolve(self, token: str) -> SentItem:
        """The sent item `token` belongs to, verified; raises an AttributionError."""
        if not self.secret:
            raise TrackingNotConfigured(
                "tracking tokens cannot be verified: RECSYS_TRACKING_SECRET is not set on "
                "this server (it must be the secret publish signs with)"
            )
        item = self.tokens.get(token)
        if item is None and time.monotonic() - self._last_miss_refresh >= _MISS_REFRESH_S:
            self._last_miss_refresh = time.monotonic()
            self.refresh()
            item = self.tokens.get(token)
        if item is None:
            raise UnknownTrackingToken("unknown tracking token: no message was sent with it")
        expected = tracking_token(item.list_id, item.item_id, item.position, self.secret)
        if not hmac.compare_digest(expected, token):
            raise TokenDoesNotVerify(
                "tracking token does not verify against its send (signed with another secret?)"
            )
        return item

    def record(self, event_type: str, token: str, *, item_id: int | None = None) -> str | None:
        """Verify and persist one open or click; returns the event file's path, or None for
        a repeat of an event already counted (accepted, not stored again)."""
        item = self.resolve(token)
        if item_id is not None and item_id != item.item_id:
            raise ItemMismatch(
                f"item_id {item_id} is not the item of this tracking token ({item.item_id})"
            )
        with self._lock:
            if (event_type, token) in self._recorded:
                return None
            self._recorded.add((event_type, token))
        now = pd.Timestamp(self.clock(), unit="ns")
        frame = pd.DataFrame(
            [
                {
                    "event_id": uuid.uuid4().hex,
                    "type": event_type,
                    "tracking_token": token,
                    "send_key": item.send_key,
                    "subject_id": item.subject_id,
                    "surface": item.surface,
                    "region": item.region,
                    "model_version": item.model_version,
                    "list_id": item.list_id,
                    "item_id": item.item_id,
                    "position": item.position,
                    "ts": now,
                }
            ]
        ).astype(ENGAGEMENT_SCHEMA)
        path = f"{ENGAGEMENT_PREFIX}/date={now.date().isoformat()}/{uuid.uuid4().hex}.parquet"
        self.warehouse.write_parquet(path, frame)
        with self._lock:
            self._engagement_seen.add(path)
            self._count(_partition(item), event_type, item.send_key)
        return path

    def snapshot(
        self,
    ) -> tuple[dict[Partition, int], dict[tuple[Partition, str], int], dict[Partition, float]]:
        """(sends, events by type, attributed CTR) per (surface, region, model_version)."""
        with self._lock:
            sends = {key: len(keys) for key, keys in self.sends.items()}
            events = dict(self.events)
            ctr = {
                key: len(self.clicked.get(key, ())) / count for key, count in sends.items() if count
            }
        return sends, events, ctr


def _appended(seen: pd.DataFrame, new: pd.DataFrame) -> pd.DataFrame:
    """`seen` then `new` (concat of an empty frame is deprecated in pandas)."""
    if new.empty:
        return seen
    return new if seen.empty else pd.concat([seen, new], ignore_index=True)


def _partition(item: SentItem) -> Partition:
    return (item.surface, item.region, item.model_version)
