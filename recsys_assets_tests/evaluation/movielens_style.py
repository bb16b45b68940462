"""A MovieLens-shaped ratings file with learnable structure, made locally and deterministically.

`ratings.csv` (userId, movieId, rating in half stars, timestamp in epoch seconds) and
`movies.csv` (movieId, title, genres `|`-joined), like the public ml-latest-small files: a
few hundred users with at least 20 ratings each, power-law movie popularity, users who
prefer a few genres and rate them higher, ratings given in sessions over months.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd

GENRES = (
    "Action", "Adventure", "Animation", "Children", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
    "Thriller", "War", "Western",
)  # fmt: skip
MAPPING_YAML = """\
interactions:
  user_id: userId
  item_id: movieId
  value: rating
  ts: {column: timestamp, unit: s}
  event_type: {constant: rating}
items:
  item_id: movieId
  title: title
  category: {column: genres, split: "|", take: 0}
"""
"""The `recsys import --mapping` file for these two files."""


def write_movielens_style(
    folder: Path,
    *,
    users: int = 300,
    movies: int = 1200,
    seed: int = 0,
    end: datetime = datetime(2026, 11, 1),
) -> dict[str, Path]:
    """Write ratings.csv, movies.csv and mapping.yaml into `folder`; return their paths."""
    rng = np.random.default_rng(seed)
    n_genres = len(GENRES)
    primary = rng.integers(0, n_genres, movies)
    genre_sets = []
    for first in primary:
        extra = rng.choice(n_genres, size=rng.integers(0, 3), replace=False)
        genre_sets.append([GENRES[first], *(GENRES[g] for g in extra if g != first)])
    popularity = 1.0 / np.arange(1, movies + 1) ** 0.9
    popularity = popularity[rng.permutation(movies)]
    quality = rng.normal(0.0, 0.5, movies)

    taste = rng.dirichlet(np.full(n_genres, 0.3), users)
    counts = np.maximum(20, rng.lognormal(3.8, 0.9, users).astype(int))
    counts = np.minimum(counts, movies // 2)
    end_s = int(pd.Timestamp(end).timestamp())
    rows = []
    for user in range(users):
        affinity = taste[user, primary]
        weights = popularity * (0.05 + affinity)
        chosen = rng.choice(movies, size=counts[user], replace=False, p=weights / weights.sum())
        start = end_s - int(rng.uniform(30, 720) * 86_400)
        span = int(rng.uniform(5, 200) * 86_400)
        sessions = np.sort(rng.uniform(start, min(start + span, end_s), max(1, counts[user] // 8)))
        times = rng.choice(sessions, size=counts[user]) + rng.uniform(0, 3_600, counts[user])
        stars = 3.0 + 4.0 * (affinity[chosen] - affinity.mean()) + quality[chosen]
        stars = np.clip(np.round((stars + rng.normal(0, 0.7, len(chosen))) * 2) / 2, 0.5, 5.0)
        rows.append(
            pd.DataFrame(
                {
                    "userId": user + 1,
                    "movieId": chosen + 1,
                    "rating": stars,
                    "timestamp": np.minimum(times.astype(np.int64), end_s),
                }
            )
        )
    ratings = pd.concat(rows, ignore_index=True).sort_values(["userId", "timestamp"])
    movie_frame = pd.DataFrame(
        {
            "movieId": np.arange(1, movies + 1),
            "title": [f"Movie {index} ({1950 + index % 70})" for index in range(1, movies + 1)],
            "genres": ["|".join(names) for names in genre_sets],
        }
    )
    folder.mkdir(parents=True, exist_ok=True)
    paths = {
        "ratings": folder / "ratings.csv",
        "movies": folder / "movies.csv",
        "mapping": folder / "mapping.yaml",
    }
    ratings.to_csv(paths["ratings"], index=False)
    movie_frame.to_csv(paths["movies"], index=False)
    paths["mapping"].write_text(MAPPING_YAML, encoding="utf-8")
    return paths
