"""Point-in-time features for (subject, item, score_time) rows, built with DuckDB ASOF JOINs.

One code path builds training rows (score_time = the label's event time) and scoring rows
(score_time = now), so the ranker never sees a feature at training time that it would not
have at scoring time. Every value comes from a time-indexed table (cumulative counts per
key, stamped with the time of the change) looked up with `ASOF JOIN … ON score_time > ts`:
the newest snapshot *strictly before* score_time. Strict, because a training row at the
label's event time must not count the label event itself. Window counts are differences of
two snapshots (cumulative at score_time minus cumulative at score_time − window), exact
without a range join. `feature_timestamp` is the newest timestamp of any value used
(1970-01-01 for a row that used none), so `feature_timestamp < score_time` holds by
construction and `leakage_violations` proves it per partition.

Engagement events are every interaction except `hide` (view, click, purchase, rating).
Items carry no history: an item's static attributes (category, creator, stock,
is_sponsored) are used only once the item exists (created_at < score_time) and are stamped
with created_at; stock is the snapshot's value (exact at scoring time, an approximation for
past training rows).

| column | group | meaning |
| --- | --- | --- |
| user_events_total | user | engagement events of the subject before score_time |
| user_events_7d | user | engagement events in the 7 days before score_time |
| user_clicks_total | user | clicks before score_time |
| user_purchases_total | user | purchases before score_time |
| user_days_since_last_activity | user | days since the last engagement event (365 if none, capped) |
| item_events_1d | item | engagement events on the item in the last day |
| item_events_7d | item | … in the last 7 days |
| item_events_28d | item | … in the last 28 days |
| item_events_total | item | … ever before score_time |
| item_age_days | item | days since created_at (0 if not created yet) |
| item_stock | item | units in stock; -1 = not stock-tracked; 0 if not created yet |
| item_is_sponsored | item | 1 for a paid placement |
| embedding_dot | cross | two-tower dot product (retrieval_score), 0 when not computed |
| has_embedding_dot | cross | 1 when retrieval_score was given |
| user_category_events | cross | subject's engagement events in the item's category |
| user_category_affinity | cross | user_category_events / user_events_total |
| category_match | cross | 1 if the subject engaged with the item's category before |
| user_creator_events | cross | subject's engagement events with the item's creator |
| user_creator_affinity | cross | user_creator_events / user_events_total |
| user_item_events | cross | subject's earlier engagement events with this very item |
| from_<source> | source | 1 if the source proposed the item (rank_<source> > 0), per SOURCES |
| rank_<source>_log1p | source | log1p(rank_<source>), 0 when not proposed, per SOURCES |
| source_count | source | how many sources proposed the item |
| shown_24h | exposure | times the item was shown to the subject on this surface in 24h |
| shown_7d | exposure | … in 7 days |
| creator_hidden | suppression | 1 if the subject's latest control on the creator is `hide` |
| category_hidden | suppression | 1 if the subject's latest control on the category is `hide` |
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa

from recsys_assets.config.settings import SOURCES

FEATURE_SET_VERSION = "fs_v1"

USER_FEATURES = (
    "user_events_total",
    "user_events_7d",
    "user_clicks_total",
    "user_purchases_total",
    "user_days_since_last_activity",
)
ITEM_FEATURES = (
    "item_events_1d",
    "item_events_7d",
    "item_events_28d",
    "item_events_total",
    "item_age_days",
    "item_stock",
    "item_is_sponsored",
)
CROSS_FEATURES = (
    "embedding_dot",
    "has_embedding_dot",
    "user_category_events",
    "user_category_affinity",
    "category_match",
    "user_creator_events",
    "user_creator_affinity",
    "user_item_events",
)
SOURCE_FEATURES = (
    *(f"from_{source}" for source in SOURCES),
    *(f"rank_{source}_log1p" for source in SOURCES),
    "source_count",
)
EXPOSURE_FEATURES = ("shown_24h", "shown_7d")
SUPPRESSION_FEATURES = ("creator_hidden", "category_hidden")

FEATURE_COLUMNS: list[str] = [
    *USER_FEATURES,
    *ITEM_FEATURES,
    *CROSS_FEATURES,
    *SOURCE_FEATURES,
    *EXPOSURE_FEATURES,
    *SUPPRESSION_FEATURES,
]
"""Ordered float32 feature columns: the ranker's input layout."""

