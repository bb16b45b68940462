"""The validation gate: a version is published only if every check passes.

Item state is judged with `rules.eligibility.item_rejection_reasons`, the same function
serving's final check starts from, so the invalid-item rate measured here is the rate at
which serving would drop items from this version right now.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from typing import Any, Literal

import numpy as np
import pandas as pd

from recsys_assets.config import SurfaceConfig
from recsys_assets.config.settings import PublishThresholds
from recsys_assets.publish.lists import PERSONALIZED_CONTEXT
from recsys_assets.rules.categories import category_capped
from recsys_assets.rules.eligibility import TOMBSTONED, UNKNOWN_ITEM, item_rejection_reasons
from recsys_assets.rules.person import PersonFacts, person_rejection_reasons, without_consent
from recsys_assets.rules.tombstones import tombstoned_list_rows

ListKind = Literal["personalized", "fallback"]
TENANT_LIST_PREFIX = "tenant_default_actions:"
PERSON_RULES_APPLIED = "applied"
NO_PERSON_FACTS = (
    "not applicable: no person facts (the raw snapshot has no users table to judge consent by)"
)
NOT_PERSONAL = "not applicable: fallback lists are not personal"


@dataclass(frozen=True)
class Check:
    """One gate: the measured value, the limit it is held to, and what a failure means."""

    name: str
    value: float
    limit: float
    passed: bool
    message: str


@dataclass
class ValidationReport:
    """What the gate measured and which checks failed (failures empty = publishable)."""

    passed: bool
    metrics: dict[str, Any]
    failures: list[str]
    checks: list[Check] = field(default_factory=list)
    invalid_by_reason: dict[str, int] = field(default_factory=dict)
    policy_violations_by_rule: dict[str, int] = field(default_factory=dict)
    diagnosis: str = ""
    """Why lists are short or empty, as a Markdown table ("" unless such a check failed)."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "metrics": self.metrics,
            "failures": self.failures,
            "checks": [asdict(check) for check in self.checks],
            "invalid_by_reason": self.invalid_by_reason,
            "policy_violations_by_rule": self.policy_violations_by_rule,
            "diagnosis": self.diagnosis,
        }

    def summary(self) -> dict[str, Any]:
        """The manifest's copy: verdict, metrics and failures (validation.json has the checks).

        Only passing versions reach the manifest, and they carry no diagnosis.
        """
        full = self.to_dict()
        full.pop("checks")
        full.pop("diagnosis")
        return full

    def failed_checks(self) -> set[str]:
        return {check.name for check in self.checks if not check.passed}

    def with_diagnosis(self, explanations: dict[str, str], table: str) -> ValidationReport:
        """A copy whose failed checks named in `explanations` also say why, carrying `table`."""
        checks = [
            replace(check, message=f"{check.message}. {explanations[check.name]}")
            if not check.passed and check.name in explanations
            else check
            for check in self.checks
        ]
        failures = [check.message for check in checks if not check.passed]
        return replace(self, checks=checks, failures=failures, diagnosis=table)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ValidationReport:
        return cls(
            passed=bool(data["passed"]),
            metrics=dict(data.get("metrics", {})),
            failures=list(data.get("failures", [])),
            checks=[Check(**check) for check in data.get("checks", [])],
            invalid_by_reason=dict(data.get("invalid_by_reason", {})),
            policy_violations_by_rule=dict(data.get("policy_violations_by_rule", {})),
            diagnosis=str(data.get("diagnosis", "")),
        )

    def to_markdown(self) -> str:
        """The checks as a Markdown table, for Dagster metadata and the CLI."""
        lines = ["| check | value | limit | result |", "| --- | --- | --- | --- |"]
        for check in self.checks:
            result = "pass" if check.passed else f"**FAIL**: {check.message}"
            lines.append(f"| {check.name} | {check.value:.4g} | {check.limit:.4g} | {result} |")
        if self.invalid_by_reason:
            lines += ["", "| invalid-item reason | items |", "| --- | --- |"]
            lines += [f"| {reason} | {n} |" for reason, n in sorted(self.invalid_by_reason.items())]
        if "person_rules" in self.metrics:
            verdict = self.metrics["person_rules"]
            if verdict == PERSON_RULES_APPLIED:
                verdict += (
                    f": {self.metrics['lists_without_consent']} list(s) of people without "
                    "consent now (their rows count as consent_revoked)"
                )
            lines += ["", f"person rules (consent, hidden, consumed): {verdict}"]
        return "\n".join(lines)


