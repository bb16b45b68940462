"""The final online check: one batch per list, a reason for every rejected item.

Item-state reasons come from `recsys_assets.rules.eligibility` (the arrays it builds from
the same rules publish validation runs); this module only adds what depends on the person
and on what happened since generation: tombstones naming them, their hides, their
purchases and the surface's frequency cap. Codes follow `REASON_BY_CODE`: the smallest
non-zero code that applies is the reason reported.

The personal rules work by set intersection (the person's few hides against the list's
~100 items, in C) rather than a Python loop over every item: that loop was most of a fill.
"""

from __future__ import annotations

from operator import itemgetter

import numpy as np

from recsys_assets.rules.eligibility import (
    ALREADY_CONSUMED,
    CODE_BY_REASON,
    FREQUENCY_CAP,
    HIDDEN_BY_USER,
    TOMBSTONED,
)
from recsys_assets.serving.state import FREQUENCY_WINDOW_NS, Catalog, PersonalFilters, Subject

_TOMBSTONED = CODE_BY_REASON[TOMBSTONED]
_HIDDEN = CODE_BY_REASON[HIDDEN_BY_USER]
_CONSUMED = CODE_BY_REASON[ALREADY_CONSUMED]
_FREQUENCY_CAP = CODE_BY_REASON[FREQUENCY_CAP]


def _attributes(values: list[str], places: list[int]) -> list[str]:
    """values[p] for every place, via one C-level call."""
    picked = itemgetter(*places)(values)
    return [picked] if len(places) == 1 else list(picked)


def _indexes_of(values: list, wanted: set) -> list[int]:
    """Every index of every wanted value; `list.index` scans in C, `wanted` is tiny."""
    found = []
    for value in wanted:
        index = values.index(value)
        while True:
            found.append(index)
            try:
                index = values.index(value, index + 1)
            except ValueError:
                break
    return found


def final_reason_codes(
    item_ids: np.ndarray,
    positions: np.ndarray,
    *,
    catalog: Catalog,
    region: str,
    now_ns: int,
    subject: Subject,
    filters: PersonalFilters | None,
    frequency_cap: int,
) -> np.ndarray:
    """Reason code per item of one list (0 = may be shown), checked in one batch.

    `positions` are the items' positions in `catalog` (-1 = unknown item).
    """
    codes = catalog.arrays.reason_codes(
        positions,
        region=region,
        now_ns=now_ns,
        actor_tenant=subject.tenant_id,
        actor_role=subject.actor_role,
    )
    if filters is None or len(item_ids) == 0:
        return codes
    ids: list[int] = item_ids.tolist()
    present = set(ids)
    personal: dict[int, int] = {}  # item index -> first personal reason

    def mark(indexes: list[int], code: int) -> None:
        for index in indexes:  # the first reason in REJECTION_REASONS order wins
            personal[index] = min(personal.get(index, code), code)

    item_rules = (
        (filters.tombstoned_items, _TOMBSTONED),
        (filters.hidden_items, _HIDDEN),
        (filters.consumed, _CONSUMED),
    )
    for blocked, code in item_rules:
        if blocked and (hits := present.intersection(blocked)):
            mark(_indexes_of(ids, hits), code)
    if filters.tombstoned_creators or filters.hidden_creators or filters.hidden_categories:
        places = np.maximum(positions, 0).tolist()
        creators = _attributes(catalog.creator_of, places)
        for blocked, code in (
            (filters.tombstoned_creators, _TOMBSTONED),
            (filters.hidden_creators, _HIDDEN),
        ):
            if blocked and (hits := blocked.intersection(creators)):
                mark(_indexes_of(creators, hits), code)
        if filters.hidden_categories:
            categories = _attributes(catalog.category_of, places)
            if hits := filters.hidden_categories.intersection(categories):
                mark(_indexes_of(categories, hits), _HIDDEN)
    exposures = filters.exposures
    if frequency_cap > 0 and exposures and (shown := present.intersection(exposures)):
        window_start = now_ns - FREQUENCY_WINDOW_NS
        capped = {
            item_id
            for item_id in shown
            if sum(1 for ts in exposures.get(item_id, ()) if ts > window_start) >= frequency_cap
        }
        if capped:
            mark(_indexes_of(ids, capped), _FREQUENCY_CAP)
    for index, code in personal.items():
        if codes[index] == 0:  # item-state reasons precede the personal ones
            codes[index] = code
    return codes
