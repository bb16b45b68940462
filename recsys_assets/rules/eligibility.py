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
# Reasons from a serving decision outside the item state (serving/kills.py).
CAMPAIGN_KILLED = "campaign_killed"

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
    CAMPAIGN_KILLED,  # only refuses items that passed every other rule: reported last
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


# Array-based variant of the rules above, for serving's per-request final check.

REASON_BY_CODE: tuple[str | None, ...] = (None, *REJECTION_REASONS)
"""Small-integer codes for the array-based checks; 0 = eligible. Codes follow the order of
REJECTION_REASONS, so the first failing reason is the smallest non-zero code that applies."""
CODE_BY_REASON: dict[str, int] = {
    reason: code for code, reason in enumerate(REASON_BY_CODE) if reason is not None
}
_CAMPAIGN_ENDED_CODE = CODE_BY_REASON[CAMPAIGN_ENDED]
_NO_CAMPAIGN_END = np.iinfo(np.int64).max


def apply_reason(codes: np.ndarray, failed: np.ndarray, code: int) -> None:
    """Record `code` where `failed`, unless an earlier check (a smaller code) already failed."""
    codes[failed & ((codes == 0) | (codes > code))] = code


def _codes_from_reasons(reasons: pd.Series) -> np.ndarray:
    return np.fromiter(
        (0 if pd.isna(reason) else CODE_BY_REASON[reason] for reason in reasons),
        dtype=np.int8,
        count=len(reasons),
    )


