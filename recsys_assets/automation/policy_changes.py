"""Policy-change files: the schema, line validation, and what each change withdraws or refreshes.

A policy-change file is JSON Lines: one change per line (blank lines are ignored). Every
line is validated on its own, so one bad line never hides the good ones beside it. The
schema, per type, is documented in docs/AUTOMATION.md; `CHANGE_RULES` is its source.

A valid change turns into

- tombstone rows (`rules.tombstones`), which serving honours at once, and
- the surface × region partitions whose lists it makes wrong, which are recomputed.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any, Literal

import pandas as pd

from recsys_assets.config import Settings
from recsys_assets.contracts.raw import CASE_STATES
from recsys_assets.pipeline.partitions import SurfaceRegion

RegionRule = Literal["optional", "required", "forbidden"]
RefreshScope = Literal["all_surfaces", "tenant_surfaces", "none"]

_CHANGE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.=-]{0,199}$")
MAX_ID = 2**63 - 1
_COMMON_FIELDS = frozenset({"change_id", "type", "effective_at", "reason"})
_SINGULAR_HINTS = {"item_id": "item_ids", "user_id": "user_ids", "creator_id": "creator_ids"}


@dataclass(frozen=True)
class ChangeRule:
    """What one change type needs, what it may carry, and what it does."""

    required: frozenset[str]
    optional: frozenset[str]
    region: RegionRule
    refresh: RefreshScope
    description: str


def _rule(
    required: set[str],
    optional: set[str],
    *,
    region: RegionRule,
    refresh: RefreshScope,
    description: str,
) -> ChangeRule:
    if region != "forbidden":
        (required if region == "required" else optional).add("region")
    return ChangeRule(frozenset(required), frozenset(optional), region, refresh, description)


CHANGE_RULES: dict[str, ChangeRule] = {
    "item_banned": _rule(
        {"item_ids"},
        set(),
        region="optional",
        refresh="all_surfaces",
        description="items withdrawn by trust & safety in `region` (null: everywhere)",
    ),
    "item_deleted": _rule(
        {"item_ids"},
        set(),
        region="forbidden",
        refresh="all_surfaces",
        description="items removed from the catalog, everywhere",
    ),
    "item_out_of_stock": _rule(
        {"item_ids"},
        set(),
        region="optional",
        refresh="all_surfaces",
        description="items that cannot be sold in `region` (null: everywhere)",
    ),
    "item_region_unavailable": _rule(
        {"item_ids"},
        set(),
        region="required",
        refresh="all_surfaces",
        description="items no longer offered in one region",
    ),
    "price_changed": _rule(
        {"item_ids"},
        set(),
        region="optional",
        refresh="all_surfaces",
        description="prices changed: nothing is withdrawn, the lists are re-ranked",
    ),
    "campaign_expired": _rule(
        {"item_ids"},
        {"campaign_id"},
        region="optional",
        refresh="all_surfaces",
        description="a sponsored campaign ended early: its items are withdrawn",
    ),
    "user_hide_item": _rule(
        {"user_ids", "item_ids"},
        set(),
        region="forbidden",
        refresh="none",
        description="these people hid these items (a person's choice holds everywhere)",
    ),
    "user_hide_creator": _rule(
        {"user_ids", "creator_ids"},
        set(),
        region="forbidden",
        refresh="none",
        description="these people hid everything by these creators",
    ),
    "consent_revoked": _rule(
        {"user_ids"},
        set(),
        region="forbidden",
        refresh="none",
        description="these people get no personalized list anywhere, from effective_at",
    ),
    "tenant_permission_revoked": _rule(
        {"tenant_id"},
        {"item_ids"},
        region="optional",
        refresh="tenant_surfaces",
        description="the tenant's items (or the listed ones) may no longer be recommended",
    ),
    "case_state_changed": _rule(
        {"item_ids", "case_state"},
        set(),
        region="optional",
        refresh="tenant_surfaces",
        description="cases changed state; closed cases are withdrawn at once",
    ),
}
CHANGE_TYPES = tuple(CHANGE_RULES)


class InvalidChange(ValueError):
    """One line of a policy-change file is not a valid change; the message says why."""


@dataclass(frozen=True)
class PolicyChange:
    """One validated line of a policy-change file."""

    change_id: str
    type: str
    effective_at: datetime
    item_ids: tuple[int, ...] = ()
    user_ids: tuple[int, ...] = ()
    creator_ids: tuple[str, ...] = ()
    tenant_id: str | None = None
    region: str | None = None
    case_state: str | None = None
    campaign_id: str | None = None
    reason: str | None = None

    @property
    def rule(self) -> ChangeRule:
        return CHANGE_RULES[self.type]

    def content(self) -> dict[str, Any]:
        """The change as plain JSON data: what a re-delivery must match to be the same change."""
        data = asdict(self)
        data["effective_at"] = self.effective_at.isoformat()
        return {
            key: list(value) if isinstance(value, tuple) else value for key, value in data.items()
        }

    def tombstone_rows(self) -> list[dict[str, Any]]:
        """The tombstones this change writes (rules.tombstones columns); may be empty."""
        base = {"type": self.type, "effective_at": self.effective_at}
        if self.type in ("user_hide_item", "user_hide_creator", "consent_revoked"):
            if self.type == "user_hide_item":
                targets: list[dict[str, Any]] = [{"item_id": item} for item in self.item_ids]
            elif self.type == "user_hide_creator":
                targets = [{"creator_id": creator} for creator in self.creator_ids]
            else:
                targets = [{}]
            return [
                {**base, "user_id": user, **target} for user in self.user_ids for target in targets
            ]
        scoped = {**base, "region": self.region}
        if self.type == "price_changed":
            return []
        if self.type == "case_state_changed":
            if self.case_state != "closed":
                return []
            return [{**scoped, "item_id": item} for item in self.item_ids]
        if self.type == "tenant_permission_revoked":
            if not self.item_ids:
                return [{**scoped, "tenant_id": self.tenant_id}]
            return [
                {**scoped, "tenant_id": self.tenant_id, "item_id": item} for item in self.item_ids
            ]
        return [{**scoped, "item_id": item} for item in self.item_ids]

    def affected_partitions(self, settings: Settings) -> frozenset[SurfaceRegion]:
        """The enabled surface × region partitions whose lists this change makes wrong.

        Person-scoped changes (hides, consent) name no partition: their tombstone already
        suppresses what they concern everywhere, and recomputing whole partitions for one
        person would let a stream of hides keep the pipeline busy (docs/AUTOMATION.md).
        """
        scope = self.rule.refresh
        if scope == "none":
            return frozenset()
        regions = (self.region,) if self.region else settings.regions
        surfaces = list(settings.surfaces)
        if scope == "tenant_surfaces":
            surfaces = tenant_surfaces(settings) or surfaces
        return frozenset(
            SurfaceRegion(surface, region)
            for region in regions
            for surface in surfaces
            if settings.is_enabled(surface, region)
        )


def tenant_surfaces(settings: Settings) -> list[str]:
    """Surfaces that serve tenant actors: the only ones tenant-owned items can appear on."""
    return [
        name
        for name, surface in settings.surfaces.items()
        if "tenant_actor" in surface.eligibility.requires
    ]


def parse_change(line: str, settings: Settings) -> PolicyChange:
    """Validate one JSON line against the schema; raise InvalidChange naming the problem."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise InvalidChange(f"not valid JSON: {error.msg} at column {error.colno}") from None
    except RecursionError:
        raise InvalidChange("not valid JSON: nested too deeply") from None
    if not isinstance(record, dict):
        raise InvalidChange(f"expected a JSON object, got {type(record).__name__}")
    change_type = record.get("type")
    if not isinstance(change_type, str) or change_type not in CHANGE_RULES:
        raise InvalidChange(f"type {change_type!r} is not one of {list(CHANGE_TYPES)}")
    rule = CHANGE_RULES[change_type]
    allowed = _COMMON_FIELDS | rule.required | rule.optional
    for key in sorted(set(record) - allowed):
        hint = f" (use {_SINGULAR_HINTS[key]}, a list)" if key in _SINGULAR_HINTS else ""
        raise InvalidChange(
            f"field {key!r} is not allowed for {change_type}{hint}; allowed: {sorted(allowed)}"
        )
    missing = sorted(
        key for key in {"change_id", "effective_at"} | rule.required if record.get(key) is None
    )
    if missing:
        raise InvalidChange(f"{change_type} needs {missing}")
    region = _optional_text(record, "region")
    if region is not None and region not in settings.regions:
        raise InvalidChange(f"region {region!r} is not configured; known: {list(settings.regions)}")
    case_state = _optional_text(record, "case_state")
    if case_state is not None and case_state not in CASE_STATES:
        raise InvalidChange(f"case_state {case_state!r} is not one of {list(CASE_STATES)}")
    return PolicyChange(
        change_id=_change_id(record["change_id"]),
        type=change_type,
        effective_at=_timestamp(record["effective_at"]),
        item_ids=_ids(record, "item_ids"),
        user_ids=_ids(record, "user_ids"),
        creator_ids=_texts(record, "creator_ids"),
        tenant_id=_optional_text(record, "tenant_id"),
        region=region,
        case_state=case_state,
        campaign_id=_optional_text(record, "campaign_id"),
        reason=_optional_text(record, "reason"),
    )


