"""Per-user temporal holdout: what each user did last is what the lists must predict.

Used twice: `recsys evaluate` splits the warehouse's data with it, and the model bundle
splits its own training window with it (a nested holdout) to train the ranker on candidate
pools and to tune the collaborative model, on exactly the task the lists are judged on.

For each user, interactions are ordered by time (equal timestamps in an order drawn from
`seed`, so ties never depend on file order) and the last `round(holdout × n)` of the user's
`n` interactions are held out, at most `n - 1`: every user keeps at least one training
interaction, and a user with a single interaction holds nothing out. Rounding is half up,
so with holdout 0.2 a user needs 3 interactions to hold one out.

The ground truth (`relevant`) is every held-out item with a positive signal
(`rules.engagement.positive_signal`: a click, a purchase or a rating of at least 4) that
the user had not interacted with at all (any event type, views included) in the training
part: re-finding a known item is not a prediction.
Users whose held-out part has no such item cannot be scored and are excluded (counted).

The lists are computed as of `split_time`, the latest training interaction: every training
event is visible at that moment and no held-out event is in the data the pipeline sees.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from recsys_assets.rules.engagement import positive_signal


@dataclass(frozen=True)
class HoldoutSplit:
    """The training part, the held-out part, the ground truth and how they were made."""

    train: pd.DataFrame
    """Interactions visible to every recommender (same columns as the input)."""
    held_out: pd.DataFrame
    """Each user's last interactions, never shown to any recommender."""
    relevant: pd.DataFrame
    """`user_id`, `item_id`: held-out positives not seen in training, one row per pair."""
    split_time: pd.Timestamp
    """The latest training interaction: the score time of every list evaluated."""
    holdout: float
    seed: int
    users_with_interactions: int
    users_excluded: int
    """Users with interactions but no relevant held-out item (not evaluated)."""

    @property
    def evaluated_users(self) -> np.ndarray:
        """Users with at least one relevant item, sorted."""
        return np.sort(self.relevant["user_id"].unique())

    def summary(self) -> dict[str, object]:
        """What a reader needs to reproduce and trust the split."""
        return {
            "holdout": self.holdout,
            "seed": self.seed,
            "split_time": self.split_time.isoformat(),
            "train_interactions": len(self.train),
            "held_out_interactions": len(self.held_out),
            "relevant_pairs": len(self.relevant),
            "users_with_interactions": self.users_with_interactions,
            "users_evaluated": len(self.evaluated_users),
            "users_excluded_no_relevant": self.users_excluded,
        }


def held_out_counts(sizes: np.ndarray, holdout: float) -> np.ndarray:
    """Interactions held out per user: round half up of holdout × n, at most n - 1."""
    wanted = np.floor(holdout * sizes.astype(np.float64) + 0.5).astype(np.int64)
    return np.clip(wanted, 0, np.maximum(sizes - 1, 0))


def temporal_holdout(interactions: pd.DataFrame, *, holdout: float, seed: int) -> HoldoutSplit:
    """Split `interactions` (user_id, item_id, event_type, value, ts) per user by time."""
    if not 0.0 < holdout < 1.0:
        raise ValueError(f"holdout must be a fraction between 0 and 1 (exclusive), got {holdout}")
    if interactions.empty:
        raise ValueError("no interactions to split: seed or import data first")
    user_ids = interactions["user_id"].to_numpy(dtype=np.int64)
    times = interactions["ts"].to_numpy(dtype="datetime64[ns]").view(np.int64)
    tie_break = np.random.default_rng(seed).permutation(len(interactions))
    order = np.lexsort((tie_break, times, user_ids))
    ordered = interactions.iloc[order].reset_index(drop=True)
    sorted_users = user_ids[order]
    starts = np.flatnonzero(np.r_[True, sorted_users[1:] != sorted_users[:-1]])
    sizes = np.diff(np.r_[starts, len(sorted_users)])
    position = np.arange(len(sorted_users)) - np.repeat(starts, sizes)
    first_held = np.repeat(sizes - held_out_counts(sizes, holdout), sizes)
    held = position >= first_held

    train = ordered[~held].reset_index(drop=True)
    held_out = ordered[held].reset_index(drop=True)
    positives = held_out.loc[positive_signal(held_out), ["user_id", "item_id"]].drop_duplicates()
    seen = train[["user_id", "item_id"]].drop_duplicates().assign(_seen=True)
    marked = positives.merge(seen, on=["user_id", "item_id"], how="left")
    relevant = (
        marked[marked["_seen"].isna()][["user_id", "item_id"]]
        .astype("int64")
        .sort_values(["user_id", "item_id"])
        .reset_index(drop=True)
    )
    n_users = len(starts)
    return HoldoutSplit(
        train=train,
        held_out=held_out,
        relevant=relevant,
        split_time=pd.Timestamp(train["ts"].max()),
        holdout=holdout,
        seed=seed,
        users_with_interactions=n_users,
        users_excluded=n_users - int(relevant["user_id"].nunique()),
    )
