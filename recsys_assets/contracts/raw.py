"""Contracts of the source tables under `raw/`.

Ids are integers (`user_id`, `item_id`): they index embedding tables directly and keep
joins cheap at 50B candidate rows. Timestamps are naive UTC. A list of regions is a
`|`-separated string; `*` means every configured region.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pandas as pd
import pandera.pandas as pa
from pandera.typing import Series

from recsys_assets.contracts.errors import (
    SAMPLE_ROWS,
    ContractViolation,
    Violation,
    violations_from_pandera,
)

EVENT_TYPES = ("view", "click", "purchase", "hide", "rating")
ITEM_STATUSES = ("active", "inactive", "deleted")
POLICY_STATES = ("approved", "pending", "banned")
RISK_LEVELS = ("low", "medium", "high")
CASE_STATES = ("open", "in_progress", "closed")
CONTROL_TARGETS = ("item", "creator", "category")
CONTROL_ACTIONS = ("hide", "unhide")
ALL_REGIONS = "*"
CLOCK_SKEW = timedelta(minutes=5)


class _Contract(pa.DataFrameModel):
    class Config:
        coerce = True
        strict = True


class Users(_Contract):
    """One row per user (or enterprise actor)."""

    user_id: Series[int] = pa.Field(ge=0, unique=True, description="Stable integer user id")
    region: Series[str] = pa.Field(description="Home region; one of the configured regions")
    locale: Series[str] = pa.Field(description="BCP 47 locale, e.g. en-US")
    tenant_id: Series[str] = pa.Field(
        nullable=True, description="Enterprise tenant; null = consumer"
    )
    actor_role: Series[str] = pa.Field(
        nullable=True,
        description="Role within the tenant (agent, supervisor, admin); null = consumer",
    )
    consent_personalization: Series[bool] = pa.Field(description="May receive personalized lists")
    email_subscribed: Series[bool] = pa.Field(description="Subscribed to email")
    push_enabled: Series[bool] = pa.Field(description="Opted in to push")
    timezone: Series[str] = pa.Field(description="IANA timezone, e.g. Europe/Berlin")
    quiet_hours_start: Series[int] = pa.Field(ge=0, le=23, description="Local hour push stops")
    quiet_hours_end: Series[int] = pa.Field(ge=0, le=23, description="Local hour push resumes")
    created_at: Series[pd.Timestamp] = pa.Field(description="Account creation (UTC)")
    last_active_at: Series[pd.Timestamp] = pa.Field(description="Last activity (UTC)")


class Items(_Contract):
    """One row per recommendable item, with everything the final checks need."""

    item_id: Series[int] = pa.Field(ge=0, unique=True, description="Stable integer item id")
    item_type: Series[str] = pa.Field(description="product, article, video, case, ...")
    title: Series[str] = pa.Field(nullable=True, description="Display title")
    category: Series[str] = pa.Field(description="Primary category")
    creator_id: Series[str] = pa.Field(description="Seller, author or owning team")
    regions: Series[str] = pa.Field(description="'|'-separated regions where available; '*' = all")
    status: Series[str] = pa.Field(isin=ITEM_STATUSES, description="active, inactive or deleted")
    policy_state: Series[str] = pa.Field(
        isin=POLICY_STATES, description="approved, pending, banned"
    )
    stock: Series[int] = pa.Field(ge=-1, description="Units in stock; -1 = not stock-tracked")
    is_sponsored: Series[bool] = pa.Field(description="Paid placement")
    campaign_id: Series[str] = pa.Field(nullable=True, description="Sponsoring campaign")
    campaign_end: Series[pd.Timestamp] = pa.Field(nullable=True, description="Campaign end (UTC)")
    risk_level: Series[str] = pa.Field(isin=RISK_LEVELS, description="Trust & safety risk")
    tenant_id: Series[str] = pa.Field(nullable=True, description="Owning tenant; null = public")
    required_role: Series[str] = pa.Field(nullable=True, description="Role needed to act on it")
    case_state: Series[str] = pa.Field(
        nullable=True, description="open/in_progress/closed for cases"
    )
    created_at: Series[pd.Timestamp] = pa.Field(description="When the item was created (UTC)")

    @pa.dataframe_check(error="sponsored items need campaign_id and campaign_end")
    def sponsored_have_campaign(cls, frame: pd.DataFrame) -> Series[bool]:
        return ~frame["is_sponsored"] | (
            frame["campaign_id"].notna() & frame["campaign_end"].notna()
        )


class Interactions(_Contract):
    """User behaviour: one row per event."""

    user_id: Series[int] = pa.Field(ge=0, description="References users.user_id")
    item_id: Series[int] = pa.Field(ge=0, description="References items.item_id")
    event_type: Series[str] = pa.Field(
        isin=EVENT_TYPES, description="view|click|purchase|hide|rating"
    )
    value: Series[float] = pa.Field(description="1.0 for events; the rating for ratings")
    ts: Series[pd.Timestamp] = pa.Field(description="Event time (UTC)")


class Exposures(_Contract):
    """What was shown to whom, on which surface (drives frequency caps)."""

    user_id: Series[int] = pa.Field(ge=0, description="References users.user_id")
    item_id: Series[int] = pa.Field(ge=0, description="References items.item_id")
    surface: Series[str] = pa.Field(description="Surface the item was shown on")
    ts: Series[pd.Timestamp] = pa.Field(description="Exposure time (UTC)")


class UserControls(_Contract):
    """Explicit user controls: hide or unhide an item, a creator or a category."""

    user_id: Series[int] = pa.Field(ge=0, description="References users.user_id")
    target_type: Series[str] = pa.Field(isin=CONTROL_TARGETS, description="item|creator|category")
    target_id: Series[str] = pa.Field(description="item_id, creator_id or category, as text")
    action: Series[str] = pa.Field(isin=CONTROL_ACTIONS, description="hide|unhide")
    ts: Series[pd.Timestamp] = pa.Field(description="When the user acted (UTC)")


class Editorial(_Contract):
    """Curated lists per region with a validity window."""

    list_name: Series[str] = pa.Field(description="Editorial list name")
    region: Series[str] = pa.Field(description="Region the list is for")
    item_id: Series[int] = pa.Field(ge=0, description="References items.item_id")
    position: Series[int] = pa.Field(ge=1, description="1-based position in the list")
    valid_from: Series[pd.Timestamp] = pa.Field(description="Start of validity (UTC)")
    valid_to: Series[pd.Timestamp] = pa.Field(description="End of validity (UTC)")

    @pa.dataframe_check(error="valid_to must be after valid_from")
    def window_ordered(cls, frame: pd.DataFrame) -> Series[bool]:
        return frame["valid_to"] > frame["valid_from"]


RAW_CONTRACTS: dict[str, type[_Contract]] = {
    "users": Users,
    "items": Items,
    "interactions": Interactions,
    "exposures": Exposures,
    "user_controls": UserControls,
    "editorial": Editorial,
}
"""Every source table and its contract, in the order they are validated and written."""

REQUIRED_TABLES = ("users", "items", "interactions")
"""Tables that must have rows: nothing can be recommended without them."""
OPTIONAL_TABLES = ("exposures", "user_controls", "editorial")
"""Tables that may be empty (an import rarely has them); they still need their columns."""

_KEYS = {
    "users": ["user_id"],
    "items": ["item_id"],
    "editorial": ["list_name", "region", "position"],
}
_TIMESTAMPS = {
    "users": ["created_at", "last_active_at"],
    "items": ["created_at"],
    "interactions": ["ts"],
    "exposures": ["ts"],
    "user_controls": ["ts"],
}
_FOREIGN_KEYS = {
    "interactions": [("user_id", "users"), ("item_id", "items")],
    "exposures": [("user_id", "users"), ("item_id", "items")],
    "user_controls": [("user_id", "users")],
    "editorial": [("item_id", "items")],
}


def validate_table(
    table: str,
    frame: pd.DataFrame,
    *,
    source: str = "",
    now: datetime | None = None,
    regions: tuple[str, ...] | None = None,
) -> pd.DataFrame:
    """Validate and coerce one source table; raise ContractViolation naming every problem.

    A required table (REQUIRED_TABLES) must have rows; an optional one may be empty but
    still needs every column.
    """
    contract = RAW_CONTRACTS[table]
    if frame.empty and table in REQUIRED_TABLES:
        raise ContractViolation(
            table, [Violation("(table)", "empty table: at least one row is required", 0)], source
        )
    try:
        validated = contract.validate(frame, lazy=True)
    except pa.errors.SchemaErrors as error:
        raise ContractViolation(table, violations_from_pandera(error, frame), source) from None
    violations = _duplicate_keys(table, validated) + _future_timestamps(table, validated, now)
    if regions is not None:
        violations += _unknown_regions(table, validated, regions)
    if violations:
        raise ContractViolation(table, violations, source)
    return validated


def check_foreign_keys(tables: dict[str, pd.DataFrame], *, sources: dict[str, str]) -> None:
    """Every referencing id must exist in its parent table (users, items)."""
    for table, references in _FOREIGN_KEYS.items():
        if table not in tables:
            continue
        frame = tables[table]
        violations = []
        for column, parent in references:
            known = tables[parent][column]
            unknown = ~frame[column].isin(known)
            if unknown.any():
                violations.append(_violation(frame, unknown, column, f"unknown {parent}.{column}"))
        if violations:
            raise ContractViolation(table, violations, sources.get(table, ""))


def _violation(frame: pd.DataFrame, mask: pd.Series, column: str, check: str) -> Violation:
    bad = frame.loc[mask, column].head(SAMPLE_ROWS)
    samples = tuple(f"row {index}: {value!r}" for index, value in bad.items())
    return Violation(column=column, check=check, count=int(mask.sum()), samples=samples)


def _duplicate_keys(table: str, frame: pd.DataFrame) -> list[Violation]:
    keys = _KEYS.get(table)
    if not keys or len(keys) == 1:  # single keys are checked by the contract's unique=True
        return []
    duplicated = frame.duplicated(subset=keys, keep=False)
    if not duplicated.any():
        return []
    samples = tuple(
        f"row {index}: {tuple(row)}"
        for index, row in frame.loc[duplicated, keys].head(SAMPLE_ROWS).iterrows()
    )
    return [Violation("+".join(keys), "duplicate key", int(duplicated.sum()), samples)]


def _future_timestamps(table: str, frame: pd.DataFrame, now: datetime | None) -> list[Violation]:
    limit = pd.Timestamp(now or datetime.now(UTC).replace(tzinfo=None)) + CLOCK_SKEW
    found = []
    for column in _TIMESTAMPS.get(table, []):
        future = frame[column] > limit
        if future.any():
            found.append(_violation(frame, future, column, f"timestamp in the future (> {limit})"))
    return found


def _unknown_regions(table: str, frame: pd.DataFrame, regions: tuple[str, ...]) -> list[Violation]:
    allowed = set(regions)
    if table in ("users", "editorial"):
        unknown = ~frame["region"].isin(allowed)
        if unknown.any():
            return [
                _violation(frame, unknown, "region", f"region not configured {sorted(allowed)}")
            ]
    if table == "items":
        listed = frame["regions"].str.split("|")
        unknown = listed.map(lambda names: not all(n == ALL_REGIONS or n in allowed for n in names))
        if unknown.any():
            return [
                _violation(frame, unknown, "regions", f"region not configured {sorted(allowed)}")
            ]
    return []
