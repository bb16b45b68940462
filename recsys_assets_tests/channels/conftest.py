"""A channel world on the serving test world: subscribers set up to meet each send rule,
email and push versions published in the documented format with publish's own decision log
(send times, tracking tokens)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

import pandas as pd
import pytest

from recsys_assets.channels.attribution import TRACKING_BASE_URL_ENV
from recsys_assets.data.snapshot import read_raw
from recsys_assets.publish.lists import decision_log
from recsys_assets.publish.versions import version_path
from recsys_assets.rules.person import EVENTS_PREFIX
from recsys_assets.warehouse import Warehouse
from recsys_assets_tests.conftest import TINY_AS_OF
from recsys_assets_tests.serving.conftest import CONSUMER, World, world
from recsys_assets_tests.serving.published import write_version

__all__ = ["world"]  # the serving world fixture, reused here

REGION = "na"
TRACKING_BASE_URL = "https://t.example.com"
# email_daily subjects, one per rule (CONSUMER is the happy path)
UNSUBSCRIBED = 910_001
REVOKED = 910_002
ALL_REJECTED = 910_003
LOW_CONFIDENCE = 910_004
STALE = 910_005
CAPPED = 910_006
UNKNOWN = 910_007  # has a list, is not a user
# push subjects
NIGHT_OWL = 920_001  # quiet 22-07 in UTC, scheduled at 23:00
WEAK = 920_002
RISKY = 920_003


@dataclass
class ChannelWorld:
    base: World
    campaign_item: int
    risky_item: int

    @property
    def warehouse(self) -> Warehouse:
        return self.base.warehouse


def _add_users(warehouse: Warehouse) -> None:
    users = read_raw(warehouse, "users")
    template = users[users["user_id"] == CONSUMER]
    rows = []
    for user_id, email, push, zone, quiet in [
        (UNSUBSCRIBED, False, True, "UTC", (0, 0)),
        (REVOKED, True, True, "UTC", (0, 0)),
        (ALL_REJECTED, True, True, "UTC", (0, 0)),
        (LOW_CONFIDENCE, True, True, "UTC", (0, 0)),
        (STALE, True, True, "UTC", (0, 0)),
        (CAPPED, True, True, "UTC", (0, 0)),
        (NIGHT_OWL, True, True, "UTC", (22, 7)),
        (WEAK, True, True, "UTC", (0, 0)),
        (RISKY, True, True, "UTC", (0, 0)),
    ]:
        row = template.copy()
        row["user_id"] = user_id
        row["email_subscribed"], row["push_enabled"], row["timezone"] = email, push, zone
        row["quiet_hours_start"], row["quiet_hours_end"] = quiet
        rows.append(row)
    users.loc[
        users["user_id"] == CONSUMER, ["timezone", "quiet_hours_start", "quiet_hours_end"]
    ] = [
        "UTC",
        0,
        0,
    ]
    warehouse.write_parquet(
        "raw/users/part-00000.parquet", pd.concat([users, *rows], ignore_index=True)
    )


def record_event(
    warehouse: Warehouse, event_type: str, user_id: int, at: pd.Timestamp | None = None
) -> None:
    """A serving event file, as `POST /v1/events` writes it (default: 30 minutes before
    the data's as-of time)."""
    at = pd.Timestamp(TINY_AS_OF - timedelta(minutes=30)) if at is None else at
    frame = pd.DataFrame(
        {
            "event_id": [f"{event_type}-{user_id}-{at.value}"],
            "type": [event_type],
            "user_id": pd.array([user_id], dtype="int64"),
            "item_id": pd.array([None], dtype="Int64"),
            "creator_id": pd.array([None], dtype="str"),
            "category": pd.array([None], dtype="str"),
            "surface": pd.array([None], dtype="str"),
            "region": pd.array([None], dtype="str"),
            "ts": [at],
            "received_at": [at],
        }
    )
    day = at.date().isoformat()
    warehouse.write_parquet(
        f"{EVENTS_PREFIX}/date={day}/{event_type}-{user_id}-{at.value}.parquet", frame
    )


def publish_channel_version(
    channel: ChannelWorld,
    surface: str,
    lists: dict[int, Sequence[int]],
    *,
    ttl: timedelta,
    calibrated: dict[int, Sequence[float]] | None = None,
    send_at: dict[int, pd.Timestamp] | None = None,
) -> str:
    """An active version of `lists` an hour old, with publish's decision log (send times
    and tracking tokens); `calibrated` / `send_at` override per subject."""
    warehouse = channel.warehouse
    version = write_version(
        warehouse, surface, REGION, lists, generated_at=TINY_AS_OF - timedelta(hours=1), ttl=ttl
    )
    folder = version_path(surface, REGION, version)
    frame = warehouse.read_parquet(f"{folder}/lists.parquet")
    for subject_id, values in (calibrated or {}).items():
        mine = frame.index[frame["subject_id"] == subject_id]
        frame.loc[mine, "calibrated"] = list(values)
    warehouse.write_parquet(f"{folder}/lists.parquet", frame)
    users = read_raw(warehouse, "users").rename(columns={"user_id": "subject_id"})
    settings = channel.base.settings
    log = decision_log(frame, surface=settings.surface(surface), subjects=users)
    for subject_id, at in (send_at or {}).items():
        log.loc[log["subject_id"] == subject_id, "scheduled_send_at"] = at
    warehouse.write_parquet(f"{folder}/decision_log.parquet", log)
    return version


@pytest.fixture(autouse=True)
def tracking_base_url(monkeypatch: pytest.MonkeyPatch) -> str:
    """Every channel test sends with links to a configured `recsys serve` URL; the tests of
    the refusal without it delete the variable."""
    monkeypatch.setenv(TRACKING_BASE_URL_ENV, TRACKING_BASE_URL)
    return TRACKING_BASE_URL


@pytest.fixture
def channel(world: World) -> ChannelWorld:
    """The serving world plus channel subscribers, a campaign ending before the morning
    send, a high-risk item, and a consent revocation received by serving."""
    warehouse = world.warehouse
    _add_users(warehouse)
    items = read_raw(warehouse, "items").set_index("item_id")
    campaign_item, risky_item = world.good[30], world.good[31]
    items.loc[campaign_item, ["is_sponsored", "campaign_id", "campaign_end"]] = [
        True,
        "campaign_morning",
        pd.Timestamp(TINY_AS_OF + timedelta(hours=2)),
    ]
    items.loc[risky_item, "risk_level"] = "high"
    warehouse.write_parquet("raw/items/part-00000.parquet", items.reset_index())
    record_event(warehouse, "consent_revoked", REVOKED)
    return ChannelWorld(world, campaign_item, risky_item)


def at_hours(hours: float) -> pd.Timestamp:
    """TINY_AS_OF + hours, naive UTC."""
    return pd.Timestamp(TINY_AS_OF) + pd.Timedelta(hours=hours)
