"""The temporal holdout: per-user by time, no leakage, deterministic per seed."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from recsys_assets.data.holdout import held_out_counts, temporal_holdout
from recsys_assets.rules.engagement import positive_signal

T0 = pd.Timestamp("2026-10-01")


def events(rows: list[tuple[int, int, str, float, int]]) -> pd.DataFrame:
    """(user, item, event_type, value, minutes after T0) rows as an interactions table."""
    frame = pd.DataFrame(rows, columns=["user_id", "item_id", "event_type", "value", "minutes"])
    frame["ts"] = T0 + pd.to_timedelta(frame.pop("minutes"), unit="min")
    return frame.astype({"user_id": "int64", "item_id": "int64", "value": "float64"})


def random_interactions(seed: int, users: int = 200, items: int = 80) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    n = users * 15
    return pd.DataFrame(
        {
            "user_id": rng.integers(1, users + 1, n).astype("int64"),
            "item_id": rng.integers(1, items + 1, n).astype("int64"),
            "event_type": rng.choice(["view", "click", "purchase", "rating", "hide"], n),
            "value": rng.integers(1, 6, n).astype("float64"),
            # Coarse times: many ties, so the seeded tie-break matters.
            "ts": T0 + pd.to_timedelta(rng.integers(0, 50, n), unit="h"),
        }
    )


def test_each_user_holds_out_their_latest_interactions() -> None:
    rows = [
        (1, item, "click", 1.0, minute)
        for item, minute in zip(range(10), range(10, 0, -1), strict=True)
    ]
    rows += [(2, 100 + i, "view", 1.0, i) for i in range(3)]
    rows += [(3, 200, "click", 1.0, 0)]
    split = temporal_holdout(events(rows), holdout=0.2, seed=0)

    held = split.held_out.groupby("user_id")["item_id"].apply(sorted).to_dict()
    # User 1: 10 events, 2 held out: the latest are items 0 and 1 (minutes 10 and 9).
    assert held[1] == [0, 1]
    # User 2: round(0.6) = 1 held out; user 3: a single event is never held out.
    assert held[2] == [102]
    assert 3 not in held
    for user, group in split.held_out.groupby("user_id"):
        assert group["ts"].min() >= split.train.loc[split.train["user_id"] == user, "ts"].max()
    assert split.split_time == split.train["ts"].max()


def test_relevant_is_held_out_positives_unseen_in_training() -> None:
    rows = [
        (1, 1, "view", 1.0, 0),
        (1, 2, "click", 1.0, 1),
        (1, 3, "view", 1.0, 2),
        (1, 4, "click", 1.0, 3),
        (1, 5, "view", 1.0, 4),
        (1, 6, "view", 1.0, 5),
        # Held out (last 4 of 10): a view, a low rating, a re-click of a seen item, a purchase.
        (1, 7, "view", 1.0, 6),
        (1, 8, "rating", 3.5, 7),
        (1, 3, "click", 1.0, 8),
        (1, 9, "purchase", 1.0, 9),
    ]
    split = temporal_holdout(events(rows), holdout=0.4, seed=0)
    assert split.relevant["item_id"].tolist() == [9]
    assert split.users_excluded == 0


def test_users_without_relevant_items_are_excluded_and_counted() -> None:
    rows = [(1, i, "view", 1.0, i) for i in range(5)] + [(2, i, "click", 1.0, i) for i in range(5)]
    split = temporal_holdout(events(rows), holdout=0.2, seed=0)
    assert split.evaluated_users.tolist() == [2]
    assert split.users_excluded == 1
    assert split.summary()["users_evaluated"] == 1


def test_no_leakage_on_random_data() -> None:
    data = random_interactions(seed=5)
    split = temporal_holdout(data, holdout=0.25, seed=3)
    assert len(split.train) + len(split.held_out) == len(data)
    keys = ["user_id", "item_id", "event_type", "value", "ts"]
    recombined = pd.concat([split.train, split.held_out])[keys].sort_values(keys)
    pd.testing.assert_frame_equal(
        recombined.reset_index(drop=True), data[keys].sort_values(keys).reset_index(drop=True)
    )
    # Per user, nothing held out is earlier than anything trained on.
    latest_train = split.train.groupby("user_id")["ts"].max()
    earliest_held = split.held_out.groupby("user_id")["ts"].min()
    assert (earliest_held >= latest_train.reindex(earliest_held.index)).all()
    # Relevant pairs are positives of the held-out part, never seen in training.
    seen = set(map(tuple, split.train[["user_id", "item_id"]].to_numpy()))
    assert not any(tuple(pair) in seen for pair in split.relevant.to_numpy())
    positives = split.held_out[positive_signal(split.held_out)]
    assert set(map(tuple, split.relevant.to_numpy())) <= set(
        map(tuple, positives[["user_id", "item_id"]].to_numpy())
    )


def test_split_is_deterministic_per_seed_and_ties_follow_the_seed() -> None:
    data = random_interactions(seed=7)
    first = temporal_holdout(data, holdout=0.2, seed=42)
    same = temporal_holdout(data.copy(), holdout=0.2, seed=42)
    pd.testing.assert_frame_equal(first.train, same.train)
    pd.testing.assert_frame_equal(first.held_out, same.held_out)
    pd.testing.assert_frame_equal(first.relevant, same.relevant)
    other = temporal_holdout(data, holdout=0.2, seed=43)
    assert len(other.held_out) == len(first.held_out)
    assert not other.held_out.equals(first.held_out)  # equal timestamps ordered by the seed


def test_held_out_counts_round_half_up_and_keep_one_training_event() -> None:
    sizes = np.array([1, 2, 3, 5, 8, 10])
    assert held_out_counts(sizes, 0.2).tolist() == [0, 0, 1, 1, 2, 2]
    assert held_out_counts(sizes, 0.9).tolist() == [0, 1, 2, 4, 7, 9]


def test_bad_holdout_is_refused() -> None:
    with pytest.raises(ValueError, match="between 0 and 1"):
        temporal_holdout(random_interactions(seed=1), holdout=1.0, seed=0)
