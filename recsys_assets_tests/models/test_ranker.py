"""Ranker training on planted preferences, and Platt calibration on miscalibrated scores."""

from __future__ import annotations

import duckdb
import numpy as np
import pandas as pd
import pytest
import torch

from recsys_assets.models.calibration import (
    Calibrator,
    expected_calibration_error,
    fit_calibrator,
    log_loss,
    roc_auc,
)
from recsys_assets.models.ranker import (
    RankerConfig,
    RankerModel,
    RankerTrainingError,
    train_ranker,
    training_pairs,
    validation_start,
)
from recsys_assets.pipeline.features import FEATURE_COLUMNS, compute_features

CUTOFF = pd.Timestamp("2024-03-01")
CATEGORIES = 6


@pytest.fixture(scope="module")
def planted() -> dict[str, pd.DataFrame]:
    """Users click almost only in their favourite category; the ranker must find that."""
    rng = np.random.default_rng(3)
    users, items_per_category, events = 80, 15, 2_400
    item_ids = np.arange(CATEGORIES * items_per_category)
    items = pd.DataFrame(
        {
            "item_id": item_ids,
            "category": [f"cat{i % CATEGORIES}" for i in item_ids],
            "creator_id": [f"creator{i % 20}" for i in item_ids],
            "stock": 10,
            "is_sponsored": False,
            "created_at": CUTOFF - pd.Timedelta(days=60),
        }
    )
    user_ids = rng.integers(0, users, events)
    favourite = user_ids % CATEGORIES
    in_favourite = rng.random(events) < 0.9
    category = np.where(in_favourite, favourite, rng.integers(0, CATEGORIES, events))
    item = category + CATEGORIES * rng.integers(0, items_per_category, events)
    offsets = np.sort(rng.integers(0, 40 * 86_400, events))
    interactions = pd.DataFrame(
        {
            "user_id": user_ids,
            "item_id": item,
            "event_type": rng.choice(np.array(["view", "click", "purchase"]), events),
            "value": 1.0,
            "ts": CUTOFF - pd.Timedelta(days=40) + pd.to_timedelta(offsets, unit="s"),
        }
    )
    exposures = interactions[["user_id", "item_id", "ts"]].assign(surface="home_feed")
    return {"items": items, "interactions": interactions, "exposures": exposures}


def test_training_pairs_are_point_in_time(planted: dict[str, pd.DataFrame]) -> None:
    interactions, items = planted["interactions"], planted["items"]
    pairs = training_pairs(
        interactions, items, cutoff=CUTOFF, negatives_per_positive=3, max_positives=10_000, seed=1
    )
    positives = pairs[pairs["label"] == 1]
    negatives = pairs[pairs["label"] == 0]
    assert len(positives) == interactions["event_type"].isin(["click", "purchase"]).sum()
    assert len(negatives) > 2 * len(positives)
    assert set(negatives["score_time"]) <= set(positives["score_time"])
    touched = negatives.merge(
        interactions.rename(columns={"user_id": "subject_id"}), on=["subject_id", "item_id"]
    )
    assert not (touched["ts"] <= touched["score_time"]).any()  # never touched before then


def test_ranker_learns_planted_preference_and_round_trips(
    planted: dict[str, pd.DataFrame],
) -> None:
    config = RankerConfig(epochs=3, seed=5)
    result = train_ranker(
        duckdb.connect(),
        interactions=planted["interactions"],
        exposures=planted["exposures"],
        items=planted["items"],
        cutoff=CUTOFF,
        validation_fraction=0.2,
        config=config,
        device=torch.device("cpu"),
    )
    assert result.metrics["auc"] > 0.75, result.metrics
    assert result.metrics["validation_rows"] > 0 and result.metrics["train_rows"] > 0
    assert result.window["start"] < result.window["validation_start"] < CUTOFF
    assert (result.validation.score_time >= result.window["validation_start"]).all()

    pairs = pd.DataFrame({"subject_id": [0, 0, 1], "item_id": [0, 1, 7]})
    features = compute_features(
        duckdb.connect(),
        pairs,
        interactions=planted["interactions"],
        exposures=planted["exposures"],
        items=planted["items"],
        surface="home_feed",
        score_time=CUTOFF,
    )
    predictions = result.model.predict(features, batch_size=2)
    assert predictions.dtype == np.float32 and predictions.shape == (3,)
    assert ((predictions > 0) & (predictions < 1)).all()
    # user 0's favourite is cat0 (item 0), not cat1 (item 1)
    assert predictions[0] > predictions[1]

    restored = RankerModel.from_bytes(result.model.to_bytes(), device=torch.device("cpu"))
    np.testing.assert_array_equal(restored.predict(features), result.model.predict(features))
    np.testing.assert_allclose(restored.predict(features), predictions, rtol=1e-6)  # batching

    again = train_ranker(
        duckdb.connect(),
        interactions=planted["interactions"],
        exposures=planted["exposures"],
        items=planted["items"],
        cutoff=CUTOFF,
        validation_fraction=0.2,
        config=config,
        device=torch.device("cpu"),
    )
    np.testing.assert_array_equal(  # same seed, same model
        again.model.predict(features), result.model.predict(features)
    )


