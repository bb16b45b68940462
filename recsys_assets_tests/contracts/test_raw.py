"""Source-table contracts: every kind of violation names table, column, count and samples."""

from __future__ import annotations

from datetime import datetime

import pandas as pd
import pytest

from recsys_assets.contracts import ContractViolation, check_foreign_keys, validate_table
from recsys_assets.contracts.raw import OPTIONAL_TABLES, RAW_CONTRACTS
from recsys_assets.data.snapshot import empty_table

NOW = datetime(2026, 11, 20)
REGIONS = ("na", "eu")


def _interactions(**overrides: list) -> pd.DataFrame:
    data = {
        "user_id": [1, 2, 2],
        "item_id": [10, 10, 11],
        "event_type": ["view", "click", "rating"],
        "value": [1.0, 1.0, 4.5],
        "ts": pd.to_datetime(["2026-11-01", "2026-11-02", "2026-11-03"]),
    }
    return pd.DataFrame({**data, **overrides})


def _items(**overrides: list) -> pd.DataFrame:
    data = {
        "item_id": [10, 11],
        "item_type": ["product", "video"],
        "title": ["Lamp", None],
        "category": ["home", "movies"],
        "creator_id": ["c1", "c2"],
        "regions": ["*", "na|eu"],
        "status": ["active", "deleted"],
        "policy_state": ["approved", "banned"],
        "stock": [3, -1],
        "is_sponsored": [True, False],
        "campaign_id": ["cmp_1", None],
        "campaign_end": pd.to_datetime(["2026-12-01", None]),
        "risk_level": ["low", "high"],
        "tenant_id": [None, None],
        "required_role": [None, None],
        "case_state": [None, None],
        "created_at": pd.to_datetime(["2026-01-01", "2026-02-01"]),
    }
    return pd.DataFrame({**data, **overrides})


def _violation(error: pytest.ExceptionInfo[ContractViolation], column: str):
    found = [v for v in error.value.violations if v.column == column]
    assert found, f"no violation for {column!r} in {error.value}"
    return found[0]


def test_valid_tables_pass_and_coerce_to_contract_types() -> None:
    events = validate_table("interactions", _interactions(), now=NOW, regions=REGIONS)
    items = validate_table("items", _items(), now=NOW, regions=REGIONS)
    assert str(events["ts"].dtype) == "datetime64[ns]"
    assert items["stock"].dtype == "int64"


def test_missing_column_is_named_with_row_count() -> None:
    with pytest.raises(ContractViolation) as error:
        validate_table("interactions", _interactions().drop(columns=["event_type"]), now=NOW)
    violation = _violation(error, "event_type")
    assert violation.check == "missing column"
    assert violation.count == 3
    assert "user_id" in violation.samples[0]
    assert error.value.table == "interactions"


def test_wrong_type_reports_only_the_conversion_with_row_samples() -> None:
    frame = _interactions(user_id=[1, "abc", 2])
    with pytest.raises(ContractViolation) as error:
        validate_table("interactions", frame, now=NOW, source="events.csv")
    assert [v.column for v in error.value.violations] == ["user_id"]
    violation = error.value.violations[0]
    assert violation.check.startswith("wrong type")
    assert (violation.count, violation.samples) == (1, ("row 1: 'abc'",))
    assert "events.csv" in str(error.value)


def test_duplicate_keys_single_and_composite() -> None:
    with pytest.raises(ContractViolation) as error:
        validate_table("items", _items(item_id=[10, 10]), now=NOW)
    assert _violation(error, "item_id").check == "duplicate key"
    assert _violation(error, "item_id").count == 2

    editorial = pd.DataFrame(
        {
            "list_name": ["picks", "picks"],
            "region": ["na", "na"],
            "item_id": [10, 11],
            "position": [1, 1],
            "valid_from": pd.to_datetime(["2026-11-01"] * 2),
            "valid_to": pd.to_datetime(["2026-11-30"] * 2),
        }
    )
    with pytest.raises(ContractViolation) as error:
        validate_table("editorial", editorial, now=NOW)
    violation = _violation(error, "list_name+region+position")
    assert violation.count == 2 and len(violation.samples) == 2


def test_unknown_foreign_keys_are_counted_with_samples() -> None:
    tables = {
        "users": pd.DataFrame({"user_id": [1, 2]}),
        "items": pd.DataFrame({"item_id": [10]}),
        "interactions": _interactions(),
    }
    with pytest.raises(ContractViolation) as error:
        check_foreign_keys(tables, sources={"interactions": "events.csv"})
    violation = _violation(error, "item_id")
    assert violation.check == "unknown items.item_id"
    assert (violation.count, violation.samples) == (1, ("row 2: 11",))
    assert error.value.source == "events.csv"


def test_future_timestamps_are_rejected_relative_to_now() -> None:
    frame = _interactions(ts=pd.to_datetime(["2026-11-01", "2026-11-25", "2026-12-25"]))
    with pytest.raises(ContractViolation) as error:
        validate_table("interactions", frame, now=NOW)
    violation = _violation(error, "ts")
    assert "future" in violation.check and violation.count == 2


def test_required_tables_must_have_rows_optional_ones_may_be_empty() -> None:
    with pytest.raises(ContractViolation) as error:
        validate_table("interactions", _interactions().iloc[:0], now=NOW)
    assert _violation(error, "(table)").check.startswith("empty table")
    for table in OPTIONAL_TABLES:
        empty = validate_table(table, empty_table(table), now=NOW)
        assert list(empty.columns) == list(RAW_CONTRACTS[table].to_schema().columns)


def test_values_outside_the_allowed_sets() -> None:
    with pytest.raises(ContractViolation) as error:
        validate_table(
            "items",
            _items(status=["active", "archived"], regions=["*", "mars"], is_sponsored=[True, True]),
            now=NOW,
            regions=REGIONS,
        )
    assert _violation(error, "status").samples == ("row 1: 'archived'",)
    violation = _violation(error, "(row)")
    assert violation.check.startswith("sponsored items need")
    assert (violation.count, violation.samples) == (1, ("row 1: item_id=11",))
