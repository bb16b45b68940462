"""Exact top-K retrieval: the `two_tower` candidate source.

Every subject's vector is scored against every candidate item (exact inner product, no
approximate index to build, tune or let drift), in user batches × item chunks so memory is
bounded by `user_batch × item_chunk` scores whatever the catalog and subject counts.

On the CPU the expensive part of exact top-K is not the matrix product but the selection
(`topk` over 100k scores per user). The kernel therefore selects in stages that give the
same answer (ties aside). A chunk's items are split into interleaved blocks of g1 items
and each block's maximum is taken (one vectorised pass over the scores); blocks are grouped
again, g2 blocks to a group, and the group maxima taken. The K best groups must hold every
block that holds one of the true top K (such a block's maximum is at least the K-th best
score, and at most K groups have a maximum that high), so the K best blocks are picked among
those K × g2 block maxima, and the final `topk` runs over the K × g1 scores of those blocks.
Each `topk` thus sees a few thousand values instead of the whole chunk. On CUDA `topk` is
fast, so the kernel uses it directly.

Memory is bounded by `user_batch × item_chunk` scores. When the whole catalog fits in that
budget with at least `_MIN_SINGLE_CHUNK_USERS` users per batch, it is scored as one chunk
(fewer users per batch, same memory): every extra chunk repeats the selection stages.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from recsys_assets.models.device import pick_device

if TYPE_CHECKING:
    from recsys_assets.models.two_tower import TwoTowerModel

ExcludedPositions = tuple[np.ndarray, np.ndarray]
"""CSR-like exclusions: (indptr [n_users + 1], indices = item positions), per user row."""

_MISSING_POSITION = -1
_BLOCK_ITEMS = 8
"""g1: items per block. Small enough that K blocks hold few scores, large enough that the
block maxima are an 8× smaller array."""
_BLOCK_MIN_SPEEDUP = 4
"""Block selection pays off once a chunk has this many times more items than K × g1."""
_MIN_SINGLE_CHUNK_USERS = 256
"""Fewest users per batch worth trading for scoring the whole catalog as one chunk."""


def exact_top_k(
    user_vectors: np.ndarray,
    item_vectors: np.ndarray,
    k: int,
    *,
    item_chunk: int = 50_000,
    user_batch: int = 1024,
    exclude: ExcludedPositions | None = None,
    device: torch.device | str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The k items with the largest inner product per user, best first.

    Returns (positions int64 [n_users, k], scores float32 [n_users, k]): positions index
    `item_vectors`. Excluded (user, item) pairs never appear; when a user has fewer than k
    items left, the remaining slots hold position -1 and score -inf.
    """
    users = np.ascontiguousarray(user_vectors, dtype=np.float32)
    items = np.ascontiguousarray(item_vectors, dtype=np.float32)
    if users.ndim != 2 or items.ndim != 2 or users.shape[1] != items.shape[1]:
        raise ValueError(
            f"exact_top_k needs 2-D user and item vectors of the same width; got "
            f"users {users.shape} and items {items.shape}"
        )
    n_items = items.shape[0]
    if not 1 <= k <= n_items:
        raise ValueError(f"exact_top_k: k={k} must be between 1 and the {n_items} items")
    if item_chunk < 1 or user_batch < 1:
        raise ValueError(f"item_chunk ({item_chunk}) and user_batch ({user_batch}) must be >= 1")
    target = pick_device() if device is None else torch.device(device)
    positions = np.empty((users.shape[0], k), dtype=np.int64)
    scores = np.empty((users.shape[0], k), dtype=np.float32)
    if users.shape[0] == 0:
        return positions, scores

    budget = user_batch * item_chunk
    if n_items > item_chunk and budget // n_items >= _MIN_SINGLE_CHUNK_USERS:
        item_chunk, user_batch = n_items, budget // n_items
    chunks = [
        _ItemChunk.build(items, start, min(start + item_chunk, n_items), k, target)
        for start in range(0, n_items, item_chunk)
    ]
    widest = max(chunk.padded_width for chunk in chunks)
    buffer = torch.empty(min(user_batch, users.shape[0]) * widest, device=target)
    for start in range(0, users.shape[0], user_batch):
        stop = min(start + user_batch, users.shape[0])
        batch = torch.from_numpy(users[start:stop]).to(target)
        excluded = _batch_exclusions(exclude, start, stop)
        best_scores: torch.Tensor | None = None
        best_positions: torch.Tensor | None = None
        for chunk in chunks:
            chunk_scores, chunk_positions = chunk.top_k(batch, buffer, k, excluded)
            if best_scores is None or best_positions is None:
                best_scores, best_positions = chunk_scores, chunk_positions
                continue
            merged_scores = torch.cat((best_scores, chunk_scores), dim=1)
            merged_positions = torch.cat((best_positions, chunk_positions), dim=1)
            keep = min(k, merged_scores.shape[1])
            best_scores, order = torch.topk(merged_scores, keep, dim=1)
            best_positions = torch.gather(merged_positions, 1, order)
        assert best_scores is not None and best_positions is not None
        found_scores = best_scores.cpu().numpy()
        found_positions = best_positions.cpu().numpy()
        found_positions[np.isneginf(found_scores)] = _MISSING_POSITION
        scores[start:stop] = found_scores
        positions[start:stop] = found_positions
    return positions, scores


