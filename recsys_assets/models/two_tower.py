"""Two-tower retrieval model: user and item vectors whose inner product ranks the catalog.

User tower: a user-id embedding. Item tower: an item-id embedding plus the item's category
embedding, so items share what their category learned and a new item is usable on day one.
Both outputs are L2-normalised: the retrieval score is a cosine in [-1, 1].

Training uses positive interactions strictly before the cutoff — clicks, purchases and
ratings >= 4 at weight 1, views at `view_weight` (0 = ignored), hides never — one example
per (user, item) at its strongest weight. The loss is in-batch sampled softmax: the other
positives of a batch are the negatives, with the logQ correction (subtract log of an item's
share of the examples) so popular items are not punished for being sampled as negatives
more often, and "accidental hits" (the same item elsewhere in the batch) masked out.

The served model trains on the whole window, so every user with a positive has a vector.
`retrieval_recall` reports recall@50 / recall@100 of a model trained on less (the bundle's
per-user holdout) for its held-out positives against all catalog items, excluding what each
user already interacted with.

Fallbacks, so every id gets a usable unit vector:
- an unknown user (no training positives) gets the popularity direction, the
  popularity-weighted mean of the trained item vectors (retrieval then favours popular items);
- an item without training positives gets its category's vector (category known from the
  catalog given at training time, or passed by the caller for items newer than the model);
- an item whose category is also unknown gets the popularity direction.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn

from recsys_assets.models.device import pick_device, seed_everything
from recsys_assets.pipeline.retrieval import exact_top_k, exclusions_from_pairs
from recsys_assets.rules.engagement import POSITIVE_EVENTS as STRONG_EVENTS
from recsys_assets.rules.engagement import POSITIVE_RATING

RECALL_AT = (50, 100)
FORMAT_VERSION = 1
_INIT_STD = 0.05
_SMALL_BATCH = 256
_PARALLEL_BATCH = 2048
_UNKNOWN = 0
"""Row 0 of the item and category tables: 'no id', kept at zero (padding)."""


class TwoTowerTrainingError(ValueError):
    """The training window holds too little positive data to train or validate."""


@dataclass
class TwoTowerConfig:
    """Training knobs; the defaults train medium data (3M events) in about a minute on 2 cores."""

    embedding_dim: int = 32
    epochs: int = 4
    batch_size: int = 1024
    learning_rate: float = 0.01
    temperature: float = 0.05
    seed: int = 7
    view_weight: float = 0.0
    """Weight of a view as a positive; 0 leaves views out (they are mostly not interest)."""
    max_validation_users: int = 5_000
    """Validation users are a seeded sample of at most this many (bounds metric time)."""
    min_steps: int = 200
    """Small windows get smaller batches and more epochs, so they still learn something."""


@dataclass
class TwoTowerResult:
    """A trained model and its offline metrics."""

    model: TwoTowerModel
    metrics: dict[str, float]


class _Towers(nn.Module):
    """The embedding tables; row 0 of the item and category tables is padding."""

    def __init__(self, n_users: int, n_items: int, n_categories: int, dim: int) -> None:
        super().__init__()
        self.user = nn.Embedding(n_users, dim)
        self.item = nn.Embedding(n_items + 1, dim, padding_idx=_UNKNOWN)
        self.category = nn.Embedding(n_categories + 1, dim, padding_idx=_UNKNOWN)
        for table in (self.user, self.item, self.category):
            nn.init.normal_(table.weight, std=_INIT_STD)
            if table.padding_idx is not None:
                with torch.no_grad():
                    table.weight[table.padding_idx].zero_()

    def users(self, rows: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.user(rows), dim=-1)

    def items(self, rows: torch.Tensor, categories: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.item(rows) + self.category(categories), dim=-1)


class TwoTowerModel:
    """Id vocabularies + the towers; turns ids into L2-normalised float32 vectors."""

    def __init__(
        self,
        towers: _Towers,
        *,
        user_ids: np.ndarray,
        item_ids: np.ndarray,
        item_popularity: np.ndarray,
        catalog_item_ids: np.ndarray,
        catalog_categories: np.ndarray,
        categories: list[str],
        device: torch.device | None = None,
    ) -> None:
        self.device = pick_device() if device is None else torch.device(device)
        self.towers = towers.to(self.device).eval()
        self.user_ids = np.asarray(user_ids, dtype=np.int64)
        self.item_ids = np.asarray(item_ids, dtype=np.int64)
        self.item_popularity = np.asarray(item_popularity, dtype=np.float32)
        order = np.argsort(catalog_item_ids, kind="stable")
        self.catalog_item_ids = np.asarray(catalog_item_ids, dtype=np.int64)[order]
        self.catalog_categories = np.asarray(catalog_categories, dtype=np.int64)[order]
        self.categories = list(categories)
        self._category_codes = {name: code + 1 for code, name in enumerate(self.categories)}
        self._popularity_direction: np.ndarray | None = None

    @property
    def embedding_dim(self) -> int:
        return int(self.towers.user.embedding_dim)

    def user_embeddings(self, user_ids: np.ndarray) -> np.ndarray:
        """[n, d] float32 unit vectors; unknown users get the popularity direction."""
        ids = np.asarray(user_ids, dtype=np.int64)
        rows = _positions(self.user_ids, ids)
        known = rows >= 0
        vectors = np.empty((len(ids), self.embedding_dim), dtype=np.float32)
        if known.any():
            with torch.no_grad():
                index = torch.from_numpy(rows[known]).to(self.device)
                vectors[known] = self.towers.users(index).cpu().numpy()
        if not known.all():
            vectors[~known] = self.popularity_direction()
        return vectors

    def item_embeddings(
        self, item_ids: np.ndarray, categories: np.ndarray | None = None
    ) -> np.ndarray:
        """[n, d] float32 unit vectors for items, trained or not.

        An item without training positives gets its category's vector: the category the
        training catalog recorded, else the one in `categories` (aligned with `item_ids`,
        for items created after the model). Neither known: the popularity direction.
        """
        ids = np.asarray(item_ids, dtype=np.int64)
        rows = _positions(self.item_ids, ids) + 1  # -1 (unknown) becomes padding row 0
        codes = self._item_category_codes(ids, categories)
        vectors = np.empty((len(ids), self.embedding_dim), dtype=np.float32)
        described = (rows != _UNKNOWN) | (codes != _UNKNOWN)
        if described.any():
            with torch.no_grad():
                vectors[described] = (
                    self.towers.items(
                        torch.from_numpy(rows[described]).to(self.device),
                        torch.from_numpy(codes[described]).to(self.device),
                    )
                    .cpu()
                    .numpy()
                )
        if not described.all():
            vectors[~described] = self.popularity_direction()
        return vectors

    def popularity_direction(self) -> np.ndarray:
        """Unit vector of the popularity-weighted mean trained item vector."""
        if self._popularity_direction is None:
            trained = self.item_embeddings(self.item_ids) if len(self.item_ids) else None
            if trained is None or float(self.item_popularity.sum()) <= 0:
                direction = np.ones(self.embedding_dim, dtype=np.float32)
            else:
                direction = self.item_popularity @ trained
            norm = float(np.linalg.norm(direction))
            if norm == 0.0:
                direction, norm = np.ones(self.embedding_dim, dtype=np.float32), 1.0
            self._popularity_direction = (direction / norm).astype(np.float32)
        return self._popularity_direction

    def _item_category_codes(self, ids: np.ndarray, categories: np.ndarray | None) -> np.ndarray:
        slot = _positions(self.catalog_item_ids, ids)
        codes = np.where(slot >= 0, self.catalog_categories[np.maximum(slot, 0)], _UNKNOWN)
        if categories is not None:
            given = np.asarray(
                [self._category_codes.get(str(name), _UNKNOWN) for name in categories],
                dtype=np.int64,
            )
            codes = np.where(codes == _UNKNOWN, given, codes)
        return codes.astype(np.int64)

    def to_bytes(self) -> bytes:
        """Weights and vocabularies as plain tensors/lists (loadable with weights_only)."""
        payload = {
            "format_version": FORMAT_VERSION,
            "state": {name: value.cpu() for name, value in self.towers.state_dict().items()},
            "user_ids": torch.from_numpy(self.user_ids),
            "item_ids": torch.from_numpy(self.item_ids),
            "item_popularity": torch.from_numpy(self.item_popularity),
            "catalog_item_ids": torch.from_numpy(self.catalog_item_ids),
            "catalog_categories": torch.from_numpy(self.catalog_categories),
            "categories": self.categories,
        }
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, *, device: torch.device | None = None) -> TwoTowerModel:
        """Inverse of `to_bytes`; refuses a payload written by an incompatible version."""
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        if payload.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"two-tower weights have format_version {payload.get('format_version')!r}; "
                f"this code reads {FORMAT_VERSION}: retrain the model bundle"
            )
        state = payload["state"]
        n_users, dim = state["user.weight"].shape
        towers = _Towers(
            n_users, state["item.weight"].shape[0] - 1, state["category.weight"].shape[0] - 1, dim
        )
        towers.load_state_dict(state)
        return cls(
            towers,
            user_ids=payload["user_ids"].numpy(),
            item_ids=payload["item_ids"].numpy(),
            item_popularity=payload["item_popularity"].numpy(),
            catalog_item_ids=payload["catalog_item_ids"].numpy(),
            catalog_categories=payload["catalog_categories"].numpy(),
            categories=list(payload["categories"]),
            device=device,
        )


def _positions(vocabulary: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Index of each id in a sorted vocabulary, -1 when absent."""
    if len(vocabulary) == 0:
        return np.full(len(ids), -1, dtype=np.int64)
    slot = np.clip(np.searchsorted(vocabulary, ids), 0, len(vocabulary) - 1)
    return np.where(vocabulary[slot] == ids, slot, -1).astype(np.int64)


