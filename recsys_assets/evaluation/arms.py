"""Offline comparison of an experiment's arms: the same split serving makes, scored offline.

For a surface with an `experiment`, every subject evaluated is assigned its arm exactly as
serving assigns it (`serving.experiments`, a hash of experiment id and subject). Each
serving mode builds the lists it would serve (`MODE_LISTS`: mode → builder), and is scored
twice: on the subjects of the arms that use it (what the experiment will measure online)
and on every evaluated subject (what the mode would do for everyone, free of the noise of
which subjects fell in which arm).

- `final_slate`: the stored lists the evaluation already reads (published, else slates);
  on a `storage_mode: candidate_pool` surface each shortlist's `in_slate` rows, exactly
  what serving's `final_slate` mode serves there.
- `fallback_only`: the fallback lists publish would build at the split time (the same
  `compute_fallback_lists`), in serving's order for a subject without a personal list
  (`new_user_default`, then `popular_by_region`), per subject's region, without the items
  the subject already consumed where the surface blocks them (serving's final check).
- `candidate_pool_rerank`: what serving answers at the split time from the shortlists the
  evaluation pipeline published (`storage_mode: candidate_pool`): one request per subject
  in their region through `RecommendationService.recommend` on the scratch warehouse, the
  surface's mode set to `candidate_pool_rerank` for everyone, without session context.
  The online rerank, final check and fallback top-up are serving's own code; the latency
  budget is lifted (`OFFLINE_LATENCY_BUDGET_MS`) so the rerank, not this machine's load,
  is measured. Exploration draws a fresh seed per request, as online.

Another mode plugs in by adding its builder to `MODE_LISTS`; a builder that cannot build
on this split raises `ModeUnavailable`, reported in the comparison's notes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import pandas as pd

from recsys_assets.config import Settings, SurfaceConfig
from recsys_assets.evaluation.metrics import ListMetrics
from recsys_assets.publish.fallback import (
    NEW_USER_DEFAULT,
    POPULAR_BY_REGION,
    compute_fallback_lists,
)
from recsys_assets.rules.person import blocks_consumed, consumed_mask
from recsys_assets.serving.experiments import Experiment
from recsys_assets.warehouse import Warehouse

OFFLINE_LATENCY_BUDGET_MS = 60_000.0
"""The rerank's latency budget offline: a request past the online budget would serve the
batch order, which would make the comparison depend on the evaluating machine's load."""


class ModeUnavailable(RuntimeError):
    """A serving mode's lists cannot be built on this split; the message says why."""


@dataclass(frozen=True)
class ArmInputs:
    """What a mode's list builder may use: the surface, the split's past, and the lists the
    pipeline stored (`user_id`, `rank`, `item_id`)."""

    settings: Settings
    surface: str
    regions: Sequence[str]
    split_time: pd.Timestamp
    past: dict[str, pd.DataFrame]
    stored_lists: pd.DataFrame
    warehouse: Warehouse | None = None
    """The scratch warehouse the pipeline ran in (raw snapshot of the past, model bundle,
    published versions): what serving reads for `candidate_pool_rerank`."""


ModeLists = Callable[[ArmInputs, np.ndarray], pd.DataFrame]
"""(inputs, subject ids) → the mode's lists for those subjects (`user_id`, `rank`, `item_id`)."""


def final_slate_lists(inputs: ArmInputs, users: np.ndarray) -> pd.DataFrame:
    lists = inputs.stored_lists
    return lists[lists["user_id"].isin(users)]


def fallback_only_lists(inputs: ArmInputs, users: np.ndarray) -> pd.DataFrame:
    surface = inputs.settings.surface(inputs.surface)
    past = inputs.past
    regions = past["users"].set_index("user_id")["region"]
    frames = []
    for region in inputs.regions:
        records = compute_fallback_lists(
            surface=surface,
            region=region,
            items=past["items"],
            interactions=past["interactions"],
            users=past["users"],
            editorial=past.get("editorial"),
            now=inputs.split_time.to_pydatetime(),
            list_length=min(inputs.settings.fallback.list_length, surface.store_depth),
            ttl=inputs.settings.fallback.ttl,
            trending_window=timedelta(days=inputs.settings.pipeline.trending_window_days),
        )
        ordered = _in_serving_order(records)
        in_region = users[regions.reindex(users).to_numpy() == region]
        if ordered.empty or len(in_region) == 0:
            continue
        frames.append(
            pd.DataFrame(
                {
                    "user_id": np.repeat(in_region, len(ordered)),
                    "item_id": np.tile(ordered.to_numpy(dtype=np.int64), len(in_region)),
                }
            )
        )
    if not frames:
        return pd.DataFrame({"user_id": [], "rank": [], "item_id": []}, dtype="int64")
    lists = pd.concat(frames, ignore_index=True)
    if blocks_consumed(surface):
        interactions = past["interactions"]
        consumed = interactions.loc[consumed_mask(interactions), ["user_id", "item_id"]]
        seen = lists.merge(consumed.drop_duplicates(), how="left", indicator=True)
        lists = lists[(seen["_merge"] == "left_only").to_numpy()]
    return lists.assign(rank=lists.groupby("user_id").cumcount() + 1)[
        ["user_id", "rank", "item_id"]
    ]


def _in_serving_order(records: pd.DataFrame) -> pd.Series:
    """The items a subject without a personal list is served, in order: new_user_default
    topped up from popular_by_region (serving's fallback keys for that case)."""
    if records.empty:
        return pd.Series([], dtype="int64")
    picked = [
        records[records["context_key"] == key].sort_values("position")["item_id"]
        for key in (NEW_USER_DEFAULT, POPULAR_BY_REGION)
    ]
    return pd.concat(picked, ignore_index=True).drop_duplicates()


