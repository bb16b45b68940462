"""Features at the grain where they live, as of one score_time, and the gather that scores.

Within a partition every candidate row has the same score_time, so scoring needs no per-row
ASOF join: each feature is a function of a subject, an item, a (subject, category),
a (subject, creator) or a (subject, item) exposure history, as of that moment.
`feature_tables` materializes those five entity tables (what the `features_asof` asset
stores); `gather_features` turns a candidate pool plus the tables into the ranker's input
matrix (FEATURE_COLUMNS order) with integer-coded lookups, no join per row.

The values are those of `features.compute_features` for the same (subject, item,
score_time) — the exact ASOF path training rows keep, with their own label times — and a
test holds the two paths to identical values. The aggregates below are that path's state
tables read at their newest change point: an event is in a window when
ts < score_time <= ts + window, a control's latest action wins, an exposure counts when
score_time − window <= ts < score_time. Every table row carries `feature_timestamp`, the
newest value it used (NO_HISTORY when none), so `feature_timestamp < score_time` is checked
per table, and the score_time and feature-set version it was computed for.

| table | key | features |
| --- | --- | --- |
| subjects | subject_id | USER_FEATURES |
| items | item_id (+ category_code, creator_code) | ITEM_FEATURES |
| subject_categories | subject_id, category_code | user_category_events, category_hidden |
| subject_creators | subject_id, creator_code | user_creator_events, creator_hidden |
| exposures | subject_id, item_id | shown_24h, shown_7d |

The cross features user_<target>_affinity (= events / user_events_total) and category_match
are derived in the gather, from the looked-up values, as the ASOF path derives them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa

from recsys_assets.pipeline.features import (
    _DAY,
    _ITEM_AGGREGATE_SELECT,
    FEATURE_COLUMNS,
    FEATURE_SET_VERSION,
    ITEM_FEATURES,
    MAX_DAYS_SINCE_ACTIVITY,
    NO_HISTORY,
    USER_FEATURES,
    EventSource,
    Frame,
    _cursor,
    _naive,
    _register_sources,
    _shared_tables_sql,
    source_features,
)

ENTITY_TABLES = ("subjects", "items", "subject_categories", "subject_creators", "exposures")
PER_SUBJECT_TABLES = ("subjects", "subject_categories", "subject_creators", "exposures")
"""Tables keyed by subject: written once per subject shard. `items` is one per partition."""
TARGETS = {"subject_categories": "category", "subject_creators": "creator"}
_NO_HISTORY_US = NO_HISTORY.value // 1_000


@dataclass(frozen=True)
class FeatureTables:
    """The entity tables of one partition (or of one subject shard plus the items)."""

    score_time: pd.Timestamp
    tables: dict[str, pd.DataFrame]

    def __getitem__(self, name: str) -> pd.DataFrame:
        return self.tables[name]


def feature_tables(
    con: duckdb.DuckDBPyConnection,
    subject_ids: np.ndarray,
    *,
    interactions: EventSource,
    exposures: EventSource,
    items: Frame,
    surface: str,
    score_time: pd.Timestamp,
    user_controls: EventSource | None = None,
    tables: tuple[str, ...] = ENTITY_TABLES,
) -> FeatureTables:
    """The entity tables for `subject_ids` as of `score_time` (only `tables`, by name).

    The per-subject tables hold only subjects and keys with history (a missing key means
    zeros); `items` holds every catalog item and every item with engagement.
    """
    unknown = set(tables) - set(ENTITY_TABLES)
    if unknown:
        raise ValueError(f"unknown feature table(s) {sorted(unknown)}; choose from {ENTITY_TABLES}")
    horizon = _naive(score_time)
    with _cursor(con) as cur:
        cur.register(
            "_fs_probe",
            pa.table(
                {
                    "subject_id": pa.array(np.unique(np.asarray(subject_ids, dtype=np.int64))),
                }
            ),
        )
        _register_sources(cur, interactions, exposures, items, user_controls)
        cur.execute(
            "CREATE OR REPLACE TEMP TABLE fs_bounds AS SELECT CAST(? AS TIMESTAMP) AS horizon",
            [horizon.to_pydatetime()],
        )
        for statement in _shared_tables_sql():
            cur.execute(statement)
        built = {name: cur.sql(_TABLE_SQL[name](surface)).df() for name in tables}
    for frame in built.values():
        frame["feature_timestamp"] = frame["feature_timestamp"].fillna(NO_HISTORY)
        frame["score_time"] = horizon
        frame["feature_set_version"] = FEATURE_SET_VERSION
    return FeatureTables(score_time=horizon, tables=built)


# -- SQL: each table at its newest change point ----------------------------------------------


def _subjects_sql(_: str) -> str:
    return f"""
        SELECT e.user_id AS subject_id,
               CAST(count(*) AS FLOAT) AS user_events_total,
               CAST(count(*) FILTER (WHERE e.ts + 7 * {_DAY} >= b.horizon) AS FLOAT)
                   AS user_events_7d,
               CAST(count(*) FILTER (WHERE e.event_type = 'click') AS FLOAT) AS user_clicks_total,
               CAST(count(*) FILTER (WHERE e.event_type = 'purchase') AS FLOAT)
                   AS user_purchases_total,
               CAST(least(date_diff('second', max(e.ts), b.horizon) / 86400.0,
                          {MAX_DAYS_SINCE_ACTIVITY}) AS FLOAT) AS user_days_since_last_activity,
               max(e.ts) AS feature_timestamp
        FROM fs_events e, fs_bounds b
        WHERE e.user_id IN (SELECT subject_id FROM fs_probe_subjects)
        GROUP BY e.user_id, b.horizon
        ORDER BY subject_id
    """


def _items_sql(_: str) -> str:
    return f"""
        WITH counts AS ({_ITEM_AGGREGATE_SELECT}),
        known AS (
            SELECT a.*, CASE WHEN a.created_at < b.horizon THEN a.created_at END AS known_at,
                   b.horizon
            FROM fs_item_attrs a, fs_bounds b
        )
        SELECT coalesce(k.item_id, c.item_id) AS item_id,
               coalesce(k.category_code, -1) AS category_code,
               coalesce(k.creator_code, -1) AS creator_code,
               CAST(coalesce(c.events_1d, 0) AS FLOAT) AS item_events_1d,
               CAST(coalesce(c.events_7d, 0) AS FLOAT) AS item_events_7d,
               CAST(coalesce(c.events_28d, 0) AS FLOAT) AS item_events_28d,
               CAST(coalesce(c.events_total, 0) AS FLOAT) AS item_events_total,
               CAST(coalesce(date_diff('second', k.known_at, k.horizon) / 86400.0, 0) AS FLOAT)
                   AS item_age_days,
               CAST(CASE WHEN k.known_at IS NOT NULL THEN k.stock ELSE 0 END AS FLOAT)
                   AS item_stock,
               CAST(CASE WHEN k.known_at IS NOT NULL THEN k.is_sponsored ELSE 0 END AS FLOAT)
                   AS item_is_sponsored,
               greatest(c.last_event_ts, k.known_at) AS feature_timestamp
        FROM known k FULL JOIN counts c ON k.item_id = c.item_id
        ORDER BY item_id
    """


def _target_sql(table: str) -> str:
    target = TARGETS[table]
    attribute = "category" if target == "category" else "creator_id"
    return f"""
        WITH codes AS (SELECT DISTINCT {target}_code AS code, {attribute} AS name
                       FROM fs_item_attrs),
        engaged AS (
            SELECT e.user_id, a.{target}_code AS code, count(*) AS events, max(e.ts) AS event_ts
            FROM fs_events e JOIN fs_item_attrs a USING (item_id)
            WHERE e.user_id IN (SELECT subject_id FROM fs_probe_subjects)
            GROUP BY ALL
        ),
        controlled AS (
            SELECT c.user_id, codes.code, arg_max(c.hidden, c.ts) AS hidden,
                   max(c.ts) AS control_ts
            FROM fs_controls c JOIN codes ON c.target_id = codes.name
            WHERE c.target_type = '{target}'
            GROUP BY ALL
        )
        SELECT coalesce(e.user_id, c.user_id) AS subject_id,
               coalesce(e.code, c.code) AS {target}_code,
               CAST(coalesce(e.events, 0) AS FLOAT) AS user_{target}_events,
               CAST(coalesce(c.hidden, false) AS FLOAT) AS {target}_hidden,
               greatest(e.event_ts, c.control_ts) AS feature_timestamp
        FROM engaged e FULL JOIN controlled c ON e.user_id = c.user_id AND e.code = c.code
        ORDER BY subject_id, {target}_code
    """


def _exposures_sql(surface: str) -> str:
    quoted_surface = surface.replace("'", "''")
    return f"""
        SELECT CAST(x.user_id AS BIGINT) AS subject_id, CAST(x.item_id AS BIGINT) AS item_id,
               CAST(count(*) FILTER (WHERE CAST(x.ts AS TIMESTAMP) >= b.horizon - {_DAY})
                    AS FLOAT) AS shown_24h,
               CAST(count(*) FILTER (WHERE CAST(x.ts AS TIMESTAMP) >= b.horizon - 7 * {_DAY})
                    AS FLOAT) AS shown_7d,
               max(CAST(x.ts AS TIMESTAMP)) AS feature_timestamp
        FROM _fs_exposures x, fs_bounds b
        WHERE x.surface = '{quoted_surface}'
          AND CAST(x.ts AS TIMESTAMP) < b.horizon
          AND CAST(x.user_id AS BIGINT) IN (SELECT subject_id FROM fs_probe_subjects)
        GROUP BY ALL
        ORDER BY subject_id, item_id
    """


_TABLE_SQL = {
    "subjects": _subjects_sql,
    "items": _items_sql,
    "subject_categories": lambda _: _target_sql("subject_categories"),
    "subject_creators": lambda _: _target_sql("subject_creators"),
    "exposures": _exposures_sql,
}


# -- gather ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class GatheredFeatures:
    """The ranker's inputs for each pool row, and the newest value each row used."""

    matrix: np.ndarray
    """float32, rows × FEATURE_COLUMNS, in FEATURE_COLUMNS order."""
    feature_timestamp: np.ndarray
    """datetime64[us] per row."""

    def frame(self, pool: pd.DataFrame, score_time: pd.Timestamp) -> pd.DataFrame:
        """What `compute_features` returns for these rows: the pool's own columns, score_time,
        feature_timestamp, the features and the version (debug samples, tests)."""
        own = pool.drop(
            columns=[*FEATURE_COLUMNS, "score_time", "feature_timestamp", "feature_set_version"],
            errors="ignore",
        ).reset_index(drop=True)
        values = pd.DataFrame(self.matrix, columns=FEATURE_COLUMNS)
        times = pd.DataFrame(
            {
                "score_time": np.full(len(own), _naive(score_time).to_datetime64()).astype(
                    "datetime64[ns]"
                ),
                "feature_timestamp": self.feature_timestamp.astype("datetime64[ns]"),
            }
        )
        result = pd.concat([own, times, values], axis=1)
        result["feature_set_version"] = FEATURE_SET_VERSION
        return result