@dataclass(frozen=True)
class GateLimits:
    """The thresholds one kind of list is held to (publish thresholds or fallback ones)."""

    min_coverage: float
    max_invalid_item_rate: float
    max_duplicate_rate: float
    max_policy_violation_rate: float
    max_empty_list_rate: float
    min_mean_list_length_ratio: float
    max_age_s: float

    @classmethod
    def for_lists(cls, thresholds: PublishThresholds) -> GateLimits:
        return cls(
            min_coverage=thresholds.min_coverage,
            max_invalid_item_rate=thresholds.max_invalid_item_rate,
            max_duplicate_rate=thresholds.max_duplicate_rate,
            max_policy_violation_rate=thresholds.max_policy_violation_rate,
            max_empty_list_rate=thresholds.max_empty_list_rate,
            min_mean_list_length_ratio=thresholds.min_mean_list_length_ratio,
            max_age_s=thresholds.max_age.total_seconds(),
        )

    @classmethod
    def for_fallback(cls, thresholds: PublishThresholds) -> GateLimits:
        """Fallback lists are the last line before an empty response: every list must be
        non-empty and hold only eligible items; coverage and slate policy do not apply."""
        return cls(
            min_coverage=0.0,
            max_invalid_item_rate=0.0,
            max_duplicate_rate=0.0,
            max_policy_violation_rate=1.0,
            max_empty_list_rate=0.0,
            min_mean_list_length_ratio=0.0,
            max_age_s=thresholds.max_age.total_seconds(),
        )


