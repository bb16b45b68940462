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
    TENANT_NOT_ALLOWED,
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
) -> pd.Series:
    """First failing item-state reason per row of `items`, or None where the item is eligible.

    `items` has the raw items columns (status, policy_state, regions, stock, is_sponsored,
    campaign_end, tenant_id). `subject_tenant` (scalar or aligned with `items`) enables the
    tenant rule: an item owned by a tenant may only go to that tenant's actors.
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
    ]
    if subject_tenant is not None:
        owner = items["tenant_id"]
        tenant = (
            subject_tenant
            if isinstance(subject_tenant, pd.Series)
            else pd.Series(subject_tenant, index=items.index)
        )
        foreign = owner.notna() & (owner.astype(object) != tenant.astype(object))
        checks.append((TENANT_NOT_ALLOWED, foreign.fillna(True).to_numpy(dtype=bool)))
    reasons = np.full(len(items), None, dtype=object)
    for reason, failed in reversed(checks):  # earlier checks win: assign them last
        reasons[failed] = reason
    return pd.Series(reasons, index=items.index, name="rejection_reason")


def eligible_items(items: pd.DataFrame, *, region: str, now: datetime) -> pd.DataFrame:
    """The items any subject in `region` may be shown at `now` (tenant rules not applied)."""
    return items[item_rejection_reasons(items, region=region, now=now).isna().to_numpy()]
