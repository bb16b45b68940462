"""The validation gate: each check catches what it is for, with a reason a human can act on."""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import pandas as pd
import pytest

from recsys_assets.publish.lists import finalize_lists
from recsys_assets.publish.validation import (
    NO_PERSON_FACTS,
    PERSON_RULES_APPLIED,
    GateLimits,
    ValidationReport,
    validate_lists,
)
from recsys_assets.rules.categories import UNKNOWN_CATEGORY
from recsys_assets.rules.person import read_person_facts
from recsys_assets.serving.state import OnlineState, ServingEvent
from recsys_assets.warehouse import Warehouse
from recsys_assets_tests.publish.builders import (
    NOW,
    REGION,
    SURFACE,
    later,
    make_lists,
    make_users,
    settings,
    write_raw_snapshot,
)


def _validate(lists: pd.DataFrame, items: pd.DataFrame, subjects: pd.DataFrame, **kw):
    config = settings()
    records = finalize_lists(lists, surface=SURFACE, region=REGION, version="v1", fallback=False)
    return validate_lists(
        records,
        surface=config.surface(SURFACE),
        region=REGION,
        items=items,
        limits=GateLimits.for_lists(config.publish.thresholds),
        now=kw.pop("now", later(1)),
        subjects=subjects,
        **kw,
    )


def _failed(report: ValidationReport) -> set[str]:
    return {check.name for check in report.checks if not check.passed}


def test_good_lists_pass_every_check() -> None:
    report = _validate(*make_lists())
    assert report.passed, report.failures
    assert report.metrics["coverage"] == 1.0
    assert report.metrics["invalid_item_rate"] == 0.0
    assert "| coverage | 1 | 0.95 | pass |" in report.to_markdown()
    assert ValidationReport.from_dict(report.to_dict()) == report


def test_items_that_became_ineligible_count_against_the_list() -> None:
    lists, items, subjects = make_lists()
    items.loc[items["item_id"] == 1, "status"] = "deleted"
    items.loc[items["item_id"] == 2, "stock"] = 0
    report = _validate(lists, items[items["item_id"] != 3], subjects)
    assert _failed(report) == {"invalid_item_rate"}
    assert report.invalid_by_reason == {
        "inactive_or_deleted": 1,
        "out_of_stock": 1,
        "unknown_item": 1,
    }
    assert "invalid-item rate 0.0600 > max_invalid_item_rate 0.02" in report.failures[0]


def test_a_consumer_list_with_a_tenant_item_is_invalid() -> None:
    lists, items, subjects = make_lists()
    items.loc[items["item_id"] <= 5, "tenant_id"] = "acme"
    report = _validate(lists, items, subjects)
    assert report.invalid_by_reason.get("tenant_not_allowed", 0) > 0


def test_low_coverage_duplicates_policy_and_scores_are_refused() -> None:
    lists, items, subjects = make_lists(n_subjects=5)
    extra = pd.concat([subjects, subjects.assign(subject_id=subjects["subject_id"] + 1000)])
    lists.loc[(lists["subject_id"] == 100) & (lists["position"] == 2), "item_id"] = 1
    items.loc[items["item_id"].isin([4, 5, 6]), "category"] = "same"  # push: max 2 per category
    lists.loc[lists.index[:3], "score"] = np.nan
    report = _validate(lists, items, extra)
    assert _failed(report) == {
        "coverage",
        "duplicate_rate",
        "policy_violation_rate",
        "score_finite",
    }
    assert report.policy_violations_by_rule["max_per_category"] >= 1
    assert any("5 of 10 eligible subjects have a list" in f for f in report.failures)


def test_constant_scores_short_and_malformed_lists_are_refused() -> None:
    lists, items, subjects = make_lists()
    lists["score"] = 0.5
    lists = lists[lists["position"] <= 3].copy()
    lists.loc[lists.index[0], "position"] = 7  # a gap: positions are not 1..n
    report = _validate(lists, items, subjects)
    assert {"score_spread", "mean_list_length_ratio", "well_formed"} <= _failed(report)


@pytest.mark.parametrize("age", [timedelta(hours=3), timedelta(hours=1, minutes=30)])
def test_stale_or_expired_lists_are_refused(age: timedelta) -> None:
    lists, items, subjects = make_lists(score_time=NOW - age)  # push ttl 2h, max_age 2h
    report = _validate(lists, items, subjects, now=NOW)
    assert _failed(report) == ({"freshness"} if age > timedelta(hours=2) else set())


def test_lists_where_every_item_is_now_invalid_are_empty() -> None:
    lists, items, subjects = make_lists()
    mine = lists.loc[lists["subject_id"] == 100, "item_id"]
    items.loc[items["item_id"].isin(mine), "policy_state"] = "banned"
    report = _validate(lists, items, subjects)
    assert report.metrics["empty_lists"] >= 1
    assert "empty_list_rate" in _failed(report)


def test_the_category_cap_ignores_uncategorised_items() -> None:
    """Like the slate policy: the importer's 'unknown' is not one category to cap."""
    lists, items, subjects = make_lists()
    items["category"] = UNKNOWN_CATEGORY  # push: max 2 per category
    assert _validate(lists, items, subjects).policy_violations_by_rule["max_per_category"] == 0
    items["category"] = "one"
    assert _validate(lists, items, subjects).policy_violations_by_rule["max_per_category"] >= 1


def test_person_rules_judge_consent_and_hides_as_serving_received_them(
    local_warehouse: Warehouse,
) -> None:
    lists, items, subjects = make_lists()
    write_raw_snapshot(local_warehouse, users=make_users(subjects), items=items)
    revoked, hider = 101, 102
    hidden = int(lists.loc[lists["subject_id"] == hider, "item_id"].iloc[0])
    serving = OnlineState(local_warehouse, settings(), clock=lambda: pd.Timestamp(NOW).value)
    serving.record(  # as POST /v1/events writes them
        [
            ServingEvent("consent_revoked", user_id=revoked),
            ServingEvent("hide_item", user_id=hider, item_id=hidden),
        ]
    )

    facts = read_person_facts(local_warehouse)
    assert facts is not None
    report = _validate(lists, items, subjects, person=facts)
    assert report.metrics["person_rules"] == PERSON_RULES_APPLIED
    assert report.metrics["lists_without_consent"] == 1
    depth = settings().surface(SURFACE).store_depth
    assert report.invalid_by_reason == {"consent_revoked": depth, "hidden_by_user": 1}
    assert "1 list(s) of people without consent now" in report.to_markdown()


def test_without_a_users_table_the_person_rules_say_they_were_not_applicable(
    local_warehouse: Warehouse,
) -> None:
    """A partial warehouse (a snapshot marker, no tables) has no person facts: said, not
    silently passed, and nothing crashes."""
    lists, items, subjects = make_lists()
    local_warehouse.write_json("raw/_snapshot.json", {"snapshot_id": "snap_partial"})
    assert read_person_facts(local_warehouse) is None

    report = _validate(lists, items, subjects, person=None)
    assert report.passed, report.failures
    assert report.metrics["person_rules"] == NO_PERSON_FACTS
    assert "lists_without_consent" not in report.metrics
    assert f"person rules (consent, hidden, consumed): {NO_PERSON_FACTS}" in report.to_markdown()
