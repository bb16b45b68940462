"""Shortlists (`storage_mode: candidate_pool`): what publish stores, judged by the same gate."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import yaml

from recsys_assets.config import ConfigError, SurfaceConfig
from recsys_assets.config.settings import (
    DEFAULT_CONFIG_PATH,
    CandidatePoolConfig,
    settings_from_mapping,
)
from recsys_assets.pipeline.feature_tables import FeatureTables, gather_features
from recsys_assets.pipeline.features import FEATURE_COLUMNS, ITEM_FEATURES, USER_FEATURES
from recsys_assets.publish.lists import SHORTLIST_FEATURE_COLUMNS, finalize_lists
from recsys_assets.publish.shortlists import shortlist_shard
from recsys_assets.publish.validation import GateLimits, ValidationReport, validate_lists
from recsys_assets_tests.publish.builders import (
    NOW,
    REGION,
    SURFACE,
    later,
    make_lists,
    settings,
)

SHORTLIST = 30


def _pool_surface(shortlist: int = SHORTLIST, exploration: int = 5) -> SurfaceConfig:
    surface = settings().surface(SURFACE)
    return surface.model_copy(
        update={
            "storage_mode": "candidate_pool",
            "candidate_pool": CandidatePoolConfig(
                shortlist_size=shortlist, exploration_candidates=exploration
            ),
        }
    )


def _with_candidates(lists: pd.DataFrame, items: pd.DataFrame, extra: int) -> pd.DataFrame:
    """Each subject's slate (`in_slate`), then `extra` more candidates from the catalog."""
    parts = []
    for _, slate in lists.groupby("subject_id", sort=True):
        slate = slate.assign(in_slate=True)
        rest_ids = items.loc[~items["item_id"].isin(slate["item_id"]), "item_id"][:extra]
        rest = pd.concat([slate.iloc[[-1]]] * len(rest_ids), ignore_index=True)
        rest["item_id"] = rest_ids.to_numpy()
        rest["position"] = len(slate) + np.arange(1, len(rest) + 1)
        rest["in_slate"] = False
        parts += [slate, rest]
    return pd.concat(parts, ignore_index=True)


def _validate(
    lists: pd.DataFrame, items: pd.DataFrame, subjects: pd.DataFrame, surface: SurfaceConfig
) -> ValidationReport:
    records = finalize_lists(lists, surface=SURFACE, region=REGION, version="v1", fallback=False)
    if "in_slate" in lists.columns:
        records["in_slate"] = lists.sort_values(["subject_id", "position"])["in_slate"].to_numpy()
    return validate_lists(
        records,
        surface=surface,
        region=REGION,
        items=items,
        limits=GateLimits.for_lists(settings().publish.thresholds),
        now=later(1),
        subjects=subjects,
    )


def _failed(report: ValidationReport) -> set[str]:
    return {check.name for check in report.checks if not check.passed}


def test_a_shortlist_passes_where_the_same_rows_as_a_slate_would_not() -> None:
    """Beyond its stored slate a shortlist holds candidates the slate policy has not cut
    (it runs online): the gate judges the policy on the slate rows, the length on the
    shortlist size; every other rule is the same."""
    lists, items, subjects = make_lists()
    store_depth = settings().surface(SURFACE).store_depth
    shortlists = _with_candidates(lists, items, SHORTLIST - store_depth)
    report = _validate(shortlists, items, subjects, _pool_surface())
    assert report.passed, report.failures
    assert report.metrics["list_length_max"] == SHORTLIST
    as_slates = _validate(shortlists, items, subjects, settings().surface(SURFACE))
    assert {"well_formed", "policy_violation_rate"} <= _failed(as_slates)


def test_shortlists_are_refused_for_what_refuses_slates() -> None:
    lists, items, subjects = make_lists()
    store_depth = settings().surface(SURFACE).store_depth
    shortlists = _with_candidates(lists, items, SHORTLIST - store_depth)
    too_long = _with_candidates(lists, items, SHORTLIST - store_depth + 1)
    assert "well_formed" in _failed(_validate(too_long, items, subjects, _pool_surface()))
    duplicated = shortlists.copy()
    duplicated.loc[duplicated["position"] == SHORTLIST, "item_id"] = duplicated.loc[
        duplicated["position"] == 1, "item_id"
    ].to_numpy()
    assert "duplicate_rate" in _failed(_validate(duplicated, items, subjects, _pool_surface()))
    one_creator = items.copy()
    slate_items = shortlists.loc[shortlists["in_slate"], "item_id"]
    one_creator.loc[one_creator["item_id"].isin(slate_items), "creator_id"] = "one_creator"
    policy = _failed(_validate(shortlists, one_creator, subjects, _pool_surface()))
    assert "policy_violation_rate" in policy