def candidate_pool_rerank_lists(inputs: ArmInputs, users: np.ndarray) -> pd.DataFrame:
    surface = inputs.settings.surface(inputs.surface)
    if surface.storage_mode != "candidate_pool":
        raise ModeUnavailable(
            f"candidate_pool_rerank needs surfaces.{surface.name}.storage_mode: "
            f"candidate_pool (it is {surface.storage_mode!r}): nothing to rerank"
        )
    if inputs.warehouse is None:
        raise ModeUnavailable("candidate_pool_rerank needs the warehouse holding the shortlists")
    # Imported here: serving loads torch and the rerank, which the other modes do not need.
    from recsys_assets.serving.service import RecommendationService

    split_ns = int(inputs.split_time.value)
    service = RecommendationService(
        inputs.warehouse, _reranked_for_everyone(inputs.settings, surface), clock=lambda: split_ns
    )
    service.load()
    try:
        unpublished = [
            region
            for region in inputs.regions
            if service.store.lists(surface.name, region).personalized is None
        ]
        if unpublished:
            raise ModeUnavailable(
                f"candidate_pool_rerank: no published shortlists for {surface.name} in "
                f"{unpublished} (publishing failed on the split; see the surface's notes)"
            )
        regions = inputs.past["users"].set_index("user_id")["region"].reindex(users)
        served_in = set(inputs.regions)
        found: dict[str, list[int]] = {"user_id": [], "rank": [], "item_id": []}
        for user, region in zip(users.tolist(), regions.tolist(), strict=True):
            if region not in served_in:
                continue
            served = service.recommend(user, surface.name, region)
            for rank, item in enumerate(served.items, start=1):
                found["user_id"].append(user)
                found["rank"].append(rank)
                found["item_id"].append(int(item["item_id"]))
    finally:
        service.close()
    return pd.DataFrame(found, dtype="int64")


def _reranked_for_everyone(settings: Settings, surface: SurfaceConfig) -> Settings:
    """`settings` with `surface` served in candidate_pool_rerank for every subject (no
    experiment) under the offline latency budget."""
    pool = surface.candidate_pool.model_copy(
        update={"latency_budget_ms": OFFLINE_LATENCY_BUDGET_MS}
    )
    reranked = surface.model_copy(
        update={"serving_mode": "candidate_pool_rerank", "experiment": None, "candidate_pool": pool}
    )
    return settings.model_copy(update={"surfaces": {**settings.surfaces, surface.name: reranked}})


MODE_LISTS: dict[str, ModeLists] = {
    "final_slate": final_slate_lists,
    "fallback_only": fallback_only_lists,
    "candidate_pool_rerank": candidate_pool_rerank_lists,
}


@dataclass(frozen=True)
class ArmComparison:
    """One experiment evaluated offline on the split."""

    experiment_id: str
    arms: dict[str, dict[str, Any]]
    """Arm → {serving_mode, users, metrics on the arm's users}."""
    modes: dict[str, ListMetrics]
    """Serving mode → metrics on every evaluated subject."""
    notes: tuple[str, ...] = ()

    def as_json(self) -> dict[str, Any]:
        return {
            "experiment_id": self.experiment_id,
            "arms": {
                arm: {**entry, "metrics": entry["metrics"].as_dict()}
                for arm, entry in self.arms.items()
            },
            "modes_on_all_subjects": {mode: m.as_dict() for mode, m in self.modes.items()},
            "notes": list(self.notes),
        }

    def text_lines(self, k: int) -> list[str]:
        lines = [f"experiment {self.experiment_id}:"]
        for arm, entry in self.arms.items():
            metrics = entry["metrics"]
            lines.append(
                f"  arm {arm} ({entry['serving_mode']}, {entry['users']} users): "
                f"recall@{k} {metrics.recall:.4f}, ndcg@{k} {metrics.ndcg:.4f}"
            )
        for mode, metrics in self.modes.items():
            lines.append(
                f"  {mode} on all {metrics.users} users: recall@{k} {metrics.recall:.4f}, "
                f"ndcg@{k} {metrics.ndcg:.4f}"
            )
        lines += [f"  note: {note}" for note in self.notes]
        return lines


def compare_arms(
    experiment: Experiment,
    inputs: ArmInputs,
    users: np.ndarray,
    score: Callable[[pd.DataFrame, np.ndarray], ListMetrics],
) -> ArmComparison:
    """Score every arm's mode on its subjects and every mode on all `users`.

    `score(lists, users)` scores lists for those users (the evaluation's own metrics).
    A mode without a builder here, or whose builder raises `ModeUnavailable`, is reported
    in `notes` rather than guessed.
    """
    split = experiment.split(users)
    notes = []
    modes: dict[str, ListMetrics] = {}
    lists_by_mode: dict[str, pd.DataFrame] = {}
    for mode in experiment.modes():
        build = MODE_LISTS.get(mode)
        if build is None:
            notes.append(f"serving mode {mode!r} has no offline list builder; not evaluated")
            continue
        try:
            lists_by_mode[mode] = build(inputs, users)
        except ModeUnavailable as error:
            notes.append(f"serving mode {mode!r} not evaluated: {error}")
            continue
        modes[mode] = score(lists_by_mode[mode], users)
    arms = {}
    for assignment in experiment.arms:
        mode = assignment.serving_mode
        if mode not in lists_by_mode:
            continue
        arm_users = split[assignment.arm]
        arms[assignment.arm] = {
            "serving_mode": mode,
            "users": len(arm_users),
            "metrics": score(lists_by_mode[mode], arm_users),
        }
    return ArmComparison(experiment.experiment_id, arms, modes, tuple(notes))
