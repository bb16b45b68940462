"""The validation gate: a version is published only if every check passes.

Item state is judged with `rules.eligibility.item_rejection_reasons`, the same function
serving's final check starts from, so the invalid-item rate measured here is the rate at
which serving would drop items from this version right now.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from typing import Any, Literal

import numpy as np
import pandas as pd

from recsys_assets.config import SurfaceConfig
from recsys_assets.config.settings import PublishThresholds
from recsys_assets.publish.lists import PERSONALIZED_CONTEXT
from recsys_assets.rules.categories import category_capped
from recsys_assets.rules.eligibility import (
    CODE_BY_REASON,
    TOMBSTONED,
    UNKNOWN_ITEM,
    item_rejection_reasons,
)
from recsys_assets.rules.person import PersonFacts, person_rejection_reasons, without_consent
from recsys_assets.rules.tombstones import tombstoned_list_rows

ListKind = Literal["personalized", "fallback"]
TENANT_LIST_PREFIX = "tenant_default_actions:"
PERSON_RULES_APPLIED = "applied"
NO_PERSON_FACTS = (
    "not applicable: no person facts (the raw snapshot has no users table to judge consent by)"
)
NOT_PERSONAL = "not applicable: fallback lists are not personal"
EMPTY_VERSION_NOTE = (
    "**empty version**: the partition has no eligible subject, so it holds no list; serving "
    "answers every request from the fallback lists"
)


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
    empty: bool = False
    """The version holds no list at all: published only for an empty audience, and said so
    (manifest, validation.json, metadata) so that a fallback-only partition is never read as
    a normal one."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "empty": self.empty,
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
            empty=bool(data.get("empty", False)),
        )

    def to_markdown(self) -> str:
        """The checks as a Markdown table, for Dagster metadata and the CLI."""
        lines = ["| check | value | limit | result |", "| --- | --- | --- | --- |"]
        for check in self.checks:
            result = "pass" if check.passed else f"**FAIL**: {check.message}"
            lines.append(f"| {check.name} | {check.value:.4g} | {check.limit:.4g} | {result} |")
        if self.empty and self.passed:
            lines += ["", EMPTY_VERSION_NOTE]
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


VALIDATED_COLUMNS = [
    "list_id",
    "subject_id",
    "context_key",
    "position",
    "item_id",
    "score",
    "generated_at",
    "expires_at",
]
"""The lists.parquet columns the gate reads: a version is validated from these alone."""
IN_SLATE_COLUMN = "in_slate"


@dataclass
class ListMeasures:
    """What the gate measures on some whole lists, mergeable with the next lists' measures.

    Everything is a sum, an extreme or one small number per list, so a version is validated
    part by part with the memory of one part (`validate_parts`), and gives the numbers it
    would give read whole: the score spread merges (count, mean, squared deviations) exactly
    as a parallel variance does.
    """

    rows: int = 0
    list_keys: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.uint64))
    """Hash of each list id: a list measured in two parts would show up twice."""
    list_lengths: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    subject_ids: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    """Distinct subjects with a list."""
    malformed: list[str] = field(default_factory=list)
    """Malformed list ids, the first few (the message names three)."""
    malformed_count: int = 0
    invalid_by_reason: dict[str, int] = field(default_factory=dict)
    duplicate_rows: int = 0
    empty_lists: int = 0
    policy_violating_lists: int = 0
    violations_by_rule: dict[str, int] = field(default_factory=dict)
    score_nonfinite: int = 0
    score_count: int = 0
    score_mean: float = 0.0
    score_squares: float = 0.0
    """Sum of squared deviations from score_mean of the finite scores."""
    score_min: float = np.inf
    score_max: float = -np.inf
    oldest_generated_at: pd.Timestamp | None = None
    expired_rows: int = 0

    def merge(self, other: ListMeasures) -> ListMeasures:
        """These lists' measures and `other`'s, as if measured together."""
        count = self.score_count + other.score_count
        delta = other.score_mean - self.score_mean
        if count and self.score_count and other.score_count:
            mean = self.score_mean + delta * other.score_count / count
            squares = (
                self.score_squares
                + other.score_squares
                + delta * delta * self.score_count * other.score_count / count
            )
        else:
            mean = self.score_mean if self.score_count else other.score_mean
            squares = self.score_squares + other.score_squares
        stamps = [t for t in (self.oldest_generated_at, other.oldest_generated_at) if t is not None]
        return ListMeasures(
            rows=self.rows + other.rows,
            list_keys=np.concatenate([self.list_keys, other.list_keys]),
            list_lengths=np.concatenate([self.list_lengths, other.list_lengths]),
            subject_ids=np.union1d(self.subject_ids, other.subject_ids),
            malformed=(self.malformed + other.malformed)[:_MALFORMED_NAMED],
            malformed_count=self.malformed_count + other.malformed_count,
            invalid_by_reason=_added(self.invalid_by_reason, other.invalid_by_reason),
            duplicate_rows=self.duplicate_rows + other.duplicate_rows,
            empty_lists=self.empty_lists + other.empty_lists,
            policy_violating_lists=self.policy_violating_lists + other.policy_violating_lists,
            violations_by_rule=_added(self.violations_by_rule, other.violations_by_rule),
            score_nonfinite=self.score_nonfinite + other.score_nonfinite,
            score_count=count,
            score_mean=mean,
            score_squares=squares,
            score_min=min(self.score_min, other.score_min),
            score_max=max(self.score_max, other.score_max),
            oldest_generated_at=min(stamps) if stamps else None,
            expired_rows=self.expired_rows + other.expired_rows,
        )


