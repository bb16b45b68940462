"""Top-K retrieval by inner product: the `two_tower` candidate source.

On the CPU the items go into a faiss index: `IndexFlatIP` (exact) unless `pipeline.retrieval`
picks `IndexIVFFlat` or `IndexHNSWFlat`, approximate indexes that trade recall (measured by
benchmarks/bench_retrieval.py) for speed on large catalogs. On CUDA the search is exact in
torch: a matrix product and `topk` per chunk of items, memory bounded by
`user_batch × item_chunk` scores.

A bare index search is not yet what the pipeline needs. The wrapper adds:

- per-user exclusions (items consumed or hidden). A faiss search takes one filter for the
  whole batch, so each user is searched deep enough to drop its own (k + 1 + its exclusion
  count). Users whose depths are within a factor of two share one search at the deepest of
  them: few, large searches, which faiss runs with BLAS (from about 2,000 users at d = 64;
  its per-pair kernel for smaller ones is slower);
- one answer for one input. Exactly tied scores (items sharing a vector, such as new items
  of one category) rank by item position, and the last places go to the lowest positions
  among the tied items, where faiss keeps an arbitrary subset (for k >= 100). A user whose
  k-th score ties the deepest result is searched again, twice as deep. Scores that differ
  only by rounding are not ties: faiss's BLAS and per-pair kernels round differently (by
  ~1e-7), so two such items can swap places when a user is searched in a batch of another
  size. The old torch kernel (gemm vs gemv) did the same;
- threads: faiss's OpenMP pool (its own runtime, not torch's) follows torch's thread count,
  the project's one threading knob. An HNSW graph is built on one thread: its parallel
  build depends on thread timing.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import pairwise
from typing import TYPE_CHECKING, Protocol

import faiss
import numpy as np
import pandas as pd
import torch

from recsys_assets.config.settings import RetrievalConfig
from recsys_assets.models.device import pick_device

if TYPE_CHECKING:
    from recsys_assets.models.two_tower import TwoTowerModel

ExcludedPositions = tuple[np.ndarray, np.ndarray]
"""CSR-like exclusions: (indptr [n_users + 1], indices = item positions), per user row."""

_MISSING_POSITION = -1
_TRAINING_ITEMS_PER_CLUSTER = 39
"""faiss k-means wants at least this many training items per IVF cluster."""
_MAX_RESULTS_PER_SEARCH = 1 << 23
"""(user, item) results one faiss call may return (~100 MB): bounds the deep searches that
settle ties when many items share a score."""


class ItemSearch(Protocol):
    """An index over the items of one catalog."""

    def search(self, users: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores float32, positions int64), [n_users, depth], best first; position -1 and
        score -inf past the last item found."""
        ...


