"""Ranker training on labelled pool rows, the prior blend, and Platt calibration."""

from __future__ import annotations

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
    within_subject_recall,
)
from recsys_assets.pipeline.features import FEATURE_COLUMNS, FEATURE_SET_VERSION

CPU = torch.device("cpu")


def pool_rows(
    subjects: int, per_subject: int, *, seed: int, signal: str, strength: float
) -> pd.DataFrame:
    """Candidate rows with random features; `signal` drives which rows are engaged with."""
    rng = np.random.default_rng(seed)
    rows = subjects * per_subject
    frame = pd.DataFrame(
        rng.gamma(1.0, 1.0, size=(rows, len(FEATURE_COLUMNS))).astype(np.float32),
        columns=FEATURE_COLUMNS,
    )
    frame.insert(0, "subject_id", np.repeat(np.arange(subjects, dtype=np.int64), per_subject))
    frame.insert(1, "item_id", np.tile(np.arange(per_subject, dtype=np.int64), subjects))
    logit = strength * (frame[signal].to_numpy() - 1.0) - 3.0
    frame["label"] = (rng.random(rows) < 1 / (1 + np.exp(-logit))).astype(np.float32)
    frame["feature_set_version"] = FEATURE_SET_VERSION
    return frame


def test_ranker_learns_from_pool_rows_and_round_trips() -> None:
    rows = pool_rows(300, 40, seed=3, signal="user_category_affinity", strength=2.5)
    config = RankerConfig(epochs=4, seed=5)
    result = train_ranker(rows, validation_fraction=0.2, k=5, config=config, device=CPU)
    assert result.metrics["auc"] > 0.75, result.metrics
    assert result.metrics["validation_rows"] == pytest.approx(0.2 * len(rows), rel=0.05)
    assert result.validation.labels.shape == result.validation.predictions.shape

    features = rows.head(7)
    predictions = result.model.predict(features, batch_size=2)
    assert predictions.dtype == np.float32 and predictions.shape == (7,)
    assert ((predictions > 0) & (predictions < 1)).all()
    restored = RankerModel.from_bytes(result.model.to_bytes(), device=CPU)
    np.testing.assert_array_equal(restored.predict(features), result.model.predict(features))
    np.testing.assert_allclose(result.model.predict(features), predictions, rtol=1e-6)

    again = train_ranker(rows, validation_fraction=0.2, k=5, config=config, device=CPU)
    np.testing.assert_array_equal(  # same seed, same model
        again.model.predict(features), result.model.predict(features)
    )


def test_validation_blends_in_the_strongest_input_when_the_network_ranks_worse() -> None:
    """Few labels, one input that ranks well alone: the blend must not rank below it."""
    rows = pool_rows(200, 30, seed=8, signal="collaborative_score", strength=4.0)
    result = train_ranker(
        rows, validation_fraction=0.3, k=5, config=RankerConfig(epochs=1, seed=1), device=CPU
    )
    metrics = result.metrics
    assert FEATURE_COLUMNS[int(metrics["prior_input"])] == "collaborative_score"
    assert metrics["validation_recall"] >= metrics["validation_recall_prior_alone"] - 1e-9
    assert metrics["validation_recall"] >= metrics["validation_recall_network"]
    restored = RankerModel.from_bytes(result.model.to_bytes(), device=CPU)
    np.testing.assert_array_equal(restored.predict(rows), result.model.predict(rows))


def test_within_subject_recall_counts_hits_per_subject() -> None:
    scores = np.array([0.9, 0.1, 0.5, 0.8, 0.7, 0.0])
    labels = np.array([1.0, 1.0, 0.0, 0.0, 1.0, 0.0])
    subjects = np.array([0, 0, 0, 1, 1, 2])
    # subject 0: top-1 holds 1 of 2 positives; subject 1: top-1 misses its positive;
    # subject 2 has no positive and is not judged.
    assert within_subject_recall(scores, labels, subjects, 1) == pytest.approx(0.25)
    assert within_subject_recall(scores, labels, subjects, 3) == pytest.approx(1.0)


def test_too_little_data_says_what_to_do() -> None:
    rows = pool_rows(20, 10, seed=0, signal="user_events_total", strength=1.0)
    with pytest.raises(RankerTrainingError, match=r"training\.holdout"):
        train_ranker(rows.assign(label=np.float32(0)), validation_fraction=0.2, device=CPU)


def test_predict_names_missing_features_and_version_mismatch() -> None:
    model = RankerModel.__new__(RankerModel)
    model.feature_columns = tuple(FEATURE_COLUMNS)
    model.feature_set_version = FEATURE_SET_VERSION
    with pytest.raises(ValueError, match="lacks"):
        model.predict(pd.DataFrame({"user_events_total": [1.0]}))
    frame = pd.DataFrame(np.zeros((1, len(FEATURE_COLUMNS)), np.float32), columns=FEATURE_COLUMNS)
    with pytest.raises(ValueError, match="rematerialize model_bundle"):
        model.predict(frame.assign(feature_set_version="fs_v0"))


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
