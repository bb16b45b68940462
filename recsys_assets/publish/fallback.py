"""Non-personalized fallback lists: what serving hands out when a personal list cannot be.

Aggregates only: an item enters a popularity or trending list only when at least
MIN_DISTINCT_USERS different users interacted with it, so no list reveals one person's
behaviour. Every item is eligible at generation time (same rules as serving's final check).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import numpy as np
import pandas as pd

from recsys_assets.config import SurfaceConfig
from recsys_assets.publish.lists import FALLBACK_EXTRA_COLUMNS, FALLBACK_SUBJECT_ID, LIST_COLUMNS
from recsys_assets.publish.validation import TENANT_LIST_PREFIX
from recsys_assets.rules.eligibility import item_rejection_reasons

FALLBACK_POLICY_VERSION = "fallback_v1"
POPULAR_BY_REGION = "popular_by_region"
TRENDING_BY_CATEGORY = "trending_by_category"
EDITORIAL_SAFE = "editorial_safe"
NEW_USER_DEFAULT = "new_user_default"
TENANT_DEFAULT_ACTIONS = TENANT_LIST_PREFIX.rstrip(":")
POPULARITY_WINDOW = timedelta(days=14)
MIN_DISTINCT_USERS = 3
EVENT_WEIGHTS = {"view": 1.0, "click": 2.0, "rating": 2.0, "purchase": 5.0}
"""Positive events only: a hide never makes an item popular."""
_RISK_PRIORITY = {"high": 0, "medium": 1, "low": 2}


@dataclass(frozen=True)
class FallbackList:
    """One named list: ranked items with their scores and per-item reason codes."""

    context_key: str
    ranked: pd.DataFrame
    """item_id, score, reason_codes — best first."""
    reason: str
    scope: str


def compute_fallback_lists(
    *,
    surface: SurfaceConfig,
    region: str,
    items: pd.DataFrame,
    interactions: pd.DataFrame,
    users: pd.DataFrame,
    editorial: pd.DataFrame | None,
    now: datetime,
    list_length: int,
    ttl: timedelta,
    trending_window: timedelta,
    source_data_snapshot: str | None = None,
    pipeline_run_id: str | None = None,
) -> pd.DataFrame:
    """List records (without version / list_id) for every fallback list of the partition.

    A tenant surface (eligibility requires tenant_actor) gets one action queue per tenant
    with actors in the region; every other surface gets the public lists. A list with no
    eligible item is left out rather than published empty.
    """
    now_ts = pd.Timestamp(now)
    if "tenant_actor" in surface.eligibility.requires:
        lists = tenant_action_queues(
            items, users, region=region, now=now_ts, list_length=list_length
        )
    else:
        lists = public_lists(
            items,
            interactions,
            users,
            editorial,
            region=region,
            now=now_ts,
            list_length=list_length,
            trending_window=trending_window,
        )
    return _records(
        [entry for entry in lists if not entry.ranked.empty],
        items=items,
        surface=surface,
        region=region,
        now=now_ts,
        ttl=ttl,
        source_data_snapshot=source_data_snapshot,
        pipeline_run_id=pipeline_run_id,
    )


def public_lists(
    items: pd.DataFrame,
    interactions: pd.DataFrame,
    users: pd.DataFrame,
    editorial: pd.DataFrame | None,
    *,
    region: str,
    now: pd.Timestamp,
    list_length: int,
    trending_window: timedelta,
) -> list[FallbackList]:
    """popular_by_region, trending_by_category:<c>, editorial_safe, new_user_default."""
    eligible = items[
        item_rejection_reasons(
            items,
            region=region,
            now=now,
            subject_tenant=pd.Series(None, index=items.index, dtype=object),
        )
        .isna()
        .to_numpy()
    ]
    regional = _regional_events(interactions, users, region=region)
    scope = f"region={region}; consumers (no tenant-owned items)"
    popularity = _aggregate(regional, start=now - POPULARITY_WINDOW, end=now)
    popular = _popular(popularity, eligible)
    lists = [
        FallbackList(
            POPULAR_BY_REGION,
            _top_up(popular, eligible, list_length, code=POPULAR_BY_REGION),
            f"most interacted-with eligible items in {region} over the last "
            f"{POPULARITY_WINDOW.days} days (items with >= {MIN_DISTINCT_USERS} distinct users), "
            "topped up with the newest eligible items",
            scope,
        )
    ]
    lists += _trending(
        regional, eligible, now=now, window=trending_window, list_length=list_length, scope=scope
    )
    if editorial is not None and not editorial.empty:
        lists.append(
            _editorial_safe(
                editorial, eligible, region=region, now=now, list_length=list_length, scope=scope
            )
        )
    low_risk = eligible[eligible["risk_level"] == "low"]
    lists.append(
        FallbackList(
            NEW_USER_DEFAULT,
            _top_up(_diversified(popular, low_risk), low_risk, list_length, code=NEW_USER_DEFAULT),
            f"popular low-risk items in {region}, interleaved across categories for a user we "
            "know nothing about",
            scope + "; risk_level=low",
        )
    )
    return lists


def tenant_action_queues(
    items: pd.DataFrame, users: pd.DataFrame, *, region: str, now: pd.Timestamp, list_length: int
) -> list[FallbackList]:
    """tenant_default_actions:<tenant>: the tenant's open cases, highest risk then newest first."""
    actors = users[(users["region"] == region) & users["tenant_id"].notna()]
    queues = []
    for tenant in sorted(actors["tenant_id"].astype(str).unique()):
        owned = items[(items["tenant_id"] == tenant) & (items["case_state"] == "open")]
        owned = owned[
            item_rejection_reasons(owned, region=region, now=now, subject_tenant=tenant)
            .isna()
            .to_numpy()
        ]
        ordered = owned.assign(
            priority=owned["risk_level"].map(_RISK_PRIORITY).fillna(3)
        ).sort_values(["priority", "created_at", "item_id"], ascending=[True, False, True])
        top = ordered.head(list_length)
        queues.append(
            FallbackList(
                f"{TENANT_LIST_PREFIX}{tenant}",
                pd.DataFrame(
                    {
                        "item_id": top["item_id"].to_numpy(),
                        "score": 1.0 / np.arange(1, len(top) + 1),
                        "reason_codes": TENANT_DEFAULT_ACTIONS,
                    }
                ),
                f"open cases of tenant {tenant}, highest risk first, then newest",
                f"region={region}; tenant={tenant}; role checked at serving",
            )
        )
    return queues