class ItemStateArrays:
    """The item-state rules precomputed as arrays indexed by item position.

    Serving's final check runs per request on ~100 items; pandas costs milliseconds there,
    numpy on precomputed codes microseconds. The codes come from `item_rejection_reasons`
    itself (evaluated with a `now` before every campaign end, so only the time-independent
    checks fire); the campaign end is kept as nanoseconds and compared at request time.
    Same rules, same order, therefore the same first reason as publish validation sees.
    Instances are immutable: a change of item state or tombstones builds a new one.
    """

    __slots__ = (
        "actor_codes",
        "campaign_end_ns",
        "consumer_codes",
        "item_ids",
        "required_role_codes",
        "role_index",
        "tenant_codes",
        "tenant_index",
    )

    def __init__(
        self,
        *,
        item_ids: np.ndarray,
        actor_codes: dict[str, np.ndarray],
        consumer_codes: dict[str, np.ndarray],
        campaign_end_ns: np.ndarray,
        tenant_codes: np.ndarray,
        tenant_index: dict[str, int],
        required_role_codes: np.ndarray,
        role_index: dict[str, int],
    ) -> None:
        self.item_ids = item_ids
        self.actor_codes = actor_codes
        self.consumer_codes = consumer_codes
        self.campaign_end_ns = campaign_end_ns
        self.tenant_codes = tenant_codes
        self.tenant_index = tenant_index
        self.required_role_codes = required_role_codes
        self.role_index = role_index

    @classmethod
    def from_items(cls, items: pd.DataFrame, regions: tuple[str, ...]) -> ItemStateArrays:
        """Arrays for every item of the raw items table, per configured region."""
        items = items.sort_values("item_id", kind="stable").reset_index(drop=True)
        tenants = items["tenant_id"].astype(object).where(items["tenant_id"].notna(), None)
        tenant_names = sorted({t for t in tenants if t is not None})
        tenant_index = {name: code for code, name in enumerate(tenant_names, start=1)}
        tenant_codes = np.array([tenant_index.get(t, 0) for t in tenants], dtype=np.int32)
        roles = items["required_role"].astype(object).where(items["required_role"].notna(), None)
        role_names = sorted({r for r in roles if r is not None})
        role_index = {name: code for code, name in enumerate(role_names, start=1)}
        required_role_codes = np.array([role_index.get(r, 0) for r in roles], dtype=np.int16)
        campaign_end = pd.to_datetime(items["campaign_end"]).astype("datetime64[ns]")
        sponsored = items["is_sponsored"].astype(bool).to_numpy() & campaign_end.notna().to_numpy()
        campaign_end_ns = np.where(
            sponsored, campaign_end.to_numpy().view(np.int64), _NO_CAMPAIGN_END
        ).astype(np.int64)
        before_every_campaign = pd.Timestamp.min
        consumer = pd.Series([None] * len(items), index=items.index, dtype=object)
        actor_codes: dict[str, np.ndarray] = {}
        consumer_codes: dict[str, np.ndarray] = {}
        for region in regions:
            actor_codes[region] = _codes_from_reasons(
                item_rejection_reasons(items, region=region, now=before_every_campaign)
            )
            consumer_codes[region] = _codes_from_reasons(
                item_rejection_reasons(
                    items,
                    region=region,
                    now=before_every_campaign,
                    subject_tenant=consumer,
                    subject_role=consumer,
                )
            )
        return cls(
            item_ids=np.ascontiguousarray(items["item_id"].to_numpy(dtype=np.int64)),
            actor_codes=actor_codes,
            consumer_codes=consumer_codes,
            campaign_end_ns=campaign_end_ns,
            tenant_codes=tenant_codes,
            tenant_index=tenant_index,
            required_role_codes=required_role_codes,
            role_index=role_index,
        )

    def with_reason(self, reason: str, failed_by_region: dict[str, np.ndarray]) -> ItemStateArrays:
        """A copy where `reason` also applies to the items marked in `failed_by_region`."""
        code = CODE_BY_REASON[reason]
        merged: list[dict[str, np.ndarray]] = []
        for by_region in (self.actor_codes, self.consumer_codes):
            updated = {}
            for region, codes in by_region.items():
                copy = codes.copy()
                if region in failed_by_region:
                    apply_reason(copy, failed_by_region[region], code)
                updated[region] = copy
            merged.append(updated)
        return ItemStateArrays(
            item_ids=self.item_ids,
            actor_codes=merged[0],
            consumer_codes=merged[1],
            campaign_end_ns=self.campaign_end_ns,
            tenant_codes=self.tenant_codes,
            tenant_index=self.tenant_index,
            required_role_codes=self.required_role_codes,
            role_index=self.role_index,
        )

    def positions(self, item_ids: np.ndarray) -> np.ndarray:
        """Position of each item id in these arrays, -1 for an item the catalog lacks."""
        if len(self.item_ids) == 0:
            return np.full(len(item_ids), -1, dtype=np.int64)
        found = self.item_ids.searchsorted(item_ids)
        np.minimum(found, len(self.item_ids) - 1, out=found)
        return np.where(self.item_ids[found] == item_ids, found, -1)

    def reason_codes(
        self,
        positions: np.ndarray,
        *,
        region: str,
        now_ns: int,
        actor_tenant: str | None = None,
        actor_role: str | None = None,
    ) -> np.ndarray:
        """First failing reason code per position (0 = eligible), one batch.

        Without an actor tenant or role the subject is a consumer: tenant-owned items and
        items needing a role are refused. Otherwise the tenant and role rules are evaluated
        for the actor, exactly as `item_rejection_reasons` does with subject_tenant/role.
        """
        known = positions >= 0
        if len(self.item_ids) == 0:  # no item state (raw snapshot missing): nothing is known
            return np.full(len(positions), CODE_BY_REASON[UNKNOWN_ITEM], dtype=np.int8)
        safe = np.where(known, positions, 0)
        if actor_tenant is None and actor_role is None:
            codes = self.consumer_codes[region][safe]
        else:
            codes = self.actor_codes[region][safe]
            owner = self.tenant_codes[safe]
            actor_code = self.tenant_index.get(actor_tenant, -1) if actor_tenant else -1
            apply_reason(
                codes,
                (owner != 0) & (owner != actor_code),
                CODE_BY_REASON[TENANT_NOT_ALLOWED],
            )
            required = self.required_role_codes[safe]
            actor_role_code = self.role_index.get(actor_role, -1) if actor_role else -1
            apply_reason(
                codes,
                (required != 0) & (required != actor_role_code),
                CODE_BY_REASON[ROLE_NOT_ALLOWED],
            )
        apply_reason(codes, self.campaign_end_ns[safe] <= now_ns, _CAMPAIGN_ENDED_CODE)
        codes[~known] = CODE_BY_REASON[UNKNOWN_ITEM]
        return codes
