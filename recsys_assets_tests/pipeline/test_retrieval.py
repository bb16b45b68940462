"""Exact top-K equals brute force (ids and scores, ties by position, with exclusions, k past
the catalog) on faiss and on the torch kernel the GPU runs; tied lists do not depend on the
batch; retrieve_two_tower returns the candidate_pools source frame."""

from __future__ import annotations

import faiss
import numpy as np
import pandas as pd
import pytest
import torch

from recsys_assets.models.two_tower import TwoTowerConfig, TwoTowerModel, train_two_tower
from recsys_assets.pipeline.retrieval import (
    ItemIndex,
    TorchSearch,
    TwoTowerSource,
    exact_top_k,
    exclusions_from_pairs,
    retrieve_two_tower,
)

CPU = torch.device("cpu")


def brute_force(
    users: np.ndarray, items: np.ndarray, k: int, excluded: set[tuple[int, int]]
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (positions, scores) per user by a full numpy sort: score descending, then position;
    excluded pairs removed; -1 / -inf past the last item."""
    scores = users.astype(np.float64) @ items.astype(np.float64).T
    for row, column in excluded:
        scores[row, column] = -np.inf
    columns = np.broadcast_to(np.arange(items.shape[0]), scores.shape)
    order = np.lexsort((columns, -scores))[:, :k]
    top = np.take_along_axis(scores, order, axis=1)
    order = np.where(np.isneginf(top), -1, order)
    pad = k - order.shape[1]
    return (
        np.pad(order, ((0, 0), (0, pad)), constant_values=-1),
        np.pad(top, ((0, 0), (0, pad)), constant_values=-np.inf),
    )


def random_exclusions(
    rng: np.random.Generator, n_users: int, n_items: int, per_user: int
) -> tuple[tuple[np.ndarray, np.ndarray], set[tuple[int, int]]]:
    pairs = {
        (row, int(column))
        for row in range(n_users)
        for column in rng.choice(n_items, size=rng.integers(0, per_user + 1), replace=False)
    }
    rows = np.array(sorted(pairs), dtype=np.int64).reshape(-1, 2)
    indptr = np.zeros(n_users + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows[:, 0], minlength=n_users), out=indptr[1:])
    return (indptr, rows[:, 1]), pairs


def small_integer_vectors(rng: np.random.Generator, count: int, dim: int) -> np.ndarray:
    """Vectors whose inner products are exact in float32 and tie often."""
    return rng.integers(-2, 3, (count, dim)).astype(np.float32)


def flat_index(items: np.ndarray) -> ItemIndex:
    return ItemIndex.build(items, device=CPU)


def torch_index(items: np.ndarray) -> ItemIndex:
    """The kernel CUDA runs, here on the CPU, with chunks and batches that split everything."""
    search = TorchSearch(items, CPU, item_chunk=701, user_batch=13)
    return ItemIndex(search, *items.shape)


@pytest.mark.parametrize("build", [flat_index, torch_index], ids=["faiss_flat", "torch"])
@pytest.mark.parametrize(
    ("n_items", "k", "per_user"),
    [
        (3_000, 150, 40),  # k >= 100: faiss keeps an arbitrary subset of boundary ties
        (3_000, 20, 300),  # exclusions far beyond k
        (400, 400, 30),  # k = every item: the excluded leave a -1 tail
        (60, 100, 10),  # k past the catalog
    ],
)
def test_matches_brute_force_with_ties_and_exclusions(
    build: object, n_items: int, k: int, per_user: int
) -> None:
    rng = np.random.default_rng(n_items + k)
    users = small_integer_vectors(rng, 70, 6)
    items = small_integer_vectors(rng, n_items, 6)
    exclude, excluded = random_exclusions(rng, len(users), n_items, per_user)
    index = build(items)  # type: ignore[operator]
    positions, scores = index.top_k(users, k, exclude=exclude, user_batch=32)
    assert positions.dtype == np.int64 and scores.dtype == np.float32
    expected_positions, expected_scores = brute_force(users, items, k, excluded)
    np.testing.assert_array_equal(positions, expected_positions)
    np.testing.assert_array_equal(scores, expected_scores.astype(np.float32))


def test_continuous_scores_match_brute_force() -> None:
    rng = np.random.default_rng(5)
    users = rng.standard_normal((90, 16)).astype(np.float32)
    items = rng.standard_normal((20_000, 16)).astype(np.float32)
    exclude, excluded = random_exclusions(rng, len(users), len(items), per_user=40)
    positions, scores = exact_top_k(users, items, 200, exclude=exclude, device=CPU)
    _, expected = brute_force(users, items, 200, excluded)
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-5)
    rows = np.repeat(np.arange(len(users)), 200)
    np.testing.assert_allclose(
        np.einsum("ij,ij->i", users[rows], items[positions.ravel()]), scores.ravel(), rtol=1e-5
    )
    assert not {(int(r), int(c)) for r, c in zip(rows, positions.ravel(), strict=True)} & excluded


@pytest.mark.parametrize("build", [flat_index, torch_index], ids=["faiss_flat", "torch"])
def test_tied_lists_do_not_depend_on_the_batch(build: object) -> None:
    """Exact ties (exact scores here) settle the same whoever shares the search, and a second
    call answers the same."""
    rng = np.random.default_rng(8)
    users = small_integer_vectors(rng, 300, 5)
    index = build(small_integer_vectors(rng, 5_000, 5))  # type: ignore[operator]
    together = index.top_k(users, 120, user_batch=300)
    for user_batch in (1, 7, 300):
        alone = index.top_k(users, 120, user_batch=user_batch)
        np.testing.assert_array_equal(alone[0], together[0])
        np.testing.assert_array_equal(alone[1], together[1])


def test_faiss_follows_torch_threads_and_leaves_its_own_setting() -> None:
    """torch's thread count is the one knob; the answer does not depend on it."""
    rng = np.random.default_rng(2)
    users = rng.standard_normal((50, 16)).astype(np.float32)
    items = rng.standard_normal((4_000, 16)).astype(np.float32)
    previous_torch, previous_faiss = torch.get_num_threads(), faiss.omp_get_max_threads()
    answers = []
    try:
        faiss.omp_set_num_threads(3)
        for threads in (1, 2):
            torch.set_num_threads(threads)
            answers.append(exact_top_k(users, items, 40, device=CPU))
            assert faiss.omp_get_max_threads() == 3
    finally:
        torch.set_num_threads(previous_torch)
        faiss.omp_set_num_threads(previous_faiss)
    np.testing.assert_array_equal(answers[0][0], answers[1][0])
    np.testing.assert_array_equal(answers[0][1], answers[1][1])


def test_bad_arguments_are_errors() -> None:
    users = np.ones((2, 4), dtype=np.float32)
    items = np.ones((3, 4), dtype=np.float32)
    with pytest.raises(ValueError, match="k=0"):
        exact_top_k(users, items, 0, device=CPU)
    with pytest.raises(ValueError, match="same width"):
        exact_top_k(users, np.ones((3, 5), dtype=np.float32), 1, device=CPU)
    with pytest.raises(ValueError, match="2-D"):
        exact_top_k(users[0], items, 1, device=CPU)


def test_exclusions_from_pairs_ignores_unknown_ids() -> None:
    pairs = pd.DataFrame({"subject_id": [7, 7, 9, 5, 7], "item_id": [30, 10, 10, 10, 99]})
    indptr, indices = exclusions_from_pairs(
        np.array([9, 7], dtype=np.int64), np.array([10, 20, 30], dtype=np.int64), pairs
    )
    assert indptr.tolist() == [0, 1, 3]
    assert indices.tolist() == [0, 0, 2]


@pytest.fixture(scope="module")
def model() -> TwoTowerModel:
    rng = np.random.default_rng(4)
    cutoff = pd.Timestamp("2026-11-01")
    interactions = pd.DataFrame(
        {
            "user_id": rng.integers(0, 50, 2_000),
            "item_id": rng.integers(0, 80, 2_000),
            "event_type": "click",
            "value": 1.0,
            "ts": cutoff - pd.to_timedelta(rng.integers(1, 10**6, 2_000), unit="s"),
        }
    )
    items = pd.DataFrame({"item_id": np.arange(100), "category": [f"c{i % 7}" for i in range(100)]})
    config = TwoTowerConfig(embedding_dim=8, epochs=1, min_steps=5)
    return train_two_tower(interactions, items, cutoff=cutoff, config=config, device=CPU).model


def test_retrieve_two_tower_schema_ranks_and_exclusions(model: TwoTowerModel) -> None:
    subjects = np.array([3, 4, 123_456], dtype=np.int64)  # the last one is a cold user
    candidates = np.arange(10, 100, dtype=np.int64)
    blocked = pd.DataFrame({"subject_id": [3, 3, 999], "item_id": [10, 11, 12]})
    frame = retrieve_two_tower(model, subjects, candidates, 25, exclude_pairs=blocked, device=CPU)
    assert list(frame.columns) == ["subject_id", "item_id", "rank_two_tower", "retrieval_score"]
    assert frame.dtypes.astype(str).tolist() == ["int64", "int64", "int32", "float32"]
    assert frame.groupby("subject_id").size().to_dict() == {3: 25, 4: 25, 123_456: 25}
    assert frame["item_id"].isin(candidates).all()
    assert not ((frame["subject_id"] == 3) & frame["item_id"].isin([10, 11])).any()
    for _, group in frame.groupby("subject_id"):
        assert group["rank_two_tower"].tolist() == list(range(1, 26))
        assert group["retrieval_score"].is_monotonic_decreasing
    expected = (model.user_embeddings(np.array([4])) @ model.item_embeddings(candidates).T).ravel()
    best = frame[frame["subject_id"] == 4]["retrieval_score"].to_numpy()
    np.testing.assert_allclose(best, np.sort(expected)[::-1][:25], rtol=1e-5, atol=1e-6)


def test_retrieve_two_tower_clips_k_and_handles_empty_inputs(model: TwoTowerModel) -> None:
    candidates = np.array([1, 2, 3], dtype=np.int64)
    blocked = pd.DataFrame({"subject_id": [5], "item_id": [2]})
    frame = retrieve_two_tower(
        model, np.array([5, 6], dtype=np.int64), candidates, 500, exclude_pairs=blocked
    )
    assert frame.groupby("subject_id").size().to_dict() == {5: 2, 6: 3}
    empty = retrieve_two_tower(model, np.array([], dtype=np.int64), candidates, 10)
    assert empty.empty and list(empty.columns) == list(frame.columns)
    assert retrieve_two_tower(model, np.array([5]), np.array([], dtype=np.int64), 10).empty


def test_two_tower_source_answers_each_shard_as_one_call(model: TwoTowerModel) -> None:
    """The source keeps its index between shards and rebuilds it for other candidate items."""
    source = TwoTowerSource(model, device=CPU)
    subjects = np.arange(40, dtype=np.int64)
    candidates = np.arange(5, 95, dtype=np.int64)
    whole = retrieve_two_tower(model, subjects, candidates, 30, device=CPU)
    shards = pd.concat(
        [source(subjects[:17], candidates, 30), source(subjects[17:], candidates, 30)],
        ignore_index=True,
    )
    pd.testing.assert_frame_equal(shards, whole)
    fewer = source(subjects[:5], candidates[:20], 30)
    assert fewer["item_id"].isin(candidates[:20]).all() and len(fewer) == 5 * 20
