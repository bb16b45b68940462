"""Metrics against hand-computed values, a planted perfect list, and random lists."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from recsys_assets.evaluation.metrics import (
    catalog_coverage,
    category_diversity,
    evaluate_lists,
    per_user_metrics,
    top_k,
)


def lists_of(ranked: dict[int, list[int]]) -> pd.DataFrame:
    rows = [
        (user, rank, item)
        for user, items in ranked.items()
        for rank, item in enumerate(items, start=1)
    ]
    return pd.DataFrame(rows, columns=["user_id", "rank", "item_id"])


def truth_of(relevant: dict[int, list[int]]) -> pd.DataFrame:
    rows = [(user, item) for user, items in relevant.items() for item in items]
    return pd.DataFrame(rows, columns=["user_id", "item_id"])


def test_recall_ndcg_hit_match_hand_computation() -> None:
    # User 1: relevant {10, 30, 99}; list 10, 20, 30, 40, 50 → hits at ranks 1 and 3.
    # User 2: relevant {7}; list 5, 7 → hit at rank 2.
    # User 3: relevant {1}; no hit in the top 5.
    lists = lists_of({1: [10, 20, 30, 40, 50], 2: [5, 7], 3: [2, 3, 4, 5, 6]})
    truth = truth_of({1: [10, 30, 99], 2: [7], 3: [1]})

    scores = per_user_metrics(lists, truth, k=5)

    assert scores.loc[1, "recall"] == pytest.approx(2 / 3)
    dcg_1 = 1 / math.log2(2) + 1 / math.log2(4)
    idcg_1 = 1 / math.log2(2) + 1 / math.log2(3) + 1 / math.log2(4)
    assert scores.loc[1, "ndcg"] == pytest.approx(dcg_1 / idcg_1)  # 0.7039
    assert scores.loc[2, "recall"] == 1.0
    assert scores.loc[2, "ndcg"] == pytest.approx((1 / math.log2(3)) / 1.0)  # 0.6309
    assert scores.loc[3, ["recall", "ndcg", "hit"]].tolist() == [0.0, 0.0, 0.0]

    summary = evaluate_lists(
        lists, truth, k=5, catalog_size=100, item_categories=pd.Series(dtype=object)
    )
    assert summary.recall == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert summary.ndcg == pytest.approx((dcg_1 / idcg_1 + 1 / math.log2(3)) / 3)
    assert summary.hit_rate == pytest.approx(2 / 3)
    assert summary.users == 3 and summary.users_with_list == 3


def test_k_cuts_the_list_and_ideal_dcg_uses_min_k_relevant() -> None:
    # 4 relevant items, K = 2: the ideal list has 2 hits, so two hits at the top score 1.0.
    lists = lists_of({1: [1, 2, 3, 4]})
    truth = truth_of({1: [1, 2, 3, 4]})
    at_2 = per_user_metrics(lists, truth, k=2)
    assert at_2.loc[1, "ndcg"] == pytest.approx(1.0)
    assert at_2.loc[1, "recall"] == pytest.approx(0.5)
    # A hit only at rank 2 of K = 2: DCG = 1/log2(3), IDCG = 1 + 1/log2(3).
    shifted = per_user_metrics(lists_of({1: [9, 2]}), truth, k=2)
    assert shifted.loc[1, "ndcg"] == pytest.approx((1 / math.log2(3)) / (1 + 1 / math.log2(3)))


def test_planted_perfect_lists_score_one() -> None:
    rng = np.random.default_rng(3)
    relevant = {
        user: list(rng.choice(1000, size=rng.integers(1, 11), replace=False)) for user in range(50)
    }
    perfect = lists_of({user: [*items, *range(2000, 2030)] for user, items in relevant.items()})
    metrics = evaluate_lists(
        perfect,
        truth_of(relevant),
        k=20,
        catalog_size=3000,
        item_categories=pd.Series(dtype=object),
    )
    assert (metrics.recall, metrics.ndcg, metrics.hit_rate) == (1.0, 1.0, 1.0)


def test_random_lists_score_near_their_expectation() -> None:
    # Random K of N items, r relevant: E[recall] = K / N, E[hit] = 1 - C(N-r, K) / C(N, K).
    rng = np.random.default_rng(11)
    catalog, k, relevant_per_user, users = 500, 20, 5, 2000
    relevant = {
        u: list(rng.choice(catalog, relevant_per_user, replace=False)) for u in range(users)
    }
    random_lists = lists_of({u: list(rng.choice(catalog, k, replace=False)) for u in range(users)})
    metrics = evaluate_lists(
        random_lists,
        truth_of(relevant),
        k=k,
        catalog_size=catalog,
        item_categories=pd.Series(dtype=object),
    )
    assert metrics.recall == pytest.approx(k / catalog, rel=0.1)
    expected_hit = 1 - math.comb(catalog - relevant_per_user, k) / math.comb(catalog, k)
    assert metrics.hit_rate == pytest.approx(expected_hit, rel=0.1)
    assert metrics.coverage > 0.99  # 40k random draws cover a 500-item catalog


def test_missing_or_short_lists_count_as_misses() -> None:
    truth = truth_of({1: [5], 2: [6]})
    metrics = evaluate_lists(
        lists_of({1: [5]}), truth, k=10, catalog_size=10, item_categories=pd.Series(dtype=object)
    )
    assert metrics.users == 2 and metrics.users_with_list == 1
    assert metrics.recall == 0.5


def test_duplicates_count_once_and_ranks_are_made_dense() -> None:
    # A list that repeats its one hit must not score twice; the repeat frees a K slot.
    lists = lists_of({1: [5, 5, 6]})
    assert top_k(lists, 2)["item_id"].tolist() == [5, 6]
    scores = per_user_metrics(lists, truth_of({1: [5, 6]}), k=2)
    assert scores.loc[1, "recall"] == 1.0 and scores.loc[1, "ndcg"] == pytest.approx(1.0)


def test_users_without_relevant_items_are_rejected() -> None:
    with pytest.raises(ValueError, match="no relevant item"):
        per_user_metrics(lists_of({1: [1]}), truth_of({1: [1]}), k=5, users=np.array([1, 2]))


def test_coverage_and_category_diversity() -> None:
    lists = lists_of({1: [1, 2, 3, 4], 2: [1, 2, 9, 9]})
    categories = pd.Series({1: "a", 2: "a", 3: "b", 4: "c"})
    assert catalog_coverage(lists, k=3, catalog_size=10) == pytest.approx(4 / 10)
    # User 1 top 3: a, a, b → 2/3. User 2 top 3 (dedup: 1, 2, 9): a, a, item:9 → 2/3.
    assert category_diversity(lists, k=3, item_categories=categories) == pytest.approx(2 / 3)
