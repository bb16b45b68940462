"""Point-in-time features for (subject, item, score_time) rows, built with DuckDB ASOF JOINs.

This is the exact path, for rows with their own score times (training rows: the label's
time). Scoring, where a partition's rows share one score_time, reads the same values from
entity tables (`pipeline/feature_tables.py`, the `features_asof` asset); a test holds the
two paths to identical values, so the ranker never sees a feature at training time that it
would not have at scoring time. Every value comes from a time-indexed state table (one row per key
and change point, with every count as of that point) looked up with
`ASOF JOIN … ON score_time > changed_at`: the newest state *strictly before* score_time.
Strict, because a training row at the label's event time must not count the label event
itself. An event enters a window at its time and leaves it at time + window (a second
change point), so one lookup per key yields the total and every window count exactly.
Exposures per (subject, item) are few, so their state row instead carries the exposure
times of the 7 days up to it; the window counts at score_time filter that short list.
`feature_timestamp` is the newest timestamp of any value used
(1970-01-01 for a row that used none), so `feature_timestamp < score_time` holds by
construction and `leakage_violations` proves it per partition.

Engagement events are every interaction except `hide` (view, click, purchase, rating).
Items carry no history: an item's static attributes (category, creator, stock,
is_sponsored) are used only once the item exists (created_at < score_time) and are stamped
with created_at; stock is the snapshot's value (exact at scoring time, an approximation for
past training rows).

There is deliberately no per-(subject, item) engagement count: training negatives are, by
construction, items the subject never touched before, so such a count would separate the
classes by the sampling rule rather than by preference.

| column | group | meaning |
| --- | --- | --- |
| user_events_total | user | engagement events of the subject before score_time |
| user_events_7d | user | engagement events in the 7 days before score_time |
| user_clicks_total | user | clicks before score_time |
| user_purchases_total | user | purchases before score_time |
| user_days_since_last_activity | user | days since the last engagement (capped; 365 if none) |
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
| collaborative_score | history | EASE score of the item from the subject's engagement history (candidate row) |
| collaborative_recent_score | history | … from the subject's latest items only |
| item_to_item_score | history | Σ item-neighbour similarity from the subject's history (candidate row) |
| item_to_item_recent_score | history | … from the subject's latest items only |
| from_<source> | source | 1 if the source proposed the item (rank_<source> > 0), per SOURCES |
| rank_<source>_log1p | source | log1p(rank_<source>), 0 when not proposed, per SOURCES |
| source_count | source | how many sources proposed the item |
| shown_24h | exposure | times the item was shown to the subject on this surface in 24h |
| shown_7d | exposure | … in 7 days |
| creator_hidden | suppression | 1 if the subject's latest control on the creator is `hide` |
| category_hidden | suppression | 1 if the subject's latest control on the category is `hide` |
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds

from recsys_assets.config.settings import SOURCES

FEATURE_SET_VERSION = "fs_v2"

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
)
HISTORY_SCORES = (
    "collaborative_score",
    "collaborative_recent_score",
    "item_to_item_score",
    "item_to_item_recent_score",
)
"""Computed with the candidate pool (pipeline/candidates.history_scores) and carried on its
rows, like the two-tower retrieval_score: 0 on rows that lack them."""
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
    *HISTORY_SCORES,
    *SOURCE_FEATURES,
    *EXPOSURE_FEATURES,
    *SUPPRESSION_FEATURES,
]
"""Ordered float32 feature columns: the ranker's input layout."""

RANK_COLUMNS = tuple(f"rank_{source}" for source in SOURCES)
NO_HISTORY = pd.Timestamp("1970-01-01")
"""feature_timestamp of a row that used no time-stamped value (a cold subject and item)."""
MAX_DAYS_SINCE_ACTIVITY = 365.0

Frame = pd.DataFrame | pa.Table
EventSource = pd.DataFrame | pa.Table | ds.Dataset
"""An event table; a pyarrow Dataset (Parquet parts) is scanned lazily, never loaded whole."""


