"""Point-in-time features on hand-made tables whose answers are known."""

from __future__ import annotations

from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pytest

from recsys_assets.config.settings import SOURCES
from recsys_assets.pipeline.features import (
    FEATURE_COLUMNS,
    FEATURE_SET_VERSION,
    NO_HISTORY,
    FeatureInputError,
    compute_features,
    leakage_violations,
)

T = pd.Timestamp
SCORE_TIME = T("2024-01-10")


@pytest.fixture
def items() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "item_id": [10, 11, 12],
            "category": ["books", "books", "games"],
            "creator_id": ["c1", "c2", "c1"],
            "stock": [5, -1, 3],
            "is_sponsored": [False, True, False],
            "created_at": [T("2024-01-01"), T("2024-01-01"), T("2024-01-20")],
        }
    )


@pytest.fixture
def interactions() -> pd.DataFrame:
    rows = [
        (1, 10, "view", T("2024-01-02")),
        (1, 11, "click", T("2024-01-09")),
        (1, 10, "purchase", T("2024-01-09 12:00")),
        (2, 10, "view", T("2024-01-09 23:00")),
        (2, 12, "hide", T("2024-01-09")),  # hides are not engagement
    ]
    frame = pd.DataFrame(rows, columns=["user_id", "item_id", "event_type", "ts"])
    return frame.assign(value=1.0)


@pytest.fixture
def exposures() -> pd.DataFrame:
    rows = [
        (1, 11, "home_feed", T("2024-01-09 20:00")),
        (1, 11, "home_feed", T("2024-01-05")),
        (1, 11, "email_daily", T("2024-01-09")),  # another surface
        (1, 11, "home_feed", T("2023-12-01")),  # older than 7 days
    ]
    return pd.DataFrame(rows, columns=["user_id", "item_id", "surface", "ts"])


@pytest.fixture
def user_controls() -> pd.DataFrame:
    rows = [
        (1, "creator", "c1", "hide", T("2024-01-03")),
        (2, "category", "books", "hide", T("2024-01-04")),
        (2, "category", "books", "unhide", T("2024-01-06")),
    ]
    return pd.DataFrame(rows, columns=["user_id", "target_type", "target_id", "action", "ts"])


def _features(
    pairs: pd.DataFrame,
    interactions: pd.DataFrame,
    exposures: pd.DataFrame,
    items: pd.DataFrame,
    user_controls: pd.DataFrame,
    **kwargs: object,
) -> pd.DataFrame:
    return compute_features(
        duckdb.connect(),
        pairs,
        interactions=interactions,
        exposures=exposures,
        items=items,
        surface="home_feed",
        user_controls=user_controls,
        **kwargs,  # type: ignore[arg-type]
    )