def positive_weights(interactions: pd.DataFrame, view_weight: float) -> np.ndarray:
    """Training weight per interaction: 1 for clicks, purchases, ratings >= 4; views at
    `view_weight`; 0 for hides, low ratings and anything else."""
    event = interactions["event_type"].to_numpy(dtype=object)
    value = interactions["value"].to_numpy(dtype=np.float64)
    strong = np.isin(event, STRONG_EVENTS) | ((event == "rating") & (value >= POSITIVE_RATING))
    return np.where(strong, 1.0, np.where(event == "view", view_weight, 0.0)).astype(np.float32)


def train_two_tower(
    interactions: pd.DataFrame,
    items: pd.DataFrame,
    *,
    cutoff: pd.Timestamp,
    config: TwoTowerConfig,
    device: torch.device | str | None = None,
) -> TwoTowerResult:
    """Train on every interaction strictly before `cutoff` (the whole window: the served
    model must know every user; `retrieval_recall` measures a model trained on less)."""
    started = time.perf_counter()
    target = pick_device() if device is None else torch.device(device)
    seed_everything(config.seed)

    window = interactions.loc[
        interactions["ts"] < cutoff, ["user_id", "item_id", "event_type", "value", "ts"]
    ]
    if window.empty:
        raise TwoTowerTrainingError(
            f"no interactions before the training cutoff {cutoff}; seed or import data, or "
            "lower training.cutoff_days_before_snapshot"
        )
    weights = positive_weights(window, config.view_weight)
    examples = (
        window.assign(weight=weights)[weights > 0]
        .groupby(["user_id", "item_id"], sort=True)["weight"]
        .max()
        .reset_index()
    )
    if examples.empty:
        raise TwoTowerTrainingError(
            f"no positive interactions (click, purchase, rating >= {POSITIVE_RATING}) before "
            f"the training cutoff {cutoff}; the two-tower model needs positives to learn from"
        )

    categories = sorted(items["category"].astype(str).unique().tolist())
    category_codes = pd.Series(np.arange(1, len(categories) + 1), index=categories)
    catalog_ids = items["item_id"].to_numpy(dtype=np.int64)
    catalog_codes = items["category"].astype(str).map(category_codes).to_numpy(dtype=np.int64)

    user_ids = np.unique(examples["user_id"].to_numpy(dtype=np.int64))
    item_ids = np.unique(examples["item_id"].to_numpy(dtype=np.int64))
    user_rows = np.searchsorted(user_ids, examples["user_id"].to_numpy(dtype=np.int64))
    item_rows = np.searchsorted(item_ids, examples["item_id"].to_numpy(dtype=np.int64))
    item_counts = np.bincount(item_rows, minlength=len(item_ids)).astype(np.float32)

    towers = _Towers(len(user_ids), len(item_ids), len(categories), config.embedding_dim)
    model = TwoTowerModel(
        towers,
        user_ids=user_ids,
        item_ids=item_ids,
        item_popularity=item_counts / item_counts.sum(),
        catalog_item_ids=catalog_ids,
        catalog_categories=catalog_codes,
        categories=categories,
        device=target,
    )
    item_category = model._item_category_codes(item_ids, None)
    final_loss = _fit(
        model.towers,
        user_rows=user_rows,
        item_rows=item_rows + 1,
        item_category=item_category,
        item_counts=item_counts,
        weights=examples["weight"].to_numpy(dtype=np.float32),
        config=config,
        device=target,
    )
    model.towers.eval()
    model._popularity_direction = None

    metrics = {
        "train_positives": float(len(examples)),
        "final_loss": final_loss,
        "train_seconds": time.perf_counter() - started,
    }
    return TwoTowerResult(model=model, metrics=metrics)