def _entity_tables(subject_ids: list[int], item_ids: list[int]) -> FeatureTables:
    """Feature tables with a value for every subject and item (codes per item)."""
    rng = np.random.default_rng(3)
    stamp = pd.Timestamp(NOW) - pd.Timedelta(hours=1)
    subjects = pd.DataFrame({"subject_id": subject_ids, "feature_timestamp": stamp})
    for name in USER_FEATURES:
        subjects[name] = rng.random(len(subject_ids)).astype(np.float32) * 10
    items = pd.DataFrame(
        {
            "item_id": item_ids,
            "category_code": np.arange(len(item_ids)) % 4,
            "creator_code": np.arange(len(item_ids)) % 7,
            "feature_timestamp": stamp,
        }
    )
    for name in ITEM_FEATURES:
        items[name] = rng.random(len(item_ids)).astype(np.float32)
    pairs = {
        "subject_categories": ("category", 4),
        "subject_creators": ("creator", 7),
    }
    tables = {"subjects": subjects, "items": items}
    for table, (target, codes) in pairs.items():
        frame = pd.DataFrame(
            [(s, c) for s in subject_ids for c in range(codes)],
            columns=["subject_id", f"{target}_code"],
        )
        frame[f"user_{target}_events"] = rng.integers(0, 5, len(frame)).astype(np.float32)
        frame[f"{target}_hidden"] = np.float32(0)
        frame["feature_timestamp"] = stamp
        tables[table] = frame
    tables["exposures"] = pd.DataFrame(
        {
            "subject_id": subject_ids,
            "item_id": item_ids[: len(subject_ids)],
            "shown_24h": 1.0,
            "shown_7d": 2.0,
            "feature_timestamp": stamp,
        }
    )
    return FeatureTables(score_time=pd.Timestamp(NOW), tables=tables)


def test_a_shortlist_is_the_slate_then_the_best_candidates_with_batch_features() -> None:
    surface = _pool_surface(shortlist=20, exploration=3)
    lists, items, subjects = make_lists(n_subjects=2, n_items=60)
    subject_ids = subjects["subject_id"].tolist()
    slate = lists.rename(columns={"generated_at": "score_time"})
    slate["category"] = slate["item_id"].map(items.set_index("item_id")["category"])
    slate["creator_id"] = slate["item_id"].map(items.set_index("item_id")["creator_id"])
    slate["is_sponsored"] = False
    slate["utility_policy_version"] = "utility_test"
    rng = np.random.default_rng(9)
    scored = pd.DataFrame(
        [(s, int(i)) for s in subject_ids for i in items["item_id"]],
        columns=["subject_id", "item_id"],
    )
    scored["utility"] = rng.random(len(scored))
    scored["calibrated"] = scored["utility"] / 2
    scored["is_exploration_candidate"] = scored["utility"] < 0.1  # the least useful ones
    for column in ("item_type", "category", "creator_id", "is_sponsored"):
        scored[column] = scored["item_id"].map(items.set_index("item_id")[column])
    for column in ("model_version", "feature_set_version", "pipeline_run_id"):
        scored[column] = slate[column].iloc[0]
    scored["source_provenance"] = "two_tower"
    scored["utility_policy_version"] = "utility_test"
    scored["score_time"] = slate["score_time"].iloc[0]
    pool = scored[["subject_id", "item_id"]].assign(rank_two_tower=1, retrieval_score=0.5)
    tables = _entity_tables(subject_ids, items["item_id"].tolist())

    shortlist = shortlist_shard(slate, scored, pool, tables, surface)

    for subject_id, rows in shortlist.groupby("subject_id"):
        own_slate = slate[slate["subject_id"] == subject_id].sort_values("position")
        assert rows["position"].tolist() == list(range(1, len(rows) + 1))
        assert len(rows) == 20
        head = rows.iloc[: len(own_slate)]
        assert head["item_id"].tolist() == own_slate["item_id"].tolist()
        assert head["in_slate"].all() and not rows["in_slate"].iloc[len(own_slate) :].any()
        rest = rows.iloc[len(own_slate) :]
        candidates = scored[
            (scored["subject_id"] == subject_id) & ~scored["item_id"].isin(own_slate["item_id"])
        ]
        explore = candidates[candidates["is_exploration_candidate"]]
        assert set(explore.nlargest(3, "utility")["item_id"]) <= set(rest["item_id"])
        top = candidates.nlargest(len(rest) - 3, "utility")["item_id"]
        assert set(top) <= set(rest["item_id"])
        assert (np.diff(rest["score"].to_numpy()) <= 0).all()  # batch order: by utility
    expected = gather_features(tables, shortlist[["subject_id", "item_id"]].merge(pool))
    np.testing.assert_array_equal(shortlist[SHORTLIST_FEATURE_COLUMNS].to_numpy(), expected.matrix)
    assert len(SHORTLIST_FEATURE_COLUMNS) == len(FEATURE_COLUMNS)


def test_shortlist_size_is_checked_against_the_surface() -> None:
    data = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    data["surfaces"]["home_feed"].update(
        storage_mode="candidate_pool",
        serving_mode="candidate_pool_rerank",
        candidate_pool={"shortlist_size": 50},
    )
    with pytest.raises(ConfigError, match=r"candidate_pool.shortlist_size \(50\) must be between"):
        settings_from_mapping(data)
    data["surfaces"]["home_feed"]["candidate_pool"] = {"shortlist_size": 300, "overlay_share": 1}
    with pytest.raises(ConfigError, match="overlay_share"):
        settings_from_mapping(data)
