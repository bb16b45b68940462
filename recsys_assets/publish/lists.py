"""Slates become list records (the lists.parquet contract) and batch decision log rows.

A list record is one row per (list, position) carrying the list's lineage, so serving can
answer "which model, which data, which policy" for any item it hands out.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from datetime import timedelta

import numpy as np
import pandas as pd

from recsys_assets.config import ConfigError, SurfaceConfig
from recsys_assets.pipeline.features import FEATURE_COLUMNS
from recsys_assets.rules.person import in_quiet_hours, known_timezone
from recsys_assets.warehouse import Warehouse, partition_path

PERSONALIZED_CONTEXT = "default"
PERSONALIZED_LIST_PREFIX = "precomp"
FALLBACK_LIST_PREFIX = "fallback"
FALLBACK_SUBJECT_ID = -1
TRACKING_SECRET_ENV_VAR = "RECSYS_TRACKING_SECRET"
DEV_TRACKING_SECRET = "recsys-dev-tracking-secret-not-for-production"
"""What `recsys demo` sets explicitly; nothing falls back to it."""

LINEAGE_COLUMNS = [
    "model_version",
    "feature_set_version",
    "candidate_policy_version",
    "slate_policy_version",
    "pipeline_run_id",
    "source_data_snapshot",
]
LIST_COLUMNS = [
    "list_id",
    "subject_id",
    "surface",
    "region",
    "context_key",
    "version",
    "generated_at",
    "expires_at",
    *LINEAGE_COLUMNS,
    "position",
    "item_id",
    "item_type",
    "score",
    "reason_codes",
    "source_provenance",
    "exploration",
    "propensity",
]
"""lists.parquet columns, in order (docs/DATA_MODEL.md "Published lists")."""
CALIBRATED_COLUMN = "calibrated"
"""Per item, the ranker's calibrated probability (`score` is the utility): what serving hands
out as the item's score. Null on fallback lists, which no model scored; not in LIST_COLUMNS
because versions published before it lack it (serving and rollback still read them)."""
FALLBACK_EXTRA_COLUMNS = ["policy_version", "eligibility_scope", "ttl_s", "reason"]
"""Fallback lists also say which policy built them, for whom, for how long, and why."""
SHORTLIST_FEATURE_PREFIX = "f_"
SHORTLIST_ITEM_COLUMNS = ["category", "creator_id", "is_sponsored", "is_exploration_candidate"]
SHORTLIST_FEATURE_COLUMNS = [f"{SHORTLIST_FEATURE_PREFIX}{name}" for name in FEATURE_COLUMNS]
SHORTLIST_COLUMNS = ["in_slate", *SHORTLIST_ITEM_COLUMNS, *SHORTLIST_FEATURE_COLUMNS]
"""Shortlists (`storage_mode: candidate_pool`) also carry what the online rerank needs per
candidate: whether the row is one of the stored slate's (`in_slate`, first in position
order), the slate policy's item attributes, and the ranker's inputs as batch gathered them
(`f_<feature>`, FEATURE_COLUMNS order, float32)."""


def lists_from_slates(
    slates: pd.DataFrame,
    *,
    surface: SurfaceConfig,
    region: str,
    ttl: timedelta,
    source_data_snapshot: str | None,
    candidate_policy_version: str | None = None,
    pipeline_run_id: str | None = None,
    generated_at: pd.Timestamp | None = None,
) -> pd.DataFrame:
    """List records for a partition's slates, without `list_id`/`version` (publish adds them).

    generated_at is the slates' score_time (the pipeline's clock), so a backfill with an old
    score time publishes lists that the freshness gate will rightly refuse.
    """
    frame = slates.copy()
    if "score_time" in frame.columns and generated_at is None:
        generated = pd.to_datetime(frame["score_time"]).astype("datetime64[ns]")
    else:
        if generated_at is None:
            raise ValueError("slates have no score_time column: pass generated_at explicitly")
        generated = pd.Series(pd.Timestamp(generated_at), index=frame.index).astype(
            "datetime64[ns]"
        )
    records = pd.DataFrame(
        {
            "subject_id": frame["subject_id"].astype("int64"),
            "surface": surface.name,
            "region": region,
            "context_key": PERSONALIZED_CONTEXT,
            "generated_at": generated,
            "expires_at": generated + ttl,
            "model_version": _column(frame, "model_version"),
            "feature_set_version": _column(frame, "feature_set_version"),
            "candidate_policy_version": _column(
                frame, "candidate_policy_version", candidate_policy_version
            ),
            "slate_policy_version": _column(
                frame, "slate_policy_version", surface.slate_policy.version
            ),
            "pipeline_run_id": _column(frame, "pipeline_run_id", pipeline_run_id),
            "source_data_snapshot": source_data_snapshot,
            "position": frame["position"].astype("int32"),
            "item_id": frame["item_id"].astype("int64"),
            "item_type": _column(frame, "item_type"),
            "score": frame["score"].astype("float64"),
            CALIBRATED_COLUMN: (
                frame[CALIBRATED_COLUMN].astype("float64") if CALIBRATED_COLUMN in frame else np.nan
            ),
            "reason_codes": _column(frame, "reason_codes", ""),
            "source_provenance": _column(frame, "source_provenance", ""),
            "exploration": frame["exploration"].astype(bool) if "exploration" in frame else False,
            "propensity": frame["propensity"].astype("float64") if "propensity" in frame else 1.0,
        },
        index=frame.index,
    )
    return records.reset_index(drop=True)


def _column(frame: pd.DataFrame, name: str, default: str | None = None) -> pd.Series | str | None:
    if name in frame.columns:
        return frame[name].astype(object).where(frame[name].notna(), None)
    return default


def finalize_lists(
    lists: pd.DataFrame, *, surface: str, region: str, version: str, fallback: bool
) -> pd.DataFrame:
    """Stamp `version` and `list_id` on list records, order columns and rows per the contract."""
    frame = lists.copy()
    frame["surface"] = surface
    frame["region"] = region
    frame["version"] = version
    if fallback:
        frame["subject_id"] = FALLBACK_SUBJECT_ID
        frame["list_id"] = (
            f"{FALLBACK_LIST_PREFIX}_{surface}_" + frame["context_key"].astype(str) + f"_{version}"
        )
    else:
        frame["list_id"] = (
            f"{PERSONALIZED_LIST_PREFIX}_{surface}_"
            + frame["subject_id"].astype("int64").astype(str)
            + f"_{version}"
        )
    if CALIBRATED_COLUMN not in frame.columns:  # fallback lists: no model scored them
        frame[CALIBRATED_COLUMN] = np.nan
    columns = [
        *LIST_COLUMNS,
        CALIBRATED_COLUMN,
        *(c for c in FALLBACK_EXTRA_COLUMNS if c in frame.columns),
        *(c for c in SHORTLIST_COLUMNS if c in frame.columns),
    ]
    missing = [c for c in LIST_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"list records lack columns {missing}; expected {LIST_COLUMNS}")
    frame = frame[columns].sort_values(["subject_id", "context_key", "position"], kind="stable")
    frame["subject_id"] = frame["subject_id"].astype("int64")
    frame["item_id"] = frame["item_id"].astype("int64")
    frame["position"] = frame["position"].astype("int32")
    for column in (*LINEAGE_COLUMNS, "item_type", "reason_codes", "source_provenance"):
        frame[column] = frame[column].astype("str")  # all-null columns still read as strings
    frame["score"] = frame["score"].astype("float64")
    frame[CALIBRATED_COLUMN] = frame[CALIBRATED_COLUMN].astype("float64")
    frame["exploration"] = frame["exploration"].astype(bool)
    frame["propensity"] = frame["propensity"].astype("float64")
    for column in ("generated_at", "expires_at"):
        frame[column] = pd.to_datetime(frame[column]).astype("datetime64[ns]")
    return frame.reset_index(drop=True)


class MissingTrackingSecret(ConfigError):
    """Email/push lists cannot be published without a configured tracking-token secret."""


def tracking_secret() -> str:
    """The HMAC key for tracking tokens: RECSYS_TRACKING_SECRET, required.

    No built-in fallback: tokens signed with a key in the source code could be forged by
    anyone, so a deployment that forgot the variable must stop, not publish them.
    """
    secret = os.environ.get(TRACKING_SECRET_ENV_VAR, "").strip()
    if not secret:
        raise MissingTrackingSecret(
            f"{TRACKING_SECRET_ENV_VAR} is not set: email and push lists carry tracking tokens "
            "signed with it, so they are not published without it. Set it to a secret value "
            "(`recsys demo` sets a development one by itself)"
        )
    return secret


def tracking_token(list_id: str, item_id: int, position: int, secret: str) -> str:
    """HMAC-SHA256 over `list_id|item_id|position`, hex: clicks can be attributed, not forged."""
    message = f"{list_id}|{int(item_id)}|{int(position)}".encode()
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def is_messaging_surface(surface: SurfaceConfig) -> bool:
    """Email-like (a local send hour) or push-like (quiet hours) surfaces get send times."""
    return surface.channel_rules.send_hour_local is not None or surface.channel_rules.quiet_hours


def candidate_counts(warehouse: Warehouse, surface: str, region: str) -> pd.Series | None:
    """Candidates per subject from the partition's candidate_pools, or None if absent.

    Read part by part (one per subject shard), so memory stays bounded at any scale.
    """
    folder = f"pipeline/candidate_pools/{partition_path(surface=surface, region=region)}"
    parts = warehouse.parquet_parts(folder)
    if not parts:
        return None
    counts = [
        warehouse.read_parquet(part, columns=["subject_id"])["subject_id"].value_counts()
        for part in parts
    ]
    return pd.concat(counts).groupby(level=0).sum().rename("candidate_count")


def decision_log(
    lists: pd.DataFrame,
    *,
    surface: SurfaceConfig,
    subjects: pd.DataFrame | None = None,
    candidates: pd.Series | None = None,
    secret: str | None = None,
) -> pd.DataFrame:
    """One row per published list: who, how many candidates, what was selected, which versions.

    Messaging surfaces also get the scheduled send time (next local send hour, or the next
    hour outside quiet hours) and one tracking token per selected item.
    """
    ordered = lists.sort_values(["list_id", "position"], kind="stable")
    first = ordered.drop_duplicates("list_id")
    grouped = ordered.groupby("list_id", sort=False)
    log = first[["list_id", "subject_id", "surface", "region", "context_key", "version",
                 "generated_at", "expires_at", *LINEAGE_COLUMNS]].reset_index(drop=True)  # fmt: skip
    log["item_count"] = grouped.size().to_numpy()
    log["selected_item_ids"] = _joined(ordered["item_id"].astype(str), ordered["list_id"])
    if candidates is None:
        log["candidate_count"] = pd.array([pd.NA] * len(log), dtype="Int64")
    else:
        log["candidate_count"] = log["subject_id"].map(candidates).astype("Int64")
    log["scheduled_send_at"] = pd.Series(pd.NaT, index=log.index, dtype="datetime64[ns]")
    log["tracking_tokens"] = pd.Series(None, index=log.index, dtype=object)
    if is_messaging_surface(surface) and not log.empty:
        log["scheduled_send_at"] = scheduled_send_times(log, surface=surface, subjects=subjects)
        key = secret if secret is not None else tracking_secret()
        tokens = [
            tracking_token(list_id, item_id, position, key)
            for list_id, item_id, position in zip(
                ordered["list_id"], ordered["item_id"], ordered["position"], strict=True
            )
        ]
        log["tracking_tokens"] = _joined(pd.Series(tokens, index=ordered.index), ordered["list_id"])
    return log


def _joined(values: pd.Series, list_ids: pd.Series) -> np.ndarray:
    """`|`-joined values per list, in the order lists first appear (rows sorted by list)."""
    return values.groupby(list_ids, sort=False).agg("|".join).to_numpy()


def scheduled_send_times(
    log: pd.DataFrame, *, surface: SurfaceConfig, subjects: pd.DataFrame | None
) -> pd.Series:
    """Naive-UTC send time per decision-log row, in each subject's own timezone.

    Computed once per distinct (timezone, quiet hours, generated_at), not per subject.
    Subjects without a known timezone are scheduled in UTC.
    """
    profile = pd.DataFrame({"subject_id": log["subject_id"], "generated_at": log["generated_at"]})
    columns = {"timezone": "UTC", "quiet_hours_start": 0, "quiet_hours_end": 0}
    if subjects is not None:
        known = subjects.drop_duplicates("subject_id").set_index("subject_id")
        for column in columns:
            if column in known.columns:
                profile[column] = profile["subject_id"].map(known[column])
    for column, default in columns.items():
        if column not in profile.columns:
            profile[column] = default
        profile[column] = profile[column].where(profile[column].notna(), default)
    keys = ["timezone", "quiet_hours_start", "quiet_hours_end", "generated_at"]
    distinct = profile[keys].drop_duplicates()
    send_hour = surface.channel_rules.send_hour_local
    distinct["scheduled_send_at"] = [
        _next_send(
            pd.Timestamp(generated_at),
            str(timezone),
            send_hour=send_hour,
            quiet=(int(start), int(end)) if surface.channel_rules.quiet_hours else None,
        )
        for timezone, start, end, generated_at in distinct[keys].itertuples(index=False)
    ]
    merged = profile.merge(distinct, on=keys, how="left")
    return pd.Series(merged["scheduled_send_at"].to_numpy(dtype="datetime64[ns]"), index=log.index)


def _next_send(
    generated_at: pd.Timestamp,
    timezone: str,
    *,
    send_hour: int | None,
    quiet: tuple[int, int] | None,
) -> pd.Timestamp:
    """The first full UTC hour at/after generation whose local hour is the send hour and is
    outside quiet hours. Stepping in UTC keeps DST transitions unambiguous."""
    timezone = known_timezone(timezone)
    first = generated_at.ceil("h").tz_localize("UTC")
    fallback: pd.Timestamp | None = None
    for step in range(48):
        candidate = first + pd.Timedelta(hours=step)
        hour = candidate.tz_convert(timezone).hour
        if send_hour is not None and hour != send_hour:
            continue
        if quiet is None or not in_quiet_hours(hour, *quiet):
            return candidate.tz_localize(None)
        fallback = fallback if fallback is not None else candidate
    # Only reachable when the send hour itself is quiet: the send hour wins.
    return (fallback if fallback is not None else first).tz_localize(None)