class FeatureInputError(ValueError):
    """The pairs or event tables handed to compute_features are unusable as given."""


def compute_features(
    con: duckdb.DuckDBPyConnection,
    pairs: Frame,
    *,
    interactions: EventSource,
    exposures: EventSource,
    items: Frame,
    surface: str,
    score_time: pd.Timestamp | None = None,
    user_controls: EventSource | None = None,
    step_seconds: dict[str, float] | None = None,
) -> pd.DataFrame:
    """Point-in-time features for each row of `pairs`, in the same order.

    `pairs` has subject_id and item_id, and a per-row `score_time` column unless the scalar
    `score_time` is given (one or the other). Every other column of `pairs` passes through
    (source_provenance, rank_<source>, retrieval_score, labels). Event tables may be
    pyarrow Datasets: DuckDB scans them per call, so memory does not grow with their size.
    `con` is the caller's connection: work happens on a cursor of it (own temp tables), so
    parallel steps with their own database files never share state. `user_controls`
    (hide/unhide of creators and categories) drives the suppression flags; without it they
    are 0. `step_seconds`, if given, receives wall times: build_state, asof_join (all lookups and the join back;
    per lookup as lookup_<key>) and assemble, for metadata and benchmarks.
    """
    frame = _pairs_frame(pairs)
    probe = _probe_table(frame, score_time)
    with _cursor(con) as cur:
        cur.register("_fs_probe", probe)
        _register_sources(cur, interactions, exposures, items, user_controls)
        with _timed(step_seconds, "build_state"):
            for statement in _build_tables_sql(surface, one_score_time=score_time is not None):
                cur.execute(statement)
        with _timed(step_seconds, "asof_join"):
            for key, statement in _lookup_sql():
                with _timed(step_seconds, f"lookup_{key}"):
                    cur.execute(statement)
            with _timed(step_seconds, "join_back"):
                computed = cur.sql(_ASSEMBLE_SQL).to_arrow_table()
    with _timed(step_seconds, "assemble"):
        return _assemble(frame, computed)


def leakage_violations(features: pd.DataFrame) -> pd.DataFrame:
    """Rows that used a value from after their score_time (must be empty)."""
    feature_time = pd.to_datetime(features["feature_timestamp"])
    score_time = pd.to_datetime(features["score_time"])
    future = (feature_time > score_time) | feature_time.isna() | score_time.isna()
    return features.loc[future.to_numpy()]


# -- inputs --------------------------------------------------------------------------------


def _as_arrow(frame: EventSource, name: str) -> pa.Table | ds.Dataset:
    if isinstance(frame, pa.Table | ds.Dataset):
        return frame
    if isinstance(frame, pd.DataFrame):
        return pa.Table.from_pandas(frame, preserve_index=False)
    raise FeatureInputError(
        f"{name}: expected a pandas DataFrame, pyarrow Table or Dataset, got {frame!r}"
    )


def _register_sources(
    cur: duckdb.DuckDBPyConnection,
    interactions: EventSource,
    exposures: EventSource,
    items: Frame,
    user_controls: EventSource | None,
) -> None:
    """The source tables under the names both feature paths' SQL reads."""
    cur.register("_fs_interactions", _as_arrow(interactions, "interactions"))
    cur.register("_fs_exposures", _as_arrow(exposures, "exposures"))
    cur.register("_fs_items", _as_arrow(items, "items"))
    cur.register(
        "_fs_controls",
        _as_arrow(user_controls, "user_controls")
        if user_controls is not None
        else _empty_controls(),
    )


def _empty_controls() -> pa.Table:
    """A user_controls table with no rows: no suppression flags."""
    return pa.table(
        {
            "user_id": pa.array([], pa.int64()),
            "target_type": pa.array([], pa.string()),
            "target_id": pa.array([], pa.string()),
            "action": pa.array([], pa.string()),
            "ts": pa.array([], pa.timestamp("us")),
        }
    )


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
def _timed(into: dict[str, float] | None, step: str) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    finally:
        if into is not None:
            into[step] = into.get(step, 0.0) + time.perf_counter() - started


