"""Exact top-K equals a brute-force numpy reference (with exclusions, across user batches and
depth groups), is canonical (equal scores by item position, the same answer from the faiss
search, the torch search and a full scan), and retrieve_two_tower returns the
candidate_pools source frame. The approximate IVF and HNSW indexes return k canonical items
per user at a recall floor, and a retriever builds its index once."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from recsys_assets.config.settings import RetrievalConfig
from recsys_assets.models.two_tower import TwoTowerConfig, TwoTowerModel, train_two_tower
from recsys_assets.pipeline import retrieval
from recsys_assets.pipeline.retrieval import (
    exact_top_k,
    exclusions_from_pairs,
    retrieve_two_tower,
    two_tower_retriever,
)

CPU = torch.device("cpu")


def brute_force(
    users: np.ndarray, items: np.ndarray, k: int, excluded: set[tuple[int, int]]
) -> np.ndarray:
    """Top-k scores per user by a full numpy sort, excluded pairs removed (-inf padded)."""
    scores = users.astype(np.float64) @ items.astype(np.float64).T
    for row, column in excluded:
        scores[row, column] = -np.inf
    return -np.sort(-scores, axis=1)[:, :k]


def canonical_reference(
    users: np.ndarray, items: np.ndarray, k: int, excluded: set[tuple[int, int]]
) -> tuple[np.ndarray, np.ndarray]:
    """The canonical answer by a full numpy scan: every (user, item) pair scored by the
    rescoring's computation (float32, one einsum inner loop over the width; here over a
    broadcast view, not gathered vectors), sorted by (score desc, position asc)."""
    n_users, (n_items, dim) = len(users), items.shape
    scores = np.einsum(
        "ijd,id->ij", np.broadcast_to(items, (n_users, n_items, dim)), users, optimize=False
    )
    for row, column in excluded:
        scores[row, column] = -np.inf
    order = np.lexsort((np.broadcast_to(np.arange(n_items), scores.shape), -scores))[:, :k]
    top = np.take_along_axis(scores, order, axis=1)
    return np.where(np.isneginf(top), -1, order), top


def random_exclusions(
    rng: np.random.Generator, n_users: int, n_items: int, most: int
) -> tuple[tuple[np.ndarray, np.ndarray], set[tuple[int, int]]]:
    """0 to `most` excluded items per user (so users need searches of different depths)."""
    pairs = {
        (row, int(column))
        for row in range(n_users)
        for column in rng.choice(n_items, size=rng.integers(0, most + 1), replace=False)
    }
    rows = np.array(sorted(pairs), dtype=np.int64).reshape(-1, 2)
    indptr = np.zeros(n_users + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows[:, 0], minlength=n_users), out=indptr[1:])
    return (indptr, rows[:, 1]), pairs


@pytest.fixture(params=["faiss", "torch"])
def search(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The search behind exact_top_k on the CPU: faiss (the default), or the torch search
    CUDA runs, here on the CPU with small item chunks and user batches (merged top-k)."""
    if request.param == "torch":
        monkeypatch.setattr(
            retrieval,
            "_faiss_search",
            lambda items, threads: retrieval._torch_search(
                items, CPU, item_chunk=97, user_batch=29
            ),
        )
    return str(request.param)


