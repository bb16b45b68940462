"""The model bundle: trained on tiny seeded data, written, loaded back, deterministic."""

from __future__ import annotations

import re
from datetime import datetime

import duckdb
import numpy as np
import pandas as pd
import pytest
import torch

from recsys_assets.config import load_settings
from recsys_assets.data import read_raw, read_snapshot
from recsys_assets.data.seed import seed_warehouse
from recsys_assets.models.bundle import (
    CURRENT_PATH,
    BundleMissing,
    current_model_version,
    load_bundle,
    train_bundle,
)
from recsys_assets.pipeline.features import FEATURE_SET_VERSION, compute_features
from recsys_assets.rules.engagement import positive_signal
from recsys_assets.warehouse import Warehouse

AS_OF = datetime(2024, 3, 1)
CPU = torch.device("cpu")


def _seed(warehouse: Warehouse) -> None:
    seed_warehouse(warehouse, scale="tiny", seed=11, settings=load_settings(), as_of=AS_OF)


def _scoring_features(warehouse: Warehouse) -> pd.DataFrame:
    interactions = read_raw(warehouse, "interactions")
    pairs = interactions[["user_id", "item_id"]].drop_duplicates().head(50)
    return compute_features(
        duckdb.connect(),
        pairs.rename(columns={"user_id": "subject_id"}),
        interactions=interactions,
        exposures=read_raw(warehouse, "exposures"),
        items=read_raw(warehouse, "items"),
        surface="home_feed",
        score_time=pd.Timestamp(AS_OF),
        user_controls=read_raw(warehouse, "user_controls"),
    )


def test_bundle_round_trip(warehouse: Warehouse) -> None:
    _seed(warehouse)
    info = train_bundle(warehouse, load_settings(), device=CPU)

    assert re.fullmatch(r"mb_\d{8}T\d{6}_[0-9a-f]{8}", info.model_version)
    assert current_model_version(warehouse) == info.model_version
    assert warehouse.read_json(CURRENT_PATH)["path"] == f"models/{info.model_version}"
    for name in (
        "two_tower.pt",
        "collaborative.npz",
        "ranker.pt",
        "calibration.json",
        "bundle.json",
    ):
        assert warehouse.exists(f"models/{info.model_version}/{name}")
    stored = warehouse.read_json(f"models/{info.model_version}/bundle.json")
    assert stored["model_version"] == info.model_version
    assert stored["feature_set_version"] == FEATURE_SET_VERSION
    assert stored["data_snapshot"] == read_snapshot(warehouse)["snapshot_id"]
    assert stored["seed"] == load_settings().training.seed and stored["device"] == "cpu"
    window = {key: pd.Timestamp(value) for key, value in stored["training_window"].items()}
    assert window["start"] < window["holdout_split"] < window["cutoff"] == pd.Timestamp(AS_OF)
    metrics = stored["metrics"]
    assert {"ranker_auc", "ranker_log_loss_before_calibration", "ranker_ece_after_calibration"} <= (
        set(metrics)
    )
    assert any(re.search(r"recall.*(50|100)", name) for name in metrics), metrics
    assert metrics["ranker_auc"] > 0.5
    # The ranker learned on candidate pools that found some of what users did next.
    assert metrics["ranker_training_subjects"] > 0 and metrics["ranker_pool_recall"] > 0.1
    assert metrics["collaborative_items"] > 0 and metrics["collaborative_l2"] > 0

    bundle = load_bundle(warehouse, device=CPU)
    assert bundle.info == info
    features = _scoring_features(warehouse)
    prediction, calibrated = bundle.score(features)
    assert prediction.shape == calibrated.shape == (len(features),)
    assert ((calibrated >= 0) & (calibrated <= 1)).all()
    np.testing.assert_array_equal(
        load_bundle(warehouse, info.model_version, device=CPU).ranker.predict(features),
        prediction,
    )
    users = features["subject_id"].unique()[:3]
    vectors = bundle.two_tower.user_embeddings(users)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    # The served retrieval models know every user with a positive in the whole window.
    liked = read_raw(warehouse, "interactions")
    liked = liked[positive_signal(liked) & (liked["ts"] < pd.Timestamp(AS_OF))]
    assert set(liked["user_id"]) <= set(bundle.two_tower.user_ids)
    assert bundle.collaborative.weights.shape == (bundle.collaborative.size,) * 2


def test_same_seed_same_weights_and_hash(local_warehouse: Warehouse) -> None:
    _seed(local_warehouse)
    first = train_bundle(local_warehouse, load_settings(), device=CPU)
    second = train_bundle(local_warehouse, load_settings(), device=CPU)
    assert first.files == second.files  # identical bytes
    assert first.model_version.rsplit("_", 1)[1] == second.model_version.rsplit("_", 1)[1]
    assert current_model_version(local_warehouse) == second.model_version


def test_missing_bundle_says_what_to_do(local_warehouse: Warehouse) -> None:
    with pytest.raises(BundleMissing, match="materialize model_bundle first"):
        load_bundle(local_warehouse)
    local_warehouse.write_json(CURRENT_PATH, {"model_version": "mb_x"})
    with pytest.raises(BundleMissing, match="'mb_y' not found"):
        load_bundle(local_warehouse, "mb_y")