_MALFORMED_NAMED = 3


def _added(first: dict[str, int], second: dict[str, int]) -> dict[str, int]:
    """Counts of both, keys in first-seen order."""
    total = dict(first)
    for key, count in second.items():
        total[key] = total.get(key, 0) + count
    return total


def _largest_first(counts: dict[str, int]) -> dict[str, int]:
    """Largest count first, ties in the order reasons are checked: the same however the
    version was cut into parts."""
    return dict(
        sorted(counts.items(), key=lambda item: (-item[1], CODE_BY_REASON.get(item[0], 0), item[0]))
    )


def measure_lists(
    lists: pd.DataFrame,
    *,
    surface: SurfaceConfig,
    region: str,
    items: pd.DataFrame,
    now: datetime,
    subjects: pd.DataFrame | None = None,
    kind: ListKind = "personalized",
    tombstones: pd.DataFrame | None = None,
    person: PersonFacts | None = None,
) -> ListMeasures:
    """Measure whole lists (every row of each list they hold): see `validate_lists`."""
    now_ts = pd.Timestamp(now)
    lists = lists.reset_index(drop=True)
    lengths = lists.groupby("list_id", sort=False).size()
    measures = ListMeasures(
        rows=len(lists),
        list_keys=pd.util.hash_array(lengths.index.to_numpy(dtype=object)),
        list_lengths=lengths.to_numpy(dtype=np.int64),
        subject_ids=np.unique(lists["subject_id"].to_numpy(dtype=np.int64)),
    )
    malformed = _malformed_lists(lists, stored_depth(surface))
    measures.malformed = malformed[:_MALFORMED_NAMED]
    measures.malformed_count = len(malformed)
    if person is not None and kind == "personalized":
        person = _facts_of(person, measures.subject_ids)
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
    measures.invalid_by_reason = {str(k): int(v) for k, v in reasons.value_counts().items()}
    measures.duplicate_rows = int(lists.duplicated(["list_id", "item_id"]).sum())
    valid_lengths = (
        lists.loc[~invalid].groupby("list_id").size().reindex(lengths.index, fill_value=0)
    )
    measures.empty_lists = int((valid_lengths == 0).sum())
    if kind == "personalized":
        violating, measures.violations_by_rule = _policy_violations(
            slate_rows(lists, surface), items, surface
        )
        measures.policy_violating_lists = violating
    scores = pd.to_numeric(lists["score"], errors="coerce").to_numpy(dtype=np.float64)
    finite = scores[np.isfinite(scores)]
    measures.score_nonfinite = len(scores) - len(finite)
    if len(finite):
        measures.score_count = len(finite)
        measures.score_mean = float(finite.sum() / len(finite))
        measures.score_squares = float(np.sum((finite - finite.sum() / len(finite)) ** 2))
        measures.score_min, measures.score_max = float(finite.min()), float(finite.max())
    if len(lists):
        measures.oldest_generated_at = pd.to_datetime(lists["generated_at"]).min()
        measures.expired_rows = int((pd.to_datetime(lists["expires_at"]) <= now_ts).sum())
    return measures


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
    return validate_parts(
        [lists],
        surface=surface,
        region=region,
        items=items,
        limits=limits,
        now=now,
        subjects=subjects,
        kind=kind,
        tombstones=tombstones,
        person=person,
    )


