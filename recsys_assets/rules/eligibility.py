"""Item eligibility: the rules that decide whether an item may be shown at all.

The pipeline filters candidates with these, publish validation measures the invalid-item
rate with these, and serving's final check starts from these. Because all three import
the same functions, a list that passes publish validation cannot be rejected by serving
for an item-state reason that publish did not see, and vice versa.

Reasons are stable strings: they are metric labels and decision-log values.
"""

from __future__ import annotations

from datetime import datetime

import numpy as np
import pandas as pd

from recsys_assets.contracts.raw import ALL_REGIONS

# Item-state reasons (this module), in the order they are reported when several apply.
INACTIVE = "inactive_or_deleted"
NOT_APPROVED = "not_approved"
NOT_IN_REGION = "not_in_region"
OUT_OF_STOCK = "out_of_stock"
CAMPAIGN_ENDED = "campaign_ended"
TENANT_NOT_ALLOWED = "tenant_not_allowed"
ROLE_NOT_ALLOWED = "role_not_allowed"
CASE_CLOSED = "case_closed"
UNKNOWN_ITEM = "unknown_item"
# Reasons that depend on the subject or on events after generation (serving adds these).
TOMBSTONED = "tombstoned"
HIDDEN_BY_USER = "hidden_by_user"
ALREADY_CONSUMED = "already_consumed"
FREQUENCY_CAP = "frequency_cap"
CONSENT_REVOKED = "consent_revoked"

ITEM_REASONS = (
    UNKNOWN_ITEM,
    INACTIVE,
    NOT_APPROVED,
    NOT_IN_REGION,
    OUT_OF_STOCK,
    CAMPAIGN_ENDED,
    CASE_CLOSED,
    TENANT_NOT_ALLOWED,
    ROLE_NOT_ALLOWED,
)
REJECTION_REASONS = (
    *ITEM_REASONS,
    TOMBSTONED,
    HIDDEN_BY_USER,
    ALREADY_CONSUMED,
    FREQUENCY_CAP,
    CONSENT_REVOKED,
)


def available_in_region(regions: pd.Series, region: str) -> np.ndarray:
    """True where a `|`-separated region list contains `region` or the wildcard."""
    padded = "|" + regions.astype(str) + "|"
    return (
        padded.str.contains(f"|{region}|", regex=False)
        | padded.str.contains(f"|{ALL_REGIONS}|", regex=False)
    ).to_numpy(dtype=bool)


def item_rejection_reasons(
    items: pd.DataFrame,
    *,
    region: str,
    now: datetime,
    subject_tenant: pd.Series | str | None = None,
    subject_role: pd.Series | str | None = None,
) -> pd.Series:
    """First failing item-state reason per row of `items`, or None where the item is eligible.

    `items` has the raw items columns (status, policy_state, regions, stock, is_sponsored,
    campaign_end, case_state, tenant_id, required_role). `subject_tenant` (scalar or aligned
    with `items`; None/NaN = a consumer) enables the tenant rule: an item owned by a tenant
    may only go to that tenant's actors, and a consumer gets no tenant-owned item.
    `subject_role` enables the role rule: an item with a required_role goes only to actors
    holding that role. Pass neither to check item state alone (publish's invalid-item rate
    for consumer surfaces passes the tenant too, so both paths agree).
    """
    now_ts = pd.Timestamp(now).tz_localize(None) if pd.Timestamp(now).tzinfo else pd.Timestamp(now)
    checks: list[tuple[str, np.ndarray]] = [
        (INACTIVE, (items["status"] != "active").to_numpy(dtype=bool)),
        (NOT_APPROVED, (items["policy_state"] != "approved").to_numpy(dtype=bool)),
        (NOT_IN_REGION, ~available_in_region(items["regions"], region)),
        (OUT_OF_STOCK, (items["stock"] == 0).to_numpy(dtype=bool)),
        (
            CAMPAIGN_ENDED,
            (items["is_sponsored"].astype(bool) & (items["campaign_end"] <= now_ts))
            .fillna(False)
            .to_numpy(dtype=bool),
        ),
        (CASE_CLOSED, (items["case_state"] == "closed").fillna(False).to_numpy(dtype=bool)),
    ]
    if subject_tenant is not None:
        owner = items["tenant_id"].astype(object)
        tenant = _aligned(subject_tenant, items.index)
        foreign = owner.notna() & (tenant.isna() | (owner != tenant))
        checks.append((TENANT_NOT_ALLOWED, foreign.to_numpy(dtype=bool)))
    if subject_role is not None:
        required = items["required_role"].astype(object)
        role = _aligned(subject_role, items.index)
        missing_role = required.notna() & (role.isna() | (required != role))
        checks.append((ROLE_NOT_ALLOWED, missing_role.to_numpy(dtype=bool)))
    reasons = np.full(len(items), None, dtype=object)
    for reason, failed in reversed(checks):  # earlier checks win: assign them last
        reasons[failed] = reason
    return pd.Series(reasons, index=items.index, name="rejection_reason")


def _aligned(value: pd.Series | str, index: pd.Index) -> pd.Series:
    series = value if isinstance(value, pd.Series) else pd.Series(value, index=index)
    return series.astype(object).where(series.notna(), None)


def eligible_items(items: pd.DataFrame, *, region: str, now: datetime) -> pd.DataFrame:
    """The items any subject in `region` may be shown at `now` (tenant rules not applied)."""
    return items[item_rejection_reasons(items, region=region, now=now).isna().to_numpy()]
