"""Person rules about engagement: what counts as interest, and what is a positive.

One definition for every part that needs it: the ranker's labels, the collaborative model's
input, the per-user holdout of `recsys evaluate`, and the baselines.

- **Engagement** is every interaction except `hide` (view, click, purchase, rating, any
  value): the user found the item.
- **Positive** is engagement that says the user liked it: a click, a purchase, or a rating
  of at least POSITIVE_RATING (MovieLens' "liked it"). Views and low ratings are not.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

POSITIVE_EVENTS = ("click", "purchase")
POSITIVE_RATING = 4.0
"""A rating counts as a positive signal from this value up."""
NOT_ENGAGEMENT = ("hide",)


def positive_signal(interactions: pd.DataFrame) -> np.ndarray:
    """True where an interaction says the user liked the item."""
    event = interactions["event_type"]
    liked_rating = (event == "rating") & (interactions["value"] >= POSITIVE_RATING)
    return (event.isin(POSITIVE_EVENTS) | liked_rating).to_numpy(dtype=bool)


def engagement_events(interactions: pd.DataFrame) -> np.ndarray:
    """True where an interaction is engagement (anything but a hide)."""
    return (~interactions["event_type"].isin(NOT_ENGAGEMENT)).to_numpy(dtype=bool)