def _regional_events(
    interactions: pd.DataFrame, users: pd.DataFrame, *, region: str
) -> pd.DataFrame:
    """Positive events by users of `region`, weighted."""
    members = users.loc[users["region"] == region, "user_id"]
    events = interactions[
        interactions["user_id"].isin(members) & interactions["event_type"].isin(EVENT_WEIGHTS)
    ]
    return events.assign(weight=events["event_type"].map(EVENT_WEIGHTS).astype("float64"))


def _aggregate(events: pd.DataFrame, *, start: pd.Timestamp, end: pd.Timestamp) -> pd.DataFrame:
    """Per item: weighted events and distinct users in [start, end)."""
    window = events[(events["ts"] >= start) & (events["ts"] < end)]
    grouped = window.groupby("item_id")
    return pd.DataFrame({"weight": grouped["weight"].sum(), "users": grouped["user_id"].nunique()})


def _popular(popularity: pd.DataFrame, eligible: pd.DataFrame) -> pd.DataFrame:
    enough = popularity[
        (popularity["users"] >= MIN_DISTINCT_USERS) & popularity.index.isin(eligible["item_id"])
    ]
    ranked = enough.reset_index().sort_values(["weight", "item_id"], ascending=[False, True])
    return pd.DataFrame(
        {
            "item_id": ranked["item_id"].to_numpy(),
            "score": ranked["weight"].to_numpy(dtype="float64"),
        }
    )


def _top_up(
    ranked: pd.DataFrame, pool: pd.DataFrame, list_length: int, *, code: str
) -> pd.DataFrame:
    """Fill a short list with the newest items of `pool` not already in it (score 0)."""
    ranked = ranked.head(list_length).assign(reason_codes=code)
    missing = list_length - len(ranked)
    if missing <= 0:
        return ranked.reset_index(drop=True)
    newest = pool[~pool["item_id"].isin(ranked["item_id"])].sort_values(
        ["created_at", "item_id"], ascending=[False, True]
    )
    fill = pd.DataFrame(
        {
            "item_id": newest["item_id"].head(missing).to_numpy(),
            "score": 0.0,
            "reason_codes": f"{code}|newest_fill",
        }
    )
    return pd.concat([ranked, fill], ignore_index=True)


def _diversified(popular: pd.DataFrame, pool: pd.DataFrame) -> pd.DataFrame:
    """Popular items of `pool`, round-robin across categories (each category's best first)."""
    frame = popular.merge(pool[["item_id", "category"]], on="item_id", how="inner")
    frame["round"] = frame.groupby("category").cumcount()
    ordered = frame.sort_values(["round", "score", "item_id"], ascending=[True, False, True])
    return ordered[["item_id", "score"]].reset_index(drop=True)