class FaissSearch:
    """Items in a faiss index, searched on the CPU with torch's thread count."""

    def __init__(self, index: faiss.Index) -> None:
        self.index = index

    @classmethod
    def build(cls, items: np.ndarray, config: RetrievalConfig) -> FaissSearch:
        n_items, dim = items.shape
        threads = torch.get_num_threads()
        nlist = min(config.ivf.nlist, n_items // _TRAINING_ITEMS_PER_CLUSTER)
        if config.index == "hnsw":
            index = faiss.IndexHNSWFlat(dim, config.hnsw.m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efSearch = config.hnsw.ef_search
            threads = 1
        elif config.index == "ivf" and nlist >= 2:
            index = faiss.IndexIVFFlat(
                faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT
            )
            index.nprobe = min(config.ivf.nprobe, nlist)
        else:  # flat, or a catalog too small for two IVF clusters
            index = faiss.IndexFlatIP(dim)
        with _faiss_threads(threads):
            if not index.is_trained:
                index.train(items)
            index.add(items)
        return cls(index)

    def search(self, users: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
        with _faiss_threads(torch.get_num_threads()):
            scores, positions = self.index.search(users, depth)
        if positions[:, -1].min() < 0:  # "not found" slots trail, with score -FLT_MAX
            scores[positions < 0] = -np.inf
        return scores, positions


class TorchSearch:
    """Items on a torch device (CUDA in the pipeline), searched exactly: a matrix product and
    `topk` per chunk of `item_chunk` items, merged; memory bounded by `user_batch × item_chunk`
    scores."""

    def __init__(
        self, items: np.ndarray, device: torch.device, *, item_chunk: int, user_batch: int = 1024
    ) -> None:
        if item_chunk < 1 or user_batch < 1:
            raise ValueError(
                f"item_chunk ({item_chunk}) and user_batch ({user_batch}) must be >= 1"
            )
        self.device = device
        self.user_batch = user_batch
        self.chunks = [
            torch.from_numpy(items[start : start + item_chunk]).to(device)
            for start in range(0, len(items), item_chunk)
        ]

    def search(self, users: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
        rows = users.shape[0]
        scores = np.empty((rows, depth), dtype=np.float32)
        positions = np.empty((rows, depth), dtype=np.int64)
        for start in range(0, rows, self.user_batch):
            stop = min(start + self.user_batch, rows)
            batch = torch.from_numpy(users[start:stop]).to(self.device)
            best_scores, best_positions = self._top(batch, depth)
            scores[start:stop] = best_scores.cpu().numpy()
            positions[start:stop] = best_positions.cpu().numpy()
        return scores, positions

    def _top(self, batch: torch.Tensor, depth: int) -> tuple[torch.Tensor, torch.Tensor]:
        best_scores = torch.empty((len(batch), 0), device=self.device)
        best_positions = torch.empty((len(batch), 0), dtype=torch.int64, device=self.device)
        offset = 0
        for chunk in self.chunks:
            chunk_scores, chunk_positions = torch.topk(
                batch @ chunk.T, min(depth, len(chunk)), dim=1
            )
            merged_scores = torch.cat((best_scores, chunk_scores), dim=1)
            merged_positions = torch.cat((best_positions, chunk_positions + offset), dim=1)
            best_scores, order = torch.topk(merged_scores, min(depth, merged_scores.shape[1]))
            best_positions = torch.gather(merged_positions, 1, order)
            offset += len(chunk)
        return best_scores, best_positions


@dataclass(frozen=True)
class _BatchExclusions:
    """The excluded (row, position) pairs of one user batch, as sorted row × n_items + position
    codes, and how many each row has."""

    codes: np.ndarray
    counts: np.ndarray
    n_items: int

    @classmethod
    def of(
        cls, exclude: ExcludedPositions | None, start: int, stop: int, n_items: int
    ) -> _BatchExclusions | None:
        if exclude is None:
            return None
        indptr, indices = exclude
        lo, hi = int(indptr[start]), int(indptr[stop])
        if hi == lo:
            return None
        counts = np.diff(indptr[start : stop + 1]).astype(np.int64)
        rows = np.repeat(np.arange(stop - start, dtype=np.int64), counts)
        codes = np.sort(rows * n_items + np.asarray(indices[lo:hi], dtype=np.int64))
        return cls(codes, counts, n_items)

    def contains(self, rows: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Whether each (rows[i], positions[i, j]) is excluded."""
        codes = rows[:, None] * self.n_items + positions
        slot = np.minimum(np.searchsorted(self.codes, codes), len(self.codes) - 1)
        return (positions >= 0) & (self.codes[slot] == codes)


class ItemIndex:
    """The items of one catalog, ready for top-K search by inner product: built once, then
    searched for every shard of subjects."""

    def __init__(self, search: ItemSearch, n_items: int, dim: int) -> None:
        self.search = search
        self.n_items = n_items
        self.dim = dim

    @classmethod
    def build(
        cls,
        item_vectors: np.ndarray,
        config: RetrievalConfig | None = None,
        *,
        device: torch.device | str | None = None,
        item_chunk: int = 50_000,
    ) -> ItemIndex:
        """faiss on the CPU (the index `config` names, flat by default); torch, exact, on any
        other device. `device` None: `pick_device()`."""
        items = _matrix(item_vectors, "item")
        target = pick_device() if device is None else torch.device(device)
        search: ItemSearch
        if target.type == "cpu":
            search = FaissSearch.build(items, config or RetrievalConfig())
        else:
            search = TorchSearch(items, target, item_chunk=item_chunk)
        return cls(search, *items.shape)

    def top_k(
        self,
        user_vectors: np.ndarray,
        k: int,
        *,
        exclude: ExcludedPositions | None = None,
        user_batch: int = 8192,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The k items with the largest inner product per user, best first, equal scores by
        position.

        Returns (positions int64 [n_users, k], scores float32 [n_users, k]): positions index
        the items. Excluded (user, item) pairs never appear; when a user has fewer than k
        items left (or an approximate index finds fewer), the remaining slots hold position
        -1 and score -inf. `user_batch` users are searched together: memory grows with
        user_batch × (k + exclusions), and faiss needs large batches for its BLAS kernel (a
        shard of subjects is one search by default, as a bare faiss call would be).
        """
        users = _matrix(user_vectors, "user")
        if users.shape[1] != self.dim:
            raise ValueError(
                f"user vectors of width {users.shape[1]} against items of width {self.dim}: "
                f"both need the same width"
            )
        if k < 1 or user_batch < 1:
            raise ValueError(f"k={k} and user_batch={user_batch} must be >= 1")
        n_users = users.shape[0]
        width = min(k, self.n_items)
        positions = np.empty((n_users, k), dtype=np.int64)
        scores = np.empty((n_users, k), dtype=np.float32)
        positions[:, width:] = _MISSING_POSITION
        scores[:, width:] = -np.inf
        if width == 0:
            return positions, scores
        # Equal batches: a short last one would fall below faiss's BLAS threshold.
        bounds = np.linspace(0, n_users, -(-n_users // user_batch) + 1).astype(np.int64)
        for start, stop in pairwise(bounds.tolist()):
            self._batch_top_k(
                users[start:stop],
                k,
                _BatchExclusions.of(exclude, start, stop, self.n_items),
                positions[start:stop, :width],
                scores[start:stop, :width],
            )
        return positions, scores

    def _batch_top_k(
        self,
        users: np.ndarray,
        k: int,
        excluded: _BatchExclusions | None,
        positions: np.ndarray,
        scores: np.ndarray,
    ) -> None:
        """`top_k` of one user batch into `positions` and `scores` ([rows, min(k, items)]): a
        first search per depth group, then deeper searches for the users it leaves unsettled."""
        rows, width = positions.shape
        excluded_count = np.zeros(rows, dtype=np.int64) if excluded is None else excluded.counts
        depth = np.minimum(self.n_items, k + 1 + excluded_count)
        pending = np.arange(rows)
        while len(pending):
            unsettled: list[np.ndarray] = []
            doublings = np.ceil(np.log2(depth[pending])).astype(np.int64)
            for doubling in np.unique(doublings):
                group = pending[doublings == doubling]
                group_depth = int(depth[group].max())
                depth[group] = group_depth
                per_call = max(1, _MAX_RESULTS_PER_SEARCH // group_depth)
                for part in np.array_split(group, -(-len(group) // per_call)):
                    part_users = users if len(part) == rows else users[part]
                    found_scores, found_positions = self.search.search(part_users, group_depth)
                    settled = _settle(
                        found_scores, found_positions, k, self.n_items, excluded, part
                    )
                    kept = slice(None) if settled.all() else settled
                    positions[part[kept]] = found_positions[kept, :width]
                    scores[part[kept]] = found_scores[kept, :width]
                    unsettled.append(part[~settled])
            pending = np.concatenate(unsettled)
            depth[pending] = np.minimum(self.n_items, 2 * depth[pending])


def _settle(
    scores: np.ndarray,
    positions: np.ndarray,
    k: int,
    n_items: int,
    excluded: _BatchExclusions | None,
    rows: np.ndarray,
) -> np.ndarray:
    """Drop excluded items and put equal scores in position order, in place; return which rows
    are final.

    A row is final when its search reached every item it could, or when its k-th kept score
    beats the deepest score found: every item at or above the k-th score was then returned,
    so ties at the k-th place are settled by position among items all in hand.
    """
    depth = positions.shape[1]
    deepest = scores[:, -1].copy()
    complete = positions[:, -1] < 0 if depth < n_items else np.ones(len(rows), dtype=bool)
    # Rows to sort by (score descending, position): ties (two trailing "not found" slots count
    # as one, harmlessly) and rows with excluded items to move to the end.
    reorder = (scores[:, 1:] == scores[:, :-1]).any(axis=1)
    if excluded is not None:
        hit = excluded.contains(rows, positions)
        positions[hit] = _MISSING_POSITION
        scores[hit] = -np.inf
        reorder |= hit.any(axis=1)
    reorder = np.flatnonzero(reorder)
    if len(reorder):
        order = np.lexsort((positions[reorder], -scores[reorder]))
        positions[reorder] = np.take_along_axis(positions[reorder], order, axis=1)
        scores[reorder] = np.take_along_axis(scores[reorder], order, axis=1)
    if depth <= k:
        return complete
    return complete | (scores[:, k - 1] > deepest)


def _matrix(vectors: np.ndarray, name: str) -> np.ndarray:
    matrix = np.ascontiguousarray(vectors, dtype=np.float32)
    if matrix.ndim != 2:
        raise ValueError(f"{name} vectors must be 2-D (one row per {name}); got {matrix.shape}")
    return matrix


@contextmanager
def _faiss_threads(count: int) -> Iterator[None]:
    """faiss's OpenMP threads set to `count` for the block (per calling thread), then back."""
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(count)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)


def exact_top_k(
    user_vectors: np.ndarray,
    item_vectors: np.ndarray,
    k: int,
    *,
    item_chunk: int = 50_000,
    user_batch: int = 8192,
    exclude: ExcludedPositions | None = None,
    device: torch.device | str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """`ItemIndex.top_k` over an exact index of `item_vectors` (faiss `IndexFlatIP` on the CPU,
    torch on CUDA), for one-off searches."""
    index = ItemIndex.build(item_vectors, device=device, item_chunk=item_chunk)
    return index.top_k(user_vectors, k, exclude=exclude, user_batch=user_batch)


def exclusions_from_pairs(
    subject_ids: np.ndarray, item_ids: np.ndarray, pairs: pd.DataFrame
) -> ExcludedPositions:
    """CSR exclusions (per row of `subject_ids`, positions in `item_ids`) from id pairs.

    Pairs naming a subject or an item outside the two arrays are ignored.
    """
    subject_order = np.argsort(subject_ids, kind="stable")
    item_order = np.argsort(item_ids, kind="stable")
    pair_subjects = pairs["subject_id"].to_numpy(dtype=np.int64)
    pair_items = pairs["item_id"].to_numpy(dtype=np.int64)
    row = _lookup(subject_ids, subject_order, pair_subjects)
    column = _lookup(item_ids, item_order, pair_items)
    known = (row >= 0) & (column >= 0)
    row, column = row[known], column[known]
    order = np.lexsort((column, row))
    row, column = row[order], column[order]
    indptr = np.zeros(len(subject_ids) + 1, dtype=np.int64)
    np.cumsum(np.bincount(row, minlength=len(subject_ids)), out=indptr[1:])
    return indptr, column


def _lookup(ids: np.ndarray, order: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Position of each wanted id in `ids` (-1 when absent)."""
    if len(ids) == 0:
        return np.full(len(wanted), -1, dtype=np.int64)
    sorted_ids = ids[order]
    slot = np.clip(np.searchsorted(sorted_ids, wanted), 0, len(ids) - 1)
    return np.where(sorted_ids[slot] == wanted, order[slot], -1).astype(np.int64)


class TwoTowerSource:
    """The two_tower candidate source, in the shape `generate_candidates` takes: top-k
    candidate items per subject by two-tower inner product.

    The item index is kept between calls for the same candidate items (every shard of a
    partition has the same), so an IVF or HNSW index is built once per partition.
    """

    def __init__(
        self,
        model: TwoTowerModel,
        *,
        retrieval: RetrievalConfig | None = None,
        item_chunk: int = 50_000,
        device: torch.device | str | None = None,
    ) -> None:
        self.model = model
        self.retrieval = retrieval or RetrievalConfig()
        self.item_chunk = item_chunk
        self.device = device
        self._item_ids: np.ndarray | None = None
        self._index: ItemIndex | None = None

    def __call__(
        self,
        subject_ids: np.ndarray,
        candidate_item_ids: np.ndarray,
        k: int,
        exclude_pairs: pd.DataFrame | None = None,
    ) -> pd.DataFrame:
        """subject_id, item_id, rank_two_tower (int32, 1-based), retrieval_score (float32),
        sorted by subject then rank. k is clipped to the number of candidate items; pairs in
        `exclude_pairs` (subject_id, item_id) are never returned, so a subject with few items
        left gets fewer than k rows."""
        subjects = np.asarray(subject_ids, dtype=np.int64)
        items = np.asarray(candidate_item_ids, dtype=np.int64)
        k = min(int(k), len(items))
        if k < 1 or len(subjects) == 0:
            return _empty_retrieval()
        exclude = (
            exclusions_from_pairs(subjects, items, exclude_pairs)
            if exclude_pairs is not None and len(exclude_pairs)
            else None
        )
        positions, scores = self._index_of(items).top_k(
            self.model.user_embeddings(subjects), k, exclude=exclude
        )
        row, slot = np.nonzero(positions >= 0)
        return pd.DataFrame(
            {
                "subject_id": subjects[row],
                "item_id": items[positions[row, slot]],
                "rank_two_tower": (slot + 1).astype(np.int32),
                "retrieval_score": scores[row, slot].astype(np.float32),
            }
        )

    def _index_of(self, items: np.ndarray) -> ItemIndex:
        if self._index is None or not np.array_equal(self._item_ids, items):
            self._index = ItemIndex.build(
                self.model.item_embeddings(items),
                self.retrieval,
                device=self.device,
                item_chunk=self.item_chunk,
            )
            self._item_ids = items.copy()
        return self._index


def retrieve_two_tower(
    model: TwoTowerModel,
    subject_ids: np.ndarray,
    candidate_item_ids: np.ndarray,
    k: int,
    *,
    exclude_pairs: pd.DataFrame | None = None,
    item_chunk: int = 50_000,
    device: torch.device | str | None = None,
    retrieval: RetrievalConfig | None = None,
) -> pd.DataFrame:
    """One `TwoTowerSource` call (its index is not kept)."""
    source = TwoTowerSource(model, retrieval=retrieval, item_chunk=item_chunk, device=device)
    return source(subject_ids, candidate_item_ids, k, exclude_pairs)


def _empty_retrieval() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "subject_id": pd.Series(dtype="int64"),
            "item_id": pd.Series(dtype="int64"),
            "rank_two_tower": pd.Series(dtype="int32"),
            "retrieval_score": pd.Series(dtype="float32"),
        }
    )


def two_tower_retriever(
    model: TwoTowerModel | None,
    *,
    item_chunk: int,
    retrieval: RetrievalConfig | None = None,
) -> TwoTowerSource | None:
    """The two_tower source over `model` (None: no two-tower source)."""
    if model is None:
        return None
    return TwoTowerSource(model, retrieval=retrieval, item_chunk=item_chunk)