@contextmanager
def _cursor(con: duckdb.DuckDBPyConnection) -> Iterator[duckdb.DuckDBPyConnection]:
    """A cursor of `con`: its own temp tables and registrations, dropped on exit.

    DuckDB's progress bar is off: it draws on stdout, where `recsys evaluate` prints JSON.
    """
    cur = con.cursor()
    cur.execute("SET enable_progress_bar = false")
    try:
        yield cur
    finally:
        cur.close()


# -- SQL -----------------------------------------------------------------------------------


def _build_tables_sql(surface: str, *, one_score_time: bool = False) -> list[str]:
    """Time-indexed state tables: one row per key and change point, all values as of then.

    An event at time e adds 1 to the totals and to each window from e on, and a second row
    at e + window takes it out of that window again, so the running sums at the newest
    change point before score_time are the exact window counts: one ASOF lookup per key
    instead of one per window. Only keys the probe can reach are kept (subjects and items in
    the probe, changes before the latest score_time): a subject shard builds its own history.
    The window frame includes peers, so rows sharing a change time carry identical values
    and the ASOF join may pick any of them.

    With `one_score_time` (every probe row at the same score_time) the item state needs
    only its newest row, so it is one aggregate per item straight from the interactions
    (the same counts the change points would sum to: an event is in a window when
    ts < score_time <= ts + window), and `fs_events` keeps the subjects' events only.
    """
    quoted_surface = surface.replace("'", "''")
    return [
        "CREATE OR REPLACE TEMP TABLE fs_bounds AS "
        "SELECT max(score_time) AS horizon FROM _fs_probe",
        "CREATE OR REPLACE TEMP TABLE fs_probe_items AS SELECT DISTINCT item_id FROM _fs_probe",
        *_shared_tables_sql(one_score_time=one_score_time),
        f"""
        CREATE OR REPLACE TEMP TABLE fs_user_state AS
        SELECT e.user_id, e.ts + k.shift AS changed_at,
               CAST(sum(k.total) OVER w AS FLOAT) AS events_total,
               CAST(sum(k.d7) OVER w AS FLOAT) AS events_7d,
               CAST(sum(k.total * (e.event_type = 'click')::INT) OVER w AS FLOAT)
                   AS clicks_total,
               CAST(sum(k.total * (e.event_type = 'purchase')::INT) OVER w AS FLOAT)
                   AS purchases_total,
               max(CASE WHEN k.total = 1 THEN e.ts END) OVER w AS last_event_ts
        FROM fs_events e
        CROSS JOIN (VALUES (INTERVAL 0 DAY, 1, 1), (7 * {_DAY}, 0, -1)) k(shift, total, d7)
        WHERE e.user_id IN (SELECT subject_id FROM fs_probe_subjects)
          AND e.ts + k.shift < (SELECT horizon FROM fs_bounds)
        WINDOW w AS (PARTITION BY e.user_id ORDER BY e.ts + k.shift)
        """,
        _ITEM_STATE_SQL
        if not one_score_time
        else "CREATE OR REPLACE TEMP TABLE fs_item_state AS SELECT * FROM "
        f"({_ITEM_AGGREGATE_SELECT}) WHERE item_id IN (SELECT item_id FROM fs_probe_items)",
        *(_affinity_state_sql(target_type) for target_type in ("category", "creator")),
        f"""
        CREATE OR REPLACE TEMP TABLE fs_pair_state AS
        WITH shown AS (
            SELECT CAST(user_id AS BIGINT) AS user_id, CAST(item_id AS BIGINT) AS item_id,
                   CAST(ts AS TIMESTAMP) AS ts
            FROM _fs_exposures
            WHERE surface = '{quoted_surface}'
              AND CAST(ts AS TIMESTAMP) < (SELECT horizon FROM fs_bounds)
              AND CAST(user_id AS BIGINT) IN (SELECT subject_id FROM fs_probe_subjects)
        )
        SELECT user_id, item_id, ts AS changed_at, list(ts) OVER recent AS shown_last_7d
        FROM shown
        WINDOW recent AS (PARTITION BY user_id, item_id ORDER BY ts
                          RANGE BETWEEN 7 * {_DAY} PRECEDING AND CURRENT ROW)
        """,
    ]