def _trending(
    events: pd.DataFrame,
    eligible: pd.DataFrame,
    *,
    now: pd.Timestamp,
    window: timedelta,
    list_length: int,
    scope: str,
) -> list[FallbackList]:
    """Per category, items whose activity grew from the previous window to the recent one."""
    recent = _aggregate(events, start=now - window, end=now)
    before = _aggregate(events, start=now - 2 * window, end=now - window)["weight"]
    recent = recent[
        (recent["users"] >= MIN_DISTINCT_USERS) & recent.index.isin(eligible["item_id"])
    ]
    previous = before.reindex(recent.index, fill_value=0.0)
    growth = ((recent["weight"] + 1.0) / (previous + 1.0)).rename("growth")
    rising = growth[recent["weight"] > previous].reset_index()
    rising = rising.merge(eligible[["item_id", "category"]], on="item_id", how="inner")
    lists = []
    for category, group in sorted(rising.groupby("category"), key=lambda pair: str(pair[0])):
        top = group.sort_values(["growth", "item_id"], ascending=[False, True]).head(list_length)
        lists.append(
            FallbackList(
                f"{TRENDING_BY_CATEGORY}:{category}",
                pd.DataFrame(
                    {
                        "item_id": top["item_id"].to_numpy(),
                        "score": top["growth"].to_numpy(dtype="float64"),
                        "reason_codes": TRENDING_BY_CATEGORY,
                    }
                ),
                f"items in {category} whose activity grew most over the last {window} versus "
                f"the {window} before (>= {MIN_DISTINCT_USERS} distinct users)",
                scope,
            )
        )
    return lists


def _editorial_safe(
    editorial: pd.DataFrame,
    eligible: pd.DataFrame,
    *,
    region: str,
    now: pd.Timestamp,
    list_length: int,
    scope: str,
) -> FallbackList:
    """Currently valid editorial picks for the region, eligible and low-risk, in curated order."""
    current = editorial[
        (editorial["region"] == region)
        & (editorial["valid_from"] <= now)
        & (editorial["valid_to"] > now)
    ]
    safe = eligible.loc[eligible["risk_level"] == "low", "item_id"]
    picks = (
        current[current["item_id"].isin(safe)]
        .sort_values(["position", "list_name", "item_id"])
        .drop_duplicates("item_id")
        .head(list_length)
    )
    return FallbackList(
        EDITORIAL_SAFE,
        pd.DataFrame(
            {
                "item_id": picks["item_id"].to_numpy(),
                "score": 1.0 / np.arange(1, len(picks) + 1),
                "reason_codes": EDITORIAL_SAFE,
            }
        ),
        f"editorial picks valid now for {region}, eligible and risk_level=low, in curated order",
        scope + "; risk_level=low",
    )


def _records(
    lists: list[FallbackList],
    *,
    items: pd.DataFrame,
    surface: SurfaceConfig,
    region: str,
    now: pd.Timestamp,
    ttl: timedelta,
    source_data_snapshot: str | None,
    pipeline_run_id: str | None,
) -> pd.DataFrame:
    item_types = items.drop_duplicates("item_id").set_index("item_id")["item_type"]
    frames = []
    for entry in lists:
        ranked = entry.ranked.reset_index(drop=True)
        frames.append(
            pd.DataFrame(
                {
                    "subject_id": FALLBACK_SUBJECT_ID,
                    "surface": surface.name,
                    "region": region,
                    "context_key": entry.context_key,
                    "generated_at": now,
                    "expires_at": now + ttl,
                    "model_version": None,
                    "feature_set_version": None,
                    "candidate_policy_version": FALLBACK_POLICY_VERSION,
                    "slate_policy_version": FALLBACK_POLICY_VERSION,
                    "pipeline_run_id": pipeline_run_id,
                    "source_data_snapshot": source_data_snapshot,
                    "position": np.arange(1, len(ranked) + 1, dtype="int32"),
                    "item_id": ranked["item_id"].astype("int64").to_numpy(),
                    "item_type": ranked["item_id"].map(item_types).to_numpy(),
                    "score": ranked["score"].astype("float64").to_numpy(),
                    "reason_codes": ranked["reason_codes"].to_numpy(),
                    "source_provenance": "fallback",
                    "exploration": False,
                    "propensity": 1.0,
                    "policy_version": FALLBACK_POLICY_VERSION,
                    "eligibility_scope": entry.scope,
                    "ttl_s": int(ttl.total_seconds()),
                    "reason": entry.reason,
                }
            )
        )
    if not frames:
        unstamped = [c for c in LIST_COLUMNS if c not in ("list_id", "version")]
        return pd.DataFrame(columns=unstamped + FALLBACK_EXTRA_COLUMNS)
    return pd.concat(frames, ignore_index=True)
