"""Person rules: who may get a surface's personalized list, and which items they must not see.

One definition for subject selection, candidate blocking, publish validation and serving's
final check, so a person excluded or an item blocked in one place is excluded or blocked
everywhere (a property test checks that they agree):

- **Consent per surface.** Every personalized surface needs `consent_personalization`, on
  top of what its `eligibility.requires` lists (`email_subscribed`, `push_enabled`). The
  enterprise action queue is personalized too: revoking consent empties it like any other.
- **Already consumed.** A click, a purchase or a rating of the item (any value): the user has
  met it, so it is not proposed again unless the surface sets `repeat_consumption`.
- **Hidden.** The latest control per (user, target) wins: a later unhide lifts an earlier
  hide; on equal timestamps the one recorded later wins. Targets are an item, a creator or
  a category.
- **Positive interaction** lives in `rules/engagement.py` (`positive_signal`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd

from recsys_assets.config import SurfaceConfig
from recsys_assets.rules.eligibility import ALREADY_CONSUMED, CONSENT_REVOKED, HIDDEN_BY_USER

CONSENT = "consent_personalization"
EMAIL = "email_subscribed"
PUSH = "push_enabled"
PERSON_REQUIREMENTS = (CONSENT, EMAIL, PUSH)
"""Per-person flags a surface can require, in the order exclusions are reported."""

CONSUMED_EVENTS = ("click", "purchase", "rating")
"""Interactions after which an item is not recommended again to the same user (unless the
surface sets `repeat_consumption`)."""


@dataclass(frozen=True)
class PersonFacts:
    """The raw tables the person rules read: users (consent flags), interactions, controls."""

    users: pd.DataFrame
    interactions: pd.DataFrame
    user_controls: pd.DataFrame


def person_requirements(surface: SurfaceConfig) -> tuple[str, ...]:
    """The person flags `surface` needs: consent on every personalized surface, plus its
    listed subscriptions."""
    required = set(surface.eligibility.requires)
    if surface.personalized:
        required.add(CONSENT)
    return tuple(flag for flag in PERSON_REQUIREMENTS if flag in required)


def may_receive(surface: SurfaceConfig, flags: Mapping[str, bool]) -> bool:
    """Whether a person with these flags may get `surface`'s personalized list."""
    return all(bool(flags.get(flag, False)) for flag in person_requirements(surface))


def blocks_consumed(surface: SurfaceConfig) -> bool:
    return not surface.repeat_consumption


def consumed_mask(interactions: pd.DataFrame) -> np.ndarray:
    """True where an interaction means the user consumed the item."""
    return interactions["event_type"].isin(CONSUMED_EVENTS).to_numpy(dtype=bool)


def latest_controls(user_controls: pd.DataFrame) -> pd.DataFrame:
    """The latest control per (user_id, target_type, target_id): the one that holds now."""
    ordered = user_controls.sort_values("ts", kind="stable")
    return ordered.drop_duplicates(["user_id", "target_type", "target_id"], keep="last")


def hidden_pairs(user_controls: pd.DataFrame, items: pd.DataFrame) -> pd.DataFrame:
    """(user_id, item_id) pairs the user hid, directly or through a creator or category."""
    hides = latest_controls(user_controls)
    hides = hides[hides["action"] == "hide"]
    direct = hides[hides["target_type"] == "item"]
    found = [
        pd.DataFrame(
            {
                "user_id": direct["user_id"].to_numpy(),
                "item_id": pd.to_numeric(direct["target_id"], errors="coerce"),
            }
        ).dropna()
    ]
    for target, column in (("creator", "creator_id"), ("category", "category")):
        chosen = hides.loc[hides["target_type"] == target, ["user_id", "target_id"]]
        if chosen.empty:
            continue
        keys = pd.DataFrame({"item_id": items["item_id"], "target_id": items[column].astype(str)})
        joined = chosen.assign(target_id=chosen["target_id"].astype(str)).merge(
            keys, on="target_id"
        )
        found.append(joined[["user_id", "item_id"]])
    pairs = pd.concat(found, ignore_index=True).astype("int64")
    return pairs.drop_duplicates().reset_index(drop=True)


def consumed_pairs(interactions: pd.DataFrame) -> pd.DataFrame:
    """(user_id, item_id) pairs the user consumed."""
    consumed = interactions.loc[consumed_mask(interactions), ["user_id", "item_id"]]
    return consumed.astype("int64").drop_duplicates().reset_index(drop=True)


def person_rejection_reasons(
    rows: pd.DataFrame,
    *,
    surface: SurfaceConfig,
    facts: PersonFacts,
    items: pd.DataFrame,
) -> pd.Series:
    """The person reason each (subject_id, item_id) row would be refused for (None = none).

    As serving reports them: a subject without the surface's consent gets no personalized
    list, so every row is `consent_revoked` (an unknown subject counts as not consenting);
    otherwise hidden before already consumed.
    """
    reasons = pd.Series(None, index=rows.index, dtype=object, name="person_reason")
    if rows.empty:
        return reasons
    blocked = [(HIDDEN_BY_USER, hidden_pairs(facts.user_controls, items))]
    if blocks_consumed(surface):
        blocked.append((ALREADY_CONSUMED, consumed_pairs(facts.interactions)))
    keys = pd.MultiIndex.from_arrays(
        [rows["subject_id"].astype("int64"), rows["item_id"].astype("int64")]
    )
    for reason, pairs in reversed(blocked):  # earlier reasons win: assign them last
        hit = keys.isin(pd.MultiIndex.from_frame(pairs[["user_id", "item_id"]]))
        reasons[hit] = reason
    flags = facts.users.drop_duplicates("user_id").set_index("user_id")
    allowed = pd.Series(True, index=rows.index)
    for flag in person_requirements(surface):
        allowed &= rows["subject_id"].map(flags[flag]).fillna(False).astype(bool)
    reasons[~allowed.to_numpy()] = CONSENT_REVOKED  # no list at all: every row fails
    return reasons