RANK_COLUMNS = tuple(f"rank_{source}" for source in SOURCES)
NO_HISTORY = pd.Timestamp("1970-01-01")
"""feature_timestamp of a row that used no time-stamped value (a cold subject and item)."""
MAX_DAYS_SINCE_ACTIVITY = 365.0
_KEY_COLUMNS = ("subject_id", "item_id", "score_time")

Frame = pd.DataFrame | pa.Table


class FeatureInputError(ValueError):
    """The pairs or event tables handed to compute_features are unusable as given."""


def compute_features(
    con: duckdb.DuckDBPyConnection,
    pairs: Frame,
    *,
    interactions: Frame,
    exposures: Frame,
    items: Frame,
    surface: str,
    score_time: pd.Timestamp | None = None,
    user_controls: Frame | None = None,
) -> pd.DataFrame:
    """Point-in-time features for each row of `pairs`, in the same order.

    `pairs` has subject_id and item_id, and a per-row `score_time` column unless the scalar
    `score_time` is given (one or the other). Every other column of `pairs` passes through
    (source_provenance, rank_<source>, retrieval_score, labels). `con` is the caller's
    connection: work happens on a cursor of it (own temp tables), so parallel steps with
    their own database files never share state. `user_controls` (hide/unhide of creators
    and categories) drives the suppression flags; without it they are 0.
    """
    frame = _pairs_frame(pairs)
    probe = _probe_table(frame, score_time)
    with _cursor(con) as cur:
        cur.register("_fs_probe", probe)
        cur.register("_fs_interactions", _as_arrow(interactions, "interactions"))
        cur.register("_fs_exposures", _as_arrow(exposures, "exposures"))
        cur.register("_fs_items", _as_arrow(items, "items"))
        controls = (
            _as_arrow(user_controls, "user_controls")
            if user_controls is not None
            else pa.table(
                {
                    "user_id": pa.array([], pa.int64()),
                    "target_type": pa.array([], pa.string()),
                    "target_id": pa.array([], pa.string()),
                    "action": pa.array([], pa.string()),
                    "ts": pa.array([], pa.timestamp("us")),
                }
            )
        )
        cur.register("_fs_controls", controls)
        for statement in _build_tables_sql(surface):
            cur.execute(statement)
        computed = cur.execute(_FEATURES_SQL).to_arrow_table()
    return _assemble(frame, computed)


def leakage_violations(features: pd.DataFrame) -> pd.DataFrame:
    """Rows that used a value from after their score_time (must be empty)."""
    feature_time = pd.to_datetime(features["feature_timestamp"])
    score_time = pd.to_datetime(features["score_time"])
    future = (feature_time > score_time) | feature_time.isna() | score_time.isna()
    return features.loc[future.to_numpy()]


# -- inputs --------------------------------------------------------------------------------


def _as_arrow(frame: Frame, name: str) -> pa.Table:
    if isinstance(frame, pa.Table):
        return frame
    if isinstance(frame, pd.DataFrame):
        return pa.Table.from_pandas(frame, preserve_index=False)
    raise FeatureInputError(f"{name}: expected a pandas DataFrame or pyarrow Table, got {frame!r}")


def _pairs_frame(pairs: Frame) -> pd.DataFrame:
    frame = pairs.to_pandas() if isinstance(pairs, pa.Table) else pairs.reset_index(drop=True)
    missing = [column for column in ("subject_id", "item_id") if column not in frame.columns]
    if missing:
        raise FeatureInputError(
            f"pairs lack column(s) {missing}; pass one row per (subject_id, item_id)"
        )
    return frame


def _probe_table(frame: pd.DataFrame, score_time: pd.Timestamp | None) -> pa.Table:
    if (score_time is None) == ("score_time" not in frame.columns):
        raise FeatureInputError(
            "give score_time either as the scalar argument or as a pairs column, not both "
            "or neither (training rows: the label's event time; scoring rows: now)"
        )
    if score_time is not None:
        times = np.full(len(frame), _naive(score_time).to_datetime64(), dtype="datetime64[us]")
    else:
        column = pd.to_datetime(frame["score_time"])
        if column.isna().any():
            raise FeatureInputError("pairs.score_time has nulls; every row needs a score time")
        times = column.to_numpy(dtype="datetime64[us]")
    return pa.table(
        {
            "_row": pa.array(np.arange(len(frame), dtype=np.int64)),
            "subject_id": pa.array(frame["subject_id"].to_numpy(dtype=np.int64)),
            "item_id": pa.array(frame["item_id"].to_numpy(dtype=np.int64)),
            "score_time": pa.array(times),
        }
    )


