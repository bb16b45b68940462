"""The category rule shared by the slate policy and publish validation.

`recsys import` gives items whose file has no category UNKNOWN_CATEGORY. It is not a
category: `max_per_category` does not apply to it (or to a null), since one cap over a
whole uncategorised catalog would cut every list to `max_per_category` items and no list
could ever reach its store_depth.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

UNKNOWN_CATEGORY = "unknown"


def category_capped(categories: pd.Series) -> np.ndarray:
    """True where `max_per_category` applies: a known category.

    Decided once per distinct category, not per row: a shard's 1.5M category cells are
    factorized (Arrow strings stay Arrow) instead of each turned into a Python object.
    """
    codes, distinct = pd.factorize(categories)  # null → -1
    known = np.array([value != UNKNOWN_CATEGORY for value in distinct], dtype=bool)
    return np.append(known, False)[codes]