def _shared_tables_sql(*, one_score_time: bool = True) -> list[str]:
    """The inputs both feature paths build first (after fs_bounds and the probe):
    the probe's subjects, item attributes with integer category and creator codes (they
    join far faster than text), the subjects' engagement events and their controls.
    Without `one_score_time` the events of the probe's items are kept too (fs_probe_items
    must exist), for item state at many score_times."""
    item_events = (
        ""
        if one_score_time
        else "OR CAST(e.item_id AS BIGINT) IN (SELECT item_id FROM fs_probe_items)"
    )
    return [
        "CREATE OR REPLACE TEMP TABLE fs_probe_subjects AS "
        "SELECT DISTINCT subject_id FROM _fs_probe",
        """
        CREATE OR REPLACE TEMP TABLE fs_item_attrs AS
        SELECT CAST(item_id AS BIGINT) AS item_id, CAST(category AS VARCHAR) AS category,
               CAST(creator_id AS VARCHAR) AS creator_id,
               dense_rank() OVER (ORDER BY CAST(category AS VARCHAR)) AS category_code,
               dense_rank() OVER (ORDER BY CAST(creator_id AS VARCHAR)) AS creator_code,
               CAST(stock AS DOUBLE) AS stock, CAST(is_sponsored AS DOUBLE) AS is_sponsored,
               CAST(created_at AS TIMESTAMP) AS created_at
        FROM _fs_items
        """,
        f"""
        CREATE OR REPLACE TEMP TABLE fs_events AS
        SELECT CAST(e.user_id AS BIGINT) AS user_id, CAST(e.item_id AS BIGINT) AS item_id,
               CAST(e.ts AS TIMESTAMP) AS ts, e.event_type
        FROM _fs_interactions e
        WHERE e.event_type <> 'hide'
          AND CAST(e.ts AS TIMESTAMP) < (SELECT horizon FROM fs_bounds)
          AND (CAST(e.user_id AS BIGINT) IN (SELECT subject_id FROM fs_probe_subjects)
               {item_events})
        """,
        """
        CREATE OR REPLACE TEMP TABLE fs_controls AS
        SELECT CAST(user_id AS BIGINT) AS user_id, target_type,
               CAST(target_id AS VARCHAR) AS target_id, CAST(ts AS TIMESTAMP) AS ts,
               bool_or(action = 'hide') AS hidden
        FROM _fs_controls
        WHERE target_type IN ('creator', 'category')
          AND CAST(ts AS TIMESTAMP) < (SELECT horizon FROM fs_bounds)
          AND CAST(user_id AS BIGINT) IN (SELECT subject_id FROM fs_probe_subjects)
        GROUP BY ALL
        """,
    ]


