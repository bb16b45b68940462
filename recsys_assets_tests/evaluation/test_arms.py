"""The offline arm comparison: serving's split, each arm's mode on its subjects and every
mode on all, with fallback_only lists built by publish's own fallback code on tiny data, and
candidate_pool_rerank lists served by serving's own rerank from the shortlists the
evaluation pipeline published on a temporal split of tiny data."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from recsys_assets.config import Settings, load_settings
from recsys_assets.config.settings import DEFAULT_CONFIG_PATH, ExperimentConfig
from recsys_assets.contracts.raw import RAW_CONTRACTS
from recsys_assets.data import read_raw
from recsys_assets.data.holdout import HoldoutSplit, temporal_holdout
from recsys_assets.evaluation.arms import (
    ArmInputs,
    candidate_pool_rerank_lists,
    compare_arms,
    fallback_only_lists,
)
from recsys_assets.evaluation.evaluate import (
    run_pipeline_on,
    surface_lists,
    surface_subjects,
    training_tables,
    write_training_snapshot,
)
from recsys_assets.evaluation.metrics import ListMetrics, evaluate_lists
from recsys_assets.rules.person import consumed_mask
from recsys_assets.serving.experiments import Experiment, experiment_of
from recsys_assets.warehouse import Warehouse
from recsys_assets_tests.conftest import TINY_AS_OF

EXPERIMENT = Experiment(
    ExperimentConfig.model_validate(
        {
            "id": "offline_check",
            "arms": {
                "slates": {"serving_mode": "final_slate", "weight": 1},
                "fallback": {"serving_mode": "fallback_only", "weight": 1},
            },
        }
    )
)


@pytest.fixture
def inputs(tiny_warehouse: Warehouse) -> tuple[ArmInputs, np.ndarray]:
    settings = load_settings(DEFAULT_CONFIG_PATH)
    past = {table: read_raw(tiny_warehouse, table) for table in RAW_CONTRACTS}
    interactions = past["interactions"]
    users = np.unique(interactions["user_id"].to_numpy(dtype=np.int64))[:400]
    # Stored lists that hit each user's own items: far better than any fallback list.
    own = interactions[interactions["user_id"].isin(users)].drop_duplicates(["user_id", "item_id"])
    stored = own.assign(rank=own.groupby("user_id").cumcount() + 1)[["user_id", "rank", "item_id"]]
    arm_inputs = ArmInputs(
        settings, "home_feed", settings.regions, pd.Timestamp(TINY_AS_OF), past, stored
    )
    return arm_inputs, users


def test_fallback_only_lists_follow_serving_order_per_region_without_consumed_items(
    inputs: tuple[ArmInputs, np.ndarray],
) -> None:
    arm_inputs, users = inputs
    lists = fallback_only_lists(arm_inputs, users)
    assert set(lists["user_id"]) <= set(users) and len(set(lists["user_id"])) > 0.9 * len(users)
    region_of = arm_inputs.past["users"].set_index("user_id")["region"]
    by_region = lists.assign(region=lists["user_id"].map(region_of))
    for _, group in by_region.groupby("region"):
        firsts = group[group["rank"] == 1]["item_id"]
        assert len(firsts) > 0
    ranks = lists.groupby("user_id")["rank"].agg(["min", "max", "size"])
    assert (ranks["min"] == 1).all() and (ranks["max"] == ranks["size"]).all()
    interactions = arm_inputs.past["interactions"]
    consumed = interactions.loc[consumed_mask(interactions), ["user_id", "item_id"]]
    assert lists.merge(consumed, on=["user_id", "item_id"]).empty


def test_each_arm_scores_its_mode_on_its_own_subjects_and_every_mode_on_all(
    inputs: tuple[ArmInputs, np.ndarray],
) -> None:
    arm_inputs, users = inputs
    interactions = arm_inputs.past["interactions"]
    relevant = interactions[interactions["user_id"].isin(users)][["user_id", "item_id"]]
    score = _scorer(relevant, arm_inputs.past["items"])

    comparison = compare_arms(EXPERIMENT, arm_inputs, users, score)
    split = EXPERIMENT.split(users)
    assert {arm: entry["users"] for arm, entry in comparison.arms.items()} == {
        arm: len(ids) for arm, ids in split.items()
    }
    assert comparison.arms["slates"]["serving_mode"] == "final_slate"
    assert set(comparison.modes) == {"final_slate", "fallback_only"}
    assert comparison.modes["final_slate"].users == len(users)
    # Stored lists of each user's own items beat the fallback lists, on every split.
    assert comparison.modes["final_slate"].recall > comparison.modes["fallback_only"].recall
    arms = comparison.arms
    assert arms["slates"]["metrics"].recall > arms["fallback"]["metrics"].recall
    report = comparison.as_json()
    assert set(report["arms"]["fallback"]["metrics"]) >= {"recall", "ndcg"}
    assert any("fallback_only on all" in line for line in comparison.text_lines(20))


def _scorer(
    relevant: pd.DataFrame, items: pd.DataFrame
) -> Callable[[pd.DataFrame, np.ndarray], ListMetrics]:
    """Metrics@20 of lists against `relevant` (user_id, item_id), for the users asked."""

    def score(lists: pd.DataFrame, who: np.ndarray) -> ListMetrics:
        return evaluate_lists(
            lists,
            relevant[relevant["user_id"].isin(who)],
            k=20,
            catalog_size=len(items),
            item_categories=items.set_index("item_id")["category"],
            users=who,
        )

    return score


SLATE_VS_RERANK_CONFIG = {
    "id": "slate_vs_rerank",
    "arms": {
        "control": {"serving_mode": "final_slate", "weight": 1},
        "rerank": {"serving_mode": "candidate_pool_rerank", "weight": 1},
    },
}
SLATE_VS_RERANK = Experiment(ExperimentConfig.model_validate(SLATE_VS_RERANK_CONFIG))


def test_candidate_pool_rerank_is_a_note_where_the_surface_stores_final_slates(
    inputs: tuple[ArmInputs, np.ndarray],
) -> None:
    arm_inputs, users = inputs
    relevant = arm_inputs.past["interactions"][["user_id", "item_id"]]
    score = _scorer(relevant, arm_inputs.past["items"])
    comparison = compare_arms(SLATE_VS_RERANK, arm_inputs, users, score)
    assert set(comparison.arms) == {"control"} and set(comparison.modes) == {"final_slate"}
    assert any(
        "'candidate_pool_rerank' not evaluated" in note
        and "surfaces.home_feed.storage_mode: candidate_pool" in note
        for note in comparison.notes
    )


@dataclass
class PoolSplit:
    """A temporal split of tiny data and the scratch warehouse the evaluation pipeline
    published home_feed × na shortlists into."""

    settings: Settings
    split: HoldoutSplit
    past: dict[str, pd.DataFrame]
    scratch: Warehouse


@pytest.fixture(scope="module")
def pool_split(
    tiny_raw_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PoolSplit]:
    root = tmp_path_factory.mktemp("arms_pool")
    data = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    data["surfaces"]["home_feed"].update(
        storage_mode="candidate_pool",
        serving_mode="candidate_pool_rerank",
        regions=["na"],  # one partition keeps the pipeline run short
        experiment=SLATE_VS_RERANK_CONFIG,
    )
    config_path = root / "surfaces.yaml"
    config_path.write_text(yaml.safe_dump(data))
    settings = load_settings(config_path)
    shutil.copytree(tiny_raw_root, root / "source" / "raw")
    source = Warehouse((root / "source").as_uri())
    tables = {table: read_raw(source, table) for table in RAW_CONTRACTS}
    split = temporal_holdout(tables["interactions"], holdout=0.2, seed=0)
    past = training_tables(tables, split)
    scratch = Warehouse((root / "scratch").as_uri())
    write_training_snapshot(scratch, past, {"source": "evaluation"})
    failures = run_pipeline_on(
        scratch,
        settings=settings,
        config_path=str(config_path),
        surfaces=["home_feed"],
        score_time=split.split_time,
        instance_dir=root / "dagster",
        progress=lambda message: None,
    )
    assert failures == {}
    yield PoolSplit(settings, split, past, scratch)


def test_final_slate_and_candidate_pool_rerank_arms_on_published_shortlists(
    pool_split: PoolSplit,
) -> None:
    settings, split, scratch = pool_split.settings, pool_split.split, pool_split.scratch
    stored, source = surface_lists(scratch, "home_feed", ["na"])
    assert source == "published"
    store_depth = settings.surface("home_feed").store_depth
    assert stored.groupby("user_id").size().max() <= store_depth  # the slate, not the pool
    users = np.intersect1d(split.evaluated_users, surface_subjects(scratch, "home_feed", ["na"]))
    assert len(users) >= 20
    score = _scorer(split.relevant, pool_split.past["items"])
    arm_inputs = ArmInputs(
        settings, "home_feed", ["na"], split.split_time, pool_split.past, stored, scratch
    )
    experiment = experiment_of(settings.surface("home_feed"))  # as configured
    assert experiment is not None
    comparison = compare_arms(experiment, arm_inputs, users, score)
    assert comparison.notes == ()
    split_users = experiment.split(users)
    assert {arm: entry["users"] for arm, entry in comparison.arms.items()} == {
        arm: len(ids) for arm, ids in split_users.items()
    }
    assert comparison.arms["rerank"]["serving_mode"] == "candidate_pool_rerank"
    assert set(comparison.modes) == {"final_slate", "candidate_pool_rerank"}
    for mode, metrics in comparison.modes.items():
        assert metrics.users == len(users), mode
        assert metrics.recall > 0 and metrics.ndcg > 0, mode
    for arm, entry in comparison.arms.items():
        assert entry["metrics"].users == len(split_users[arm]) and entry["metrics"].recall > 0
    report = comparison.as_json()
    assert set(report["modes_on_all_subjects"]["candidate_pool_rerank"]) >= {"recall", "ndcg"}
    assert any("candidate_pool_rerank on all" in line for line in comparison.text_lines(20))


def test_candidate_pool_rerank_lists_are_what_serving_serves_minus_consumed_items(
    pool_split: PoolSplit,
) -> None:
    settings, scratch, past = pool_split.settings, pool_split.scratch, pool_split.past
    stored, _ = surface_lists(scratch, "home_feed", ["na"])
    users = surface_subjects(scratch, "home_feed", ["na"])[:40]
    arm_inputs = ArmInputs(
        settings, "home_feed", ["na"], pool_split.split.split_time, past, stored, scratch
    )
    lists = candidate_pool_rerank_lists(arm_inputs, users)
    display_count = settings.surface("home_feed").display_count
    sizes = lists.groupby("user_id").size()
    assert set(sizes.index) == set(users.tolist()) and sizes.max() == display_count
    ranks = lists.groupby("user_id")["rank"].agg(["min", "max", "size"])
    assert (ranks["min"] == 1).all() and (ranks["max"] == ranks["size"]).all()
    assert not lists.duplicated(["user_id", "item_id"]).any()
    interactions = past["interactions"]
    consumed = interactions.loc[consumed_mask(interactions), ["user_id", "item_id"]]
    assert lists.merge(consumed, on=["user_id", "item_id"]).empty
    # A rerank, not the stored order: some subject's served list differs from their slate.
    slates = stored[stored["user_id"].isin(users)]
    differs = [
        lists.loc[lists["user_id"] == user, "item_id"].tolist()
        != slates.loc[slates["user_id"] == user]
        .sort_values("rank")["item_id"]
        .head(display_count)
        .tolist()
        for user in users.tolist()
    ]
    assert any(differs)