@pytest.mark.parametrize(
    ("n_items", "k", "user_batch"),
    [
        (20_000, 50, 64),  # several user batches; two depth groups (0-40 exclusions)
        (20_000, 50, 37),  # ragged user batches
        (1_000, 30, 16),  # exclusions past k
        (300, 300, 1_000),  # k = every item: searched to the end, slots left empty
    ],
)
def test_matches_brute_force_with_exclusions(
    search: str, n_items: int, k: int, user_batch: int
) -> None:
    rng = np.random.default_rng(n_items + k)
    users = rng.standard_normal((90, 16)).astype(np.float32)
    items = rng.standard_normal((n_items, 16)).astype(np.float32)
    exclude, excluded = random_exclusions(rng, len(users), n_items, most=40)
    positions, scores = exact_top_k(
        users, items, k, user_batch=user_batch, exclude=exclude, device=CPU
    )
    assert positions.shape == scores.shape == (len(users), k)
    assert positions.dtype == np.int64 and scores.dtype == np.float32
    expected = brute_force(users, items, k, excluded)
    finite = np.isfinite(expected)
    np.testing.assert_allclose(scores[finite], expected[finite], rtol=1e-4, atol=1e-4)
    # Slots past a user's remaining items are -inf with position -1.
    assert (positions[~finite] == -1).all() and np.isneginf(scores[~finite]).all()
    # Positions point at the items with those scores, no repeats, nothing excluded.
    found = positions[finite]
    rows = np.nonzero(finite)[0]
    np.testing.assert_allclose(
        np.einsum("ij,ij->i", users[rows], items[found]), scores[finite], rtol=1e-4, atol=1e-4
    )
    assert not {(int(r), int(c)) for r, c in zip(rows, found, strict=True)} & excluded
    assert all(len(set(row[row >= 0])) == (row >= 0).sum() for row in positions)
    assert (np.diff(np.nan_to_num(scores, neginf=-1e30), axis=1) <= 0).all()
    # And bit for bit the canonical full scan's answer.
    reference_positions, reference_scores = canonical_reference(users, items, k, excluded)
    np.testing.assert_array_equal(positions, reference_positions)
    np.testing.assert_array_equal(scores, reference_scores)


