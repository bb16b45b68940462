"""Who may receive a surface's list: consent, subscriptions, activity, tenant actors."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd

from recsys_assets.config import SurfaceConfig
from recsys_assets.rules.person import (
    CONSENT,
    EMAIL,
    PUSH,
    person_requirements,
    with_consent_events,
)

SUBJECT_COLUMNS = [
    "subject_id",
    "region",
    "tenant_id",
    "actor_role",
    "timezone",
    "quiet_hours_start",
    "quiet_hours_end",
    "last_active_at",
]

# Exclusion reasons, reported in the order they are applied (a user counts once, first reason).
OTHER_REGION = "other_region"
NO_CONSENT = "no_personalization_consent"
NOT_SUBSCRIBED = "not_email_subscribed"
PUSH_DISABLED = "push_disabled"
NOT_TENANT_ACTOR = "not_tenant_actor"
INACTIVE = "inactive"
SUPPRESSED = "suppressed_by_policy_change"

_REQUIREMENT_REASONS = {CONSENT: NO_CONSENT, EMAIL: NOT_SUBSCRIBED, PUSH: PUSH_DISABLED}


@dataclass(frozen=True)
class SubjectSelection:
    subjects: pd.DataFrame
    excluded: dict[str, int]
    """Users of the region not selected, by first failing reason."""


def select_subjects(
    users: pd.DataFrame,
    surface: SurfaceConfig,
    *,
    region: str,
    now: pd.Timestamp,
    suppressed: set[int] | frozenset[int] = frozenset(),
    events: pd.DataFrame | None = None,
) -> SubjectSelection:
    """Users of `region` eligible for `surface` at `now`, with exclusion counts by reason.

    The person requirements are `rules.person.person_requirements` (a personalized surface
    always needs consent_personalization), the ones serving checks: users without them are
    served non-personalized fallback lists (or nothing) by the serving layer instead.
    Consent is as the latest serving consent `events` (`rules.person.read_events`) left it,
    so a revocation posted to serving is honoured by the next run. `suppressed` users
    (consent revoked by a policy change not yet in the users table) are excluded too.
    """
    if events is not None:
        users = with_consent_events(users, events)
    in_region = users[users["region"] == region]
    excluded: dict[str, int] = {OTHER_REGION: int(len(users) - len(in_region))}
    keep = pd.Series(True, index=in_region.index)

    def exclude(reason: str, failing: pd.Series) -> None:
        nonlocal keep
        newly = keep & failing
        excluded[reason] = int(newly.sum())
        keep = keep & ~failing

    for requirement in person_requirements(surface):
        exclude(_REQUIREMENT_REASONS[requirement], ~in_region[requirement].astype(bool))
    if surface.personalized and suppressed:
        exclude(SUPPRESSED, in_region["user_id"].isin(list(suppressed)))
    if "tenant_actor" in surface.eligibility.requires:
        exclude(NOT_TENANT_ACTOR, in_region["tenant_id"].isna() | in_region["actor_role"].isna())
    cutoff = now - pd.Timedelta(days=surface.eligibility.active_within_days)
    exclude(INACTIVE, in_region["last_active_at"] < cutoff)

    subjects = (
        in_region.loc[keep]
        .rename(columns={"user_id": "subject_id"})
        .loc[:, SUBJECT_COLUMNS]
        .sort_values("subject_id", kind="stable")
        .reset_index(drop=True)
    )
    return SubjectSelection(subjects=subjects, excluded=excluded)


def shard_bounds(n_subjects: int, shard_size: int) -> list[tuple[int, int]]:
    """Half-open row ranges that split `n_subjects` into shards of at most `shard_size`.

    No subjects still gives one (empty) shard, so every stage writes a part with its schema
    and downstream stages and publish read an empty partition rather than a missing one.
    """
    if n_subjects == 0:
        return [(0, 0)]
    return [
        (start, min(start + shard_size, n_subjects)) for start in range(0, n_subjects, shard_size)
    ]


def shard_count(n_subjects: int, shards: int | Literal["auto"], shard_subjects: int) -> int:
    """Shards of a partition with `n_subjects`: `pipeline.shards`, or under `auto` one per
    `shard_subjects` subjects; never more than the subjects (a shard beyond them could only
    be an empty part and four idle steps) and at least one, so an empty partition still has
    its parts."""
    wanted = math.ceil(n_subjects / shard_subjects) if shards == "auto" else shards
    return max(1, min(wanted, n_subjects))


def subject_shards(subject_ids: np.ndarray | pd.Series, shards: int) -> np.ndarray:
    """The shard (0 … shards-1) of each subject: a SplitMix64 hash of its id modulo `shards`.

    The same id lands in the same shard in every run, process and machine (no salted
    `hash()`), and consecutive ids spread evenly over the shards.
    """
    mixed = np.asarray(subject_ids, dtype=np.int64).view(np.uint64)
    with np.errstate(over="ignore"):
        mixed = mixed + np.uint64(0x9E3779B97F4A7C15)
        mixed = (mixed ^ (mixed >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        mixed = (mixed ^ (mixed >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        mixed = mixed ^ (mixed >> np.uint64(31))
    return (mixed % np.uint64(shards)).astype(np.int64)
