"""Small synthetic inputs for publish tests: raw tables, candidate pools and slates."""

from __future__ import annotations

from datetime import datetime, timedelta

import numpy as np
import pandas as pd

from recsys_assets.config import Settings, load_settings
from recsys_assets.config.settings import SOURCES
from recsys_assets.data.snapshot import RawSnapshotWriter
from recsys_assets.publish.lists import lists_from_slates
from recsys_assets.warehouse import Warehouse

NOW = datetime(2026, 11, 20, 12, 0, 0)
SURFACE = "push"
REGION = "na"


def settings() -> Settings:
    return load_settings()


def make_items(n_items: int = 60, *, n_categories: int = 12) -> pd.DataFrame:
    """Active, approved, in-stock public items; one creator each, categories cycling."""
    ids = np.arange(1, n_items + 1, dtype=np.int64)
    return pd.DataFrame(
        {
            "item_id": ids,
            "item_type": "product",
            "title": [f"item {i}" for i in ids],
            "category": [f"cat{i % n_categories}" for i in ids],
            "creator_id": [f"creator{i}" for i in ids],
            "regions": "*",
            "status": "active",
            "policy_state": "approved",
            "stock": -1,
            "is_sponsored": False,
            "campaign_id": pd.Series([None] * n_items, dtype=object),
            "campaign_end": pd.Series([pd.NaT] * n_items, dtype="datetime64[ns]"),
            "risk_level": "low",
            "tenant_id": pd.Series([None] * n_items, dtype=object),
            "required_role": pd.Series([None] * n_items, dtype=object),
            "case_state": pd.Series([None] * n_items, dtype=object),
            "created_at": pd.Timestamp(NOW) - pd.to_timedelta(ids, unit="h"),
        }
    )


def make_subjects(n_subjects: int = 5, *, region: str = REGION) -> pd.DataFrame:
    ids = np.arange(100, 100 + n_subjects, dtype=np.int64)
    zones = ["America/New_York", "Europe/Berlin", "Asia/Tokyo", "UTC"]
    return pd.DataFrame(
        {
            "subject_id": ids,
            "region": region,
            "tenant_id": pd.Series([None] * n_subjects, dtype=object),
            "actor_role": pd.Series([None] * n_subjects, dtype=object),
            "timezone": [zones[i % len(zones)] for i in range(n_subjects)],
            "quiet_hours_start": 22,
            "quiet_hours_end": 7,
            "last_active_at": pd.Timestamp(NOW) - pd.Timedelta(days=1),
        }
    )


def make_users(subjects: pd.DataFrame) -> pd.DataFrame:
    """Raw users rows for `subjects`: consenting, subscribed to email and push."""
    return pd.DataFrame(
        {
            "user_id": subjects["subject_id"].astype("int64"),
            "region": subjects["region"],
            "locale": "en",
            "tenant_id": subjects["tenant_id"],
            "actor_role": subjects["actor_role"],
            "consent_personalization": True,
            "email_subscribed": True,
            "push_enabled": True,
            "timezone": subjects["timezone"],
            "quiet_hours_start": subjects["quiet_hours_start"],
            "quiet_hours_end": subjects["quiet_hours_end"],
            "created_at": pd.Timestamp(NOW) - pd.Timedelta(days=30),
            "last_active_at": subjects["last_active_at"],
        }
    )


def write_raw_snapshot(warehouse: Warehouse, *, users: pd.DataFrame, items: pd.DataFrame) -> None:
    """A complete raw snapshot of `users` and `items` (the other tables empty)."""
    writer = RawSnapshotWriter(warehouse)
    writer.write_part("users", users)
    writer.write_part("items", items)
    writer.finish({"source": "publish test builders"})


def make_slates(
    subjects: pd.DataFrame,
    items: pd.DataFrame,
    *,
    depth: int,
    score_time: datetime = NOW,
) -> pd.DataFrame:
    """`depth` distinct items per subject, each list a different rotation of the catalog."""
    rows = []
    item_ids = items["item_id"].to_numpy()
    by_id = items.set_index("item_id")
    for offset, subject_id in enumerate(subjects["subject_id"]):
        chosen = np.roll(item_ids, -offset * 3)[:depth]
        for position, item_id in enumerate(chosen, start=1):
            rows.append(
                {
                    "subject_id": int(subject_id),
                    "position": position,
                    "item_id": int(item_id),
                    "item_type": by_id.at[item_id, "item_type"],
                    "category": by_id.at[item_id, "category"],
                    "creator_id": by_id.at[item_id, "creator_id"],
                    "is_sponsored": False,
                    "score": 1.0 / position + 0.001 * offset,
                    "calibrated": 0.5,
                    "reason_codes": "two_tower",
                    "source_provenance": "two_tower",
                    "exploration": False,
                    "propensity": 1.0,
                    "exploration_seed": 7,
                    "slate_policy_version": "slate_v1",
                    "model_version": "model_test",
                    "feature_set_version": "features_test",
                    "utility_policy_version": "utility_test",
                    "score_time": pd.Timestamp(score_time),
                    "pipeline_run_id": "run_test",
                }
            )
    return pd.DataFrame(rows)


def make_lists(
    surface: str = SURFACE,
    *,
    n_subjects: int = 5,
    n_items: int = 60,
    score_time: datetime = NOW,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(list records, items, subjects) for a publish that passes validation at NOW."""
    config = settings().surface(surface)
    items = make_items(n_items)
    subjects = make_subjects(n_subjects)
    slates = make_slates(subjects, items, depth=config.store_depth, score_time=score_time)
    lists = lists_from_slates(
        slates,
        surface=config,
        region=REGION,
        ttl=config.ttl,
        source_data_snapshot="snap_test",
        candidate_policy_version="candidates_test",
    )
    return lists, items, subjects


def later(minutes: float) -> datetime:
    return NOW + timedelta(minutes=minutes)


def make_interactions(
    events_per_subject: dict[int, int], *, before: datetime = NOW
) -> pd.DataFrame:
    """`n` clicks per subject, one an hour up to `before` (raw interactions rows)."""
    rows = [
        {
            "user_id": subject_id,
            "item_id": 1 + k % 60,
            "event_type": "click",
            "value": 1.0,
            "ts": pd.Timestamp(before) - pd.Timedelta(hours=k + 1),
        }
        for subject_id, n in events_per_subject.items()
        for k in range(n)
    ]
    return pd.DataFrame(rows, columns=["user_id", "item_id", "event_type", "value", "ts"])


def make_pools(proposals: dict[int, dict[str, list[int]]]) -> pd.DataFrame:
    """candidate_pools rows: per subject, the item ids each source proposed (in rank order).

    Only the columns publish reads (the pipeline adds retrieval and per-source scores).
    """
    rows: dict[tuple[int, int], dict[str, int]] = {}
    for subject_id, by_source in proposals.items():
        for source, item_ids in by_source.items():
            for rank, item_id in enumerate(item_ids, start=1):
                rows.setdefault((subject_id, item_id), {})[source] = rank
    return pd.DataFrame(
        [
            {
                "subject_id": subject_id,
                "item_id": item_id,
                "source_provenance": "|".join(s for s in SOURCES if s in ranks),
                **{f"rank_{s}": ranks.get(s, 0) for s in SOURCES},
                "candidate_policy_version": "candidates_test",
            }
            for (subject_id, item_id), ranks in rows.items()
        ]
    )