def validate_lists(
    lists: pd.DataFrame,
    *,
    surface: SurfaceConfig,
    region: str,
    items: pd.DataFrame,
    limits: GateLimits,
    now: datetime,
    subjects: pd.DataFrame | None = None,
    kind: ListKind = "personalized",
    tombstones: pd.DataFrame | None = None,
    person: PersonFacts | None = None,
) -> ValidationReport:
    """Measure a version's lists (lists.parquet rows) against `limits`.

    `items` is the current raw items table; `subjects` (subject_id, tenant_id, actor_role)
    are the partition's eligible subjects, the denominator of coverage (for fallback lists:
    the users they could be served to). An empty version passes only for an empty audience. Fallback lists
    (`kind="fallback"`) skip coverage, slate policy and score spread. With `person`
    (`rules.person.read_person_facts`: raw users, interactions, controls and the serving
    events since), personalized rows are also judged by the person rules serving applies
    (consent at publish time, hidden, already consumed); without it the metrics say the
    person rules were not applicable, and why.
    """
    now_ts = pd.Timestamp(now)
    checks: list[Check] = []
    metrics: dict[str, Any] = {"rows": len(lists)}
    lists = lists.reset_index(drop=True)
    lengths = lists.groupby("list_id", sort=False).size()
    metrics["lists"] = len(lengths)

    def gate(name: str, value: float, limit: float, ok: bool, message: str) -> None:
        checks.append(Check(name, float(value), float(limit), bool(ok), message))

    # An empty version is valid only for an empty audience (e.g. no tenant actors in a region).
    no_audience = subjects is not None and len(subjects) == 0
    gate(
        "non_empty",
        len(lists),
        0 if no_audience else 1,
        len(lists) > 0 or no_audience,
        "the version has no list rows at all: the upstream slates are empty",
    )

    if kind == "personalized":
        eligible = _eligible_ids(subjects, lists)
        with_list = pd.Index(lists["subject_id"].unique())
        covered = int(with_list.isin(eligible).sum())
        coverage = covered / len(eligible) if len(eligible) else 1.0
        metrics |= {
            "eligible_subjects": len(eligible),
            "subjects_with_list": covered,
            "lists_for_ineligible_subjects": int((~with_list.isin(eligible)).sum()),
            "coverage": round(coverage, 6),
        }
        gate(
            "coverage",
            coverage,
            limits.min_coverage,
            coverage >= limits.min_coverage,
            f"coverage {coverage:.4f} < min_coverage {limits.min_coverage} "
            f"({covered} of {len(eligible)} eligible subjects have a list)",
        )

    length_ratio = float(lengths.mean()) / surface.store_depth if len(lengths) else 0.0
    metrics |= {
        "list_length_min": int(lengths.min()) if len(lengths) else 0,
        "list_length_p50": float(lengths.median()) if len(lengths) else 0.0,
        "list_length_mean": round(float(lengths.mean()), 4) if len(lengths) else 0.0,
        "list_length_max": int(lengths.max()) if len(lengths) else 0,
        "mean_list_length_ratio": round(length_ratio, 6),
    }
    if kind == "personalized" and len(lengths):
        gate(
            "mean_list_length_ratio",
            length_ratio,
            limits.min_mean_list_length_ratio,
            length_ratio >= limits.min_mean_list_length_ratio,
            f"mean list length {metrics['list_length_mean']} is {length_ratio:.3f} of "
            f"store_depth {surface.store_depth} < min_mean_list_length_ratio "
            f"{limits.min_mean_list_length_ratio}",
        )

    malformed = _malformed_lists(lists, surface.store_depth)
    metrics["malformed_lists"] = len(malformed)
    gate(
        "well_formed",
        len(malformed),
        0,
        not malformed,
        f"{len(malformed)} list(s) have missing item ids, positions that are not 1..n, or "
        f"more than store_depth {surface.store_depth} items, e.g. {malformed[:3]}",
    )

    metrics |= _person_rules(lists, surface=surface, kind=kind, person=person)
    reasons = rejection_reasons(
        lists,
        items,
        region=region,
        now=now_ts,
        subjects=subjects,
        tombstones=tombstones,
        surface=surface,
        person=person if kind == "personalized" else None,
    )
    invalid = reasons.notna().to_numpy()
    invalid_rate = float(invalid.mean()) if len(lists) else 0.0
    invalid_by_reason = {str(k): int(v) for k, v in reasons.value_counts().items()}
    metrics |= {"invalid_items": int(invalid.sum()), "invalid_item_rate": round(invalid_rate, 6)}
    gate(
        "invalid_item_rate",
        invalid_rate,
        limits.max_invalid_item_rate,
        invalid_rate <= limits.max_invalid_item_rate,
        f"invalid-item rate {invalid_rate:.4f} > max_invalid_item_rate "
        f"{limits.max_invalid_item_rate} against current item state ({invalid_by_reason})",
    )

    duplicates = lists.duplicated(["list_id", "item_id"]).to_numpy()
    duplicate_rate = float(duplicates.mean()) if len(lists) else 0.0
    metrics |= {
        "duplicate_items": int(duplicates.sum()),
        "duplicate_rate": round(duplicate_rate, 6),
    }
    gate(
        "duplicate_rate",
        duplicate_rate,
        limits.max_duplicate_rate,
        duplicate_rate <= limits.max_duplicate_rate,
        f"duplicate rate {duplicate_rate:.4f} > max_duplicate_rate {limits.max_duplicate_rate} "
        f"({int(duplicates.sum())} repeated (list, item) rows)",
    )

    valid_lengths = (
        lists.loc[~invalid].groupby("list_id").size().reindex(lengths.index, fill_value=0)
    )
    empty = int((valid_lengths == 0).sum())
    empty_rate = empty / len(lengths) if len(lengths) else 0.0
    metrics |= {"empty_lists": empty, "empty_list_rate": round(empty_rate, 6)}
    gate(
        "empty_list_rate",
        empty_rate,
        limits.max_empty_list_rate,
        empty_rate <= limits.max_empty_list_rate,
        f"empty-list rate {empty_rate:.4f} > max_empty_list_rate {limits.max_empty_list_rate} "
        f"({empty} list(s) have no item that is eligible now)",
    )

    violations_by_rule: dict[str, int] = {}
    if kind == "personalized":
        violating, violations_by_rule = _policy_violations(lists, items, surface)
        policy_rate = violating / len(lengths) if len(lengths) else 0.0
        metrics |= {
            "policy_violating_lists": violating,
            "policy_violation_rate": round(policy_rate, 6),
        }
        gate(
            "policy_violation_rate",
            policy_rate,
            limits.max_policy_violation_rate,
            policy_rate <= limits.max_policy_violation_rate,
            f"slate-policy violation rate {policy_rate:.4f} > max_policy_violation_rate "
            f"{limits.max_policy_violation_rate} ({violations_by_rule})",
        )

    scores = pd.to_numeric(lists["score"], errors="coerce").to_numpy(dtype=np.float64)
    nonfinite = int((~np.isfinite(scores)).sum())
    spread = float(np.nanstd(scores[np.isfinite(scores)])) if nonfinite < len(scores) else 0.0
    metrics |= {"score_nonfinite": nonfinite, "score_std": round(spread, 6)}
    if len(scores):
        finite = scores[np.isfinite(scores)]
        metrics |= {
            "score_min": round(float(finite.min()), 6) if len(finite) else 0.0,
            "score_mean": round(float(finite.mean()), 6) if len(finite) else 0.0,
            "score_max": round(float(finite.max()), 6) if len(finite) else 0.0,
        }
    gate(
        "score_finite",
        nonfinite,
        0,
        nonfinite == 0,
        f"{nonfinite} score(s) are NaN or infinite: the ranker or utility produced garbage",
    )
    if kind == "personalized" and len(scores) > 1:
        gate(
            "score_spread",
            spread,
            0,
            spread > 0,
            "every score is identical across all lists: the ranker is not discriminating",
        )

    if len(lists):
        generated = pd.to_datetime(lists["generated_at"])
        age_s = (now_ts - generated.min()).total_seconds()
        expired = int((pd.to_datetime(lists["expires_at"]) <= now_ts).sum())
        metrics |= {
            "oldest_generated_at": generated.min().isoformat(),
            "age_s": round(age_s, 3),
            "expired_rows": expired,
        }
        gate(
            "freshness",
            age_s,
            limits.max_age_s,
            age_s <= limits.max_age_s and expired == 0,
            f"oldest list was generated {age_s:.0f}s before publishing (max_age "
            f"{limits.max_age_s:.0f}s) and {expired} row(s) are already expired",
        )

    failures = [check.message for check in checks if not check.passed]
    return ValidationReport(
        passed=not failures,
        metrics=metrics,
        failures=failures,
        checks=checks,
        invalid_by_reason=invalid_by_reason,
        policy_violations_by_rule=violations_by_rule,
    )