def gather_features(tables: FeatureTables, pool: pd.DataFrame) -> GatheredFeatures:
    """The ranker's input matrix for `pool` (subject_id, item_id, rank_<source>,
    retrieval_score, history scores) from the entity tables, by integer-coded lookups.

    The matrix is filled feature by feature into contiguous rows of a (features × rows)
    array and returned as its transpose (a column-major rows × features view): writing
    one feature of every row at a time stays sequential in memory, and torch reads the
    view without a copy.
    """
    subject_ids = pool["subject_id"].to_numpy(dtype=np.int64)
    item_ids = pool["item_id"].to_numpy(dtype=np.int64)
    rows = len(pool)
    by_feature = np.zeros((len(FEATURE_COLUMNS), rows), dtype=np.float32)
    column = {name: by_feature[index] for index, name in enumerate(FEATURE_COLUMNS)}
    newest = np.full(rows, np.iinfo(np.int64).min, dtype=np.int64)

    def look_up(table: str, at: np.ndarray, names: tuple[str, ...]) -> None:
        """Each of `names` from `table` at rows `at` (0 where -1), and the newest timestamp."""
        frame = tables[table]
        if len(frame) == 0:
            return
        missing = at < 0
        safe = np.where(missing, 0, at)
        for name in names:
            np.take(frame[name].to_numpy(dtype=np.float32), safe, out=column[name])
            column[name][missing] = 0.0
        stamps = frame["feature_timestamp"].to_numpy(dtype="datetime64[us]").view(np.int64)
        found = np.take(stamps, safe)
        found[missing] = np.iinfo(np.int64).min
        np.maximum(newest, found, out=newest)

    subjects = tables["subjects"]
    subject_at = pd.Index(subjects["subject_id"].to_numpy(dtype=np.int64)).get_indexer(subject_ids)
    look_up("subjects", subject_at, USER_FEATURES)
    column["user_days_since_last_activity"][subject_at < 0] = MAX_DAYS_SINCE_ACTIVITY
    items = tables["items"]
    item_at = pd.Index(items["item_id"].to_numpy(dtype=np.int64)).get_indexer(item_ids)
    look_up("items", item_at, ITEM_FEATURES)
    for table, target in TARGETS.items():
        codes = take_or_fill(items[f"{target}_code"].to_numpy(dtype=np.int64), item_at, fill=-1)
        frame = tables[table]
        at = _pair_positions(
            (subject_ids, codes),
            (
                frame["subject_id"].to_numpy(dtype=np.int64),
                frame[f"{target}_code"].to_numpy(dtype=np.int64),
            ),
        )
        look_up(table, at, (f"user_{target}_events", f"{target}_hidden"))
    derive_cross_features(column)
    exposures = tables["exposures"]
    look_up(
        "exposures",
        _pair_positions(
            (subject_ids, item_ids),
            (
                exposures["subject_id"].to_numpy(dtype=np.int64),
                exposures["item_id"].to_numpy(dtype=np.int64),
            ),
        ),
        ("shown_24h", "shown_7d"),
    )
    for name, values in source_features(pool).items():
        column[name][:] = values
    newest[newest == np.iinfo(np.int64).min] = _NO_HISTORY_US
    return GatheredFeatures(matrix=by_feature.T, feature_timestamp=newest.view("datetime64[us]"))