def test_known_counts_windows_and_flags(
    interactions: pd.DataFrame,
    exposures: pd.DataFrame,
    items: pd.DataFrame,
    user_controls: pd.DataFrame,
) -> None:
    pairs = pd.DataFrame(
        {
            "subject_id": [1, 1, 2, 3],
            "item_id": [10, 11, 12, 10],
            "source_provenance": ["two_tower", "trending", "content|two_tower", "trending"],
            **{f"rank_{source}": [0, 0, 0, 0] for source in SOURCES},
            "retrieval_score": np.array([0.5, np.nan, 0.25, np.nan], dtype=np.float32),
        }
    ).assign(rank_two_tower=[1, 0, 3, 0], rank_trending=[0, 2, 0, 1], rank_content=[0, 0, 7, 0])
    out = _features(pairs, interactions, exposures, items, user_controls, score_time=SCORE_TIME)
    by_pair = out.set_index(["subject_id", "item_id"])

    first = by_pair.loc[(1, 10)]
    assert first["user_events_total"] == 3
    assert first["user_events_7d"] == 2  # the 01-02 view is older than 7 days
    assert first["user_clicks_total"] == 1 and first["user_purchases_total"] == 1
    assert first["user_days_since_last_activity"] == pytest.approx(0.5)
    assert (first["item_events_1d"], first["item_events_7d"], first["item_events_28d"]) == (2, 2, 3)
    assert first["item_age_days"] == 9 and first["item_stock"] == 5
    assert first["user_category_events"] == 3 and first["user_category_affinity"] == 1
    assert first["user_creator_events"] == 2
    assert first["user_creator_affinity"] == pytest.approx(2 / 3)
    assert first["creator_hidden"] == 1 and first["category_hidden"] == 0
    assert first["embedding_dot"] == pytest.approx(0.5) and first["has_embedding_dot"] == 1
    assert first["from_two_tower"] == 1 and first["rank_two_tower_log1p"] == pytest.approx(
        np.log(2)
    )

    shown = by_pair.loc[(1, 11)]
    assert (shown["shown_24h"], shown["shown_7d"]) == (1, 2)  # home_feed only
    assert shown["item_is_sponsored"] == 1 and shown["item_stock"] == -1
    assert shown["embedding_dot"] == 0 and shown["has_embedding_dot"] == 0
    assert shown["feature_timestamp"] == T("2024-01-09 20:00")

    unborn = by_pair.loc[(2, 12)]  # created after score_time: no item attributes yet
    assert (unborn["item_age_days"], unborn["item_stock"], unborn["item_events_total"]) == (0, 0, 0)
    assert unborn["source_count"] == 2 and unborn["category_hidden"] == 0

    cold = by_pair.loc[(3, 10)]
    assert cold["user_events_total"] == 0 and cold["user_days_since_last_activity"] == 365
    assert cold["category_match"] == 0

    assert list(out.columns[: len(pairs.columns)]) == list(pairs.columns)  # pass-through first
    assert out[FEATURE_COLUMNS].dtypes.eq(np.float32).all()
    assert (out["feature_set_version"] == FEATURE_SET_VERSION).all()
    assert (out["score_time"] == SCORE_TIME).all()
    assert out["feature_timestamp"].dtype == "datetime64[ns]"
    assert leakage_violations(out).empty


def test_unhide_lifts_suppression_only_after_it_happened(
    interactions: pd.DataFrame,
    exposures: pd.DataFrame,
    items: pd.DataFrame,
    user_controls: pd.DataFrame,
) -> None:
    pairs = pd.DataFrame(
        {
            "subject_id": [2, 2, 2],
            "item_id": [11, 11, 11],
            "score_time": [T("2024-01-04 12:00"), T("2024-01-07"), T("2024-01-04")],
        }
    )
    out = _features(pairs, interactions, exposures, items, user_controls)
    assert out["category_hidden"].tolist() == [1, 0, 0]  # hidden strictly before 01-04 only


def test_per_row_score_time_keeps_row_order_and_uses_only_the_past(
    interactions: pd.DataFrame,
    exposures: pd.DataFrame,
    items: pd.DataFrame,
    user_controls: pd.DataFrame,
) -> None:
    times = [T("2024-01-09 12:00"), T("2024-01-02"), T("2024-01-30"), T("2024-01-09 12:00:01")]
    pairs = pd.DataFrame({"subject_id": [1, 1, 1, 1], "item_id": [10] * 4, "score_time": times})
    out = _features(pairs, interactions, exposures, items, user_controls)
    # an event at exactly score_time is not visible: a label never sees itself
    assert out["user_events_total"].tolist() == [2, 0, 3, 3]
    assert out["score_time"].tolist() == times
    assert out.loc[1, "feature_timestamp"] == T("2024-01-01")  # only the item's creation
    assert leakage_violations(out).empty


def test_future_events_do_not_change_features_and_a_planted_leak_is_caught(
    interactions: pd.DataFrame,
    exposures: pd.DataFrame,
    items: pd.DataFrame,
    user_controls: pd.DataFrame,
) -> None:
    pairs = pd.DataFrame({"subject_id": [1, 2, 3], "item_id": [10, 11, 12]})
    before = _features(pairs, interactions, exposures, items, user_controls, score_time=SCORE_TIME)
    future = pd.DataFrame(
        [
            (1, 10, "purchase", T("2024-01-10"), 1.0),  # exactly at score_time
            (2, 11, "click", T("2024-01-11"), 1.0),
            (3, 12, "rating", T("2024-02-01"), 5.0),
        ],
        columns=["user_id", "item_id", "event_type", "ts", "value"],
    )
    future_exposures = pd.DataFrame(
        [(1, 10, "home_feed", T("2024-01-10 00:00:01"))], columns=exposures.columns
    )
    future_controls = pd.DataFrame(
        [(1, "category", "books", "hide", T("2024-01-12"))], columns=user_controls.columns
    )
    after = _features(
        pairs,
        pd.concat([interactions, future], ignore_index=True),
        pd.concat([exposures, future_exposures], ignore_index=True),
        items,
        pd.concat([user_controls, future_controls], ignore_index=True),
        score_time=SCORE_TIME,
    )
    pd.testing.assert_frame_equal(before, after)
    assert leakage_violations(after).empty

    planted = after.copy()
    planted.loc[1, "feature_timestamp"] = SCORE_TIME + pd.Timedelta(seconds=1)
    caught = leakage_violations(planted)
    assert caught.index.tolist() == [1]