def tied_catalog(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(users, items, the positions of a 300-item tie group): items of three "cold
    categories" (300, 40 and 5 items) share one vector each, scattered over the catalog;
    the first 60 users point at the big group (3× longer than the other vectors), so their
    k-th place falls inside it."""
    dim = 16
    items = rng.standard_normal((3_000, dim)).astype(np.float32)
    scattered = rng.permutation(len(items))
    big, forty, five = scattered[:300], scattered[300:340], scattered[340:345]
    for slots, length in ((big, 3.0), (forty, 1.0), (five, 1.0)):
        items[slots] = length * rng.standard_normal(dim).astype(np.float32)
    users = rng.standard_normal((150, dim)).astype(np.float32)
    users[:60] = 4 * items[big[0]] + 0.1 * users[:60]
    return users, items, np.sort(big)


def test_equal_vectors_tie_exactly_and_rank_by_position(search: str) -> None:
    users, items, big = tied_catalog(np.random.default_rng(7))
    k = 50
    exclude, excluded = random_exclusions(np.random.default_rng(8), len(users), len(items), 20)
    positions, scores = exact_top_k(users, items, k, exclude=exclude, device=CPU)
    reference_positions, reference_scores = canonical_reference(users, items, k, excluded)
    np.testing.assert_array_equal(positions, reference_positions)
    np.testing.assert_array_equal(scores, reference_scores)
    # The users pointing at the big group get its lowest positions they have not excluded,
    # all with one score.
    for row in range(60):
        allowed = [int(p) for p in big if (row, int(p)) not in excluded]
        assert positions[row].tolist() == allowed[:k]
        assert len(set(scores[row].tolist())) == 1


def test_answer_does_not_depend_on_batches_or_rescoring_chunks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    users, items, _ = tied_catalog(np.random.default_rng(9))
    exclude, _ = random_exclusions(np.random.default_rng(10), len(users), len(items), 30)
    first = exact_top_k(users, items, 120, exclude=exclude, device=CPU)
    # One user per search, and a few items per rescoring call.
    monkeypatch.setattr(retrieval, "_RESCORE_FLOATS", 100)
    second = exact_top_k(users, items, 120, user_batch=1, exclude=exclude, device=CPU)
    for ours, theirs in zip(first, second, strict=True):
        np.testing.assert_array_equal(ours, theirs)


def test_fewer_items_left_than_k_and_no_users() -> None:
    rng = np.random.default_rng(11)
    users = rng.standard_normal((3, 4)).astype(np.float32)
    items = rng.standard_normal((6, 4)).astype(np.float32)
    exclude = (np.array([0, 4, 4, 6]), np.array([0, 2, 3, 5, 1, 4]))
    positions, scores = exact_top_k(users, items, 5, exclude=exclude, device=CPU)
    assert (positions[0, 2:] == -1).all() and np.isneginf(scores[0, 2:]).all()
    assert sorted(positions[0, :2].tolist()) == [1, 4]
    assert (positions[1] >= 0).all()
    assert positions[2, 4] == -1 and sorted(positions[2, :4].tolist()) == [0, 2, 3, 5]
    no_users, no_scores = exact_top_k(users[:0], items, 5, device=CPU)
    assert no_users.shape == no_scores.shape == (0, 5)


def test_k_out_of_range_and_mismatched_widths_are_errors() -> None:
    users = np.ones((2, 4), dtype=np.float32)
    items = np.ones((3, 4), dtype=np.float32)
    with pytest.raises(ValueError, match="k=4"):
        exact_top_k(users, items, 4, device=CPU)
    with pytest.raises(ValueError, match="same width"):
        exact_top_k(users, np.ones((3, 5), dtype=np.float32), 1, device=CPU)


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


APPROXIMATE = {
    "ivf": RetrievalConfig.model_validate({"index": "ivf", "ivf": {"nlist": 64, "nprobe": 8}}),
    "hnsw": RetrievalConfig.model_validate({"index": "hnsw", "hnsw": {"m": 16, "ef_search": 64}}),
}


def clustered(rng: np.random.Generator, count: int, centres: np.ndarray) -> np.ndarray:
    """Unit vectors scattered around random cluster centres (as trained embeddings are)."""
    vectors = centres[rng.integers(0, len(centres), count)]
    vectors = vectors + 0.5 * rng.standard_normal(vectors.shape).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def counting(monkeypatch: pytest.MonkeyPatch, name: str) -> list[int]:
    """Calls of retrieval.`name` from now on, one entry each."""
    calls: list[int] = []
    original = getattr(retrieval, name)

    def counted(*args: object, **kwargs: object) -> object:
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(retrieval, name, counted)
    return calls


@pytest.mark.parametrize("index", ["ivf", "hnsw"])
def test_approximate_index_returns_k_canonical_items_at_a_recall_floor(
    index: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(21)
    centres = rng.standard_normal((32, 16)).astype(np.float32)
    users, items = clustered(rng, 300, centres), clustered(rng, 8_000, centres)
    k = 100
    exclude, excluded = random_exclusions(rng, len(users), len(items), most=30)
    full_scans = counting(monkeypatch, "_full_scan")
    positions, scores = exact_top_k(
        users, items, k, exclude=exclude, device=CPU, retrieval=APPROXIMATE[index]
    )
    # The index's candidates are kept: no user falls back to the full scan.
    assert not full_scans
    assert positions.shape == scores.shape == (len(users), k)
    assert (positions >= 0).all()
    assert all(len(set(row.tolist())) == k for row in positions)
    rows = np.repeat(np.arange(len(users)), k)
    assert not {(int(r), int(c)) for r, c in zip(rows, positions.ravel(), strict=True)} & excluded
    # Canonical scores (a numpy dot product of the two vectors) in canonical order.
    gathered = items[positions]
    np.testing.assert_array_equal(scores, np.einsum("ijd,id->ij", gathered, users, optimize=False))
    falls = np.diff(scores, axis=1)
    assert (falls <= 0).all()
    assert (np.diff(positions, axis=1)[falls == 0] > 0).all()
    exact_positions, _ = exact_top_k(users, items, k, exclude=exclude, device=CPU)
    recall = np.mean(
        [len(set(a) & set(b)) / k for a, b in zip(positions, exact_positions, strict=True)]
    )
    assert recall >= 0.98, recall  # measured: ivf 0.999, hnsw 0.998


def test_a_user_the_index_leaves_short_of_k_is_scanned_in_full(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rng = np.random.default_rng(22)
    centres = rng.standard_normal((32, 16)).astype(np.float32)
    users, items = clustered(rng, 60, centres), clustered(rng, 4_000, centres)
    # One cluster of ~60 items searched per user: too few for k = 150.
    config = RetrievalConfig.model_validate({"index": "ivf", "ivf": {"nlist": 64, "nprobe": 1}})
    full_scans = counting(monkeypatch, "_full_scan")
    positions, scores = exact_top_k(users, items, 150, device=CPU, retrieval=config)
    assert 0 < len(full_scans) < len(users)  # measured: 57 of 60
    assert (positions >= 0).all()
    # Those users got the exact answer.
    reference_positions, reference_scores = canonical_reference(users, items, 150, set())
    exact_rows = (positions == reference_positions).all(axis=1)
    assert exact_rows.sum() >= len(full_scans)
    np.testing.assert_array_equal(scores[exact_rows], reference_scores[exact_rows])


@pytest.mark.parametrize("index", ["ivf", "hnsw"])
def test_approximate_search_of_every_item_is_the_exact_answer(index: str) -> None:
    """k = every item (IVF: a catalog too small for two clusters, searched exactly), with
    exclusions: each user gets all its items, in canonical order."""
    rng = np.random.default_rng(23)
    users = rng.standard_normal((40, 8)).astype(np.float32)
    items = rng.standard_normal((70, 8)).astype(np.float32)
    exclude, excluded = random_exclusions(rng, len(users), len(items), most=20)
    positions, scores = exact_top_k(
        users, items, 70, exclude=exclude, device=CPU, retrieval=APPROXIMATE[index]
    )
    reference_positions, reference_scores = canonical_reference(users, items, 70, excluded)
    np.testing.assert_array_equal(positions, reference_positions)
    np.testing.assert_array_equal(scores, reference_scores)


def test_flat_is_the_default_and_builds_no_index(monkeypatch: pytest.MonkeyPatch) -> None:
    builds = counting(monkeypatch, "_build_index")
    users, items, _ = tied_catalog(np.random.default_rng(24))
    positions, scores = exact_top_k(users, items, 60, device=CPU, retrieval=RetrievalConfig())
    reference_positions, reference_scores = canonical_reference(users, items, 60, set())
    np.testing.assert_array_equal(positions, reference_positions)
    np.testing.assert_array_equal(scores, reference_scores)
    assert not builds


@pytest.mark.parametrize("index", ["ivf", "hnsw"])
def test_a_retriever_builds_its_index_once_per_catalog(
    index: str, model: TwoTowerModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(retrieval, "pick_device", lambda: CPU)
    builds = counting(monkeypatch, "_build_index")
    two_tower = two_tower_retriever(model, item_chunk=1_000, retrieval=APPROXIMATE[index])
    assert two_tower is not None
    candidates = np.arange(100, dtype=np.int64)
    blocked = pd.DataFrame({"subject_id": [3], "item_id": [10]})
    for shard in (np.array([1, 2, 3]), np.array([4, 5]), np.array([3, 6, 7])):
        frame = two_tower(shard, candidates, 20, blocked)
        assert frame.groupby("subject_id").size().tolist() == [20] * len(shard)
    assert len(builds) == 1
    two_tower(np.array([1]), candidates[:90], 20, blocked)
    assert len(builds) == 2


def test_another_device_runs_the_exact_search_whatever_the_index(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A CUDA target searches exactly in torch (here on the CPU) and builds no index."""
    builds = counting(monkeypatch, "_build_index")
    torch_search = retrieval._torch_search
    monkeypatch.setattr(
        retrieval,
        "_torch_search",
        lambda items, device, **sizes: torch_search(items, CPU, **sizes),
    )
    users, items, _ = tied_catalog(np.random.default_rng(25))
    positions, scores = exact_top_k(users, items, 60, device="cuda", retrieval=APPROXIMATE["hnsw"])
    reference_positions, reference_scores = canonical_reference(users, items, 60, set())
    np.testing.assert_array_equal(positions, reference_positions)
    np.testing.assert_array_equal(scores, reference_scores)
    assert not builds
