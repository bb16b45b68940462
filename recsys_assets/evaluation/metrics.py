"""Top-K ranking metrics over many users at once, with the definitions written down.

Every metric reads two frames: the recommendations (`user_id`, `rank` 1-based, `item_id`)
and the ground truth (`user_id`, `item_id`, one row per relevant item). Relevance is binary.
The evaluated users are given explicitly, so a user who got no list (or a short one) counts
with zero hits instead of silently disappearing from the average.

- Recall@K = |top-K ∩ relevant| / |relevant|, averaged over users.
- nDCG@K = DCG@K / IDCG@K with DCG@K = Σ_{hit at rank r ≤ K} 1 / log2(r + 1) and IDCG@K the
  DCG of a perfect list, i.e. Σ_{r=1}^{min(K, |relevant|)} 1 / log2(r + 1).
- Hit rate@K = share of users with at least one relevant item in their top K.
- Catalog coverage@K = distinct items in anyone's top K / catalog size.
- Category diversity@K = distinct categories in a user's top K / items in that top K,
  averaged over users with a non-empty list (1.0 = every item from another category).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

METRIC_NAMES = ("recall", "ndcg", "hit_rate", "coverage", "diversity")


@dataclass(frozen=True)
class ListMetrics:
    """The metrics of one set of lists against one ground truth, at one K."""

    k: int
    users: int
    """Users evaluated (the denominator of recall, nDCG and hit rate)."""
    users_with_list: int
    """Of those, users with at least one recommended item."""
    recall: float
    ndcg: float
    hit_rate: float
    coverage: float
    diversity: float

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def discounts(k: int) -> np.ndarray:
    """1 / log2(rank + 1) for ranks 1..k."""
    return 1.0 / np.log2(np.arange(2, k + 2, dtype=np.float64))


def top_k(recommendations: pd.DataFrame, k: int) -> pd.DataFrame:
    """The first `k` rows of each user's list by rank, duplicates of an item dropped.

    A duplicate counts once at its best rank, and ranks are made dense again, so a list with
    repeated items cannot score above a list without them.
    """
    if k < 1:
        raise ValueError(f"K must be at least 1, got {k}")
    ordered = (
        recommendations[["user_id", "rank", "item_id"]]
        .sort_values(["user_id", "rank", "item_id"], kind="stable")
        .drop_duplicates(["user_id", "item_id"], keep="first")
    )
    ranked = ordered.assign(rank=ordered.groupby("user_id", sort=False).cumcount() + 1)
    return ranked[ranked["rank"] <= k].reset_index(drop=True)


def per_user_metrics(
    recommendations: pd.DataFrame,
    relevant: pd.DataFrame,
    *,
    k: int,
    users: np.ndarray | pd.Index | None = None,
) -> pd.DataFrame:
    """One row per evaluated user: `relevant`, `hits`, `recall`, `ndcg`, `hit`.

    `users` defaults to every user with a relevant item; a user without relevant items has
    no defined recall and is rejected, so the caller decides who is evaluated.
    """
    truth = relevant[["user_id", "item_id"]].drop_duplicates()
    relevant_counts = truth.groupby("user_id").size()
    chosen = pd.Index(
        relevant_counts.index if users is None else pd.unique(np.asarray(users)), name="user_id"
    )
    missing = chosen.difference(relevant_counts.index)
    if len(missing):
        raise ValueError(
            f"{len(missing)} evaluated user(s) have no relevant item (e.g. user_id "
            f"{missing[0]}): recall is undefined for them; evaluate only users with relevant items"
        )
    listed = top_k(recommendations, k)
    hits = listed.merge(truth, on=["user_id", "item_id"], how="inner")
    weight = discounts(k)
    hits = hits.assign(gain=weight[hits["rank"].to_numpy() - 1])
    by_user = hits.groupby("user_id").agg(hits=("item_id", "size"), dcg=("gain", "sum"))
    ideal_cumulative = np.cumsum(weight)
    frame = pd.DataFrame(index=chosen)
    frame["relevant"] = relevant_counts.reindex(chosen).to_numpy(dtype=np.int64)
    frame["hits"] = by_user["hits"].reindex(chosen, fill_value=0).to_numpy(dtype=np.int64)
    dcg = by_user["dcg"].reindex(chosen, fill_value=0.0).to_numpy(dtype=np.float64)
    ideal = ideal_cumulative[np.minimum(frame["relevant"].to_numpy(), k) - 1]
    frame["recall"] = frame["hits"] / frame["relevant"]
    frame["ndcg"] = dcg / ideal
    frame["hit"] = (frame["hits"] > 0).astype(np.float64)
    return frame


def catalog_coverage(recommendations: pd.DataFrame, *, k: int, catalog_size: int) -> float:
    """Distinct items in anyone's top K over the number of recommendable items."""
    if catalog_size < 1:
        raise ValueError(f"catalog_size must be at least 1, got {catalog_size}")
    return float(top_k(recommendations, k)["item_id"].nunique() / catalog_size)


def category_diversity(
    recommendations: pd.DataFrame, *, k: int, item_categories: pd.Series
) -> float:
    """Mean over non-empty lists of distinct categories in the top K / items in the top K.

    `item_categories` maps item_id → category; an item without one counts as its own
    category (it cannot make a list look less diverse than it is).
    """
    listed = top_k(recommendations, k)
    if listed.empty:
        return 0.0
    category = listed["item_id"].map(item_categories)
    category = category.astype(object).where(
        category.notna(), "item:" + listed["item_id"].astype(str)
    )
    per_user = (
        listed.assign(category=category)
        .groupby("user_id")
        .agg(distinct=("category", "nunique"), length=("item_id", "size"))
    )
    return float((per_user["distinct"] / per_user["length"]).mean())


def evaluate_lists(
    recommendations: pd.DataFrame,
    relevant: pd.DataFrame,
    *,
    k: int,
    catalog_size: int,
    item_categories: pd.Series,
    users: np.ndarray | pd.Index | None = None,
) -> ListMetrics:
    """All metrics of one set of lists; lists of users not evaluated are ignored."""
    scores = per_user_metrics(recommendations, relevant, k=k, users=users)
    evaluated = recommendations[recommendations["user_id"].isin(scores.index)]
    with_list = int(evaluated["user_id"].nunique())
    n_users = len(scores)
    return ListMetrics(
        k=k,
        users=n_users,
        users_with_list=with_list,
        recall=float(scores["recall"].mean()) if n_users else 0.0,
        ndcg=float(scores["ndcg"].mean()) if n_users else 0.0,
        hit_rate=float(scores["hit"].mean()) if n_users else 0.0,
        coverage=catalog_coverage(evaluated, k=k, catalog_size=catalog_size),
        diversity=category_diversity(evaluated, k=k, item_categories=item_categories),
    )
