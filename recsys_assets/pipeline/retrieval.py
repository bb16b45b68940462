"""Top-K retrieval by inner product: the `two_tower` candidate source.

By default (`pipeline.retrieval.index: flat`) every subject's vector is searched against
every candidate item (exact, no approximate index to build, tune or let drift): faiss
`IndexFlatIP` on the CPU, a matrix product and `topk` per item chunk in torch on any other
device (CUDA in the pipeline). Faiss's selection is faster than the hand-written staged
torch selection this replaces, which reached only 0.87-0.88× bare faiss.

A search's answer is not yet the pipeline's: faiss and torch sum a dot product in
different orders (scores differ in the last bit) and choose differently among equal
scores. Cold items of one category share a vector, so such ties are common at the last
slots, and swapping them alone moved the ml-100k evaluation from 1.11× to 1.06× of EASE
(commit 4fd4ffe, reverted). So the wrapper makes one canonical answer of either search:

- the search returns each user's best k + `_SEARCH_MARGIN` + (its exclusion count) items;
- every returned (user, item) pair is rescored by `_canonical_scores`: float32 vectors,
  one `einsum` accumulating over the vector width, the same computation for every pair,
  so a score depends only on the two vectors (identical item vectors score
  bit-identically, whichever device, batch or slot found them);
- results are ordered by (score desc, item position asc), excluded pairs dropped, and the
  first k kept;
- a user is final when its k-th kept score beats the deepest searched score by more than
  the rounding error two float32 dot products can differ by (`_rounding_slack`): no item
  left unsearched can then reach the k-th place. Otherwise (a tie group running past the
  margin, or exclusions the search could not see past) the user is scored canonically
  against the whole catalog (`_full_scan`).

The exact answer is therefore a full canonical scan's, whatever searched. It costs:
rescoring, ordering and settling 5,000 users × 516 items at d = 64 took 0.12-0.19 s on one
thread against 3.4-4.2 s for the search itself (4-5%); benchmarks/bench_retrieval.py
measured 0.81-1.56× bare faiss on a shared 2-core machine (docs/BENCHMARKS.md). On ml-100k
the lists stayed at 1.12× / 1.13× EASE's Recall / nDCG@20.

`index: ivf | hnsw` searches a faiss `IndexIVFFlat` or `IndexHNSWFlat` instead, on the CPU
only (any other device runs the exact torch search, whatever the configuration). Building
one takes seconds, so a retriever keeps it for every later call with the same items
(`IndexCache`). Its results go through the same rescoring and ordering (a pair's score is
bit for bit the exact answer's), but no bound settles them: an approximate search may miss
any item, and checking would scan nearly every user in full, which is the cost the index
exists to avoid. So an approximate answer is the index's candidates, canonically scored
and ordered; only a user left with fewer than k items after its exclusions, while it has
more items not excluded, is scanned in full. benchmarks/bench_retrieval.py, 5,000 users ×
100k items around 256 cluster centres, d = 64, k = 500, one thread: flat 928 users/s;
ivf (nlist 1024, nprobe 64) 3,058 users/s at recall@500 0.997 after a 9.5 s build; hnsw
(m 32, ef_search 512) 1,290 users/s at recall 0.955 after a 6.8 s build. On uniform
random vectors (no neighbourhoods, the worst case; 2,000 users) ivf kept 0.363 of the exact
items and hnsw 0.909 at half flat's speed: measure on the model's own embeddings first.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from itertools import pairwise
from typing import TYPE_CHECKING

import faiss
import numpy as np
import pandas as pd
import torch

from recsys_assets.config.settings import RetrievalConfig
from recsys_assets.models.device import pick_device
from recsys_assets.pipeline.threads import thread_share

if TYPE_CHECKING:
    from recsys_assets.models.two_tower import TwoTowerModel

ExcludedPositions = tuple[np.ndarray, np.ndarray]
"""CSR-like exclusions: (indptr [n_users + 1], indices = item positions), per user row."""

Search = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]
"""(users [n, d], depth) -> (scores float32, positions int64), [n, depth], best first by the
search's own arithmetic."""

