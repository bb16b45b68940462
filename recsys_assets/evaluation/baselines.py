"""Reference recommenders on the same split: popularity, item-kNN (cosine), ALS, EASE.

They see exactly what the pipeline sees (the training part of the split) and obey the same
item rules (`rules.eligibility` at the split time, the surface's tenant rule): a baseline
may not win by recommending an item the pipeline is forbidden to show. Every item the user
interacted with in training is filtered out, since it can never be relevant.

Item-kNN and ALS are the `implicit` library's models (`CosineRecommender`,
`AlternatingLeastSquares`), fitted on a user × item preference matrix where each training
event adds its signal weight (SIGNAL_WEIGHTS). EASE is the project's own collaborative model
(`models.collaborative`, the one EASE implementation), with λ chosen on a nested holdout of
the training part only. Scores are computed in user batches, so memory is bounded by
batch × catalog, never users × catalog.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp
from implicit.als import AlternatingLeastSquares
from implicit.nearest_neighbours import CosineRecommender
from implicit.utils import ParameterWarning
from threadpoolctl import threadpool_limits

from recsys_assets.data.holdout import temporal_holdout
from recsys_assets.models.collaborative import (
    CollaborativeModel,
    choose_l2,
    engaged_pairs,
    fit_collaborative,
)
from recsys_assets.rules.eligibility import item_rejection_reasons
from recsys_assets.rules.engagement import POSITIVE_RATING

BASELINES = ("popularity", "item_knn", "als", "ease")
SIGNAL_WEIGHTS = {"view": 0.25, "click": 1.0, "purchase": 2.0, "rating": 1.0}
"""Preference added per training event; hides add nothing. A rating below POSITIVE_RATING
counts like a view: the user found the item, but did not like it."""
KNN_NEIGHBOURS = 100
ALS_FACTORS = 64
ALS_REGULARIZATION = 0.05
ALS_ALPHA = 10.0
"""Confidence scale for ALS (Hu, Koren & Volinsky): confidence = 1 + alpha × preference."""
ALS_ITERATIONS = 20
UNCOVERED_SCORE = -np.finfo(np.float64).max
"""EASE score of an item outside the model: below every real score, yet still allowed."""
_SCORE_CELLS_PER_BATCH = 4_000_000
"""Dense scores held at once (users in a batch × catalog items)."""

Scorer = Callable[[np.ndarray], np.ndarray]
"""Matrix row indices of a user batch → dense scores (batch × catalog items)."""


@dataclass(frozen=True)
class Catalog:
    """The items each user may be recommended, as boolean masks over `item_ids`."""

    item_ids: np.ndarray
    """Every item of the items table, sorted: the columns of the training matrices."""
    categories: pd.Series
    """item_id → category, for diversity."""
    allowed: dict[tuple[str, str, str], np.ndarray]
    """(region, tenant_id or '', actor_role or '') → which items may be recommended."""
    group_of_user: pd.Series
    """user_id → its key in `allowed`."""

    @property
    def size(self) -> int:
        """Items recommendable to at least one user: the denominator of catalog coverage."""
        if not self.allowed:
            return 0
        return int(np.logical_or.reduce(list(self.allowed.values())).sum())


def build_catalog(
    items: pd.DataFrame, users: pd.DataFrame, *, now: pd.Timestamp, tenant_items: bool
) -> Catalog:
    """Per user group, the items `rules.eligibility` allows at `now`.

    `tenant_items` mirrors the candidate stage: consumer surfaces never get tenant-owned
    items; the enterprise surface gets only the actor's own tenant's items, with the role rule.
    """
    items = items.sort_values("item_id", kind="stable").reset_index(drop=True)
    tenant = users["tenant_id"].astype(object).where(users["tenant_id"].notna(), "")
    role = users["actor_role"].astype(object).where(users["actor_role"].notna(), "")
    keys = pd.Series(
        list(zip(users["region"].astype(str), tenant, role, strict=True)),
        index=users["user_id"].to_numpy(dtype=np.int64),
    )
    owned = items["tenant_id"].notna().to_numpy(dtype=bool)
    allowed: dict[tuple[str, str, str], np.ndarray] = {}
    for key in sorted(set(keys)):
        region, tenant_id, actor_role = key
        if tenant_items:
            reasons = item_rejection_reasons(
                items,
                region=region,
                now=now,
                subject_tenant=tenant_id or None,
                subject_role=actor_role or None,
            )
            allowed[key] = reasons.isna().to_numpy(dtype=bool) & owned
        else:
            reasons = item_rejection_reasons(items, region=region, now=now)
            allowed[key] = reasons.isna().to_numpy(dtype=bool) & ~owned
    return Catalog(
        item_ids=items["item_id"].to_numpy(dtype=np.int64),
        categories=pd.Series(items["category"].to_numpy(), index=items["item_id"].to_numpy()),
        allowed=allowed,
        group_of_user=keys,
    )


@dataclass(frozen=True)
class TrainingMatrices:
    """The training part as sparse users × items matrices over the catalog's items."""

    user_ids: np.ndarray
    """Sorted: the rows."""
    preference: sp.csr_matrix
    """Summed signal weights per (user, item)."""
    seen: sp.csr_matrix
    """1 where the user had any training interaction with the item (hides included)."""

    def rows(self, user_ids: np.ndarray) -> np.ndarray:
        """Row index of each user id; -1 for a user without training interactions."""
        found = np.searchsorted(self.user_ids, user_ids)
        found = np.minimum(found, max(len(self.user_ids) - 1, 0))
        known = len(self.user_ids) > 0
        return np.where(known & (self.user_ids[found] == user_ids), found, -1)