def validate_parts(
    parts: Iterable[pd.DataFrame],
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
    """`validate_lists` of a version read part by part, each part holding whole lists
    (`whole_lists` cuts a stream of rows so): memory is one part's, the report the same."""
    measures = ListMeasures()
    for part in parts:
        measures = measures.merge(
            measure_lists(
                part,
                surface=surface,
                region=region,
                items=items,
                now=now,
                subjects=subjects,
                kind=kind,
                tombstones=tombstones,
                person=person,
            )
        )
    if len(np.unique(measures.list_keys)) != len(measures.list_keys):
        raise ValueError(
            "a list's rows were validated in two parts: the parts must each hold whole lists"
        )
    return judge(
        measures,
        surface=surface,
        limits=limits,
        now=now,
        subjects=subjects,
        kind=kind,
        person=person,
    )


def whole_lists(frames: Iterable[pd.DataFrame]) -> Iterator[pd.DataFrame]:
    """The rows of `frames` (a list's rows together, in order) cut into frames of whole
    lists: the last list of a frame is carried into the next."""
    carried: pd.DataFrame | None = None
    for frame in frames:
        if carried is not None:
            frame = pd.concat([carried, frame], ignore_index=True)
        if frame.empty:
            carried = frame
            continue
        list_ids = frame["list_id"].to_numpy()
        others = np.flatnonzero(list_ids != list_ids[-1])
        cut = int(others[-1]) + 1 if len(others) else 0
        if cut:
            yield frame.iloc[:cut]
        carried = frame.iloc[cut:]
    if carried is not None:
        yield carried


def judge(
    measures: ListMeasures,
    *,
    surface: SurfaceConfig,
    limits: GateLimits,
    now: datetime,
    subjects: pd.DataFrame | None = None,
    kind: ListKind = "personalized",
    person: PersonFacts | None = None,
) -> ValidationReport:
    """The gate's checks and metrics from a version's measures."""
    metrics: dict[str, Any] = {"rows": measures.rows, "lists": len(measures.list_lengths)}
    invalid_by_reason = _largest_first(measures.invalid_by_reason)
    checks = [_non_empty(measures, subjects)]
    if kind == "personalized":
        check, found = _coverage(measures, subjects, limits)
        checks.append(check)
        metrics |= found
    check, found = _list_lengths(measures, surface, limits, kind)
    metrics |= found
    if check is not None:
        checks.append(check)
    metrics["malformed_lists"] = measures.malformed_count
    checks.append(
        Check(
            "well_formed",
            float(measures.malformed_count),
            0.0,
            measures.malformed_count == 0,
            f"{measures.malformed_count} list(s) have missing item ids, positions that are not "
            f"1..n, or more than {depth_name(surface)} {stored_depth(surface)} items, e.g. "
            f"{measures.malformed}",
        )
    )
    metrics |= _person_rules(measures.subject_ids, surface=surface, kind=kind, person=person)
    check, found = _invalid_items(measures, invalid_by_reason, limits)
    checks.append(check)
    metrics |= found
    for gate in (_duplicates, _empty_lists):
        check, found = gate(measures, limits)
        checks.append(check)
        metrics |= found
    if kind == "personalized":
        check, found = _policy(measures, limits)
        checks.append(check)
        metrics |= found
    found_checks, found = _scores(measures, kind)
    checks += found_checks
    metrics |= found
    if measures.oldest_generated_at is not None:
        check, found = _freshness(measures, limits, pd.Timestamp(now))
        checks.append(check)
        metrics |= found
    failures = [check.message for check in checks if not check.passed]
    return ValidationReport(
        passed=not failures,
        metrics=metrics,
        failures=failures,
        checks=checks,
        invalid_by_reason=invalid_by_reason,
        policy_violations_by_rule=measures.violations_by_rule,
        empty=measures.rows == 0,
    )


def _non_empty(measures: ListMeasures, subjects: pd.DataFrame | None) -> Check:
    """An empty version is valid only for an empty audience (e.g. no tenant actors in a region)."""
    no_audience = subjects is not None and len(subjects) == 0
    return Check(
        "non_empty",
        float(measures.rows),
        0.0 if no_audience else 1.0,
        measures.rows > 0 or no_audience,
        "the version has no list rows at all: the upstream slates are empty",
    )


def _coverage(
    measures: ListMeasures, subjects: pd.DataFrame | None, limits: GateLimits
) -> tuple[Check, dict[str, Any]]:
    eligible = (
        pd.Index(measures.subject_ids)
        if subjects is None
        else pd.Index(subjects["subject_id"].unique())
    )
    with_list = pd.Index(measures.subject_ids)
    covered = int(with_list.isin(eligible).sum())
    coverage = covered / len(eligible) if len(eligible) else 1.0
    metrics = {
        "eligible_subjects": len(eligible),
        "subjects_with_list": covered,
        "lists_for_ineligible_subjects": int((~with_list.isin(eligible)).sum()),
        "coverage": round(coverage, 6),
    }
    check = Check(
        "coverage",
        float(coverage),
        float(limits.min_coverage),
        coverage >= limits.min_coverage,
        f"coverage {coverage:.4f} < min_coverage {limits.min_coverage} "
        f"({covered} of {len(eligible)} eligible subjects have a list)",
    )
    return check, metrics


def _list_lengths(
    measures: ListMeasures, surface: SurfaceConfig, limits: GateLimits, kind: ListKind
) -> tuple[Check | None, dict[str, Any]]:
    lengths = pd.Series(measures.list_lengths)
    length_ratio = float(lengths.mean()) / surface.store_depth if len(lengths) else 0.0
    metrics = {
        "list_length_min": int(lengths.min()) if len(lengths) else 0,
        "list_length_p50": float(lengths.median()) if len(lengths) else 0.0,
        "list_length_mean": round(float(lengths.mean()), 4) if len(lengths) else 0.0,
        "list_length_max": int(lengths.max()) if len(lengths) else 0,
        "mean_list_length_ratio": round(length_ratio, 6),
    }
    if kind != "personalized" or not len(lengths):
        return None, metrics
    check = Check(
        "mean_list_length_ratio",
        length_ratio,
        float(limits.min_mean_list_length_ratio),
        length_ratio >= limits.min_mean_list_length_ratio,
        f"mean list length {metrics['list_length_mean']} is {length_ratio:.3f} of "
        f"store_depth {surface.store_depth} < min_mean_list_length_ratio "
        f"{limits.min_mean_list_length_ratio}",
    )
    return check, metrics


def _rate_check(
    name: str, count: int, total: int, limit: float, label: str, detail: str
) -> tuple[Check, float]:
    """`count / total` (0 when nothing to count) against its maximum `limit`."""
    rate = count / total if total else 0.0
    limit_name = "max_" + name
    return (
        Check(
            name,
            rate,
            float(limit),
            rate <= limit,
            f"{label} {rate:.4f} > {limit_name} {limit} {detail}",
        ),
        rate,
    )


def _invalid_items(
    measures: ListMeasures, invalid_by_reason: dict[str, int], limits: GateLimits
) -> tuple[Check, dict[str, Any]]:
    invalid = sum(invalid_by_reason.values())
    check, rate = _rate_check(
        "invalid_item_rate",
        invalid,
        measures.rows,
        limits.max_invalid_item_rate,
        "invalid-item rate",
        f"against current item state ({invalid_by_reason})",
    )
    return check, {"invalid_items": invalid, "invalid_item_rate": round(rate, 6)}


def _duplicates(measures: ListMeasures, limits: GateLimits) -> tuple[Check, dict[str, Any]]:
    duplicates = measures.duplicate_rows
    check, rate = _rate_check(
        "duplicate_rate",
        duplicates,
        measures.rows,
        limits.max_duplicate_rate,
        "duplicate rate",
        f"({duplicates} repeated (list, item) rows)",
    )
    return check, {"duplicate_items": duplicates, "duplicate_rate": round(rate, 6)}


def _empty_lists(measures: ListMeasures, limits: GateLimits) -> tuple[Check, dict[str, Any]]:
    empty = measures.empty_lists
    check, rate = _rate_check(
        "empty_list_rate",
        empty,
        len(measures.list_lengths),
        limits.max_empty_list_rate,
        "empty-list rate",
        f"({empty} list(s) have no item that is eligible now)",
    )
    return check, {"empty_lists": empty, "empty_list_rate": round(rate, 6)}


def _policy(measures: ListMeasures, limits: GateLimits) -> tuple[Check, dict[str, Any]]:
    violating = measures.policy_violating_lists
    check, rate = _rate_check(
        "policy_violation_rate",
        violating,
        len(measures.list_lengths),
        limits.max_policy_violation_rate,
        "slate-policy violation rate",
        f"({measures.violations_by_rule})",
    )
    return check, {"policy_violating_lists": violating, "policy_violation_rate": round(rate, 6)}


def _scores(measures: ListMeasures, kind: ListKind) -> tuple[list[Check], dict[str, Any]]:
    nonfinite = measures.score_nonfinite
    count = measures.score_count
    spread = float(np.sqrt(measures.score_squares / count)) if count else 0.0
    metrics: dict[str, Any] = {"score_nonfinite": nonfinite, "score_std": round(spread, 6)}
    if measures.rows:
        metrics |= {
            "score_min": round(measures.score_min, 6) if count else 0.0,
            "score_mean": round(measures.score_mean, 6) if count else 0.0,
            "score_max": round(measures.score_max, 6) if count else 0.0,
        }
    checks = [
        Check(
            "score_finite",
            float(nonfinite),
            0.0,
            nonfinite == 0,
            f"{nonfinite} score(s) are NaN or infinite: the ranker or utility produced garbage",
        )
    ]
    if kind == "personalized" and measures.rows > 1:
        checks.append(
            Check(
                "score_spread",
                spread,
                0.0,
                spread > 0,
                "every score is identical across all lists: the ranker is not discriminating",
            )
        )
    return checks, metrics


def _freshness(
    measures: ListMeasures, limits: GateLimits, now: pd.Timestamp
) -> tuple[Check, dict[str, Any]]:
    oldest = measures.oldest_generated_at
    assert oldest is not None
    age_s = (now - oldest).total_seconds()
    expired = measures.expired_rows
    check = Check(
        "freshness",
        age_s,
        float(limits.max_age_s),
        age_s <= limits.max_age_s and expired == 0,
        f"oldest list was generated {age_s:.0f}s before publishing (max_age "
        f"{limits.max_age_s:.0f}s) and {expired} row(s) are already expired",
    )
    metrics = {
        "oldest_generated_at": oldest.isoformat(),
        "age_s": round(age_s, 3),
        "expired_rows": expired,
    }
    return check, metrics


def _person_rules(
    subject_ids: np.ndarray, *, surface: SurfaceConfig, kind: ListKind, person: PersonFacts | None
) -> dict[str, Any]:
    """Whether the person rules judged this version, and how many of its lists belong to
    people who may not get the surface now."""
    if kind != "personalized":
        return {"person_rules": NOT_PERSONAL}
    if person is None:
        return {"person_rules": NO_PERSON_FACTS}
    revoked = without_consent(pd.Series(subject_ids), surface=surface, facts=person)
    return {"person_rules": PERSON_RULES_APPLIED, "lists_without_consent": int(revoked.sum())}


def _facts_of(person: PersonFacts, subject_ids: np.ndarray) -> PersonFacts:
    """`person` narrowed to `subject_ids`: every person rule is per person, so judging some
    subjects' rows needs only their facts (and never scans everyone's per part)."""
    return PersonFacts(
        users=person.users[person.users["user_id"].isin(subject_ids)],
        interactions=person.interactions[person.interactions["user_id"].isin(subject_ids)],
        user_controls=person.user_controls[person.user_controls["user_id"].isin(subject_ids)],
        events=person.events[person.events["user_id"].isin(subject_ids)],
    )


def stored_depth(surface: SurfaceConfig) -> int:
    """Items a published list may hold: store_depth for final slates, the shortlist size for
    `storage_mode: candidate_pool`. The mean-length check stays against store_depth for both:
    a shortlist must hold at least a slate's worth, and its pool may be shorter than the
    shortlist size."""
    if surface.storage_mode == "candidate_pool":
        return surface.candidate_pool.shortlist_size
    return surface.store_depth


def depth_name(surface: SurfaceConfig) -> str:
    """The configuration key behind `stored_depth`, for messages."""
    if surface.storage_mode == "candidate_pool":
        return "candidate_pool.shortlist_size"
    return "store_depth"


def validated_columns(surface: SurfaceConfig) -> list[str]:
    """The columns the gate reads of `surface`'s lists: shortlists also say which rows are
    their stored slate (`in_slate`)."""
    if surface.storage_mode == "candidate_pool":
        return [*VALIDATED_COLUMNS, IN_SLATE_COLUMN]
    return VALIDATED_COLUMNS


def slate_rows(lists: pd.DataFrame, surface: SurfaceConfig) -> pd.DataFrame:
    """The rows the slate policy governs: every row of a final slate; of a shortlist, its
    stored slate (`in_slate`, first in batch order). The rest of a shortlist is candidates,
    to which serving applies the policy online when it reranks."""
    if surface.storage_mode != "candidate_pool" or IN_SLATE_COLUMN not in lists.columns:
        return lists
    return lists.loc[lists[IN_SLATE_COLUMN].to_numpy(dtype=bool)]


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
