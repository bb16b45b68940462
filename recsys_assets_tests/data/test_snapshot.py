"""The raw-table reader pipeline code uses: clear errors before any data exists."""

from __future__ import annotations

import pytest

from recsys_assets.data import RawDataMissing, read_raw, read_snapshot
from recsys_assets.warehouse import Warehouse


def test_reading_before_seed_or_import_says_what_to_do(local_warehouse: Warehouse) -> None:
    with pytest.raises(RawDataMissing, match=r"run `recsys seed` or `recsys import` first"):
        read_snapshot(local_warehouse)
    with pytest.raises(RawDataMissing, match="wanted table 'items'"):
        read_raw(local_warehouse, "items")
    with pytest.raises(ValueError, match="unknown source table 'item'"):
        read_raw(local_warehouse, "item")


def test_tables_withdrawn_mid_write_are_not_read(tiny_warehouse: Warehouse) -> None:
    assert len(read_raw(tiny_warehouse, "users", columns=["user_id", "region"]).columns) == 2
    tiny_warehouse.delete("raw/_snapshot.json")
    with pytest.raises(RawDataMissing):
        read_raw(tiny_warehouse, "users")


def test_a_missing_table_is_named(tiny_warehouse: Warehouse) -> None:
    tiny_warehouse.delete("raw/editorial", recursive=True)
    with pytest.raises(RawDataMissing, match="source table 'editorial' is missing"):
        read_raw(tiny_warehouse, "editorial")