class _ItemChunk:
    """One slice of the catalog, padded to a whole number of block groups."""

    def __init__(
        self,
        vectors: torch.Tensor,
        start: int,
        stop: int,
        levels: tuple[int, int],
        padded: int,
    ) -> None:
        self.vectors = vectors
        self.start = start
        self.stop = stop
        self.block_items, self.group_blocks = levels
        self.padded_width = padded

    @classmethod
    def build(
        cls, items: np.ndarray, start: int, stop: int, k: int, device: torch.device
    ) -> _ItemChunk:
        width = stop - start
        levels = _levels(width, k) if device.type == "cpu" else (1, 1)
        step = levels[0] * levels[1]
        padded = -(-width // step) * step
        vectors = torch.zeros((padded, items.shape[1]), dtype=torch.float32, device=device)
        vectors[:width] = torch.from_numpy(items[start:stop]).to(device)
        return cls(vectors, start, stop, levels, padded)

    def top_k(
        self,
        users: torch.Tensor,
        buffer: torch.Tensor,
        k: int,
        excluded: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Best min(k, chunk size) (scores, global item positions) of this chunk per user."""
        rows = users.shape[0]
        width = self.stop - self.start
        scores = buffer[: rows * self.padded_width].view(rows, self.padded_width)
        torch.mm(users, self.vectors.T, out=scores)
        if self.padded_width > width:
            scores[:, width:] = -torch.inf
        if excluded is not None:
            user_rows, item_positions = excluded
            inside = (item_positions >= self.start) & (item_positions < self.stop)
            scores[user_rows[inside], item_positions[inside] - self.start] = -torch.inf
        keep = min(k, width)
        if self.block_items == 1:
            values, local = torch.topk(scores, keep, dim=1)
            return values, local + self.start
        # Block j holds items j, j + n_blocks, j + 2 n_blocks, ...: its max is a strided
        # reduction over g1 contiguous rows of length n_blocks, which vectorises fully.
        # Groups interleave blocks the same way.
        n_blocks = self.padded_width // self.block_items
        blocks = scores.view(rows, self.block_items, n_blocks)
        block_max = blocks.amax(dim=1)
        best_blocks = _best_members(block_max, self.group_blocks, keep)
        gathered = torch.gather(
            blocks, 2, best_blocks.unsqueeze(1).expand(rows, self.block_items, keep)
        )
        values, flat = torch.topk(gathered.reshape(rows, -1), keep, dim=1)
        member = torch.div(flat, keep, rounding_mode="floor")
        block = torch.gather(best_blocks, 1, flat - member * keep)
        return values, member * n_blocks + block + self.start


def _best_members(maxima: torch.Tensor, group_size: int, keep: int) -> torch.Tensor:
    """Columns of the `keep` largest values per row of `maxima` (unordered), found by taking
    the `keep` best groups of `group_size` interleaved columns first, then the best among
    their members."""
    rows, width = maxima.shape
    if group_size == 1:
        return torch.topk(maxima, keep, dim=1, sorted=False).indices
    n_groups = width // group_size
    members = maxima.view(rows, group_size, n_groups)
    _, best_groups = torch.topk(members.amax(dim=1), keep, dim=1, sorted=False)
    gathered = torch.gather(members, 2, best_groups.unsqueeze(1).expand(rows, group_size, keep))
    _, flat = torch.topk(gathered.reshape(rows, -1), keep, dim=1, sorted=False)
    member = torch.div(flat, keep, rounding_mode="floor")
    return torch.gather(best_groups, 1, flat - member * keep) + member * n_groups


def _levels(width: int, k: int) -> tuple[int, int]:
    """(g1 items per block, g2 blocks per group); (1, 1) = plain topk.

    g2 minimises the values the two block-picking `topk`s see, n_blocks / g2 + K · g2.
    """
    if width < _BLOCK_MIN_SPEEDUP * k * _BLOCK_ITEMS:
        return 1, 1
    group_blocks = max(1, round((width / _BLOCK_ITEMS / k) ** 0.5))
    return _BLOCK_ITEMS, group_blocks


def _batch_exclusions(
    exclude: ExcludedPositions | None, start: int, stop: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(batch-relative user rows, item positions) of the exclusions of users [start, stop)."""
    if exclude is None:
        return None
    indptr, indices = exclude
    lo, hi = int(indptr[start]), int(indptr[stop])
    if hi == lo:
        return None
    counts = np.diff(indptr[start : stop + 1])
    rows = np.repeat(np.arange(stop - start, dtype=np.int64), counts)
    return torch.from_numpy(rows), torch.from_numpy(np.asarray(indices[lo:hi], dtype=np.int64))


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
) -> pd.DataFrame:
    """Top-k candidate items per subject by two-tower inner product.

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
    model: TwoTowerModel | None, *, item_chunk: int
) -> Callable[[np.ndarray, np.ndarray, int, pd.DataFrame], pd.DataFrame] | None:
    """`retrieve_two_tower` over `model` in the shape `generate_candidates` takes (None:
    no two-tower source)."""
    if model is None:
        return None

    def two_tower(
        subject_ids: np.ndarray, item_ids: np.ndarray, k: int, blocked: pd.DataFrame
    ) -> pd.DataFrame:
        return retrieve_two_tower(
            model, subject_ids, item_ids, k, exclude_pairs=blocked, item_chunk=item_chunk
        )

    return two_tower