def _affinity_state_sql(target_type: str) -> str:
    """Per (subject, category or creator code): engagement count and latest hide/unhide."""
    return f"""
        CREATE OR REPLACE TEMP TABLE fs_{target_type}_state AS
        WITH codes AS (SELECT DISTINCT {target_type}_code AS code, {_ATTRIBUTE[target_type]} AS name
                       FROM fs_item_attrs),
        changes AS (
            SELECT e.user_id, a.{target_type}_code AS target, e.ts AS changed_at, 1 AS events,
                   e.ts AS event_ts, NULL::BOOLEAN AS hidden, NULL::TIMESTAMP AS control_ts
            FROM fs_events e JOIN fs_item_attrs a USING (item_id)
            WHERE e.user_id IN (SELECT subject_id FROM fs_probe_subjects)
            UNION ALL
            SELECT c.user_id, codes.code, c.ts, 0, NULL, c.hidden, c.ts
            FROM fs_controls c JOIN codes ON c.target_id = codes.name
            WHERE c.target_type = '{target_type}'
        ),
        per_time AS (
            SELECT user_id, target, changed_at, sum(events) AS events, max(event_ts) AS event_ts,
                   bool_or(hidden) AS hidden, max(control_ts) AS control_ts
            FROM changes GROUP BY user_id, target, changed_at
        )
        SELECT user_id, target, changed_at,
               CAST(sum(events) OVER w AS FLOAT) AS events_total,
               max(event_ts) OVER w AS last_event_ts,
               last_value(hidden IGNORE NULLS) OVER w AS hidden,
               max(control_ts) OVER w AS last_control_ts
        FROM per_time
        WINDOW w AS (PARTITION BY user_id, target ORDER BY changed_at ROWS UNBOUNDED PRECEDING)
        """


_ATTRIBUTE = {"category": "category", "creator": "creator_id"}

_DAY = "INTERVAL 1 DAY"
_ITEM_STATE_SQL = f"""
        CREATE OR REPLACE TEMP TABLE fs_item_state AS
        SELECT e.item_id, e.ts + k.shift AS changed_at,
               CAST(sum(k.total) OVER w AS FLOAT) AS events_total,
               CAST(sum(k.d1) OVER w AS FLOAT) AS events_1d,
               CAST(sum(k.d7) OVER w AS FLOAT) AS events_7d,
               CAST(sum(k.d28) OVER w AS FLOAT) AS events_28d,
               max(CASE WHEN k.total = 1 THEN e.ts END) OVER w AS last_event_ts
        FROM fs_events e
        CROSS JOIN (VALUES (INTERVAL 0 DAY, 1, 1, 1, 1), ({_DAY}, 0, -1, 0, 0),
                           (7 * {_DAY}, 0, 0, -1, 0), (28 * {_DAY}, 0, 0, 0, -1))
            k(shift, total, d1, d7, d28)
        WHERE e.item_id IN (SELECT item_id FROM fs_probe_items)
          AND e.ts + k.shift < (SELECT horizon FROM fs_bounds)
        WINDOW w AS (PARTITION BY e.item_id ORDER BY e.ts + k.shift)
"""
"""Item state at every change point: for probes at many score_times (training rows)."""
_ITEM_AGGREGATE_SELECT = f"""
SELECT CAST(e.item_id AS BIGINT) AS item_id, max(CAST(e.ts AS TIMESTAMP)) AS changed_at,
       CAST(count(*) AS FLOAT) AS events_total,
       CAST(count(*) FILTER (WHERE CAST(e.ts AS TIMESTAMP) + {_DAY} >= b.horizon) AS FLOAT)
           AS events_1d,
       CAST(count(*) FILTER (WHERE CAST(e.ts AS TIMESTAMP) + 7 * {_DAY} >= b.horizon) AS FLOAT)
           AS events_7d,
       CAST(count(*) FILTER (WHERE CAST(e.ts AS TIMESTAMP) + 28 * {_DAY} >= b.horizon) AS FLOAT)
           AS events_28d,
       max(CAST(e.ts AS TIMESTAMP)) AS last_event_ts
FROM _fs_interactions e, fs_bounds b
WHERE e.event_type <> 'hide' AND CAST(e.ts AS TIMESTAMP) < b.horizon
GROUP BY ALL
"""
"""Every item's state as of the one horizon in fs_bounds: one row per item."""