def signal_weights(train: pd.DataFrame) -> np.ndarray:
    """Preference weight of each training event (SIGNAL_WEIGHTS)."""
    weights = train["event_type"].map(SIGNAL_WEIGHTS).fillna(0.0).to_numpy(dtype=np.float32)
    disliked = (train["event_type"] == "rating").to_numpy() & (
        train["value"].to_numpy(dtype=np.float64) < POSITIVE_RATING
    )
    weights[disliked] = SIGNAL_WEIGHTS["view"]
    return weights


def training_matrices(train: pd.DataFrame, catalog: Catalog) -> TrainingMatrices:
    """Sparse matrices of the training part; events on items outside the catalog are dropped."""
    columns = np.searchsorted(catalog.item_ids, train["item_id"].to_numpy(dtype=np.int64))
    columns = np.minimum(columns, len(catalog.item_ids) - 1)
    in_catalog = catalog.item_ids[columns] == train["item_id"].to_numpy(dtype=np.int64)
    user_ids = np.unique(train["user_id"].to_numpy(dtype=np.int64))
    rows = np.searchsorted(user_ids, train["user_id"].to_numpy(dtype=np.int64))
    shape = (len(user_ids), len(catalog.item_ids))
    rows, columns = rows[in_catalog], columns[in_catalog]
    preference = sp.csr_matrix(
        (signal_weights(train)[in_catalog], (rows, columns)), shape=shape, dtype=np.float32
    )
    preference.eliminate_zeros()
    seen = sp.csr_matrix((np.ones(len(rows), dtype=np.float32), (rows, columns)), shape=shape)
    seen.data[:] = 1.0
    return TrainingMatrices(user_ids=user_ids, preference=preference, seen=seen)


def top_k_lists(
    scorer: Scorer,
    matrices: TrainingMatrices,
    catalog: Catalog,
    user_ids: np.ndarray,
    k: int,
) -> pd.DataFrame:
    """Each user's k best allowed, unseen items: `user_id`, `rank`, `item_id`.

    Deterministic: the same scores give the same lists (equal scores are ordered by the
    selection algorithm, which has no randomness; scorers that tie often break ties
    themselves, as popularity does).
    """
    user_ids = np.asarray(user_ids, dtype=np.int64)
    rows = matrices.rows(user_ids)
    if (rows < 0).any():
        raise ValueError(
            f"{int((rows < 0).sum())} user(s) have no training interactions (e.g. user_id "
            f"{user_ids[rows < 0][0]}); evaluate only users present in the training part"
        )
    n_items = len(catalog.item_ids)
    depth = min(k, n_items)
    batch = max(1, _SCORE_CELLS_PER_BATCH // max(n_items, 1))
    groups = catalog.group_of_user.reindex(user_ids).to_numpy()
    frames = [_empty_lists()]
    for start in range(0, len(user_ids), batch):
        chunk = slice(start, start + batch)
        scores = np.array(scorer(rows[chunk]), dtype=np.float64)
        allowed = np.stack([catalog.allowed[group] for group in groups[chunk]])
        allowed &= matrices.seen[rows[chunk]].toarray() == 0
        scores[~allowed] = -np.inf
        best = np.argpartition(-scores, depth - 1, axis=1)[:, :depth]
        best_scores = np.take_along_axis(scores, best, axis=1)
        within = np.argsort(-best_scores, axis=1, kind="stable")
        best = np.take_along_axis(best, within, axis=1)
        keep = np.isfinite(np.take_along_axis(best_scores, within, axis=1)).ravel()
        frames.append(
            pd.DataFrame(
                {
                    "user_id": np.repeat(user_ids[chunk], depth)[keep],
                    "rank": np.tile(np.arange(1, depth + 1, dtype=np.int64), len(best))[keep],
                    "item_id": catalog.item_ids[best].ravel()[keep],
                }
            )
        )
    lists = pd.concat(frames, ignore_index=True)
    # Masked items sort last and are dropped, so kept ranks are already dense 1..n.
    return lists


def _empty_lists() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "user_id": pd.Series(dtype="int64"),
            "rank": pd.Series(dtype="int64"),
            "item_id": pd.Series(dtype="int64"),
        }
    )