_MISSING_POSITION = -1
_SEARCH_MARGIN = 16
"""Items searched past k (and a user's exclusions). Random unit vectors at d = 64 and 100k
items leave ~1e-3 between the k-th and the (k + 16)-th score at k = 500, a hundred times
the rounding slack, so only ties send a user to the full scan."""
_RESCORE_FLOATS = 1 << 18
"""Gathered item floats per `einsum` call (1 MiB, cache-sized): 4-8 users × 516 items at
d = 64 rescored 5,000 users in 0.09-0.11 s, 64 users (8 MiB) in 0.11-0.12 s."""
_UNIT_ROUNDOFF = 2.0**-24
"""float32's unit roundoff."""
_TRAINING_ITEMS_PER_CLUSTER = 39
"""faiss k-means wants at least this many training items per IVF cluster."""
_FLAT = RetrievalConfig()
"""The default: the exact search."""


def exact_top_k(
    user_vectors: np.ndarray,
    item_vectors: np.ndarray,
    k: int,
    *,
    item_chunk: int = 50_000,
    user_batch: int = 4096,
    exclude: ExcludedPositions | None = None,
    device: torch.device | str | None = None,
    retrieval: RetrievalConfig = _FLAT,
    indexes: IndexCache | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The k items with the largest inner product per user, best first, equal scores by
    item position: exactly, unless `retrieval` picks an approximate index (CPU only).

    Returns (positions int64 [n_users, k], scores float32 [n_users, k]): positions index
    `item_vectors`, scores are `_canonical_scores`, the same whichever device searched.
    Excluded (user, item) pairs never appear; when a user has fewer than k items left, the
    remaining slots hold position -1 and score -inf. `user_batch` users are searched
    together; on a torch device scores are computed `user_batch × item_chunk` at a time.
    An approximate index is taken from `indexes` (built there unless it holds the one for
    these items), or built for this call alone.
    """
    users = np.ascontiguousarray(user_vectors, dtype=np.float32)
    items = np.ascontiguousarray(item_vectors, dtype=np.float32)
    if users.ndim != 2 or items.ndim != 2 or users.shape[1] != items.shape[1]:
        raise ValueError(
            f"exact_top_k needs 2-D user and item vectors of the same width; got "
            f"users {users.shape} and items {items.shape}"
        )
    n_users, n_items = users.shape[0], items.shape[0]
    if not 1 <= k <= n_items:
        raise ValueError(f"exact_top_k: k={k} must be between 1 and the {n_items} items")
    if item_chunk < 1 or user_batch < 1:
        raise ValueError(f"item_chunk ({item_chunk}) and user_batch ({user_batch}) must be >= 1")
    target = pick_device() if device is None else torch.device(device)
    positions = np.empty((n_users, k), dtype=np.int64)  # every row is written below
    scores = np.empty((n_users, k), dtype=np.float32)
    if n_users == 0:
        return positions, scores
    index = (
        (indexes or IndexCache()).index_for(items, retrieval)
        if target.type == "cpu" and retrieval.index != "flat"
        else None
    )
    # Inside a shard step's block of subjects, that block's share of the threads.
    threads = thread_share(torch.get_num_threads())
    if index is not None:
        search = _index_search(index, retrieval, threads)
    elif target.type == "cpu":
        search = _faiss_search(items, threads)
    else:
        search = _torch_search(items, target, item_chunk=item_chunk, user_batch=user_batch)
    # An approximate search has no bound to settle by: None.
    slack = None if index is not None else _rounding_slack(users, items)
    with ThreadPoolExecutor(threads) if threads > 1 else nullcontext() as pool:
        for start in range(0, n_users, user_batch):
            stop = min(start + user_batch, n_users)
            _batch_top_k(
                search,
                users[start:stop],
                items,
                k,
                _BatchExclusions.of(exclude, start, stop, n_items),
                None if slack is None else slack[start:stop],
                pool,
                threads,
                positions[start:stop],
                scores[start:stop],
            )
    return positions, scores


def _faiss_search(items: np.ndarray, threads: int) -> Search:
    """Exact search by faiss's `IndexFlatIP` kernel (`knn_inner_product`, BLAS from 20 users
    up), run on `items` in place: building the index would copy them (17-39 ms for 100k × 64,
    2-4% of a 5,000-user search), on `threads` of faiss's own OpenMP threads."""

    def search(users: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
        with _faiss_threads(threads):
            return faiss.knn(users, items, depth, metric=faiss.METRIC_INNER_PRODUCT)

    return search


class IndexCache:
    """The approximate index last built, kept (with a copy of its item vectors, to compare)
    for the next search of the same items under the same configuration: a retriever
    searches one catalog for each chunk of subjects it is handed, and a build takes
    seconds (100k × 64 clustered items, one thread: IVF's k-means 9.5-10.5 s, an HNSW graph
    6.8-8.2 s)."""

    def __init__(self) -> None:
        self._items: np.ndarray | None = None
        self._config: RetrievalConfig | None = None
        self._index: faiss.Index | None = None
        self._lock = threading.Lock()  # shard steps search from several threads at once

    def index_for(self, items: np.ndarray, config: RetrievalConfig) -> faiss.Index | None:
        """The index `config` names over `items` (None: a catalog too small for two IVF
        clusters, searched exactly)."""
        with self._lock:
            if (
                config != self._config
                or self._items is None
                or not np.array_equal(items, self._items)
            ):
                self._index = _build_index(items, config)
                self._items, self._config = items.copy(), config
            return self._index


def _build_index(items: np.ndarray, config: RetrievalConfig) -> faiss.Index | None:
    """faiss `IndexHNSWFlat` or `IndexIVFFlat` over `items`, as `config` sets it (None for
    an IVF catalog under 2 × 39 items). An HNSW graph is built on one thread: its parallel
    build depends on thread timing, so the same items would give different graphs."""
    n_items, dim = items.shape
    if config.index == "hnsw":
        index = faiss.IndexHNSWFlat(dim, config.hnsw.m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = config.hnsw.ef_search
        threads = 1
    else:
        nlist = min(config.ivf.nlist, n_items // _TRAINING_ITEMS_PER_CLUSTER)
        if nlist < 2:
            return None
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.nprobe = min(config.ivf.nprobe, nlist)
        threads = torch.get_num_threads()
    with _faiss_threads(threads):
        if not index.is_trained:
            index.train(items)
        index.add(items)
    return index


def _index_search(index: faiss.Index, config: RetrievalConfig, threads: int) -> Search:
    """Approximate search of a built index (position -1 past the last item it found). An
    HNSW search keeps at least `depth` candidates: with fewer, faiss returns fewer items
    (m = 8, ef_search = 10, depth 300: 95-119 of 300), leaving users to the full scan."""

    def search(users: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
        params = (
            faiss.SearchParametersHNSW(efSearch=max(config.hnsw.ef_search, depth))
            if config.index == "hnsw"
            else None
        )
        with _faiss_threads(threads):
            return index.search(users, depth, params=params)

    return search


@contextmanager
def _faiss_threads(count: int) -> Iterator[None]:
    """faiss's OpenMP threads set to `count` for the block (per calling thread), then back."""
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(count)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)


def _torch_search(
    items: np.ndarray, device: torch.device, *, item_chunk: int, user_batch: int
) -> Search:
    """Exact search on a torch device: per `user_batch` users, a matrix product and `topk`
    per `item_chunk` items, merged by `topk` (memory: `user_batch × item_chunk` scores)."""
    chunks = [
        torch.from_numpy(items[start : start + item_chunk]).to(device)
        for start in range(0, len(items), item_chunk)
    ]

    def search(users: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
        scores = np.empty((len(users), depth), dtype=np.float32)
        positions = np.empty((len(users), depth), dtype=np.int64)
        for start in range(0, len(users), user_batch):
            batch = torch.from_numpy(users[start : start + user_batch]).to(device)
            best_scores = torch.empty((len(batch), 0), device=device)
            best_positions = torch.empty((len(batch), 0), dtype=torch.int64, device=device)
            offset = 0
            for chunk in chunks:
                chunk_scores, chunk_positions = torch.topk(
                    batch @ chunk.T, min(depth, len(chunk)), dim=1
                )
                merged_scores = torch.cat((best_scores, chunk_scores), dim=1)
                merged_positions = torch.cat((best_positions, chunk_positions + offset), dim=1)
                best_scores, order = torch.topk(
                    merged_scores, min(depth, merged_scores.shape[1]), dim=1
                )
                best_positions = torch.gather(merged_positions, 1, order)
                offset += len(chunk)
            scores[start : start + len(batch)] = best_scores.cpu().numpy()
            positions[start : start + len(batch)] = best_positions.cpu().numpy()
        return scores, positions

    return search


@dataclass(frozen=True)
class _BatchExclusions:
    """The excluded (row, position) pairs of one user batch, as sorted row × n_items +
    position codes, and how many each row has."""

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
        rows = np.repeat(np.arange(stop - start, dtype=np.int64), np.diff(indptr[start : stop + 1]))
        codes = np.unique(rows * n_items + np.asarray(indices[lo:hi], dtype=np.int64))
        # Counted once each: a repeated pair excludes one item.
        counts = np.bincount(codes // n_items, minlength=stop - start).astype(np.int64)
        return cls(codes, counts, n_items)

    def contains(self, rows: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Whether each (rows[i], positions[i, j]) is excluded."""
        codes = rows[:, None] * self.n_items + positions
        slot = np.minimum(np.searchsorted(self.codes, codes), len(self.codes) - 1)
        return self.codes[slot] == codes

    def of_row(self, row: int) -> np.ndarray:
        """The excluded positions of one row."""
        lo, hi = np.searchsorted(self.codes, [row * self.n_items, (row + 1) * self.n_items])
        return self.codes[lo:hi] - row * self.n_items


def _batch_top_k(
    search: Search,
    users: np.ndarray,
    items: np.ndarray,
    k: int,
    excluded: _BatchExclusions | None,
    slack: np.ndarray | None,
    pool: ThreadPoolExecutor | None,
    threads: int,
    positions: np.ndarray,
    scores: np.ndarray,
) -> None:
    """`exact_top_k` of one user batch into `positions` and `scores` ([rows, k]); `slack`
    None: an approximate search. The rescoring is split in `threads` row parts over `pool`
    (None when `threads` is 1; numpy releases the GIL)."""
    rows, n_items = len(users), len(items)
    counts = np.zeros(rows, dtype=np.int64) if excluded is None else excluded.counts
    depth = np.minimum(n_items, k + _SEARCH_MARGIN + counts)
    settle = partial(
        _settle,
        items=items,
        k=k,
        excluded=excluded,
        approximate=slack is None,
        positions=positions,
        scores=scores,
    )
    # Users whose depths are within a factor of two share one search at the deepest of
    # them: few, large searches, which faiss runs with BLAS.
    doublings = np.ceil(np.log2(depth)).astype(np.int64)
    unsettled: list[np.ndarray] = []
    for doubling in np.unique(doublings):
        group = np.flatnonzero(doublings == doubling)
        group_depth = int(depth[group].max())
        group_users = users if len(group) == rows else users[group]
        found_scores, found = search(group_users, group_depth)
        # No item left out of an exact search scores above its deepest score + the slack.
        bound = (
            None if slack is None or group_depth == n_items else found_scores[:, -1] + slack[group]
        )
        parts = _row_parts(len(group), threads)
        arguments = (
            [group_users[part] for part in parts],
            [found[part] for part in parts],
            [None if bound is None else bound[part] for part in parts],
            [group[part] for part in parts],
        )
        unsettled.extend(pool.map(settle, *arguments) if pool else map(settle, *arguments))
    empty = np.empty(0, dtype=np.int64)
    for row in np.concatenate(unsettled).tolist():
        positions[row], scores[row] = _full_scan(
            users[row], items, k, empty if excluded is None else excluded.of_row(row)
        )


def _row_parts(rows: int, workers: int) -> list[slice]:
    """`rows` split into at most `workers` contiguous, non-empty parts."""
    bounds = np.linspace(0, rows, min(workers, rows) + 1).astype(np.int64).tolist()
    return [slice(start, stop) for start, stop in pairwise(bounds)]


def _settle(
    users: np.ndarray,
    found: np.ndarray,
    bound: np.ndarray | None,
    rows: np.ndarray,
    *,
    items: np.ndarray,
    k: int,
    excluded: _BatchExclusions | None,
    approximate: bool,
    positions: np.ndarray,
    scores: np.ndarray,
) -> np.ndarray:
    """Canonical top k of the searched positions `found` (reordered in place) into the
    `rows` of `positions` and `scores`, for the rows it settles; returns the other rows.

    An exact search settles the rows whose k-th score beats `bound` (None: the search
    returned every item); an approximate one, the rows holding k items (or every item they
    have not excluded).
    """
    n_items = len(items)
    found_scores = _canonical_scores(users, items, found)
    _canonical_order(found, found_scores, excluded, rows, n_items)
    if approximate:
        allowed = n_items if excluded is None else n_items - excluded.counts[rows]
        kept = np.isfinite(found_scores[:, :k]).sum(axis=1)
        settled = kept >= np.minimum(k, allowed)
    elif bound is None:
        settled = np.ones(len(rows), dtype=bool)
    else:
        settled = found_scores[:, k - 1] > bound
    positions[rows[settled]] = found[settled, :k]
    scores[rows[settled]] = found_scores[settled, :k]
    return rows[~settled]


def _canonical_order(
    found: np.ndarray,
    scores: np.ndarray,
    excluded: _BatchExclusions | None,
    rows: np.ndarray,
    n_items: int,
) -> None:
    """Searched positions `found` and their canonical `scores` [n, depth] put in order of
    (score desc, position asc), in place; excluded pairs and the -1 slots an approximate
    search leaves past the last item it found go last, as position -1, score -inf."""
    dropped = found < 0
    if excluded is not None:
        dropped |= excluded.contains(rows, found)
    any_dropped = bool(dropped.any())
    if any_dropped:
        scores[dropped] = -np.inf
        found[dropped] = n_items  # after every item position among the -inf scores
    # A search returns nearly this order already: only the rows where a score does not
    # strictly fall (a tie, or a swap by rounding) are checked further and sorted.
    later, earlier = scores[:, 1:], scores[:, :-1]
    suspect = np.flatnonzero((later >= earlier).any(axis=1))
    if len(suspect):
        later, earlier = scores[suspect, 1:], scores[suspect, :-1]
        suspect_found = found[suspect]
        broken = (later > earlier) | (
            (later == earlier) & (suspect_found[:, 1:] < suspect_found[:, :-1])
        )
        fix = suspect[broken.any(axis=1)]
        order = np.lexsort((found[fix], -scores[fix]))
        found[fix] = np.take_along_axis(found[fix], order, axis=1)
        scores[fix] = np.take_along_axis(scores[fix], order, axis=1)
    if any_dropped:
        found[found == n_items] = _MISSING_POSITION


def _full_scan(
    user: np.ndarray, items: np.ndarray, k: int, excluded: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """One user's canonical top k against every item, `excluded` positions left out:
    (positions, scores) as `exact_top_k` returns them."""
    n_items = len(items)
    scores = _canonical_scores(user[None], items, np.arange(n_items)[None])[0]
    scores[excluded] = -np.inf
    kth = np.partition(scores, n_items - k)[n_items - k]
    candidates = np.flatnonzero(scores >= kth)  # every item tied with the k-th, too
    best = candidates[np.lexsort((candidates, -scores[candidates]))][:k]
    best_scores = scores[best]
    return np.where(np.isneginf(best_scores), _MISSING_POSITION, best), best_scores


def _canonical_scores(users: np.ndarray, items: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """float32 scores [n, width] of users[i] against items[positions[i, j]].

    Every pair goes through the same computation: the item's float32 vector gathered and one
    `einsum` inner loop over the vector width (same length and strides for every pair, so
    the same summation order). A score thus depends only on its two vectors, not on the
    device, batch, slot or chunk, so equal vectors tie exactly. The vectors are gathered
    `_RESCORE_FLOATS` at a time into one reused buffer, which stays in cache (`take`'s
    "clip" mode writes into it directly; "raise" would copy).
    """
    rows, width = positions.shape
    dim = items.shape[1]
    scores = np.empty((rows, width), dtype=np.float32)
    row_step = max(1, _RESCORE_FLOATS // max(1, width * dim))
    column_step = width if row_step > 1 else max(1, _RESCORE_FLOATS // max(1, dim))
    buffer = np.empty(min(rows, row_step) * min(width, column_step) * dim, dtype=np.float32)
    for top in range(0, rows, row_step):
        for left in range(0, width, column_step):
            block = (slice(top, top + row_step), slice(left, left + column_step))
            wanted = positions[block]
            gathered = buffer[: wanted.size * dim].reshape(*wanted.shape, dim)
            np.take(items, wanted, axis=0, out=gathered, mode="clip")
            np.einsum("ijd,id->ij", gathered, users[block[0]], out=scores[block], optimize=False)
    return scores


def _rounding_slack(users: np.ndarray, items: np.ndarray) -> np.ndarray:
    """Per user, how far a search's float32 score and the canonical one can differ.

    Any float32 dot product of width d is within γ_d Σ|u_i v_i| <= d · 2^-24 ‖u‖ max‖v‖ of the
    exact value, whatever its summation order (BLAS, SIMD, FMA); two of them are within twice
    that, doubled again here for safety.
    """
    largest = float(np.sqrt(np.einsum("id,id->i", items, items).max()))
    user_norms = np.sqrt(np.einsum("id,id->i", users, users))
    return 4 * (users.shape[1] + 1) * _UNIT_ROUNDOFF * largest * user_norms


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


def retrieve_two_tower(
    model: TwoTowerModel,
    subject_ids: np.ndarray,
    candidate_item_ids: np.ndarray,
    k: int,
    *,
    exclude_pairs: pd.DataFrame | None = None,
    item_chunk: int = 50_000,
    device: torch.device | str | None = None,
    retrieval: RetrievalConfig = _FLAT,
    indexes: IndexCache | None = None,
) -> pd.DataFrame:
    """Top-k candidate items per subject by two-tower inner product (`exact_top_k`: exact
    unless `retrieval` picks an approximate index, taken from `indexes` when it holds it).

    Returns subject_id, item_id, rank_two_tower (int32, 1-based), retrieval_score (float32),
    sorted by subject then rank. k is clipped to the number of candidate items; pairs in
    `exclude_pairs` (subject_id, item_id) are never returned, so a subject with few items
    left gets fewer than k rows.
    """
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
    positions, scores = exact_top_k(
        model.user_embeddings(subjects),
        model.item_embeddings(items),
        k,
        item_chunk=item_chunk,
        exclude=exclude,
        device=device,
        retrieval=retrieval,
        indexes=indexes,
    )
    found = positions >= 0
    row, slot = np.nonzero(found)
    return pd.DataFrame(
        {
            "subject_id": subjects[row],
            "item_id": items[positions[row, slot]],
            "rank_two_tower": (slot + 1).astype(np.int32),
            "retrieval_score": scores[row, slot].astype(np.float32),
        }
    )


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
    model: TwoTowerModel | None, *, item_chunk: int, retrieval: RetrievalConfig = _FLAT
) -> Callable[[np.ndarray, np.ndarray, int, pd.DataFrame], pd.DataFrame] | None:
    """`retrieve_two_tower` over `model` in the shape `generate_candidates` takes (None:
    no two-tower source). An approximate index is built at the first call and reused by
    every later call with the same candidate items."""
    if model is None:
        return None
    indexes = IndexCache()

    def two_tower(
        subject_ids: np.ndarray, item_ids: np.ndarray, k: int, blocked: pd.DataFrame
    ) -> pd.DataFrame:
        return retrieve_two_tower(
            model,
            subject_ids,
            item_ids,
            k,
            exclude_pairs=blocked,
            item_chunk=item_chunk,
            retrieval=retrieval,
            indexes=indexes,
        )

    return two_tower