def test_predict_names_missing_features_and_version_mismatch(
    planted: dict[str, pd.DataFrame],
) -> None:
    model = RankerModel.__new__(RankerModel)
    model.feature_columns = tuple(FEATURE_COLUMNS)
    model.feature_set_version = "fs_v1"
    with pytest.raises(ValueError, match="lacks"):
        model.predict(pd.DataFrame({"user_events_total": [1.0]}))
    frame = pd.DataFrame(np.zeros((1, len(FEATURE_COLUMNS)), np.float32), columns=FEATURE_COLUMNS)
    with pytest.raises(ValueError, match="rematerialize model_bundle"):
        model.predict(frame.assign(feature_set_version="fs_v0"))


def test_capped_positives_span_the_window(planted: dict[str, pd.DataFrame]) -> None:
    """A cap below the window's positives samples across time, so both splits get rows."""
    interactions, items = planted["interactions"], planted["items"]

    def capped(seed: int) -> pd.DataFrame:
        pairs = training_pairs(
            interactions,
            items,
            cutoff=CUTOFF,
            negatives_per_positive=2,
            max_positives=150,
            seed=seed,
        )
        return pairs[pairs["label"] == 1]

    positives = capped(seed=4)
    assert len(positives) == 150
    split_at = validation_start(interactions, CUTOFF, validation_fraction=0.2)
    before = (positives["score_time"] < split_at).mean()
    assert 0.6 < before < 0.95  # about the 0.8 of the window before the split, not 0
    pd.testing.assert_frame_equal(positives, capped(seed=4))
    assert not positives.reset_index(drop=True).equals(capped(seed=5).reset_index(drop=True))


def test_too_little_data_says_what_to_do(planted: dict[str, pd.DataFrame]) -> None:
    with pytest.raises(RankerTrainingError, match="seed or import"):
        training_pairs(
            planted["interactions"],
            planted["items"],
            cutoff=pd.Timestamp("2000-01-01"),
            negatives_per_positive=2,
            max_positives=10,
            seed=0,
        )


def test_roc_auc_matches_pairwise_definition_with_ties() -> None:
    rng = np.random.default_rng(0)
    labels = rng.random(300) < 0.3
    scores = np.round(rng.random(300), 1)  # many ties
    positive, negative = scores[labels], scores[~labels]
    wins = (positive[:, None] > negative[None, :]).sum() + 0.5 * (
        positive[:, None] == negative[None, :]
    ).sum()
    assert roc_auc(labels, scores) == pytest.approx(wins / (len(positive) * len(negative)))
    assert np.isnan(roc_auc(np.ones(3), np.arange(3.0)))


def test_platt_scaling_repairs_overconfident_scores() -> None:
    rng = np.random.default_rng(1)
    truth = rng.uniform(0.05, 0.6, 6_000)
    labels = (rng.random(6_000) < truth).astype(np.float64)
    logit = np.log(truth / (1 - truth))
    overconfident = 1 / (1 + np.exp(-(2.5 * logit + 1.0)))
    calibrator, report = fit_calibrator(labels, overconfident, order=np.arange(6_000))
    assert report.log_loss_after < report.log_loss_before - 0.05
    assert report.ece_after < report.ece_before / 3
    assert calibrator.slope == pytest.approx(0.4, abs=0.08)
    calibrated = calibrator.transform(overconfident)
    assert calibrated.dtype == np.float32 and ((calibrated >= 0) & (calibrated <= 1)).all()
    assert roc_auc(labels, calibrated) == pytest.approx(roc_auc(labels, overconfident))
    assert log_loss(labels, calibrated) < log_loss(labels, overconfident)
    assert expected_calibration_error(labels, calibrated) < 0.03

    restored = Calibrator.from_json(calibrator.to_json())
    np.testing.assert_array_equal(restored.transform(overconfident), calibrated)
    with pytest.raises(ValueError, match="not supported"):
        Calibrator.from_json('{"method": "isotonic"}')


def test_single_class_gives_identity_calibrator() -> None:
    calibrator = Calibrator.fit(np.ones(10), np.full(10, 0.3))
    np.testing.assert_allclose(calibrator.transform(np.array([0.3])), [0.3], rtol=1e-6)