def _naive(moment: pd.Timestamp | str) -> pd.Timestamp:
    stamp = pd.Timestamp(moment)
    return stamp.tz_convert("UTC").tz_localize(None) if stamp.tzinfo else stamp


@contextmanager
def _cursor(con: duckdb.DuckDBPyConnection) -> Iterator[duckdb.DuckDBPyConnection]:
    """A cursor of `con`: its own temp tables and registrations, dropped on exit."""
    cur = con.cursor()
    try:
        yield cur
    finally:
        cur.close()


# -- SQL -----------------------------------------------------------------------------------


def _build_tables_sql(surface: str) -> list[str]:
    """Time-indexed feature tables: cumulative counts per key, one row per key and time.

    Only keys and times the probe can reach are kept (subjects and items in the probe, events
    before the latest score_time), so a subject shard builds only its own history.
    """
    quoted_surface = surface.replace("'", "''")
    return [
        "CREATE OR REPLACE TEMP TABLE fs_bounds AS "
        "SELECT max(score_time) AS horizon FROM _fs_probe",
        """
        CREATE OR REPLACE TEMP TABLE fs_item_attrs AS
        SELECT CAST(item_id AS BIGINT) AS item_id, CAST(category AS VARCHAR) AS category,
               CAST(creator_id AS VARCHAR) AS creator_id, CAST(stock AS DOUBLE) AS stock,
               CAST(is_sponsored AS DOUBLE) AS is_sponsored,
               CAST(created_at AS TIMESTAMP) AS created_at
        FROM _fs_items
        """,
        """
        CREATE OR REPLACE TEMP TABLE fs_events AS
        SELECT CAST(e.user_id AS BIGINT) AS user_id, CAST(e.item_id AS BIGINT) AS item_id,
               CAST(e.ts AS TIMESTAMP) AS ts, e.event_type
        FROM _fs_interactions e
        WHERE e.event_type <> 'hide'
          AND CAST(e.ts AS TIMESTAMP) < (SELECT horizon FROM fs_bounds)
        """,
        """
        CREATE OR REPLACE TEMP TABLE fs_user_activity AS
        WITH per_time AS (
            SELECT user_id, ts, count(*) AS events,
                   count(*) FILTER (WHERE event_type = 'click') AS clicks,
                   count(*) FILTER (WHERE event_type = 'purchase') AS purchases
            FROM fs_events
            WHERE user_id IN (SELECT DISTINCT subject_id FROM _fs_probe)
            GROUP BY user_id, ts
        )
        SELECT user_id, ts,
               sum(events) OVER w AS events_cum,
               sum(clicks) OVER w AS clicks_cum,
               sum(purchases) OVER w AS purchases_cum
        FROM per_time
        WINDOW w AS (PARTITION BY user_id ORDER BY ts ROWS UNBOUNDED PRECEDING)
        """,
        """
        CREATE OR REPLACE TEMP TABLE fs_item_activity AS
        WITH per_time AS (
            SELECT item_id, ts, count(*) AS events
            FROM fs_events
            WHERE item_id IN (SELECT DISTINCT item_id FROM _fs_probe)
            GROUP BY item_id, ts
        )
        SELECT item_id, ts, sum(events) OVER w AS events_cum
        FROM per_time
        WINDOW w AS (PARTITION BY item_id ORDER BY ts ROWS UNBOUNDED PRECEDING)
        """,
        """
        CREATE OR REPLACE TEMP TABLE fs_user_category AS
        WITH per_time AS (
            SELECT e.user_id, a.category, e.ts, count(*) AS events
            FROM fs_events e JOIN fs_item_attrs a USING (item_id)
            WHERE e.user_id IN (SELECT DISTINCT subject_id FROM _fs_probe)
            GROUP BY e.user_id, a.category, e.ts
        )
        SELECT user_id, category, ts, sum(events) OVER w AS events_cum
        FROM per_time
        WINDOW w AS (PARTITION BY user_id, category ORDER BY ts ROWS UNBOUNDED PRECEDING)
        """,
        """
        CREATE OR REPLACE TEMP TABLE fs_user_creator AS
        WITH per_time AS (
            SELECT e.user_id, a.creator_id, e.ts, count(*) AS events
            FROM fs_events e JOIN fs_item_attrs a USING (item_id)
            WHERE e.user_id IN (SELECT DISTINCT subject_id FROM _fs_probe)
            GROUP BY e.user_id, a.creator_id, e.ts
        )
        SELECT user_id, creator_id, ts, sum(events) OVER w AS events_cum
        FROM per_time
        WINDOW w AS (PARTITION BY user_id, creator_id ORDER BY ts ROWS UNBOUNDED PRECEDING)
        """,
        f"""
        CREATE OR REPLACE TEMP TABLE fs_pair_activity AS
        WITH stream AS (
            SELECT user_id, item_id, ts, 1 AS engaged, 0 AS shown FROM fs_events
            UNION ALL
            SELECT CAST(user_id AS BIGINT), CAST(item_id AS BIGINT), CAST(ts AS TIMESTAMP), 0, 1
            FROM _fs_exposures
            WHERE surface = '{quoted_surface}'
              AND CAST(ts AS TIMESTAMP) < (SELECT horizon FROM fs_bounds)
        ),
        per_time AS (
            SELECT user_id, item_id, ts, sum(engaged) AS engaged, sum(shown) AS shown
            FROM stream
            WHERE user_id IN (SELECT DISTINCT subject_id FROM _fs_probe)
            GROUP BY user_id, item_id, ts
        )
        SELECT user_id, item_id, ts,
               sum(engaged) OVER w AS engaged_cum, sum(shown) OVER w AS shown_cum
        FROM per_time
        WINDOW w AS (PARTITION BY user_id, item_id ORDER BY ts ROWS UNBOUNDED PRECEDING)
        """,
        """
        CREATE OR REPLACE TEMP TABLE fs_controls AS
        SELECT CAST(user_id AS BIGINT) AS user_id, target_type, CAST(target_id AS VARCHAR)
                   AS target_id, CAST(ts AS TIMESTAMP) AS ts, bool_or(action = 'hide') AS hidden
        FROM _fs_controls
        WHERE target_type IN ('creator', 'category')
          AND user_id IN (SELECT DISTINCT subject_id FROM _fs_probe)
        GROUP BY ALL
        """,
    ]