def test_empty_pairs_give_an_empty_frame_with_every_column(
    interactions: pd.DataFrame,
    exposures: pd.DataFrame,
    items: pd.DataFrame,
    user_controls: pd.DataFrame,
) -> None:
    pairs = pd.DataFrame(
        {"subject_id": pd.Series([], dtype="int64"), "item_id": pd.Series([], dtype="int64")}
    )
    out = _features(pairs, interactions, exposures, items, user_controls, score_time=SCORE_TIME)
    assert out.empty
    assert set(FEATURE_COLUMNS) <= set(out.columns)


def test_score_time_must_come_from_exactly_one_place(
    interactions: pd.DataFrame,
    exposures: pd.DataFrame,
    items: pd.DataFrame,
    user_controls: pd.DataFrame,
) -> None:
    pairs = pd.DataFrame({"subject_id": [1], "item_id": [10]})
    with pytest.raises(FeatureInputError, match="score_time"):
        _features(pairs, interactions, exposures, items, user_controls)
    with pytest.raises(FeatureInputError, match="not both"):
        _features(
            pairs.assign(score_time=SCORE_TIME),
            interactions,
            exposures,
            items,
            user_controls,
            score_time=SCORE_TIME,
        )


def test_cold_row_uses_no_history(items: pd.DataFrame) -> None:
    empty_events = pd.DataFrame(
        {
            "user_id": pd.Series([], dtype="int64"),
            "item_id": pd.Series([], dtype="int64"),
            "event_type": pd.Series([], dtype="str"),
            "value": pd.Series([], dtype="float64"),
            "ts": pd.Series([], dtype="datetime64[ns]"),
        }
    )
    empty_exposures = empty_events[["user_id", "item_id"]].assign(
        surface=pd.Series([], dtype="str"), ts=pd.Series([], dtype="datetime64[ns]")
    )
    out = compute_features(
        duckdb.connect(),
        pd.DataFrame({"subject_id": [5], "item_id": [999]}),
        interactions=empty_events,
        exposures=empty_exposures,
        items=items,
        surface="push",
        score_time=SCORE_TIME,
    )
    assert out.loc[0, "feature_timestamp"] == NO_HISTORY
    assert float(out[FEATURE_COLUMNS].abs().sum(axis=1).iloc[0]) == 365  # only days-since


def test_runs_on_a_database_file_and_leaves_nothing_behind(
    tmp_path: Path,
    interactions: pd.DataFrame,
    exposures: pd.DataFrame,
    items: pd.DataFrame,
    user_controls: pd.DataFrame,
) -> None:
    """A step's own database file (as DuckDBResource gives it) stays free of scratch tables."""
    con = duckdb.connect(str(tmp_path / "step.duckdb"))
    pairs = pd.DataFrame({"subject_id": [1, 2], "item_id": [10, 11]})
    steps: dict[str, float] = {}
    out = compute_features(
        con,
        pairs,
        interactions=interactions,
        exposures=exposures,
        items=items,
        surface="home_feed",
        score_time=SCORE_TIME,
        user_controls=user_controls,
        step_seconds=steps,
    )
    assert len(out) == 2
    assert {"build_state", "asof_join", "lookup_pair", "assemble"} <= set(steps)
    assert con.execute("SELECT count(*) FROM duckdb_tables()").fetchall() == [(0,)]
    assert con.execute("SELECT count(*) FROM duckdb_views() WHERE NOT internal").fetchall() == [
        (0,)
    ]