def _lookup_sql() -> list[tuple[str, str]]:
    """(name, statement): the probe rows, then one ASOF lookup per key.

    Each runs over distinct probe keys that have any history: keys without it skip the
    sort-merge and get zeros from the final left join, and subject and item lookups run
    once per distinct (key, score_time), not once per candidate. The (subject, item)
    exposure lookup runs on the probe rows themselves, keyed by row, and keeps
    only matches.
    """

    def with_history(columns: str, state: str, on: str) -> str:
        """Distinct probe keys that have state rows; the semi-join runs before the DISTINCT."""
        selected = ", ".join(f"q.{column.strip()}" for column in columns.split(","))
        return (
            f"(SELECT DISTINCT {selected} FROM fs_probe_rows q "
            f"SEMI JOIN (SELECT DISTINCT {state}) k ON {on}) q"
        )

    return [
        (
            "probe",
            """
            CREATE OR REPLACE TEMP TABLE fs_probe_rows AS
            SELECT p._row, p.subject_id, p.item_id, p.score_time,
                   a.category_code, a.creator_code,
                   CASE WHEN a.created_at < p.score_time THEN a.created_at END AS item_known_at,
                   CASE WHEN a.created_at < p.score_time THEN a.stock ELSE 0 END AS item_stock,
                   CASE WHEN a.created_at < p.score_time THEN a.is_sponsored ELSE 0 END
                       AS item_is_sponsored
            FROM _fs_probe p LEFT JOIN fs_item_attrs a USING (item_id)
            """,
        ),
        (
            "user",
            f"""
            CREATE OR REPLACE TEMP TABLE fs_user_features AS
            SELECT q.subject_id, q.score_time, s.last_event_ts AS user_ts,
                   s.events_total AS user_events_total, s.events_7d AS user_events_7d,
                   s.clicks_total AS user_clicks_total,
                   s.purchases_total AS user_purchases_total
            FROM {
                with_history(
                    "subject_id, score_time",
                    "user_id FROM fs_user_state",
                    "q.subject_id = k.user_id",
                )
            }
            ASOF JOIN fs_user_state s
                ON q.subject_id = s.user_id AND q.score_time > s.changed_at
            """,
        ),
        (
            "item",
            f"""
            CREATE OR REPLACE TEMP TABLE fs_item_features AS
            SELECT q.item_id, q.score_time, s.last_event_ts AS item_ts,
                   s.events_total AS item_events_total, s.events_1d AS item_events_1d,
                   s.events_7d AS item_events_7d, s.events_28d AS item_events_28d
            FROM {
                with_history(
                    "item_id, score_time",
                    "item_id FROM fs_item_state",
                    "q.item_id = k.item_id",
                )
            }
            ASOF JOIN fs_item_state s ON q.item_id = s.item_id AND q.score_time > s.changed_at
            """,
        ),
        *(
            (
                target_type,
                f"""
                CREATE OR REPLACE TEMP TABLE fs_{target_type}_features AS
                SELECT q.subject_id, q.{target_type}_code, q.score_time,
                       s.events_total AS user_{target_type}_events,
                       coalesce(s.hidden, false) AS {target_type}_hidden,
                       greatest(s.last_event_ts, s.last_control_ts) AS {target_type}_ts
                FROM {
                    with_history(
                        f"subject_id, {target_type}_code, score_time",
                        f"user_id, target FROM fs_{target_type}_state",
                        f"q.subject_id = k.user_id AND q.{target_type}_code = k.target",
                    )
                }
                ASOF JOIN fs_{target_type}_state s
                    ON q.subject_id = s.user_id AND q.{target_type}_code = s.target
                   AND q.score_time > s.changed_at
                """,
            )
            for target_type in ("category", "creator")
        ),
        (
            "pair",
            f"""
            CREATE OR REPLACE TEMP TABLE fs_pair_features AS
            SELECT q._row, s.changed_at AS pair_ts,
                   len(list_filter(s.shown_last_7d,
                                   lambda shown: shown >= q.score_time - {_DAY})) AS shown_24h,
                   len(list_filter(s.shown_last_7d,
                                   lambda shown: shown >= q.score_time - 7 * {_DAY})) AS shown_7d
            FROM _fs_probe q
            ASOF JOIN fs_pair_state s
                ON q.subject_id = s.user_id AND q.item_id = s.item_id
               AND q.score_time > s.changed_at
            """,
        ),
    ]