def popularity_scorer(matrices: TrainingMatrices) -> Scorer:
    """Distinct users with a positive training signal per item, the same for everyone."""
    liked = matrices.preference.copy()
    liked.data = (liked.data >= 1.0).astype(np.float32)
    counts = np.asarray(liked.sum(axis=0), dtype=np.float64).ravel()
    # Integer counts tie often: subtract a fraction < 1 so the smaller item id wins a tie.
    counts = counts - np.arange(len(counts)) / (len(counts) + 1.0)

    def score(rows: np.ndarray) -> np.ndarray:
        return np.broadcast_to(counts, (len(rows), len(counts)))

    return score


def item_knn_scorer(matrices: TrainingMatrices) -> Scorer:
    """Sum of cosine similarities (top KNN_NEIGHBOURS per item) to the user's items."""
    model = CosineRecommender(K=KNN_NEIGHBOURS, num_threads=1)
    with warnings.catch_warnings():
        # implicit hands its own normalised copy over as COO and warns about it.
        warnings.simplefilter("ignore", ParameterWarning)
        model.fit(matrices.preference, show_progress=False)
    similarity = model.similarity.tocsr()

    def score(rows: np.ndarray) -> np.ndarray:
        return (matrices.preference[rows] @ similarity).toarray()

    return score


def als_scorer(matrices: TrainingMatrices, *, seed: int) -> Scorer:
    """Implicit-feedback matrix factorization (confidence-weighted ALS), fixed random_state."""
    with threadpool_limits(1, "blas"):
        return _fit_als(matrices, seed)


def _fit_als(matrices: TrainingMatrices, seed: int) -> Scorer:
    # implicit checks the BLAS thread pool at construction: build it inside the limit.
    model = AlternatingLeastSquares(
        factors=ALS_FACTORS,
        regularization=ALS_REGULARIZATION,
        alpha=ALS_ALPHA,
        iterations=ALS_ITERATIONS,
        random_state=seed,
        num_threads=1,
        use_gpu=False,
    )
    model.fit(matrices.preference, show_progress=False)
    user_factors = np.asarray(model.user_factors)
    item_factors = np.asarray(model.item_factors)

    def score(rows: np.ndarray) -> np.ndarray:
        return user_factors[rows] @ item_factors.T

    return score


def fit_ease(train: pd.DataFrame, *, holdout: float, seed: int) -> CollaborativeModel:
    """EASE (`models.collaborative`) on the training part, λ tuned without the test part.

    λ is chosen by `choose_l2` on a per-user holdout *inside* `train` (same fraction and
    seed as the evaluation's split), then the model is fitted on all of `train`: the
    evaluation's held-out items never influence λ.
    """
    inner = temporal_holdout(train, holdout=holdout, seed=seed)
    return fit_collaborative(train, l2=choose_l2(inner.train, inner.relevant))


def ease_scorer(
    model: CollaborativeModel, train: pd.DataFrame, matrices: TrainingMatrices, catalog: Catalog
) -> Scorer:
    """Sum of EASE weights over the user's engaged items; uncovered items score lowest."""
    history = model.history_matrix(matrices.user_ids, engaged_pairs(train))
    columns = model.columns(catalog.item_ids)
    covered = np.flatnonzero(columns >= 0)
    model_columns = columns[covered]

    def score(rows: np.ndarray) -> np.ndarray:
        scores = np.full((len(rows), len(catalog.item_ids)), UNCOVERED_SCORE)
        scores[:, covered] = model.scores(history[rows])[:, model_columns]
        return scores

    return score


def baseline_lists(
    train: pd.DataFrame,
    catalog: Catalog,
    user_ids: np.ndarray,
    *,
    k: int,
    seed: int,
    holdout: float,
) -> dict[str, pd.DataFrame]:
    """Top-k lists of every baseline (BASELINES order) for `user_ids`.

    `holdout` and `seed` are the evaluation split's: EASE tunes λ on a holdout of `train`
    made the same way.
    """
    matrices = training_matrices(train, catalog)
    scorers = {
        "popularity": popularity_scorer(matrices),
        "item_knn": item_knn_scorer(matrices),
        "als": als_scorer(matrices, seed=seed),
        "ease": ease_scorer(fit_ease(train, holdout=holdout, seed=seed), train, matrices, catalog),
    }
    return {
        name: top_k_lists(scorer, matrices, catalog, user_ids, k)
        for name, scorer in scorers.items()
    }