_DAY = "INTERVAL 1 DAY"

_FEATURES_SQL = f"""
WITH probe AS (
    SELECT p._row, p.subject_id, p.item_id, p.score_time,
           a.category, a.creator_id,
           CASE WHEN a.created_at < p.score_time THEN a.created_at END AS item_known_at,
           CASE WHEN a.created_at < p.score_time THEN a.stock ELSE 0 END AS item_stock,
           CASE WHEN a.created_at < p.score_time THEN a.is_sponsored ELSE 0 END
               AS item_is_sponsored
    FROM _fs_probe p LEFT JOIN fs_item_attrs a USING (item_id)
),
user_probe AS (SELECT DISTINCT subject_id, score_time FROM probe),
user_features AS (
    SELECT u.subject_id, u.score_time, now_.ts AS user_ts,
           coalesce(now_.events_cum, 0) AS user_events_total,
           coalesce(now_.events_cum, 0) - coalesce(week.events_cum, 0) AS user_events_7d,
           coalesce(now_.clicks_cum, 0) AS user_clicks_total,
           coalesce(now_.purchases_cum, 0) AS user_purchases_total
    FROM user_probe u
    ASOF LEFT JOIN fs_user_activity now_
        ON u.subject_id = now_.user_id AND u.score_time > now_.ts
    ASOF LEFT JOIN fs_user_activity week
        ON u.subject_id = week.user_id AND u.score_time - 7 * {_DAY} > week.ts
),
item_probe AS (SELECT DISTINCT item_id, score_time FROM probe),
item_features AS (
    SELECT i.item_id, i.score_time, now_.ts AS item_ts,
           coalesce(now_.events_cum, 0) AS item_events_total,
           coalesce(now_.events_cum, 0) - coalesce(d1.events_cum, 0) AS item_events_1d,
           coalesce(now_.events_cum, 0) - coalesce(d7.events_cum, 0) AS item_events_7d,
           coalesce(now_.events_cum, 0) - coalesce(d28.events_cum, 0) AS item_events_28d
    FROM item_probe i
    ASOF LEFT JOIN fs_item_activity now_
        ON i.item_id = now_.item_id AND i.score_time > now_.ts
    ASOF LEFT JOIN fs_item_activity d1
        ON i.item_id = d1.item_id AND i.score_time - {_DAY} > d1.ts
    ASOF LEFT JOIN fs_item_activity d7
        ON i.item_id = d7.item_id AND i.score_time - 7 * {_DAY} > d7.ts
    ASOF LEFT JOIN fs_item_activity d28
        ON i.item_id = d28.item_id AND i.score_time - 28 * {_DAY} > d28.ts
),
category_probe AS (
    SELECT DISTINCT subject_id, category, score_time FROM probe WHERE category IS NOT NULL
),
category_features AS (
    SELECT c.subject_id, c.category, c.score_time,
           coalesce(aff.events_cum, 0) AS user_category_events, aff.ts AS category_ts,
           coalesce(ctl.hidden, false) AS category_hidden, ctl.ts AS category_control_ts
    FROM category_probe c
    ASOF LEFT JOIN fs_user_category aff
        ON c.subject_id = aff.user_id AND c.category = aff.category AND c.score_time > aff.ts
    ASOF LEFT JOIN (SELECT * FROM fs_controls WHERE target_type = 'category') ctl
        ON c.subject_id = ctl.user_id AND c.category = ctl.target_id AND c.score_time > ctl.ts
),
creator_probe AS (
    SELECT DISTINCT subject_id, creator_id, score_time FROM probe WHERE creator_id IS NOT NULL
),
creator_features AS (
    SELECT c.subject_id, c.creator_id, c.score_time,
           coalesce(aff.events_cum, 0) AS user_creator_events, aff.ts AS creator_ts,
           coalesce(ctl.hidden, false) AS creator_hidden, ctl.ts AS creator_control_ts
    FROM creator_probe c
    ASOF LEFT JOIN fs_user_creator aff
        ON c.subject_id = aff.user_id AND c.creator_id = aff.creator_id AND c.score_time > aff.ts
    ASOF LEFT JOIN (SELECT * FROM fs_controls WHERE target_type = 'creator') ctl
        ON c.subject_id = ctl.user_id AND c.creator_id = ctl.target_id AND c.score_time > ctl.ts
),
pair_features AS (
    SELECT p._row, now_.ts AS pair_ts,
           coalesce(now_.engaged_cum, 0) AS user_item_events,
           coalesce(now_.shown_cum, 0) - coalesce(d1.shown_cum, 0) AS shown_24h,
           coalesce(now_.shown_cum, 0) - coalesce(d7.shown_cum, 0) AS shown_7d
    FROM _fs_probe p
    ASOF LEFT JOIN fs_pair_activity now_
        ON p.subject_id = now_.user_id AND p.item_id = now_.item_id AND p.score_time > now_.ts
    ASOF LEFT JOIN fs_pair_activity d1
        ON p.subject_id = d1.user_id AND p.item_id = d1.item_id
       AND p.score_time - {_DAY} > d1.ts
    ASOF LEFT JOIN fs_pair_activity d7
        ON p.subject_id = d7.user_id AND p.item_id = d7.item_id
       AND p.score_time - 7 * {_DAY} > d7.ts
)
SELECT
    p.score_time,
    coalesce(
        greatest(u.user_ts, i.item_ts, p.item_known_at, cat.category_ts,
                 cat.category_control_ts, cr.creator_ts, cr.creator_control_ts, pf.pair_ts),
        TIMESTAMP '{NO_HISTORY.isoformat(sep=" ")}'
    ) AS feature_timestamp,
    CAST(u.user_events_total AS FLOAT) AS user_events_total,
    CAST(u.user_events_7d AS FLOAT) AS user_events_7d,
    CAST(u.user_clicks_total AS FLOAT) AS user_clicks_total,
    CAST(u.user_purchases_total AS FLOAT) AS user_purchases_total,
    CAST(coalesce(least(date_diff('second', u.user_ts, p.score_time) / 86400.0,
                        {MAX_DAYS_SINCE_ACTIVITY}), {MAX_DAYS_SINCE_ACTIVITY}) AS FLOAT)
        AS user_days_since_last_activity,
    CAST(i.item_events_1d AS FLOAT) AS item_events_1d,
    CAST(i.item_events_7d AS FLOAT) AS item_events_7d,
    CAST(i.item_events_28d AS FLOAT) AS item_events_28d,
    CAST(i.item_events_total AS FLOAT) AS item_events_total,
    CAST(coalesce(date_diff('second', p.item_known_at, p.score_time) / 86400.0, 0) AS FLOAT)
        AS item_age_days,
    CAST(coalesce(p.item_stock, 0) AS FLOAT) AS item_stock,
    CAST(coalesce(p.item_is_sponsored, 0) AS FLOAT) AS item_is_sponsored,
    CAST(coalesce(cat.user_category_events, 0) AS FLOAT) AS user_category_events,
    CAST(coalesce(cat.user_category_events / nullif(u.user_events_total, 0), 0) AS FLOAT)
        AS user_category_affinity,
    CAST(coalesce(cat.user_category_events, 0) > 0 AS FLOAT) AS category_match,
    CAST(coalesce(cr.user_creator_events, 0) AS FLOAT) AS user_creator_events,
    CAST(coalesce(cr.user_creator_events / nullif(u.user_events_total, 0), 0) AS FLOAT)
        AS user_creator_affinity,
    CAST(pf.user_item_events AS FLOAT) AS user_item_events,
    CAST(pf.shown_24h AS FLOAT) AS shown_24h,
    CAST(pf.shown_7d AS FLOAT) AS shown_7d,
    CAST(coalesce(cr.creator_hidden, false) AS FLOAT) AS creator_hidden,
    CAST(coalesce(cat.category_hidden, false) AS FLOAT) AS category_hidden
FROM probe p
JOIN pair_features pf USING (_row)
LEFT JOIN user_features u USING (subject_id, score_time)
LEFT JOIN item_features i USING (item_id, score_time)
LEFT JOIN category_features cat USING (subject_id, category, score_time)
LEFT JOIN creator_features cr USING (subject_id, creator_id, score_time)
ORDER BY p._row
"""