def _change_id(value: Any) -> str:
    if not isinstance(value, str) or not _CHANGE_ID.match(value):
        raise InvalidChange(
            f"change_id {value!r} must be text of letters, digits and _ . = - "
            "(at most 200 characters, starting with a letter or digit)"
        )
    return value


def _timestamp(value: Any) -> datetime:
    """ISO-8601 only (not pandas' "now"/"today", which would mean a different moment on
    every retry), within the range tombstones can store (datetime64[ns])."""
    if not isinstance(value, str):
        raise InvalidChange(f"effective_at {value!r} must be an ISO-8601 text timestamp")
    try:
        stamp = pd.Timestamp(datetime.fromisoformat(value)).as_unit("ns")
    except (ValueError, OverflowError):
        raise InvalidChange(
            f"effective_at {value!r} is not an ISO-8601 timestamp between years 1678 and 2261"
        ) from None
    if stamp.tzinfo is not None:
        stamp = stamp.tz_convert("UTC").tz_localize(None)
    return stamp.floor("us").to_pydatetime()


def _ids(record: dict[str, Any], key: str) -> tuple[int, ...]:
    values = record.get(key)
    if values is None:
        return ()
    if not isinstance(values, list) or not values:
        raise InvalidChange(f"{key} must be a non-empty list of integer ids")
    bad = [value for value in values if isinstance(value, bool) or not isinstance(value, int)]
    if bad or any(value < 0 for value in values):
        raise InvalidChange(f"{key} must hold non-negative integer ids; got {values[:5]!r}")
    too_large = [value for value in values if value > MAX_ID]
    if too_large:
        # Ids are stored as int64: a larger one cannot name any item or person.
        raise InvalidChange(f"{key} must hold ids of at most {MAX_ID} (int64); got {too_large[:5]}")
    return tuple(dict.fromkeys(values))


def _texts(record: dict[str, Any], key: str) -> tuple[str, ...]:
    values = record.get(key)
    if values is None:
        return ()
    if not isinstance(values, list) or not values:
        raise InvalidChange(f"{key} must be a non-empty list of ids (text)")
    if any(not isinstance(value, str) or not value for value in values):
        raise InvalidChange(f"{key} must hold non-empty text ids; got {values[:5]!r}")
    return tuple(dict.fromkeys(values))


def _optional_text(record: dict[str, Any], key: str) -> str | None:
    value = record.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise InvalidChange(f"{key} must be non-empty text; got {value!r}")
    return value
