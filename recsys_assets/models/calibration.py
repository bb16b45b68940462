"""Platt scaling of ranker probabilities, plus the offline metrics that judge it.

The ranker is trained on sampled negatives and scored later than it was trained, so its
raw probabilities drift from observed rates; utility and the email "high-confidence first"
rule need probabilities that mean what they say. Platt scaling (a logistic regression on
the raw logit) has two parameters, so it fits well on a small validation split and cannot
reorder candidates. It is fitted with Newton's method on the time-based validation split
and stored as JSON beside the weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

_EPSILON = 1e-7
_NEWTON_STEPS = 50
_RIDGE = 1e-6


def _logit(probability: np.ndarray) -> np.ndarray:
    clipped = np.clip(np.asarray(probability, dtype=np.float64), _EPSILON, 1 - _EPSILON)
    return np.log(clipped) - np.log1p(-clipped)


def _sigmoid(value: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * value))  # no overflow for large |value|


def log_loss(labels: np.ndarray, probability: np.ndarray) -> float:
    """Mean negative log-likelihood of binary `labels` under `probability`."""
    p = np.clip(np.asarray(probability, dtype=np.float64), _EPSILON, 1 - _EPSILON)
    y = np.asarray(labels, dtype=np.float64)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p)))


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve via the rank-sum (Mann–Whitney) statistic; ties count half."""
    y = np.asarray(labels, dtype=bool)
    positives = int(y.sum())
    negatives = len(y) - positives
    if positives == 0 or negatives == 0:
        return float("nan")
    s = np.asarray(scores, dtype=np.float64)
    order = np.argsort(s, kind="mergesort")
    ordered = s[order]
    # average rank of each run of tied scores
    starts = np.r_[0, np.flatnonzero(np.diff(ordered)) + 1]
    ends = np.r_[starts[1:], len(ordered)]
    run_rank = (starts + ends + 1) / 2.0
    ranks = np.empty(len(s), dtype=np.float64)
    ranks[order] = np.repeat(run_rank, ends - starts)
    rank_sum = ranks[y].sum()
    return float((rank_sum - positives * (positives + 1) / 2.0) / (positives * negatives))


def expected_calibration_error(
    labels: np.ndarray, probability: np.ndarray, *, bins: int = 10
) -> float:
    """Weighted mean |predicted − observed| over equal-width probability bins."""
    p = np.asarray(probability, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    if len(p) == 0:
        return float("nan")
    which = np.minimum((p * bins).astype(np.int64), bins - 1)
    predicted = np.bincount(which, weights=p, minlength=bins)
    observed = np.bincount(which, weights=y, minlength=bins)
    return float(np.abs(predicted - observed).sum() / len(p))


@dataclass(frozen=True)
class Calibrator:
    """p_cal = sigmoid(slope · logit(p) + intercept); slope > 0 keeps the ranking."""

    slope: float = 1.0
    intercept: float = 0.0
    fitted_rows: int = 0
    method: str = "platt"

    @classmethod
    def fit(cls, labels: np.ndarray, probability: np.ndarray) -> Calibrator:
        """Maximum-likelihood Platt parameters (Newton's method, tiny ridge for stability).

        With a single class in `labels` there is nothing to learn: the identity comes back.
        """
        y = np.asarray(labels, dtype=np.float64)
        if len(y) == 0 or y.min() == y.max():
            return cls(fitted_rows=len(y))
        x = _logit(probability)
        design = np.column_stack([x, np.ones_like(x)])
        params = np.array([1.0, 0.0])
        for _ in range(_NEWTON_STEPS):
            p = _sigmoid(design @ params)
            gradient = design.T @ (p - y) + _RIDGE * params
            weight = np.maximum(p * (1 - p), _EPSILON)
            hessian = (design * weight[:, None]).T @ design + _RIDGE * np.eye(2)
            step = np.linalg.solve(hessian, gradient)
            params -= step
            if np.abs(step).max() < 1e-10:
                break
        slope, intercept = (float(value) for value in params)
        if slope <= 0:  # a ranker worse than chance on validation: do not invert it
            return cls(
                slope=_EPSILON, intercept=float(_logit(np.array([y.mean()]))[0]), fitted_rows=len(y)
            )
        return cls(slope=slope, intercept=intercept, fitted_rows=len(y))

    def transform(self, probability: np.ndarray) -> np.ndarray:
        """Calibrated probabilities, same shape, float32, in [0, 1]."""
        value = self.slope * _logit(probability) + self.intercept
        return _sigmoid(value).astype(np.float32)

    def to_json(self) -> str:
        return json.dumps(
            {
                "method": self.method,
                "slope": self.slope,
                "intercept": self.intercept,
                "fitted_rows": self.fitted_rows,
            },
            indent=2,
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> Calibrator:
        data = json.loads(text)
        if data.get("method") != "platt":
            raise ValueError(
                f"calibration method {data.get('method')!r} is not supported (expected 'platt'); "
                "the bundle was written by a newer version: retrain with model_bundle"
            )
        return cls(
            slope=float(data["slope"]),
            intercept=float(data["intercept"]),
            fitted_rows=int(data.get("fitted_rows", 0)),
        )


@dataclass(frozen=True)
class CalibrationReport:
    """Validation metrics before and after calibration, on rows the calibrator did not see."""

    log_loss_before: float
    log_loss_after: float
    ece_before: float
    ece_after: float
    evaluated_rows: int


def fit_calibrator(
    labels: np.ndarray, probability: np.ndarray, order: np.ndarray
) -> tuple[Calibrator, CalibrationReport]:
    """Fit on the validation split; report on its later half with a calibrator fit on the earlier.

    `order` (e.g. event time) sorts the rows in time, so the reported improvement is what a
    calibrator fitted on the past does for the future. The returned calibrator uses every row.
    """
    y = np.asarray(labels, dtype=np.float64)
    p = np.asarray(probability, dtype=np.float64)
    chronological = np.argsort(np.asarray(order), kind="stable")
    half = len(chronological) // 2
    earlier, later = chronological[:half], chronological[half:]
    holdout = Calibrator.fit(y[earlier], p[earlier])
    after = holdout.transform(p[later])
    report = CalibrationReport(
        log_loss_before=log_loss(y[later], p[later]),
        log_loss_after=log_loss(y[later], after),
        ece_before=expected_calibration_error(y[later], p[later]),
        ece_after=expected_calibration_error(y[later], after),
        evaluated_rows=len(later),
    )
    return Calibrator.fit(y, p), report