# -- output --------------------------------------------------------------------------------


def _assemble(frame: pd.DataFrame, computed: pa.Table) -> pd.DataFrame:
    """The pairs' own columns, then score_time, feature_timestamp, features, version."""
    out = computed.to_pandas()
    out.index = frame.index
    features = {name: out[name].to_numpy(dtype=np.float32) for name in _SQL_FEATURES}
    features.update(_cross_and_source_features(frame))
    own = frame.drop(
        columns=[*FEATURE_COLUMNS, "score_time", "feature_timestamp", "feature_set_version"],
        errors="ignore",
    )
    times = pd.DataFrame(
        {
            "score_time": out["score_time"].astype("datetime64[ns]"),
            "feature_timestamp": out["feature_timestamp"].astype("datetime64[ns]"),
        },
        index=frame.index,
    )
    values = pd.DataFrame({name: features[name] for name in FEATURE_COLUMNS}, index=frame.index)
    result = pd.concat([own, times, values], axis=1)
    result["feature_set_version"] = FEATURE_SET_VERSION
    return result


def _cross_and_source_features(frame: pd.DataFrame) -> dict[str, np.ndarray]:
    """Features read straight off the candidate row: embedding dot and source provenance."""
    rows = len(frame)
    if "retrieval_score" in frame.columns:
        dot = frame["retrieval_score"].to_numpy(dtype=np.float32, na_value=np.nan)
    else:
        dot = np.full(rows, np.nan, dtype=np.float32)
    known = np.isfinite(dot)
    found: dict[str, np.ndarray] = {
        "embedding_dot": np.where(known, dot, 0.0).astype(np.float32),
        "has_embedding_dot": known.astype(np.float32),
    }
    proposed_by = np.zeros(rows, dtype=np.float32)
    for source, column in zip(SOURCES, RANK_COLUMNS, strict=True):
        if column in frame.columns:
            rank = frame[column].fillna(0).to_numpy(dtype=np.float32)
        else:
            rank = np.zeros(rows, dtype=np.float32)
        proposed = (rank > 0).astype(np.float32)
        found[f"from_{source}"] = proposed
        found[f"rank_{source}_log1p"] = np.log1p(np.maximum(rank, 0)).astype(np.float32)
        proposed_by += proposed
    found["source_count"] = proposed_by
    return found


_SQL_FEATURES = tuple(
    name
    for name in FEATURE_COLUMNS
    if name not in ("embedding_dot", "has_embedding_dot", "source_count")
    and not name.startswith(("from_", "rank_"))
)