_ASSEMBLE_SQL = f"""
SELECT
    p._row,
    p.score_time,
    coalesce(
        greatest(u.user_ts, i.item_ts, p.item_known_at, cat.category_ts, cr.creator_ts,
                 pf.pair_ts),
        TIMESTAMP '{NO_HISTORY.isoformat(sep=" ")}'
    ) AS feature_timestamp,
    CAST(coalesce(u.user_events_total, 0) AS FLOAT) AS user_events_total,
    CAST(coalesce(u.user_events_7d, 0) AS FLOAT) AS user_events_7d,
    CAST(coalesce(u.user_clicks_total, 0) AS FLOAT) AS user_clicks_total,
    CAST(coalesce(u.user_purchases_total, 0) AS FLOAT) AS user_purchases_total,
    CAST(coalesce(least(date_diff('second', u.user_ts, p.score_time) / 86400.0,
                        {MAX_DAYS_SINCE_ACTIVITY}), {MAX_DAYS_SINCE_ACTIVITY}) AS FLOAT)
        AS user_days_since_last_activity,
    CAST(coalesce(i.item_events_1d, 0) AS FLOAT) AS item_events_1d,
    CAST(coalesce(i.item_events_7d, 0) AS FLOAT) AS item_events_7d,
    CAST(coalesce(i.item_events_28d, 0) AS FLOAT) AS item_events_28d,
    CAST(coalesce(i.item_events_total, 0) AS FLOAT) AS item_events_total,
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
    CAST(coalesce(pf.shown_24h, 0) AS FLOAT) AS shown_24h,
    CAST(coalesce(pf.shown_7d, 0) AS FLOAT) AS shown_7d,
    CAST(coalesce(cr.creator_hidden, false) AS FLOAT) AS creator_hidden,
    CAST(coalesce(cat.category_hidden, false) AS FLOAT) AS category_hidden
FROM fs_probe_rows p
LEFT JOIN fs_pair_features pf ON p._row = pf._row
LEFT JOIN fs_user_features u ON p.subject_id = u.subject_id AND p.score_time = u.score_time
LEFT JOIN fs_item_features i ON p.item_id = i.item_id AND p.score_time = i.score_time
LEFT JOIN fs_category_features cat
    ON p.subject_id = cat.subject_id AND p.category_code = cat.category_code
   AND p.score_time = cat.score_time
LEFT JOIN fs_creator_features cr
    ON p.subject_id = cr.subject_id AND p.creator_code = cr.creator_code
   AND p.score_time = cr.score_time
"""


# -- output --------------------------------------------------------------------------------


def _assemble(frame: pd.DataFrame, computed: pa.Table) -> pd.DataFrame:
    """The pairs' own columns, then score_time, feature_timestamp, features, version."""
    order = np.argsort(computed.column("_row").to_numpy(), kind="stable")
    out = computed.drop_columns(["_row"]).take(order).to_pandas()
    out.index = frame.index
    features = {name: out[name].to_numpy(dtype=np.float32) for name in _SQL_FEATURES}
    features.update(source_features(frame))
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


def source_features(frame: pd.DataFrame) -> dict[str, np.ndarray]:
    """Features read straight off the candidate row: embedding dot, history scores and
    source provenance (both feature paths)."""
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
    for column in HISTORY_SCORES:
        found[column] = (
            frame[column].fillna(0.0).to_numpy(dtype=np.float32)
            if column in frame.columns
            else np.zeros(rows, dtype=np.float32)
        )
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
    if name not in ("embedding_dot", "has_embedding_dot", "source_count", *HISTORY_SCORES)
    and not name.startswith(("from_", "rank_"))
)
