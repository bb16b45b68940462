"""Person rules about engagement: what counts as interest, and what is a positive.

One definition for every part that needs it: the ranker's labels, the collaborative model's
input, the per-user holdout of `recsys evaluate`, and the baselines.

- **Engagement** is every interaction except `hide` (view, click, purchase, rating, any
  value): the user found the item.
- **Positive** is engagement that says the user liked it: a click, a purchase, or a rating
  of at least POSITIVE_RATING (MovieLens' "liked it"). Views and low ratings are not. It is
  the label: what the ranker learns to predict and what `recsys evaluate` scores against.
- **Interest** is engagement that may seed "more like this" in candidate generation (item
  neighbours, category affinity, trending): positives, and ratings from INTEREST_RATING up.
  A middling rating says the user chose the item and found it fair: evidence about their
  tastes for *finding* candidates, though not a "like" to predict. Seeding with positives
  only cost 7% Recall@20 on MovieLens 100k (0.2867 → 0.2660).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

POSITIVE_EVENTS = ("click", "purchase")
POSITIVE_RATING = 4.0
"""A rating counts as a positive signal from this value up."""
INTEREST_RATING = 3.0
NOT_ENGAGEMENT = ("hide",)


def positive_signal(interactions: pd.DataFrame) -> np.ndarray:
    """True where an interaction says the user liked the item."""
    event = interactions["event_type"]
    liked_rating = (event == "rating") & (interactions["value"] >= POSITIVE_RATING)
    return (event.isin(POSITIVE_EVENTS) | liked_rating).to_numpy(dtype=bool)


def engagement_events(interactions: pd.DataFrame) -> np.ndarray:
    """True where an interaction is engagement (anything but a hide)."""
    return (~interactions["event_type"].isin(NOT_ENGAGEMENT)).to_numpy(dtype=bool)


def interest_signal(interactions: pd.DataFrame) -> np.ndarray:
    """True where an interaction may seed candidates: a positive or a rating >= INTEREST_RATING."""
    event = interactions["event_type"]
    fair_rating = (event == "rating") & (interactions["value"] >= INTEREST_RATING)
    return (event.isin(POSITIVE_EVENTS) | fair_rating).to_numpy(dtype=bool)