def _person_rules(
    lists: pd.DataFrame, *, surface: SurfaceConfig, kind: ListKind, person: PersonFacts | None
) -> dict[str, Any]:
    """Whether the person rules judged this version, and how many of its lists belong to
    people who may not get the surface now."""
    if kind != "personalized":
        return {"person_rules": NOT_PERSONAL}
    if person is None:
        return {"person_rules": NO_PERSON_FACTS}
    subject_ids = pd.Series(lists["subject_id"].unique())
    revoked = without_consent(subject_ids, surface=surface, facts=person)
    return {"person_rules": PERSON_RULES_APPLIED, "lists_without_consent": int(revoked.sum())}


def _eligible_ids(subjects: pd.DataFrame | None, lists: pd.DataFrame) -> pd.Index:
    """Eligible subject ids; without a subjects table every listed subject counts."""
    if subjects is None:
        return pd.Index(lists["subject_id"].unique())
    return pd.Index(subjects["subject_id"].unique())


def _malformed_lists(lists: pd.DataFrame, store_depth: int) -> list[str]:
    if lists.empty:
        return []
    grouped = lists.groupby("list_id", sort=False)
    stats = pd.DataFrame(
        {
            "n": grouped.size(),
            "min_pos": grouped["position"].min(),
            "max_pos": grouped["position"].max(),
            "distinct_pos": grouped["position"].nunique(),
            "null_items": lists["item_id"].isna().groupby(lists["list_id"], sort=False).sum(),
        }
    )
    bad = (
        (stats["min_pos"] != 1)
        | (stats["max_pos"] != stats["n"])
        | (stats["distinct_pos"] != stats["n"])
        | (stats["null_items"] > 0)
        | (stats["n"] > store_depth)
    )
    return [str(list_id) for list_id in stats.index[bad.to_numpy()]]


def list_tenants(lists: pd.DataFrame, subjects: pd.DataFrame | None) -> tuple[pd.Series, pd.Series]:
    """(tenant, role) per list row: from the subject, or from a tenant fallback list's key.

    A consumer (no tenant) yields None, which makes every tenant-owned item ineligible.
    """
    tenant = pd.Series(None, index=lists.index, dtype=object)
    role = pd.Series(None, index=lists.index, dtype=object)
    if subjects is not None and "tenant_id" in subjects.columns:
        by_subject = subjects.drop_duplicates("subject_id").set_index("subject_id")
        tenant = lists["subject_id"].map(by_subject["tenant_id"]).astype(object)
        if "actor_role" in by_subject.columns:
            role = lists["subject_id"].map(by_subject["actor_role"]).astype(object)
    keys = lists["context_key"].astype(str)
    tenant_lists = keys.str.startswith(TENANT_LIST_PREFIX).to_numpy()
    tenant = tenant.where(~tenant_lists, keys.str.removeprefix(TENANT_LIST_PREFIX))
    return tenant.where(tenant.notna(), None), role.where(role.notna(), None)


