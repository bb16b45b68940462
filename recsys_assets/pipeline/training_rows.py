"""The ranker's training rows: candidate pools built as of an earlier moment, then labelled.

The bundle holds out each user's latest interactions of its window (`data.holdout`, the
same per-user split `recsys evaluate` uses). On the part that remains, the retrieval
models are trained and, for a seeded sample of the users with held-out positives, the
candidate pools are built by `candidates.generate_candidates` and their features by
`features.compute_features` — the functions the pipeline runs, as of the holdout's
split time. A row is labelled 1 when the subject engaged positively with the item in
their held-out part (`rules.engagement.positive_signal`), else 0.

So training and scoring share one feature function and one candidate function: the ranker
learns on exactly the kind of row it will score.
"""

from __future__ import annotations

from dataclasses import dataclass

import duckdb
import numpy as np
import pandas as pd

from recsys_assets.config import Settings, SurfaceConfig
from recsys_assets.data.holdout import HoldoutSplit
from recsys_assets.models.collaborative import CollaborativeModel
from recsys_assets.models.two_tower import TwoTowerModel
from recsys_assets.pipeline import candidates as candidate_stage
from recsys_assets.pipeline.features import compute_features
from recsys_assets.pipeline.retrieval import two_tower_retriever

TRAINING_SURFACE = "home_feed"
"""The surface whose pools train the ranker (the first personalized one if not configured)."""


@dataclass(frozen=True)
class RetrievalModels:
    """The models the candidate pools are built with (trained on the same data)."""

    two_tower: TwoTowerModel | None
    collaborative: CollaborativeModel | None


def training_surface(settings: Settings) -> SurfaceConfig:
    """TRAINING_SURFACE, else the first personalized surface."""
    if TRAINING_SURFACE in settings.surfaces:
        return settings.surfaces[TRAINING_SURFACE]
    personalized = [surface for surface in settings.surfaces.values() if surface.personalized]
    if not personalized:
        raise ValueError("no personalized surface is configured: there is no ranker to train")
    return personalized[0]


def training_subjects(split: HoldoutSplit, *, limit: int, seed: int) -> np.ndarray:
    """Users with held-out positives, a seeded sample of `limit` of them above it (sorted)."""
    users = split.evaluated_users
    if len(users) > limit:
        users = np.sort(np.random.default_rng(seed).choice(users, size=limit, replace=False))
    return users


def pool_training_rows(
    con: duckdb.DuckDBPyConnection,
    split: HoldoutSplit,
    *,
    tables: dict[str, pd.DataFrame],
    models: RetrievalModels,
    settings: Settings,
) -> pd.DataFrame:
    """Labelled feature rows of the sampled subjects' pools, as of `split.split_time`.

    `tables` are the raw tables (users, items, exposures, user_controls, editorial) cut
    at the bundle's cutoff; the interactions are `split.train`. Subjects are grouped by
    their region, whose item rules the pools obey, as in the pipeline.
    """
    surface = training_surface(settings)
    score_time = split.split_time
    subjects = training_subjects(
        split, limit=settings.training.max_training_subjects, seed=settings.training.seed
    )
    users = tables["users"]
    users = users[users["user_id"].isin(subjects)].rename(columns={"user_id": "subject_id"})
    exposures = tables["exposures"][tables["exposures"]["ts"] < score_time]
    controls = tables["user_controls"][tables["user_controls"]["ts"] <= score_time]
    labels = split.relevant.rename(columns={"user_id": "subject_id"}).assign(label=np.float32(1))
    frames = []
    # One retriever: an approximate index is built once per catalog, not once per chunk.
    two_tower = two_tower_retriever(
        models.two_tower,
        item_chunk=settings.pipeline.retrieval_item_chunk,
        retrieval=settings.pipeline.retrieval,
    )
    for region, members in users.groupby("region", sort=True):
        if region not in settings.regions:
            continue
        context = candidate_stage.build_context(
            items=tables["items"],
            interactions=split.train,
            user_controls=controls,
            editorial=tables["editorial"],
            region=str(region),
            surface=surface,
            score_time=score_time,
            trending_window_days=settings.pipeline.trending_window_days,
            trending_min_share=settings.pipeline.trending_min_share,
            recent_history_items=settings.pipeline.recent_history_items,
            collaborative=models.collaborative,
        )
        size = settings.pipeline.shard_subjects
        for start in range(0, len(members), size):
            pool = candidate_stage.generate_candidates(
                members.iloc[start : start + size],
                context,
                surface,
                two_tower=two_tower,
                recent_items_per_user=settings.pipeline.recent_items_per_user,
            )
            features = compute_features(
                con,
                pool,
                interactions=split.train,
                exposures=exposures,
                items=tables["items"],
                surface=surface.name,
                score_time=score_time,
                user_controls=controls,
            )
            frames.append(
                features.merge(labels, on=["subject_id", "item_id"], how="left").fillna(
                    {"label": np.float32(0)}
                )
            )
    if not frames:
        return pd.DataFrame(columns=["subject_id", "item_id", "label"])
    return pd.concat(frames, ignore_index=True)