def _fit(
    towers: _Towers,
    *,
    user_rows: np.ndarray,
    item_rows: np.ndarray,
    item_category: np.ndarray,
    item_counts: np.ndarray,
    weights: np.ndarray,
    config: TwoTowerConfig,
    device: torch.device,
) -> float:
    """In-batch sampled softmax with logQ correction; returns the last epoch's mean loss."""
    towers.train()
    users = torch.from_numpy(user_rows.astype(np.int64)).to(device)
    items = torch.from_numpy(item_rows.astype(np.int64)).to(device)
    # Category per item table row (row 0 = padding keeps category 0).
    category_of = torch.from_numpy(np.concatenate(([_UNKNOWN], item_category))).to(device)
    log_q = torch.from_numpy(np.log(np.concatenate(([1.0], item_counts / item_counts.sum())))).to(
        device=device, dtype=torch.float32
    )
    weight = torch.from_numpy(weights.copy()).to(device)
    optimizer = torch.optim.Adam(towers.parameters(), lr=config.learning_rate)
    shuffle = torch.Generator().manual_seed(config.seed)
    batch_size = max(2, min(config.batch_size, max(_SMALL_BATCH, len(users) // 8)))
    steps_per_epoch = -(-len(users) // batch_size)
    epochs = max(config.epochs, -(-config.min_steps // steps_per_epoch))
    previous_threads = torch.get_num_threads()
    if device.type == "cpu" and batch_size < _PARALLEL_BATCH:
        # Small steps are dominated by thread hand-offs, badly so on a busy machine.
        torch.set_num_threads(1)
    try:
        epoch_loss = float("nan")
        for _ in range(epochs):
            order = torch.randperm(len(users), generator=shuffle).to(device)
            total, seen = 0.0, 0.0
            for start in range(0, len(order), batch_size):
                batch = order[start : start + batch_size]
                batch_items = items[batch]
                user_vectors = towers.users(users[batch])
                item_vectors = towers.items(batch_items, category_of[batch_items])
                logits = user_vectors @ item_vectors.T / config.temperature - log_q[batch_items]
                accidental = batch_items.unsqueeze(1) == batch_items.unsqueeze(0)
                accidental.fill_diagonal_(False)
                logits = logits.masked_fill(accidental, -torch.inf)
                targets = torch.arange(len(batch), device=device)
                per_example = nn.functional.cross_entropy(logits, targets, reduction="none")
                batch_weight = weight[batch]
                loss = (per_example * batch_weight).sum() / batch_weight.sum()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += float(loss.detach()) * float(batch_weight.sum())
                seen += float(batch_weight.sum())
            epoch_loss = total / max(seen, 1e-12)
    finally:
        torch.set_num_threads(previous_threads)
    return epoch_loss


def retrieval_recall(
    model: TwoTowerModel,
    seen: pd.DataFrame,
    relevant: pd.DataFrame,
    catalog_ids: np.ndarray,
    *,
    max_users: int,
    seed: int,
) -> dict[str, float]:
    """recall@K of `relevant` (user_id, item_id) against the whole catalog, per user, averaged,
    next to popularity's for the same users.

    `seen` (user_id, item_id) is what the model was trained on: those items are excluded
    from each user's ranking (re-finding a known item is not retrieval).
    """
    held_out = relevant[relevant["item_id"].isin(catalog_ids)][["user_id", "item_id"]]
    seen = seen[["user_id", "item_id"]].drop_duplicates()
    users = np.unique(held_out["user_id"].to_numpy(dtype=np.int64))
    users = users[np.isin(users, model.user_ids)]
    empty = {
        f"{prefix}recall@{k}": float("nan") for prefix in ("", "popularity_") for k in RECALL_AT
    }
    if len(users) == 0 or len(catalog_ids) == 0:
        return {**empty, "validation_users": 0.0}
    if len(users) > max_users:
        users = np.sort(np.random.default_rng(seed).choice(users, max_users, replace=False))
    held_out = held_out[held_out["user_id"].isin(users)]
    catalog = np.sort(catalog_ids)
    exclude = exclusions_from_pairs(
        users, catalog, seen[seen["user_id"].isin(users)].rename(columns={"user_id": "subject_id"})
    )
    row = np.searchsorted(users, held_out["user_id"].to_numpy(dtype=np.int64))
    column = np.searchsorted(catalog, held_out["item_id"].to_numpy(dtype=np.int64))
    # Baseline for the same users and exclusions: rank every user's unseen items by how
    # often they were engaged with in training (a 1-d inner product does exactly that).
    popularity = _positions(model.item_ids, catalog)
    engaged = np.where(popularity >= 0, model.item_popularity[np.maximum(popularity, 0)], 0.0)
    metrics: dict[str, float] = {}
    for prefix, user_vectors, item_vectors in (
        ("", model.user_embeddings(users), model.item_embeddings(catalog)),
        (
            "popularity_",
            np.ones((len(users), 1), dtype=np.float32),
            engaged.astype(np.float32)[:, None],
        ),
    ):
        positions, _ = exact_top_k(
            user_vectors,
            item_vectors,
            min(max(RECALL_AT), len(catalog)),
            exclude=exclude,
            device=model.device,
        )
        metrics.update(_recall(positions, row, column, len(catalog), prefix))
    metrics["validation_users"] = float(len(users))
    return metrics


def _recall(
    positions: np.ndarray, row: np.ndarray, column: np.ndarray, n_items: int, prefix: str
) -> dict[str, float]:
    """Mean over users of (held-out items in the top K) / (held-out items), per K."""
    rank_of = _rank_of_held_out(positions, row, column, n_items)
    per_user_total = np.bincount(row, minlength=len(positions)).astype(np.float64)
    return {
        f"{prefix}recall@{k}": float(
            np.mean(
                np.bincount(row, weights=(rank_of < k).astype(np.float64), minlength=len(positions))
                / per_user_total
            )
        )
        for k in RECALL_AT
    }


def _rank_of_held_out(
    positions: np.ndarray, row: np.ndarray, column: np.ndarray, n_items: int
) -> np.ndarray:
    """0-based rank of each held-out (row, column) in its user's top list; depth if absent."""
    depth = positions.shape[1]
    listed = positions >= 0
    keys = (np.arange(len(positions), dtype=np.int64)[:, None] * n_items + positions)[listed]
    ranks = np.broadcast_to(np.arange(depth, dtype=np.int64), positions.shape)[listed]
    order = np.argsort(keys, kind="stable")
    keys, ranks = keys[order], ranks[order]
    wanted = row.astype(np.int64) * n_items + column
    if len(keys) == 0:
        return np.full(len(wanted), depth, dtype=np.int64)
    slot = np.clip(np.searchsorted(keys, wanted), 0, len(keys) - 1)
    return np.where(keys[slot] == wanted, ranks[slot], depth)
