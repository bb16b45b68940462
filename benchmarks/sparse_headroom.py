"""How far above EASE can any standard method get on the sparse-purchases set? (issue 18)

    python benchmarks/sparse_headroom.py

The sparse variant of MovieLens 100k (`recsys_assets_tests/realdata.sparse_purchases`: liked
ratings only, each user's first 8–10, day-stamped) split exactly as `recsys evaluate` splits
it (`temporal_holdout`, holdout 0.2, seed 0). Each method below is scored on the held-out
part with its settings chosen **on the held-out part itself** (an oracle: no honest
pipeline can do better than its best setting), so the best row is an upper bound for that
family. Methods: popularity; EASE (λ = 0.25…128 × mean item degree); RP3β (α, β grid);
item-kNN cosine; z-score and reciprocal-rank blends of EASE and item-kNN. No slate policy,
no eligibility rules: pure ranking of every item the user has not bought.
The last line is a JSON summary: each method's Recall@20 / nDCG@20 and the best ratio to
EASE at its best λ, next to the 1.1 × target.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from recsys_assets.data.holdout import temporal_holdout
from recsys_assets.evaluation.metrics import per_user_metrics
from recsys_assets.models.collaborative import ease_weights
from recsys_assets_tests.realdata import sparse_purchases

K = 20
TARGET = 1.1


def sparse_interactions() -> pd.DataFrame:
    """The sparse-purchases set, built by the real-data tests' own builder, as the importer
    stores it (purchase, value 1, day stamps)."""
    with tempfile.TemporaryDirectory(prefix="sparse_headroom_") as folder:
        purchases = pd.read_csv(sparse_purchases(Path(folder)).interactions)
    return pd.DataFrame(
        {
            "user_id": purchases["user_id"].to_numpy(dtype=np.int64),
            "item_id": purchases["item_id"].to_numpy(dtype=np.int64),
            "event_type": "purchase",
            "value": 1.0,
            "ts": pd.to_datetime(purchases["timestamp"], unit="s"),
        }
    )


class Task:
    """The split as matrices: training rows of the evaluated users, and how to score."""

    def __init__(self, interactions: pd.DataFrame) -> None:
        split = temporal_holdout(interactions, holdout=0.2, seed=0)
        self.relevant = split.relevant
        self.items = np.sort(interactions["item_id"].unique())
        users = np.sort(interactions["user_id"].unique())
        columns = np.searchsorted(self.items, split.train["item_id"].to_numpy())
        rows = np.searchsorted(users, split.train["user_id"].to_numpy())
        matrix = sp.csr_matrix(
            (np.ones(len(rows)), (rows, columns)), shape=(len(users), len(self.items))
        )
        matrix.data[:] = 1.0  # repeated purchases count once
        self.matrix = matrix
        self.evaluated = split.evaluated_users
        self.history = matrix[np.searchsorted(users, self.evaluated)].toarray()
        self.gram = (matrix.T @ matrix).toarray()
        self.degree = np.diag(self.gram).copy()

    def score(self, scores: np.ndarray) -> tuple[float, float]:
        """Recall@K and nDCG@K of the top K unbought items by `scores` (users × items)."""
        masked = np.where(self.history > 0, -np.inf, scores)
        top = np.argsort(-masked, axis=1, kind="stable")[:, :K]
        lists = pd.DataFrame(
            {
                "user_id": np.repeat(self.evaluated, K),
                "rank": np.tile(np.arange(1, K + 1), len(self.evaluated)),
                "item_id": self.items[top.ravel()],
            }
        )
        metrics = per_user_metrics(lists, self.relevant, k=K, users=self.evaluated)
        return float(metrics["recall"].mean()), float(metrics["ndcg"].mean())


def _zscore(scores: np.ndarray) -> np.ndarray:
    return (scores - scores.mean(axis=1, keepdims=True)) / (
        scores.std(axis=1, keepdims=True) + 1e-9
    )


def _ranks(scores: np.ndarray) -> np.ndarray:
    return np.argsort(np.argsort(-scores, axis=1, kind="stable"), axis=1, kind="stable")


def methods(task: Task) -> dict[str, Callable[[], np.ndarray]]:
    """Name → scores (users × items), each a standard method at one setting."""
    mean_degree = float(task.degree.mean())
    ease = {
        multiple: task.history @ ease_weights(task.gram, multiple * mean_degree)
        for multiple in (0.25, 1, 4, 16, 32, 128)
    }
    norm = np.sqrt(np.maximum(task.degree, 1.0))
    cosine = task.gram / norm[:, None] / norm[None, :]
    np.fill_diagonal(cosine, 0.0)
    knn = task.history @ cosine
    users_items = sp.diags(1 / np.maximum(task.matrix.sum(axis=1).A.ravel(), 1)) @ task.matrix
    items_users = sp.diags(1 / np.maximum(task.degree, 1)) @ task.matrix.T
    transition = (items_users @ users_items).toarray()
    found: dict[str, Callable[[], np.ndarray]] = {
        "popularity": lambda: np.tile(task.degree, (len(task.evaluated), 1)),
        "item_knn_cosine": lambda: knn,
    }
    for multiple, scores in ease.items():
        found[f"ease_l2_{multiple}x_degree"] = lambda scores=scores: scores
    for alpha in (0.5, 1.0):
        for beta in (0.0, 0.3, 0.5):
            weights = transition**alpha / np.maximum(task.degree, 1.0)[None, :] ** beta
            np.fill_diagonal(weights, 0.0)
            found[f"rp3_alpha{alpha}_beta{beta}"] = lambda w=weights: task.history @ w
    best_ease = ease[16]
    for weight in (0.25, 0.5, 1.0, 2.0):
        found[f"ease+knn_zscore_{weight}"] = lambda w=weight: _zscore(best_ease) + w * _zscore(knn)
    for constant in (10, 60):
        found[f"ease+knn_reciprocal_rank_{constant}"] = lambda c=constant: (
            1 / (c + _ranks(best_ease)) + 1 / (c + _ranks(knn))
        )
    return found


def main() -> dict[str, object]:
    task = Task(sparse_interactions())
    results = {name: task.score(build()) for name, build in methods(task).items()}
    for name, (recall, ndcg) in results.items():
        print(f"{name:34s} recall@{K} {recall:.4f}  ndcg@{K} {ndcg:.4f}", flush=True)
    ease_recall = max(r for name, (r, _) in results.items() if name.startswith("ease_l2"))
    ease_ndcg = max(n for name, (_, n) in results.items() if name.startswith("ease_l2"))
    best_recall = max(r for r, _ in results.values())
    best_ndcg = max(n for _, n in results.values())
    summary: dict[str, object] = {
        "benchmark": "sparse_headroom",
        "users_evaluated": len(task.evaluated),
        "methods": {
            name: {"recall": round(r, 4), "ndcg": round(n, 4)} for name, (r, n) in results.items()
        },
        "best_ease": {"recall": round(ease_recall, 4), "ndcg": round(ease_ndcg, 4)},
        "best_any": {"recall": round(best_recall, 4), "ndcg": round(best_ndcg, 4)},
        "best_over_ease": {
            "recall": round(best_recall / ease_recall, 3),
            "ndcg": round(best_ndcg / ease_ndcg, 3),
        },
        "target_over_best_baseline": TARGET,
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