def derive_cross_features(column: Mapping[str, np.ndarray]) -> None:
    """The features derived from looked-up values, in place: user_<target>_affinity
    (events / user_events_total, 0 without events) and category_match. The batch gather and
    serving's online rerank (after it adds the events since generation) both call this."""
    has_user = column["user_events_total"] > 0
    for target in TARGETS.values():
        affinity = column[f"user_{target}_affinity"]
        np.divide(
            column[f"user_{target}_events"],
            column["user_events_total"],
            out=affinity,
            where=has_user,
        )
        affinity[~has_user] = 0.0
    column["category_match"][:] = column["user_category_events"] > 0


def take_or_fill(values: np.ndarray, at: np.ndarray, fill: float | int = 0) -> np.ndarray:
    """values[at], with `fill` where at is -1 (no row: the key has no history, the item is
    not in the catalog)."""
    if len(values) == 0:
        return np.full(len(at), fill, dtype=values.dtype)
    out = values[np.maximum(at, 0)]
    out[at < 0] = fill
    return out


def _pair_positions(
    keys: tuple[np.ndarray, np.ndarray], table: tuple[np.ndarray, np.ndarray]
) -> np.ndarray:
    """The row of `table` (unique pairs) matching each pair of `keys`, -1 where none: both
    key columns are coded over their union, so one int64 hash lookup finds a pair."""
    rows = len(table[0])
    if rows == 0:
        return np.full(len(keys[0]), -1, dtype=np.int64)
    first, _ = pd.factorize(np.concatenate((table[0], keys[0])))
    second, distinct_second = pd.factorize(np.concatenate((table[1], keys[1])))
    combined = first.astype(np.int64) * len(distinct_second) + second
    return pd.Index(combined[:rows]).get_indexer(combined[rows:])
