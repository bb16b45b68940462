"""Intermediate-table contracts: good frames pass and are coerced, bad ones name the column."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
import pytest

from recsys_assets.config.settings import SOURCES
from recsys_assets.contracts import ContractViolation
from recsys_assets.contracts.pipeline import (
    FEATURE_TABLE_CONTRACTS,
    PIPELINE_CONTRACTS,
    RANK_COLUMNS,
    validate_stage,
)
from recsys_assets.pipeline.features import FEATURE_COLUMNS, FEATURE_SET_VERSION, HISTORY_SCORES

T = pd.Timestamp
NOW = T("2024-03-01 06:00")
LINEAGE = {
    "model_version": "mb_20240301T000000_abcd1234",
    "feature_set_version": FEATURE_SET_VERSION,
    "utility_policy_version": "utility_v1",
    "score_time": NOW,
    "pipeline_run_id": "run-1",
}


def subjects() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "subject_id": [1, 2],
            "region": ["na", "na"],
            "tenant_id": [None, "tenant_acme"],
            "actor_role": [None, "agent"],
            "timezone": ["America/New_York", "America/Chicago"],
            "quiet_hours_start": [22, 21],
            "quiet_hours_end": [7, 8],
            "last_active_at": [T("2024-02-28"), T("2024-02-27")],
        }
    )


def candidate_pools() -> pd.DataFrame:
    ranks = {column: np.zeros(3, dtype=np.int32) for column in RANK_COLUMNS}
    ranks["rank_two_tower"] = np.array([1, 2, 0], dtype=np.int32)
    ranks["rank_trending"] = np.array([0, 1, 4], dtype=np.int32)
    return pd.DataFrame(
        {
            "subject_id": [1, 1, 2],
            "item_id": [10, 11, 10],
            "source_provenance": ["two_tower", "two_tower|trending", "trending"],
            **ranks,
            "retrieval_score": np.array([0.9, 0.4, np.nan], dtype=np.float32),
            **{name: np.array([0.5, 0.0, 0.1], dtype=np.float32) for name in HISTORY_SCORES},
            "candidate_policy_version": "candidates_v2",
        }
    )


def feature_rows() -> pd.DataFrame:
    pools = candidate_pools().drop(columns="candidate_policy_version")
    values = {name: np.ones(3, dtype=np.float32) for name in FEATURE_COLUMNS}
    return pools.assign(
        score_time=NOW,
        feature_timestamp=[T("2024-02-29"), NOW, T("1970-01-01")],
        feature_set_version=FEATURE_SET_VERSION,
        **values,
    )


def scored_candidates() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "subject_id": [1, 1, 2],
            "item_id": [10, 11, 10],
            "prediction": [0.7, 0.2, 0.5],
            "calibrated": [0.6, 0.1, 0.4],
            "utility": [0.65, 0.3, 0.4],
            "utility_relevance": [0.6, 0.1, 0.4],
            "utility_novelty": [0.05, 0.0, 0.0],
            "utility_sponsored": [0.0, 0.2, 0.0],
            "utility_exploration": [0.0, 0.0, 0.0],
            "item_type": "product",
            "category": ["books", "games", "books"],
            "creator_id": ["c1", "c2", "c1"],
            "is_sponsored": [False, True, False],
            "is_exploration_candidate": [False, False, True],
            "source_provenance": ["two_tower", "two_tower|trending", "trending"],
            **LINEAGE,
        }
    )


def slates() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "subject_id": [1, 1, 2],
            "position": [1, 2, 1],
            "item_id": [10, 11, 10],
            "item_type": "product",
            "category": ["books", "games", "books"],
            "creator_id": ["c1", "c2", "c1"],
            "is_sponsored": [False, True, False],
            "score": [0.65, 0.3, 0.4],
            "calibrated": [0.6, 0.1, 0.4],
            "reason_codes": ["two_tower|high_confidence", "trending", "exploration"],
            "source_provenance": ["two_tower", "two_tower|trending", "trending"],
            "exploration": [False, False, True],
            "propensity": [1.0, 1.0, 0.25],
            "exploration_seed": [7, 7, 7],
            "slate_policy_version": "slate_v1",
            **LINEAGE,
        }
    )


def entity_table(name: str) -> Callable[[], pd.DataFrame]:
    """A valid features_asof entity table: distinct integer keys, float32 values."""

    def build() -> pd.DataFrame:
        columns = FEATURE_TABLE_CONTRACTS[name].to_schema().columns
        frame = pd.DataFrame(
            {
                column: (
                    np.array([1, 2, 3], dtype=np.int64)
                    if spec.dtype.type == np.int64
                    else np.array([0.0, 1.5, 3.0], dtype=np.float32)
                )
                for column, spec in columns.items()
                if column not in ("score_time", "feature_timestamp", "feature_set_version")
            }
        )
        return frame.assign(
            score_time=NOW,
            feature_timestamp=[T("2024-02-29"), NOW, T("1970-01-01")],
            feature_set_version=FEATURE_SET_VERSION,
        )

    return build


GOOD: dict[str, Callable[[], pd.DataFrame]] = {
    "subjects": subjects,
    "candidate_pools": candidate_pools,
    **{f"features_asof.{name}": entity_table(name) for name in FEATURE_TABLE_CONTRACTS},
    "feature_rows": feature_rows,
    "scored_candidates": scored_candidates,
    "slates": slates,
}


def _violations(stage: str, frame: pd.DataFrame) -> dict[str, list[str]]:
    with pytest.raises(ContractViolation) as caught:
        validate_stage(stage, frame, source="surface=home_feed/region=na")
    assert caught.value.table == stage
    assert "surface=home_feed/region=na" in str(caught.value)
    found: dict[str, list[str]] = {}
    for violation in caught.value.violations:
        found.setdefault(violation.column, []).append(violation.check)
    return found


@pytest.mark.parametrize("stage", list(PIPELINE_CONTRACTS))
def test_good_frames_pass_and_empty_frames_with_the_right_columns_too(stage: str) -> None:
    frame = GOOD[stage]()
    validated = validate_stage(stage, frame)
    assert len(validated) == len(frame)
    key = "item_id" if stage == "features_asof.items" else "subject_id"
    assert validated[key].dtype == np.int64
    validate_stage(stage, frame.iloc[0:0])


def test_types_are_coerced_to_the_documented_ones() -> None:
    pools = validate_stage("candidate_pools", candidate_pools().astype({"rank_content": "int64"}))
    assert pools["rank_content"].dtype == np.int32
    features = validate_stage("feature_rows", feature_rows())
    assert (features[FEATURE_COLUMNS].dtypes == np.float32).all()
    assert features["score_time"].dtype == "datetime64[ns]"


def test_unknown_stage_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="candidate_pools"):
        validate_stage("ranked", pd.DataFrame())


def test_subjects_are_strict_and_unique() -> None:
    bad = pd.concat([subjects(), subjects().iloc[:1]], ignore_index=True).assign(email="x")
    found = _violations("subjects", bad.drop(columns="timezone"))
    assert found["timezone"] == ["missing column"]
    assert found["email"] == ["unexpected column"]
    assert found["subject_id"] == ["duplicate key"]


def test_candidate_pools_check_provenance_against_ranks_and_key() -> None:
    bad = candidate_pools()
    bad.loc[0, "source_provenance"] = "trending"  # rank_two_tower says two_tower proposed it
    bad.loc[1, "source_provenance"] = "trending|two_tower"  # not in SOURCES order
    bad.loc[2, "item_id"] = 10
    bad.loc[2, "subject_id"] = 1
    bad.loc[0, "collaborative_score"] = np.inf
    found = _violations("candidate_pools", bad)
    assert (
        "source_provenance must list exactly the sources with rank > 0"
        in (found["source_provenance"])
    )
    assert "'|'-joined known sources in SOURCES order, no repeats" in found["source_provenance"]
    assert found["subject_id"] == ["duplicate key (subject_id, item_id)"]
    assert found["collaborative_score"] == ["must be finite (no NaN or ±inf)"]
    assert set(found) == {"source_provenance", "subject_id", "collaborative_score"}


def test_features_reject_future_values_and_non_finite_features() -> None:
    bad = feature_rows()
    bad.loc[1, "feature_timestamp"] = NOW + pd.Timedelta(seconds=1)
    bad.loc[2, "item_age_days"] = np.inf
    bad.loc[0, "shown_7d"] = np.nan
    found = _violations("feature_rows", bad)
    assert found["feature_timestamp"] == [
        "feature_timestamp must be <= score_time (no future values)"
    ]
    assert found["item_age_days"] == ["must be finite (no NaN or ±inf)"]
    assert "missing value (null)" in found["shown_7d"]
    assert set(found) == {"feature_timestamp", "item_age_days", "shown_7d"}


def test_features_keep_pass_through_columns() -> None:
    extra = feature_rows().assign(retrieval_score_raw=1.0, candidate_policy_version="c1")
    assert "retrieval_score_raw" in validate_stage("feature_rows", extra).columns
    missing = _violations("feature_rows", feature_rows().drop(columns="rank_editorial"))
    assert missing == {"rank_editorial": ["missing column"]}


@pytest.mark.parametrize("name", list(FEATURE_TABLE_CONTRACTS))
def test_entity_tables_reject_future_values_duplicate_keys_and_non_finite_values(
    name: str,
) -> None:
    bad = entity_table(name)()
    value = next(
        column
        for column, spec in FEATURE_TABLE_CONTRACTS[name].to_schema().columns.items()
        if spec.dtype.type == np.float32
    )
    keys = [column for column in bad.columns if bad[column].dtype == np.int64]
    if name == "items":
        keys = ["item_id"]  # the codes repeat across items; the key is item_id alone
    bad.loc[0, "feature_timestamp"] = NOW + pd.Timedelta(seconds=1)
    bad.loc[1, value] = np.nan
    bad.loc[2, "user_events_total" if name == "subjects" else value] = np.inf
    bad.loc[2, keys] = bad.loc[1, keys].to_numpy()
    found = _violations(f"features_asof.{name}", bad)
    assert found["feature_timestamp"] == [
        "feature_timestamp must be <= score_time (no future values)"
    ]
    assert "missing value (null)" in found[value]
    infinite = "user_events_total" if name == "subjects" else value
    assert "must be finite (no NaN or ±inf)" in found[infinite]
    assert found[keys[0]] == [f"duplicate key ({', '.join(keys)})"]


def test_scored_candidates_need_probabilities_and_finite_utility() -> None:
    bad = scored_candidates()
    bad.loc[0, "calibrated"] = 1.2
    bad.loc[1, "utility"] = np.inf
    bad.loc[2, "prediction"] = -0.1
    found = _violations("scored_candidates", bad.drop(columns="pipeline_run_id"))
    assert set(found) == {"calibrated", "utility", "prediction", "pipeline_run_id"}
    assert found["pipeline_run_id"] == ["missing column"]


def test_slates_positions_dense_items_unique_propensity_bounded() -> None:
    gap = slates()
    gap.loc[1, "position"] = 3  # subject 1: 1, 3
    found = _violations("slates", gap)
    assert found == {"position": ["positions must be dense per subject: 1, 2, …, n"]}

    repeated = slates()
    repeated.loc[1, "item_id"] = 10
    found = _violations("slates", repeated)
    assert found == {"item_id": ["an item appears twice in one subject's slate"]}

    not_from_one = slates().assign(position=[2, 3, 2])
    assert "position" in _violations("slates", not_from_one)

    bad = slates()
    bad.loc[2, "propensity"] = 0.0
    bad.loc[0, "calibrated"] = np.nan
    found = _violations("slates", bad)
    assert set(found) == {"propensity", "calibrated"}


def test_rank_columns_follow_configured_sources() -> None:
    assert tuple(f"rank_{source}" for source in SOURCES) == RANK_COLUMNS
    for stage in ("candidate_pools", "feature_rows"):
        assert set(RANK_COLUMNS) <= set(PIPELINE_CONTRACTS[stage].to_schema().columns)
