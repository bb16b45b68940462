"""MovieLens 100k (real ratings) and deterministic variants of it, for real-data tests.

The files live outside the repository (`../shared/data/ml-100k/`, licence: no
redistribution) and are only read; variants are written into the test's temporary folder:

- `long_history_ratings`: the same ratings spread over 20 years, with activity thinning
  toward the end (most users long inactive at the split, few events in recent windows).
- `sparse_purchases`: only liked items (rating ≥ 4), each user's first 8–10 of them, as
  day-stamped purchases: short histories, heavy timestamp ties, no negative signal.

A missing data folder fails the test (never skips it): a quality check that silently does
not run is worse than a red one.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from recsys_assets.config import load_settings
from recsys_assets.config.settings import DEFAULT_CONFIG_PATH
from recsys_assets.data.importer import ImportMapping, ImportReport, import_tables
from recsys_assets.warehouse import Warehouse

REPO_ROOT = Path(__file__).resolve().parents[1]
ML100K_RELATIVE = Path("..") / "shared" / "data" / "ml-100k"
AS_OF = datetime(1998, 5, 1)
"""After the last rating of ml-100k (1998-04-22) and of every variant."""
LONG_HISTORY_YEARS = 20
SPARSE_MIN_EVENTS = 8
"""Each user of the sparse variant keeps their first 8 + user_id % 3 liked items."""
ALL_RATERS_DAYS = 100_000
"""home_feed active_within_days large enough that every rater is a subject."""
_DAY_S = 86_400
_SPARSE_MAPPING = {
    "interactions": {
        "ts": {"column": "timestamp", "unit": "s"},
        "event_type": {"constant": "purchase"},
    },
    "items": {"category": {"column": "genres", "split": "|", "take": 0}},
}


@dataclass(frozen=True)
class ImportFiles:
    """What `recsys import` needs for one data set: interactions, items, mapping."""

    interactions: Path
    items: Path
    mapping: Path


def ml100k_dir() -> Path:
    """The ml-100k folder beside the repository; AssertionError (a failure) when missing."""
    folder = (REPO_ROOT / ML100K_RELATIVE).resolve()
    expected = ("ratings.csv.gz", "items.csv", "mapping.yaml")
    missing = [name for name in expected if not (folder / name).is_file()]
    if missing:
        raise AssertionError(
            f"real-data tests need MovieLens 100k in {folder} (missing: {', '.join(missing)}); "
            f"it is expected at {ML100K_RELATIVE} relative to the repository root, never inside it"
        )
    return folder


def ml100k() -> ImportFiles:
    """The unchanged ml-100k files and their shipped mapping."""
    folder = ml100k_dir()
    return ImportFiles(folder / "ratings.csv.gz", folder / "items.csv", folder / "mapping.yaml")


def _ratings() -> pd.DataFrame:
    return pd.read_csv(ml100k_dir() / "ratings.csv.gz")


def long_history_ratings(folder: Path) -> ImportFiles:
    """ml-100k with its time axis stretched to 20 years, ending where the original ends.

    Each distinct timestamp's time-order quantile q (the ratings before it, as a share of
    those before the last one) moves to end − 20y + 20y × q², made strictly increasing to the
    second, so every user's order and ties are kept exactly. q² is convex: the first half of
    the ratings fall in the first 5 years and activity thins toward the end.
    """
    ratings = _ratings()
    stamps = ratings["timestamp"].to_numpy(dtype=np.int64)
    distinct = np.unique(stamps)
    before = np.searchsorted(np.sort(stamps), distinct, side="left")
    quantile = before / max(before[-1], 1)  # 0 at the first timestamp, 1 at the last
    span = int(LONG_HISTORY_YEARS * 365.25 * _DAY_S)
    offsets = np.floor(span * quantile**2).astype(np.int64)
    # Near q = 0 neighbouring quantiles fall into the same second: nudge them apart.
    steps = np.arange(len(offsets))
    offsets = np.maximum.accumulate(offsets - steps) + steps
    moved = int(stamps.max()) - span + offsets[np.searchsorted(distinct, stamps)]
    path = folder / "ratings_long_history.csv"
    ratings.assign(timestamp=moved).to_csv(path, index=False)
    source = ml100k()
    return ImportFiles(path, source.items, source.mapping)


def sparse_purchases(folder: Path) -> ImportFiles:
    """Liked ratings only, each user's first 8 + user_id % 3, as purchases on whole days."""
    ratings = _ratings()
    liked = ratings[ratings["rating"] >= 4].sort_values(
        ["user_id", "timestamp", "item_id"], kind="stable"
    )
    position = liked.groupby("user_id").cumcount().to_numpy()
    keep = position < SPARSE_MIN_EVENTS + liked["user_id"].to_numpy() % 3
    sparse = liked[keep][["user_id", "item_id", "timestamp"]]
    sparse = sparse.assign(timestamp=sparse["timestamp"] - sparse["timestamp"] % _DAY_S)
    path = folder / "purchases_sparse.csv"
    sparse.to_csv(path, index=False)
    mapping = folder / "purchases_sparse_mapping.yaml"
    mapping.write_text(yaml.safe_dump(_SPARSE_MAPPING, sort_keys=False), encoding="utf-8")
    return ImportFiles(path, ml100k().items, mapping)


def import_into(
    warehouse_url: str,
    interactions_csv: Path,
    mapping: Path,
    *,
    items: Path | None = None,
) -> ImportReport:
    """`recsys import` through its Python API, as of AS_OF, with the default configuration."""
    return import_tables(
        Warehouse(warehouse_url),
        interactions=interactions_csv,
        items=items,
        mapping=ImportMapping.from_yaml(mapping),
        settings=load_settings(DEFAULT_CONFIG_PATH),
        as_of=AS_OF,
    )


def all_raters_config(folder: Path) -> Path:
    """A copy of the default configuration in which every rater is a home_feed subject.

    ml-100k's raters were active over months (the variants: years) before the split; the
    default 60-day activity window would leave most of them out of the evaluation.
    """
    config = yaml.safe_load(Path(DEFAULT_CONFIG_PATH).read_text(encoding="utf-8"))
    config["surfaces"]["home_feed"]["eligibility"]["active_within_days"] = ALL_RATERS_DAYS
    path = folder / "surfaces_all_raters.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    load_settings(path)  # fails here, with the bad entry, if the copy is not valid
    return path