def rejection_reasons(
    lists: pd.DataFrame,
    items: pd.DataFrame,
    *,
    region: str,
    now: pd.Timestamp,
    subjects: pd.DataFrame | None,
    tombstones: pd.DataFrame | None = None,
    surface: SurfaceConfig | None = None,
    person: PersonFacts | None = None,
) -> pd.Series:
    """The eligibility reason each list row would be rejected for now (None = eligible).

    Tombstones (policy changes not yet reflected in the raw tables) count as serving counts
    them: an item withdrawn in the region, or from one person, is `tombstoned`. With
    `surface` and `person`, the person rules (`rules/person.py`) judge the rows of
    personalized lists the way serving's final check does.
    """
    reasons = pd.Series(None, index=lists.index, dtype=object, name="rejection_reason")
    if lists.empty:
        return reasons
    known = lists["item_id"].isin(items["item_id"]).to_numpy()
    reasons[~known] = UNKNOWN_ITEM
    if known.any():
        rows = lists.loc[known]
        state = items.drop_duplicates("item_id").set_index("item_id").loc[rows["item_id"]]
        state.index = rows.index
        tenant, role = list_tenants(rows, subjects)
        # A tenant's fallback queue serves every role of the tenant: the role is checked online.
        has_role = role.notna().any()
        reasons[known] = item_rejection_reasons(
            state,
            region=region,
            now=now.to_pydatetime(),
            subject_tenant=tenant,
            subject_role=role if has_role else None,
        ).to_numpy()
    if tombstones is not None and not tombstones.empty:
        withdrawn = tombstoned_list_rows(lists, items, tombstones, region=region, now=now)
        reasons[withdrawn & reasons.isna().to_numpy()] = TOMBSTONED
    if surface is not None and person is not None:
        personal = (lists["context_key"] == PERSONALIZED_CONTEXT).to_numpy()
        found = person_rejection_reasons(
            lists.loc[personal], surface=surface, facts=person, items=items
        )
        open_rows = reasons.isna().to_numpy() & personal
        reasons[open_rows] = found.reindex(lists.index)[open_rows].to_numpy()
        reasons = reasons.where(reasons.notna(), None)
    return reasons


def _policy_violations(
    lists: pd.DataFrame, items: pd.DataFrame, surface: SurfaceConfig
) -> tuple[int, dict[str, int]]:
    """Lists that break the slate policy, and how many lists break each rule.

    Counted over the whole stored list, as the slate policy applies them: serving fills
    the display from deeper in the list when items are rejected, so any stored item can
    be shown, and "at most sponsored_cap sponsored items in the top display_count" holds
    for every list serving can build only if it holds for the stored list.
    """
    policy = surface.slate_policy
    if lists.empty:
        return 0, {}
    attributes = items.drop_duplicates("item_id").set_index("item_id")
    rows = pd.DataFrame(
        {
            "list_id": lists["list_id"],
            "category": lists["item_id"].map(attributes["category"]),
            "creator_id": lists["item_id"].map(attributes["creator_id"]),
            "is_sponsored": lists["item_id"]
            .map(attributes["is_sponsored"])
            .fillna(False)
            .astype(bool),
        }
    )
    categorised = rows[category_capped(rows["category"])]
    rules = {
        "max_per_category": categorised.groupby(["list_id", "category"])
        .size()
        .gt(policy.max_per_category),
        "max_per_creator": rows.groupby(["list_id", "creator_id"])
        .size()
        .gt(policy.max_per_creator),
        "sponsored_cap": rows.groupby("list_id")["is_sponsored"].sum().gt(policy.sponsored_cap),
    }
    violating: set[Any] = set()
    by_rule: dict[str, int] = {}
    for rule, broken in rules.items():
        lists_broken = set(broken[broken].index.get_level_values("list_id"))
        by_rule[rule] = len(lists_broken)
        violating |= lists_broken
    return len(violating), by_rule
