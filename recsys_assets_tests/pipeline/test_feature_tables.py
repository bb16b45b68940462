"""The scoring path (entity tables + gather) gives exactly the ASOF path's feature values."""

from __future__ import annotations

import duckdb
import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recsys_assets.config.settings import SOURCES
from recsys_assets.pipeline.feature_tables import (
    ENTITY_TABLES,
    FeatureTables,
    feature_tables,
    gather_features,
)
from recsys_assets.pipeline.features import (
    FEATURE_COLUMNS,
    FEATURE_SET_VERSION,
    HISTORY_SCORES,
    NO_HISTORY,
    compute_features,
)

SCORE_TIME = pd.Timestamp("2024-03-01 12:00")
EVENT_TYPES = ("view", "click", "purchase", "rating", "hide")
SURFACES = ("home_feed", "email_daily")


def _world(seed: int, subjects: int, items: int, events: int) -> dict[str, pd.DataFrame]:
    """Random tables with ties, boundary timestamps (exactly score_time − 1/7/28 days, at
    score_time, after it), unknown items, items created after score_time and controls."""
    rng = np.random.default_rng(seed)
    boundaries = np.array(
        [SCORE_TIME - pd.Timedelta(days=d) for d in (1, 7, 28)] + [SCORE_TIME],
        dtype="datetime64[ns]",
    )

    def times(count: int) -> np.ndarray:
        random = SCORE_TIME - pd.to_timedelta(rng.integers(-2 * 86_400, 40 * 86_400, count), "s")
        edges = rng.choice(boundaries, count)
        return np.where(rng.random(count) < 0.2, edges, random.to_numpy())

    catalog = pd.DataFrame(
        {
            "item_id": np.arange(items, dtype=np.int64),
            "category": rng.choice(["books", "games", "music", "toys"], items),
            "creator_id": rng.choice([f"c{i}" for i in range(6)], items),
            "stock": rng.integers(-1, 20, items),
            "is_sponsored": rng.random(items) < 0.2,
            "created_at": SCORE_TIME - pd.to_timedelta(rng.integers(-5, 60, items), "D"),
        }
    )
    item_pool = np.arange(items + 3)  # three items with events but no catalog row
    interactions = pd.DataFrame(
        {
            "user_id": rng.integers(0, subjects, events),
            "item_id": rng.choice(item_pool, events),
            "event_type": rng.choice(EVENT_TYPES, events),
            "value": 1.0,
            "ts": times(events),
        }
    )
    exposures = pd.DataFrame(
        {
            "user_id": rng.integers(0, subjects, events),
            "item_id": rng.choice(item_pool, events),
            "surface": rng.choice(SURFACES, events),
            "ts": times(events),
        }
    )
    controls = pd.DataFrame(
        {
            "user_id": rng.integers(0, subjects, events // 4),
            "target_type": rng.choice(["category", "creator", "item"], events // 4),
            "target_id": rng.choice(["books", "games", "c1", "c2", "5"], events // 4),
            "action": rng.choice(["hide", "unhide"], events // 4),
            "ts": times(events // 4),
        }
    )
    pairs = pd.DataFrame(
        {
            "subject_id": rng.integers(0, subjects + 2, 4 * events),  # two cold subjects
            "item_id": rng.choice(item_pool, 4 * events),
        }
    ).drop_duplicates(ignore_index=True)
    for position, source in enumerate(SOURCES):
        pairs[f"rank_{source}"] = np.where(
            rng.random(len(pairs)) < 0.3, rng.integers(1, 50, len(pairs)) + position, 0
        ).astype(np.int32)
    pairs["retrieval_score"] = np.where(
        rng.random(len(pairs)) < 0.5, rng.normal(size=len(pairs)), np.nan
    ).astype(np.float32)
    for column in HISTORY_SCORES:
        pairs[column] = rng.random(len(pairs)).astype(np.float32)
    return {
        "items": catalog,
        "interactions": interactions,
        "exposures": exposures,
        "user_controls": controls,
        "pairs": pairs,
    }


def _both_paths(world: dict[str, pd.DataFrame]) -> tuple[pd.DataFrame, pd.DataFrame]:
    tables = {name: world[name] for name in ("interactions", "exposures", "items")}
    exact = compute_features(
        duckdb.connect(),
        world["pairs"].assign(score_time=SCORE_TIME),  # the per-row (training) ASOF path
        surface="home_feed",
        user_controls=world["user_controls"],
        **tables,
    )
    entity = feature_tables(
        duckdb.connect(),
        world["pairs"]["subject_id"].unique(),
        surface="home_feed",
        score_time=SCORE_TIME,
        user_controls=world["user_controls"],
        **tables,
    )
    return exact, gather_features(entity, world["pairs"]).frame(world["pairs"], SCORE_TIME)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),
    subjects=st.integers(1, 12),
    items=st.integers(1, 15),
    events=st.integers(0, 120),
)
def test_entity_tables_give_the_asof_paths_values(
    seed: int, subjects: int, items: int, events: int
) -> None:
    exact, gathered = _both_paths(_world(seed, subjects, items, events))
    pd.testing.assert_frame_equal(
        gathered[FEATURE_COLUMNS], exact[FEATURE_COLUMNS], check_exact=True
    )
    pd.testing.assert_series_equal(
        gathered["feature_timestamp"], exact["feature_timestamp"], check_exact=True
    )
    assert (gathered["feature_timestamp"] < SCORE_TIME).all()


def test_tables_carry_score_time_version_and_only_past_values() -> None:
    world = _world(7, subjects=20, items=30, events=400)
    entity = feature_tables(
        duckdb.connect(),
        world["pairs"]["subject_id"].unique(),
        interactions=world["interactions"],
        exposures=world["exposures"],
        items=world["items"],
        user_controls=world["user_controls"],
        surface="home_feed",
        score_time=SCORE_TIME,
    )
    assert set(entity.tables) == set(ENTITY_TABLES)
    for name, frame in entity.tables.items():
        assert len(frame), name
        assert (frame["score_time"] == SCORE_TIME).all(), name
        assert (frame["feature_set_version"] == FEATURE_SET_VERSION).all(), name
        assert (frame["feature_timestamp"] < SCORE_TIME).all(), name
    # Items created after score_time exist with no attributes used yet.
    late = world["items"].loc[world["items"]["created_at"] >= SCORE_TIME, "item_id"]
    late_rows = entity["items"].set_index("item_id").loc[late]
    assert (late_rows[["item_age_days", "item_stock", "item_is_sponsored"]] == 0).all().all()


def test_cold_pool_gets_zeros_and_no_history() -> None:
    empty = {name: frame.iloc[:0] for name, frame in _world(1, 3, 3, 10).items() if name != "pairs"}
    entity = feature_tables(
        duckdb.connect(),
        np.array([5], dtype=np.int64),
        surface="home_feed",
        score_time=SCORE_TIME,
        **empty,
    )
    pool = pd.DataFrame({"subject_id": [5], "item_id": [99]})
    gathered = gather_features(entity, pool)
    row = dict(zip(FEATURE_COLUMNS, gathered.matrix[0], strict=True))
    assert row["user_days_since_last_activity"] == 365
    assert row["item_events_total"] == 0 and row["category_match"] == 0
    assert gathered.feature_timestamp[0] == np.datetime64(NO_HISTORY, "us")


def test_unknown_table_name_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown feature table"):
        feature_tables(
            duckdb.connect(),
            np.array([1]),
            surface="home_feed",
            score_time=SCORE_TIME,
            tables=("subjects", "everything"),
            **{n: f for n, f in _world(1, 2, 2, 5).items() if n != "pairs"},
        )


def test_feature_tables_index_by_name() -> None:
    tables = FeatureTables(score_time=SCORE_TIME, tables={"items": pd.DataFrame()})
    assert tables["items"].empty
