"""The approximate indexes (IVF, HNSW) against the exact one on clustered data, and the
`pipeline.retrieval` configuration that picks them."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
import yaml

from recsys_assets.config.settings import (
    DEFAULT_CONFIG_PATH,
    ConfigError,
    RetrievalConfig,
    settings_from_mapping,
)
from recsys_assets.pipeline.retrieval import ItemIndex

CPU = torch.device("cpu")
K = 100
MIN_RECALL = 0.9
"""recall@100 against the flat index; these settings measured 0.97 (IVF) and 0.98 (HNSW)."""
APPROXIMATE = {
    "ivf": RetrievalConfig(index="ivf", ivf={"nlist": 128, "nprobe": 16}),
    "hnsw": RetrievalConfig(index="hnsw", hnsw={"m": 16, "ef_search": 200}),
}


def clustered_unit_vectors(
    rng: np.random.Generator, centres: np.ndarray, count: int, spread: float = 0.2
) -> np.ndarray:
    """Unit vectors around random cluster centres, the shape trained embeddings have."""
    picked = centres[rng.integers(0, len(centres), count)]
    vectors = picked + spread * rng.standard_normal(picked.shape)
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def catalog() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(users, items, exact top-K positions)."""
    rng = np.random.default_rng(3)
    centres = rng.standard_normal((64, 32))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    users = clustered_unit_vectors(rng, centres, 300)
    items = clustered_unit_vectors(rng, centres, 20_000)
    exact, _ = ItemIndex.build(items, device=CPU).top_k(users, K)
    return users, items, exact


@pytest.mark.parametrize("name", sorted(APPROXIMATE))
def test_approximate_recall_against_flat(
    catalog: tuple[np.ndarray, np.ndarray, np.ndarray], name: str
) -> None:
    users, items, exact = catalog
    index = ItemIndex.build(items, APPROXIMATE[name], device=CPU)
    positions, scores = index.top_k(users, K)
    recall = np.mean([len(np.intersect1d(a, b)) / K for a, b in zip(positions, exact, strict=True)])
    assert recall >= MIN_RECALL, f"{name} recall@{K} {recall:.3f} < {MIN_RECALL}"
    assert (np.diff(scores, axis=1) <= 0).all()
    # A second build answers the same: the index is part of what makes a list repeatable.
    again = ItemIndex.build(items, APPROXIMATE[name], device=CPU).top_k(users, K)
    np.testing.assert_array_equal(again[0], positions)


@pytest.mark.parametrize("name", sorted(APPROXIMATE))
def test_approximate_indexes_honour_exclusions(
    catalog: tuple[np.ndarray, np.ndarray, np.ndarray], name: str
) -> None:
    users, items, exact = catalog
    # Exclude each user's exact top 30: none may come back.
    indptr = np.arange(0, 30 * len(users) + 1, 30, dtype=np.int64)
    indices = np.sort(exact[:, :30], axis=1).ravel()
    index = ItemIndex.build(items, APPROXIMATE[name], device=CPU)
    positions, _ = index.top_k(users, K, exclude=(indptr, indices))
    for row, found in enumerate(positions):
        assert not np.isin(found, exact[row, :30]).any()
        assert (found >= 0).sum() == K


def test_ivf_on_a_catalog_too_small_to_cluster_is_exact() -> None:
    rng = np.random.default_rng(1)
    users = rng.standard_normal((5, 8)).astype(np.float32)
    items = rng.standard_normal((50, 8)).astype(np.float32)  # < 2 × 39 training items
    approximate = ItemIndex.build(items, APPROXIMATE["ivf"], device=CPU).top_k(users, 10)
    exact = ItemIndex.build(items, device=CPU).top_k(users, 10)
    np.testing.assert_array_equal(approximate[0], exact[0])


def packaged_with_retrieval(retrieval: dict[str, Any]) -> dict[str, Any]:
    data = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text(encoding="utf-8"))
    data["pipeline"]["retrieval"] = retrieval
    return data


def test_packaged_configuration_searches_exactly() -> None:
    data = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text(encoding="utf-8"))
    assert settings_from_mapping(data).pipeline.retrieval.index == "flat"


@pytest.mark.parametrize(
    ("retrieval", "message"),
    [
        ({"index": "annoy"}, "pipeline.retrieval.index: Input should be 'flat', 'ivf' or 'hnsw'"),
        ({"index": "ivf", "ivf": {"nlist": 16, "nprobe": 32}}, "pipeline.retrieval.ivf: nprobe"),
        ({"ivf": {"nlist": 0}}, "pipeline.retrieval.ivf.nlist: Input should be greater than"),
        ({"hnsw": {"m": 1}}, "pipeline.retrieval.hnsw.m: Input should be greater than"),
        ({"hnsw": {"ef_search": 0}}, "pipeline.retrieval.hnsw.ef_search: Input should be"),
        ({"hnsw": {"efSearch": 64}}, "pipeline.retrieval.hnsw.efSearch: unknown key"),
    ],
)
def test_bad_index_settings_name_the_key(retrieval: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        settings_from_mapping(packaged_with_retrieval(retrieval), "surfaces.yaml")
    assert message in str(raised.value)
